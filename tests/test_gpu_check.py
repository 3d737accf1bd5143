"""tools/gpu_check.py without a GPU: its help, its process control (time boxes, failures reported while the
other parts still run, rows echoed and written), and the parts that can run on CPU."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron.core.transformer.enums import AttnMaskType

from megatron_ext import layers
from tools import gpu_check

ROWS = "| part | check | value | limit | verdict |"


def _check(tmp_path, *args: str) -> tuple[str, str]:
    out = tmp_path / "gpu_check.md"
    run = subprocess.run([sys.executable, "-m", "tools.gpu_check", "--device", "cpu", "--workdir", str(tmp_path / "work"),
                          "--out", str(out), *args], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout, out.read_text()


def test_help_documents_every_part_and_its_time_box():
    text = subprocess.run([sys.executable, "-m", "tools.gpu_check", "--help"], capture_output=True, text=True).stdout
    for name, seconds in gpu_check.BOXES.items():
        assert re.search(rf"^  {name} +{seconds}  ", text, re.MULTILINE), name
    default = [name for name in gpu_check.PARTS if name not in gpu_check.OPTIONAL]
    without_te = [name for name in default if name not in gpu_check.TE_BOXES]
    assert sum(gpu_check.BOXES[name] for name in without_te) <= 360  # the default check in at most 6 minutes
    assert default[-len(gpu_check.TE_BOXES):] == list(gpu_check.TE_BOXES)  # with TE: its parts after the rest
    assert "--box PART=SECONDS" in text


def test_a_budget_cuts_the_boxes_and_skips_what_it_cannot_cover(tmp_path):
    stdout, _ = _check(tmp_path, "--parts", "attention,kernels", "--budget", "1")
    assert [x for x in stdout.splitlines() if x.startswith("| ")][1:3] == [
        f"| {name} | not run: 0 s of --budget 1 left | | | SKIPPED |" for name in ("attention", "kernels")]
    assert not (tmp_path / "work" / "attention.log").exists()
    stdout, _ = _check(tmp_path, "--parts", "attention", "--budget", "90", "--box", "attention=200")
    box = re.search(r"\| attention \| (?:seconds \| \d+ \| <= |time box \| stopped after )(\d+) s?", stdout)
    assert box and int(box.group(1)) < 90, stdout


def test_te_parts_without_transformer_engine_are_one_skipped_row_each(tmp_path, monkeypatch, capsys):
    from megatron_ext import gpu_stack

    monkeypatch.setattr(gpu_stack, "transformer_engine_error", lambda: "ImportError: No module named 'transformer_engine'")
    before = signal.getsignal(signal.SIGTERM)
    gpu_check.main(["--device", "cpu", "--parts", ",".join(gpu_check.TE_BOXES), "--out", str(tmp_path / "check.md"),
                    "--workdir", str(tmp_path / "work")])
    # its SIGTERM handler was for the run only: left behind in this process, it broke a datatrove worker pool's
    # shutdown in a later test (the pool's idle workers, forked from here, raised it instead of ending)
    assert signal.getsignal(signal.SIGTERM) is before
    assert _rows(capsys)[1:-1] == [[name, "needs Transformer Engine", "ImportError: No module named 'transformer_engine'",
                                    "", "SKIPPED"] for name in gpu_check.TE_BOXES]
    assert not any((tmp_path / "work").iterdir())  # no part process ran


def test_a_failing_part_and_an_overrunning_part_are_reported_and_the_rest_runs(tmp_path):
    # attention's box is its CPU time many times over: the GPU's default (32 s) is not a CPU's under a loaded CI, where
    # a part that overran it made this test fail by timing (what the test holds is that a finished part's row says so)
    stdout, written = _check(tmp_path, "--parts", "bench,resume,kernels,attention", "--box", "resume=4",
                             "--box", "kernels=3", "--box", "attention=300")
    lines = [x for x in stdout.splitlines() if x.startswith("| ")]
    assert lines[0] == ROWS
    bench, resume, kernels, *attention, total = lines[1:]
    assert re.fullmatch(r"\| all \| seconds since the command started \| \d+ \| \| \|", total)
    checks = [x for x in attention[:-1] if " deterministic (" not in x]
    assert len(checks) == 8 and all(x.startswith("| attention |") and x.endswith("| pass |") for x in checks)
    assert re.fullmatch(r"\| attention \| seconds \| \d+ \| <= 300 \| \|", attention[-1])  # a finished part's time
    assert bench.startswith("| bench | exit code 1 |") and "CUDA" in bench and bench.endswith("| FAILED |")
    assert resume == "| resume | time box | stopped after 4 s | | TIMEOUT |"
    assert kernels == "| kernels | time box | stopped after 3 s | | TIMEOUT |"
    assert all(x in written for x in lines)  # --out holds what the terminal showed
    assert re.search(r"^start-up: [\d.]+ s to start Python and import torch; [\d.]+ s to import megatron-core and fla; "
                     r"[\d.]+ s more for CUDA",
                     (tmp_path / "work" / "attention.log").read_text(), re.MULTILINE)  # where a box goes first


def test_kill_tree_reaches_processes_in_sessions_of_their_own():
    """What torchrun does with its ranks (and the resume part with its trainer): a child in a new session,
    which a signal to the launcher's process group misses."""
    import psutil

    launcher = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; subprocess.Popen([sys.executable, "
                                 "'-c', 'import time; time.sleep(120)'], start_new_session=True); time.sleep(120)"],
                                start_new_session=True)
    deadline = time.time() + 30  # until the child is in its own session (it is in the tree before its setsid)
    while (len(tree := gpu_check.process_tree(launcher.pid)) < 2 or os.getsid(tree[1].pid) == os.getsid(launcher.pid)) \
            and time.time() < deadline:
        time.sleep(0.05)
    assert len(tree) == 2 and os.getsid(tree[1].pid) != os.getsid(launcher.pid)
    gpu_check.kill_tree(launcher.pid)
    launcher.wait(timeout=10)

    def gone(p):
        try:
            return p.status() == psutil.STATUS_ZOMBIE  # killed; its new parent has not reaped it yet
        except psutil.NoSuchProcess:
            return True

    deadline = time.time() + 10
    while not all(gone(p) for p in tree) and time.time() < deadline:
        time.sleep(0.05)
    assert all(gone(p) for p in tree)


