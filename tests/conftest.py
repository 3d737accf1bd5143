"""Shared fixtures: one single-process megatron world per test session and tiny random Qwen3.5 models."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
import yaml

from megatron_ext import parallel
from tools.float64 import float64  # noqa: F401  (tests import it from here)
from tools.parity import megatron_twin  # noqa: F401  (tests import it from here)


@pytest.fixture(scope="session", autouse=True)
def megatron_world():
    parallel.initialize(tensor_parallel=1, pipeline_parallel=1, seed=1234)
    yield


DEMO = Path(__file__).resolve().parents[1] / "data" / "demo"


def compressed(body: bytes, suffix: str) -> bytes:
    """``body`` as a file of that suffix holds it (.gz, .bz2, .xz, .zst; anything else: as it is)."""
    import bz2
    import gzip
    import lzma

    import zstandard

    return {".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress,
            ".zst": zstandard.ZstdCompressor().compress}.get("." + suffix.rsplit(".", 1)[-1], bytes)(body)


def tiny_hf_dir(path: Path, seed: int, chat_template: str | None = None, release: bool = False) -> Path:
    """A tiny random Qwen3_5ForCausalLM directory with the demo tokenizer (vocabulary padded to 2048); ``release``:
    in the small releases' layout instead (Qwen3_5ForConditionalGeneration, tied; by the top-level flag only, the
    one transformers' multimodal class reads)."""
    from tools.tiny_qwen35 import causal_lm, multimodal, text_config

    if release:
        multimodal(seed, tie_word_embeddings=True, vocab_size=2048).save_pretrained(path)
    else:
        causal_lm(text_config(vocab_size=2048), seed=seed).save_pretrained(path)
    for f in (DEMO / "tokenizer").iterdir():
        shutil.copy2(f, path / f.name)
    if chat_template:
        cfg = json.loads((path / "tokenizer_config.json").read_text())
        cfg["chat_template"] = chat_template
        (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    return path


def trainer_command(config: Path, *extra: str, nproc: int = 1) -> list[str]:
    """The trainer's command line: one process, or torchrun with ``nproc`` ranks (gloo on CPU). ``--standalone``:
    torchrun binds its own free port (a port picked here and bound later could be taken in between)."""
    from tools import gpu_check

    if nproc == 1:
        return gpu_check.trainer_command(config, *extra)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "megatron_ext.train", "--config", str(config), *extra]


def kill_after_first_checkpoint(config: Path, nproc: int = 1) -> None:
    """SIGKILL the run right after its first checkpoint, and check that nothing of it goes on: a missed rank
    would train on into the run directory (it did, when only torchrun's process group was killed)."""
    from tools import gpu_check

    run_dir = Path(yaml.safe_load(config.read_text())["run_dir"])
    gpu_check.kill_after_first_checkpoint(trainer_command(config, nproc=nproc), run_dir)
    written = [(run_dir / f).read_bytes() for f in ("metrics.jsonl", "checkpoints/latest")]
    time.sleep(3)  # a few steps of these tiny runs
    assert [(run_dir / f).read_bytes() for f in ("metrics.jsonl", "checkpoints/latest")] == written


def run_trainer(config: Path, *extra: str, nproc: int = 1, check: bool = True,
                timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the trainer as users do; output goes to files, and whatever the run leaves behind (a killed
    run's checkpoint-writer helpers) is killed with its process group. A run still going after ``timeout``
    fails the test with every process's stacks (the trainer's SIGUSR1 handler) instead of hanging the suite."""
    from tools.gpu_check import kill_tree, process_tree

    cmd = trainer_command(config, *extra, nproc=nproc)
    out, err = config.with_suffix(".out"), config.with_suffix(".err")
    with open(out, "w") as o, open(err, "w") as e:
        proc = subprocess.Popen(cmd, stdout=o, stderr=e, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            tree = process_tree(proc.pid)
            for p in tree if nproc == 1 else tree[1:]:  # the ranks and their helpers; SIGUSR1 would kill torchrun
                p.send_signal(signal.SIGUSR1)
                time.sleep(0.5)  # one at a time: they share the stderr file
            kill_tree(proc.pid)
            proc.wait()
            pytest.fail(f"{' '.join(cmd)} still running after {timeout:.0f} s; its stacks:\n{err.read_text()[-20000:]}")
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    run = subprocess.CompletedProcess(cmd, code, out.read_text(), err.read_text())
    if check:
        assert run.returncode == 0, run.stderr[-3000:]
    return run


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def hold_in_another_process(directory: Path, hold: str = "hold_directory") -> subprocess.Popen:
    """A process holding ``directory`` as a running job does (preprocessing.atomic's ``hold``), once it says so."""
    code = (f"import sys, time\nfrom preprocessing.atomic import {hold}\n"
            f"with {hold}(sys.argv[1], 'job'):\n    print('held', flush=True)\n    time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(directory)], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[1])
    assert holder.stdout.readline() == "held\n"
    return holder


@contextmanager
def own_session(cmd: list[str]) -> Iterator[subprocess.Popen]:
    """``cmd`` (run from the repository) in a session of its own, output discarded; every process of the session is
    killed when the block ends."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            cwd=Path(__file__).resolve().parents[1])
    try:
        yield proc
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def processes_left_by_sigterm(proc: subprocess.Popen) -> list[str]:
    """SIGTERM to ``proc`` alone, as ``kill PID`` or ``timeout`` sends it: the processes of its session (started by
    :func:`own_session`) still running 10 s after it ended."""
    os.kill(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)
    deadline = time.time() + 10
    while (alive := live_processes_of_session(proc.pid)) and time.time() < deadline:
        time.sleep(0.2)
    return alive


def live_processes_of_session(sid: int) -> list[str]:
    """The processes of session ``sid`` that still run (zombies, waiting for init to reap them, do not)."""
    live = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":  # fields after the name: state, ppid, pgrp, session
            live.append(stat.parent.name)
    return live