def test_a_terminated_check_stops_its_running_part(tmp_path):
    """``timeout`` signals the check, not the part (in a session of its own, like torchrun's ranks): the part once
    trained on beside the benchmark that followed it. Now the check stops the part, says so, and exits."""
    import psutil

    out = tmp_path / "gpu_check.md"
    check = subprocess.Popen([sys.executable, "-m", "tools.gpu_check", "--device", "cpu", "--workdir",
                              str(tmp_path / "work"), "--out", str(out), "--parts", "resume,kernels"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while len(tree := gpu_check.process_tree(check.pid)) < 2 and time.time() < deadline:
        time.sleep(0.05)
    assert len(tree) >= 2, "the part's process never started"
    check.send_signal(signal.SIGTERM)
    assert check.wait(timeout=60) == 128 + signal.SIGTERM, check.stderr.read()[-2000:]
    part, stopped = [x for x in out.read_text().splitlines() if x.startswith("| ")][1:]
    assert re.fullmatch(r"\| resume \| terminated \| after \d+ s, by a signal to the check \| \| STOPPED \|", part)
    assert re.fullmatch(r"\| all \| terminated after \d+ s, at part resume; the parts after it did not run \| \| \| "
                        r"STOPPED \|", stopped)
    for p in tree[1:]:
        with contextlib.suppress(psutil.NoSuchProcess):
            assert p.wait(timeout=10) is not None or not p.is_running()


def test_a_signal_while_the_part_starts_still_stops_it(tmp_path):
    """SIGTERM can come inside Popen, after its fork and before it returns the part's handle (a fresh-clone CI met
    it: the test above signals as soon as the part's process appears, and the check then stopped with no row for
    the part, leaving it running): the part is stopped all the same, and its row says so. In a process of its
    own, where the part is the only child (the check stops every child it has)."""
    import psutil

    script = f"""
import argparse, io, subprocess, sys
from tools import gpu_check
start = subprocess.Popen
def popen_then_signal(cmd, **kwargs):  # the part's process starts, then the signal's handler raises in Popen
    part = start([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True,
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    print(part.pid, flush=True)
    raise gpu_check.Terminated
subprocess.Popen = popen_then_signal
try:  # the row is printed as it is written
    gpu_check.run_part("resume", 60, argparse.Namespace(device="cpu", resume_steps=2, workdir={str(tmp_path)!r}),
                       io.StringIO())
except gpu_check.Terminated:
    pass
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])
    pid, *rows = run.stdout.splitlines()
    try:
        assert len(rows) == 1, run.stderr[-2000:]
        assert re.fullmatch(r"\| resume \| terminated \| after \d+ s, by a signal to the check \| \| STOPPED \|", rows[0])
        with contextlib.suppress(psutil.NoSuchProcess):  # reaped by the check, or a zombie its exit left to init
            assert psutil.Process(int(pid)).status() == psutil.STATUS_ZOMBIE
    finally:
        with contextlib.suppress(psutil.NoSuchProcess):
            psutil.Process(int(pid)).kill()


def test_unknown_part_is_refused():
    run = subprocess.run([sys.executable, "-m", "tools.gpu_check", "--parts", "kernels,speed"], capture_output=True,
                         text=True)
    assert run.returncode != 0 and "unknown ['speed']" in run.stderr


def _rows(capsys) -> list[list[str]]:
    return [[c.strip() for c in x.split("|")[1:-1]] for x in capsys.readouterr().out.splitlines() if x.startswith("| ")]


def test_kernels_part_on_cpu(capsys, tmp_path):
    gpu_check.part_kernels("cpu", tmp_path)  # the torch kernels in bf16 against fp32: the same checks fla gets on CUDA
    rows = _rows(capsys)
    assert [r[1] for r in rows if r[4] == "pass"] == [
        "gated delta rule output, torch bf16 vs torch fp32", *(f"gated delta rule d{x}" for x in "q k v g beta".split()),
        *(f"causal conv1d {x}, torch bf16 vs torch fp32" for x in ("output", "dx", "dweight")),
        "weight gradient added in its GEMM, bf16 into fp32, vs float64 (limit: the unfused path's error)"]
    assert ["kernels", "torch gated delta rule deterministic (two runs, same bits)", "yes", "", ""] in rows


def test_attention_part_on_cpu(capsys):
    """The CUDA procedure with the masked path in bf16 for the fused kernel: outputs and gradients of two
    layouts in turn (on the GPU the second layout's gradients once came from tensors the first had made
    non-leaves: an AttributeError no CPU run had reached)."""
    gpu_check.part_attention("cpu")
    rows = _rows(capsys)
    determinism = rows.pop(4)
    assert [(r[1].split(", ")[0], r[1].split(": ")[-1], r[4]) for r in rows] == [
        ("masked bf16 vs masked fp32", name, "pass") for name in ("output", "dq", "dk", "dv")] * 2
    assert ["one document:" in r[1] for r in rows] == [False] * 4 + [True] * 4
    assert determinism[1:3] == ["masked bf16 deterministic (two runs, same bits: output, gradients)", "yes"]


class TESignatureAttention(layers.PackedDotProductAttention):
    """The masked path behind the forward signature of megatron-core's TEDotProductAttention (tests/test_te_modules.py
    holds the two equal where TE imports): ``attn_mask_type`` is required, and TE reads ``attn_mask_type.name``."""

    def forward(self, query, key, value, attention_mask, attn_mask_type, attention_bias=None, packed_seq_params=None,
                num_splits=None):
        return super().forward(query, key, value, attention_mask, AttnMaskType[attn_mask_type.name], attention_bias,
                               packed_seq_params)


def test_te_attention_part_calls_the_module_as_te_must_be_called(capsys, monkeypatch):
    """The te_attention procedure on CPU, TE's attention stood in for by the masked path with TE's signature: the
    part once called it without ``attn_mask_type``, a TypeError that only a GPU session would have met."""
    real = gpu_check.core_attention

    def core_attention(kernel, *args, **kwargs):
        module = real("masked" if kernel == "te" else kernel, *args, **kwargs)
        if kernel == "te":
            module.__class__ = TESignatureAttention
        return module

    monkeypatch.setattr(gpu_check, "core_attention", core_attention)
    gpu_check.part_attention("cpu", kernel="te", part="te_attention")
    rows = _rows(capsys)
    assert [(r[0], r[1].split(", ")[0], r[1].split(": ")[-1], r[4]) for r in rows if "deterministic" not in r[1]] == [
        ("te_attention", "te bf16 vs masked fp32", name, "pass") for name in ("output", "dq", "dk", "dv")] * 2


def test_flex_part_on_cpu(capsys):
    gpu_check.part_attention("cpu", kernel="flex")  # FlexAttention eagerly in bf16 vs masked fp32, forward only
    rows = _rows(capsys)
    assert rows.pop(1)[1:3] == ["flex bf16 deterministic (two runs, same bits: output)", "yes"]
    assert [(r[1].split(", ")[0], r[1].split(": ")[-1], r[4]) for r in rows] == [
        ("flex bf16 vs masked fp32", "output", "pass")] * 2


def test_syncs_part_on_cpu(capsys):
    """The trainer's step at two depths runs outside the trainer (syncs themselves are counted on CUDA only)."""
    gpu_check.part_syncs("cpu")
    assert [r[1] for r in _rows(capsys)] == ["training step, 4 layers", "training step, 8 layers"]


STEP = {"train.py:94": 1, "clip_grads.py:133": 1}  # the trainer's reduction, megatron's clipping .item()


@pytest.mark.parametrize("at4, at8, verdict", [
    ({**STEP, "__init__.py:1270": 1}, STEP, "pass"),  # H100, 2026-11-27: once per process, in the first model
    (STEP, STEP, "pass"),
    ({"utils.py:1206": 45}, {"utils.py:1206": 82}, "FAIL"),  # H200, 2026-11-26: one per parameter tensor
    (STEP, {**STEP, "layers.py:287": 1}, "FAIL"),  # a sync that only a deeper model has
    # a sync per attention layer (1 of 4 layers, 2 of 8) behind a one-time sync: equal totals, still caught
    ({**STEP, "__init__.py:1270": 1, "layers.py:287": 1}, {**STEP, "layers.py:287": 2}, "FAIL"),
    ({"train.py:94": 9}, {"train.py:94": 9}, "FAIL"),  # not growing, but not the small constant either
])
def test_syncs_verdict(at4, at8, verdict):
    import collections

    assert gpu_check.syncs_verdict({4: collections.Counter(at4), 8: collections.Counter(at8)}) == verdict


def test_parity_part_on_cpu(capsys):
    gpu_check.part_parity("cpu")
    logits, grads = _rows(capsys)
    assert logits[1] == "logits, megatron_ext vs transformers, fp32 on cpu" and logits[4] == "pass"
    assert grads[1].startswith("gradients of 56 parameters") and grads[4] == "pass"


def test_compiled_part_on_cpu(capsys):
    """Inductor's C++ kernels on CPU: the part turns dynamo on, which megatron_ext.cpu_patches turns off."""
    import torch

    from megatron_ext import layers

    from unittest import mock

    from megatron.core.fusions import fused_cross_entropy

    layers.rms_norm.compiled(torch.ones(2, 4), torch.ones(4), 1e-6, True)  # run while dynamo is off: skipped after
    fused = fused_cross_entropy._VocabParallelCrossEntropy
    with mock.patch.object(fused, "backward", mock.Mock(wraps=fused.backward)) as backward:
        gpu_check.part_compiled("cpu")
    assert backward.call_count == 0  # the loss the trainer runs: megatron's unfused one (megatron_ext/config.py)
    for chain in (layers.rms_norm, layers.gdn_gates, layers.gated_rms_norm):  # compiled, not eager twice
        assert torch._dynamo.eval_frame._debug_get_cache_entry_list(chain.eager.__code__), chain.__name__
    assert torch._dynamo.config.disable  # turned back off
    logits, loss, grads, worst, seconds = _rows(capsys)
    assert logits[1].startswith("logits, compiled elementwise bf16") and logits[4] == "pass"
    assert loss[1].startswith("per-token losses, compiled elementwise bf16") and loss[4] == "pass"
    assert grads[1].startswith("gradients (all, norm-wise), compiled elementwise bf16") and grads[4] == "pass"
    assert worst[1].startswith("gradient of the worst parameter") and worst[4] == ""  # shown, not judged
    assert seconds[1].startswith("first forward and backward, compiling included, s (eager's: ")
    assert float(seconds[2]) > 0


@pytest.mark.parametrize("steps", [4])
def test_resume_part_on_cpu(capsys, tmp_path, monkeypatch, steps):
    monkeypatch.chdir(tmp_path)  # the default --workdir is relative (a relative mix path once went beside the recipe)
    for name in ("uninterrupted", "killed"):  # what an earlier check left: its runs must not be resumed
        stale = Path("out/gpu_check", name)
        (stale / "checkpoints").mkdir(parents=True)
        (stale / "checkpoints" / "latest").write_text("iter_0000099")
        (stale / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    gpu_check.part_resume("cpu", Path("out/gpu_check"), resume_steps=steps)
    rows = _rows(capsys)
    assert [r[4] for r in rows[:5]] == ["pass", "pass", "pass", "", "pass (bit-identical)"]
    assert rows[0][2] == "iter_0000002" and rows[2][2] == "yes"
    assert rows[3][1] == f"the same first {steps // 2} steps in two processes: bit-identical (deterministic)"
    assert rows[3][2] == "yes"
    # the deterministic attention (FlashAttention's backward is not), so that anything but the same bits fails
    assert "attention kernel: masked (requested masked" in (tmp_path / "out/gpu_check/uninterrupted.log").read_text()


def test_parity_compares_model_code_on_transformers_reference_kernels():
    """The parity part swaps transformers' fla-dispatching GDN kernels for their pure-torch references
    while it compares, and puts them back."""
    import inspect

    from transformers.models.qwen3_5 import modeling_qwen3_5 as module

    from tools.parity import HF_KERNELS, reference_kernels
    from tools.tiny_qwen35 import causal_lm

    before = {name: getattr(module, name) for name in HF_KERNELS}
    assert all(fn is not inspect.unwrap(fn) for fn in before.values())  # dispatching wrappers
    with reference_kernels(causal_lm()):
        assert all(getattr(module, name) is inspect.unwrap(fn) for name, fn in before.items())
    assert {name: getattr(module, name) for name in HF_KERNELS} == before


def test_the_parent_process_loads_no_model_stack_where_cuda_is_present():
    """On a GPU node the check's parent only reads versions and runs parts: importing it (and megatron_ext)
    loads neither megatron-core nor fla nor transformers, which took it about 20 s on an H100 before each
    command's first part. (CUDA is faked present: on CPU megatron_ext applies megatron's CPU patches.)"""
    code = ("import sys, torch; torch.cuda.is_available = lambda: True; import tools.gpu_check; "
            "print(sorted(m for m in ('megatron', 'fla', 'transformers', 'triton') if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", code], cwd=gpu_check.ROOT, capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "[]", run.stdout
