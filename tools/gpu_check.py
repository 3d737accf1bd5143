"""The GPU check: one command for a GPU node with the training stack installed (no pip, no network, an
empty kernel cache), done in at most 6 minutes. Each part runs in its own process under its own time box,
so a part that runs long or crashes is reported and the others still run; each result row is printed
(markdown) as soon as it is known and appended to ``--out``.

    python -m tools.gpu_check [--out gpu_check.md] [--parts kernels,parity,resume,bench] [--box resume=150]
                              [--budget 570]

Parts, in the order they run, and their time boxes (seconds):
  attention  32  the local spec's fused attention (FlashAttention-2 through torch.nn.attention.varlen) in
                bf16 vs the masked path in fp32 on a packed row of 4096 tokens with the 2B attention geometry
                (8 query heads on 2 KV heads of 256), 1-token documents and a one-document row: outputs and
                dq, dk, dv, on memory filled with NaN first (a kernel reading what it did not write fails).
                FlashAttention ships compiled in torch: this part compiles nothing.
  kernels   40  fla vs the pure-torch GDN kernels (gated delta rule, causal conv1d), bf16, packed documents
                with the 2B GDN geometry (16 key / 16 value heads of 128): outputs and gradients, and
                whether two identical fla runs give identical bits (determinism). On CUDA it adds the
                configurations fla's autotuning chose to --workdir/fla_configs/ (megatron_ext/fla_configs.py:
                shipped, a fresh node skips the autotuning), every 10 s and at the end (a part stopped by
                its box keeps them), and reads them back through fla's lookup; so does bench, for
                transformers' shapes.
  resume   116  the trainer in bf16 with the distributed optimizer on the demo mix, from a base stored as the
                releases are (bf16, fp32 GDN A_log and output norm, which train in fp32): 20 steps SIGKILLed
                (every process) right after the step-10 checkpoint, then rerun, which must resume from it,
                side by side with 20 steps uninterrupted; losses bit-identical, or within 1e-4
                relative (a lost Adam state moves them by ~1e-3). It says whether the same steps in two
                processes gave the same bits, and runs the masked attention: FlashAttention's backward is
                not deterministic.
  bench    123  tools.bench_train on the 2B shape (APPROX_2B, seq 4096), its "quick" rows: ours (auto
                backend and kernels) vs transformers + fla, both with full recomputation (the same memory
                policy): tokens/s, MFU, peak memory. It builds two 2B models and compiles transformers' fla calls.
  parity    44  transformers vs megatron_ext on CUDA, float32 both sides (TF32 off), a random model with
                the real head sizes (attention head_dim 256; GDN 16 key and 16 value heads of 128):
                logits and every parameter's gradient. Both on the pure-torch GDN kernels (fla's are the
                kernels part's subject; compiling its fp32 ones overran 195 s on a fresh H200).
Not in the default list (name it in --parts):
  flex     120  the attention checks for FlexAttention (attention_kernel: flex), which torch.compile builds
                for head_dim 256 first; a comparison for choosing the kernel, not needed for training.
  syncs     60  host syncs in one training step (the trainer's forward_step, schedule, step reduction and
                optimizer step) under torch.cuda.set_sync_debug_mode("warn"), at 4 and at 8 layers with the
                2B head geometry: no source line may sync more often in the deeper model, and the total
                stays at most MAX_SYNCS; where each sync comes from goes to the part's log.
  compiled 150  compile_elementwise (megatron_ext/fusions.py: norms, GDN gates, SwiGLU, and megatron's fused cross
                entropy, compiled by torch.compile) in bf16 vs the local spec in fp32, a random model with the
                2B's head geometry: logits, per-token losses and gradients, held to twice eager bf16's error
                like te_parity; a row gives both models' first forward and backward
                (the eager one's includes fla's compiling, the compiled one's its own). Its box is a guess:
                not in the default run until it is timed on a GPU.
Transformer Engine parts, in the default run after the others where TE's torch modules import; where they
do not, each reports one SKIPPED row and takes no time:
  te_attention 40  the attention part for Transformer Engine's DotProductAttention (cuDNN, THD), which the
                TE spec uses only with attention_kernel te: its backward gave NaN on an H100 (2026-11-28).
  te_parity  60  the TE spec vs the local spec with the same weights in bf16, both against the local spec
                in fp32 (TF32 off): logits, per-token losses and all gradients (norm-wise; the worst parameter
                is shown, not judged: see bf16_against_fp32); TE passes when its error is at most twice the
                local spec's bf16 error (and never needs to beat one bf16 ulp, 2^-8).
  te_packed  40  documents packed in one row under TE's THD attention (a 1-token document among them)
                vs each document run alone: logits, within the bf16 limit (GEMM shapes differ).
  te_fp8    240  the trainer on the demo mix, 50 steps each: TE BF16, then fp8 hybrid with delayed and
                with current (tensorwise) scaling; FP8 passes when the mean of its last 10 losses is
                within 3% of BF16's.
  te_ckpt    60  the converted (local-format) checkpoint loads under TE; saved under TE, it loads under
                the local spec and back under TE: every weight equal, logits bit-identical on reload.
The boxes are the seconds each part took on a cold H100 (empty Triton cache, 2026-11-27, docs/benchmarks.md)
plus 3 to 6 s (resume: 8 s more, to build the demo mix, which that node had prebuilt), 355 in all, and about
5 s for this process: that run took 327 s. They hold where fla's kernel configurations ship for the GPU's
compute capability and the Triton version (megatron_ext/fla_configs/; the H100's serve the H200): fla then
compiles one configuration per kernel. Elsewhere fla autotunes first (kernels: about 200 s on an H100 before
they shipped, bench: more than 170 s) and parts overrun their boxes: a row says TIMEOUT; run again (Triton
keeps the compiled and tuned kernels: megatron_ext sets TRITON_CACHE_AUTOTUNING) or give more with --box
(--box kernels=250 --box bench=300), and commit what the kernels and bench parts write under
--workdir/fla_configs/.

``--device cpu`` runs what can run without CUDA (attention and flex: FlexAttention eagerly, forward only;
kernels: the torch kernels in bf16 against fp32; parity with the pure-torch kernels; resume in fp32 on a
tiny shape): the test suite uses it to check this script.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import functools
import importlib
import inspect
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from datetime import date
from pathlib import Path
from typing import Callable, NamedTuple
from unittest import mock

import torch

from tools.parity import rel_err

ROOT = Path(__file__).resolve().parents[1]
# Seconds, in the order the parts run: the bf16 parts first (they share compiled kernels; kernels compiles
# them), parity last (pure-torch kernels in fp32: it compiles nothing). Each is what the part took on a cold
# H100 with the shipped fla configurations (attention 29, kernels 36, resume 98, bench 117, parity 41) plus
# 3 to 6 s, and resume 8 s more to build the demo mix (about that on the CPU machine; the GPU node had it
# prebuilt: no datatrove there): 355 in all, so that with this process's ~5 s the default run ends within 360.
BOXES = {"attention": 32, "kernels": 40, "resume": 116, "bench": 123, "parity": 44, "flex": 120, "syncs": 60,
         "compiled": 150}
MIN_BOX = 30  # --budget: a part gets at least this or does not start (a part's process imports for ~20 s)
OPTIONAL = ("flex", "syncs", "compiled")  # run only when named in --parts (the default run keeps to 360 s)
# Transformer Engine parts: in the default run where TE imports, on top of the 360 s; SKIPPED rows elsewhere
TE_BOXES = {"te_attention": 40, "te_parity": 60, "te_packed": 40, "te_fp8": 240, "te_ckpt": 60}
BOXES.update(TE_BOXES)
L, F = "linear_attention", "full_attention"
# A small model with the 2B release's head geometry, so that the fla kernels compiled for it serve the
# 2B benchmark too (their head counts and sizes are compile-time constants).
REAL_HEADS = dict(
    vocab_size=2048, hidden_size=256, intermediate_size=512, layer_types=[L, L, L, F],
    num_attention_heads=8, num_key_value_heads=2, head_dim=256,
    linear_key_head_dim=128, linear_value_head_dim=128, linear_num_key_heads=16, linear_num_value_heads=16,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25,
                     "mrope_section": [11, 11, 10], "mrope_interleaved": True},
)
LIMITS = {  # verdict thresholds on relative error (max |ours - ref| / max |ref|)
    "bf16": 4 * 2.0**-8,  # fla in bf16 vs the fp32 reference: a few bf16 roundings (eps 2^-8)
    "fp32 logits": 1e-4,  # the same fla kernels on both sides in fp32; only the glue differs
    "fp32 grads": 1e-3,  # gradients sum over the sequence: more accumulation-order noise
    "fp8 loss": 0.03,  # FP8 vs BF16 training: mean of the last 10 losses, relative
    # resumed vs uninterrupted losses where the kernels are not bit-deterministic: a lost or wrong Adam state
    # moves them by ~1e-3 (tests/test_train.py), kernel reduction order by far less
    "resume": 1e-4,
}


def row(part: str, check: str, value, limit: float | None = None, verdict: str | None = None) -> None:
    """Print one result row at once (the parent collects rows from stdout)."""
    shown = f"{value:.3g}" if isinstance(value, float) else str(value)
    if verdict is None and limit is not None:
        verdict = "pass" if value <= limit else "FAIL"
    print(f"| {part} | {check} | {shown} | {'' if limit is None else f'<= {limit:.2g}'} | {verdict or ''} |", flush=True)


# --------------------------------------------------------------------------------------------- parts


def part_kernels(device: str, workdir: Path) -> None:
    with saving_tuned(workdir, device):
        kernel_checks(device)
    if device == "cuda":
        tuned_configs(workdir, "kernels")


def kernel_checks(device: str) -> None:
    from megatron_ext.kernels import causal_conv1d_silu, gated_delta_rule
    from megatron_ext.packing import Documents

    kernel = "fla" if device == "cuda" else "torch"  # on CPU: the same checks of the torch kernels in bf16
    gen = torch.Generator(device).manual_seed(0)
    t, heads, d = 3000 if device == "cuda" else 300, 16, 128
    docs = Documents(torch.tensor([0, 1, t // 4, t * 2 // 3, t])).to(device)  # a 1-token document too

    def rand(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, generator=gen, device=device).to(dtype)

    inputs = {"q": rand(1, t, heads, d), "k": rand(1, t, heads, d), "v": rand(1, t, heads, d),
              "g": -0.5 * torch.rand(1, t, heads, generator=gen, device=device),  # log decay, fp32 as the layer gives it
              "beta": torch.rand(1, t, heads, generator=gen, device=device).to(torch.bfloat16)}
    upstream = rand(1, t, heads, d, dtype=torch.float32)

    def run(kernel: str, dtype_of):
        leaves = {k: v.detach().to(dtype_of(v)).requires_grad_() for k, v in inputs.items()}
        out = gated_delta_rule(*leaves.values(), docs, kernel)
        (out.float() * upstream).sum().backward()
        return out.float(), {k: v.grad.float() for k, v in leaves.items()}

    out, grads = run(kernel, lambda v: v.dtype)
    ref, ref_grads = run("torch", lambda v: torch.float32)
    row("kernels", f"gated delta rule output, {kernel} bf16 vs torch fp32", rel_err(out, ref), LIMITS["bf16"])
    for name in grads:
        row("kernels", f"gated delta rule d{name}", rel_err(grads[name], ref_grads[name]), LIMITS["bf16"])
    again, again_grads = run(kernel, lambda v: v.dtype)
    same = torch.equal(out, again) and all(torch.equal(grads[k], again_grads[k]) for k in grads)
    row("kernels", f"{kernel} gated delta rule deterministic (two runs, same bits)", "yes" if same else "no")

    width, channels = 4, 2 * heads * d + heads * d
    x, w = rand(1, t, channels), rand(channels, width)
    up = rand(1, t, channels, dtype=torch.float32)

    def conv(kernel: str, dtype):
        xl, wl = x.detach().to(dtype).requires_grad_(), w.detach().to(dtype).requires_grad_()
        y = causal_conv1d_silu(xl, wl, docs, kernel)
        (y.float() * up).sum().backward()
        return y.float(), xl.grad.float(), wl.grad.float()

    got, want = conv(kernel, torch.bfloat16), conv("torch", torch.float32)
    for name, a, b in zip(("output", "dx", "dweight"), got, want):
        row("kernels", f"causal conv1d {name}, {kernel} bf16 vs torch fp32", rel_err(a, b), LIMITS["bf16"])
    wgrad_check(device, rand)


def wgrad_check(device: str, rand: Callable[..., torch.Tensor]) -> None:
    """A linear layer's weight gradient added into its fp32 buffer by the GEMM (the trainer's
    ``gradient_accumulation_fusion``; without Apex, megatron_ext/no_apex.py's ``torch.addmm(..., out_dtype=fp32)``)
    against float64. On a CUDA GPU of compute capability 8.0 or later the GEMM must exist here and sum in fp32: at
    most a quarter of the unfused path's error (a bf16 GEMM, then an fp32 add; fp32 sums err ~100x less). Elsewhere
    the stand-in is the unfused arithmetic, held to that path's error."""
    from megatron_ext.no_apex import _gemm_into_fp32, wgrad_gemm_accum

    x, g, start = rand(4096, 512), rand(4096, 256), rand(256, 512, dtype=torch.float32)
    ref = start.double() + g.double().t() @ x.double()
    fused = start.clone()
    wgrad_gemm_accum(x, g, fused)
    unfused = rel_err((start + g.t() @ x).double(), ref)
    expected = device == "cuda" and torch.cuda.get_device_capability() >= (8, 0)
    if expected:
        available = _gemm_into_fp32(fused.device)
        row("kernels", "bf16 GEMM into fp32 available (torch.addmm out_dtype)", "yes" if available else "no",
            verdict="pass" if available else "FAIL")
    row("kernels", "weight gradient added in its GEMM, bf16 into fp32, vs float64 (limit: "
        f"{'a quarter of ' if expected else ''}the unfused path's error)", rel_err(fused.double(), ref),
        unfused / 4 if expected else unfused)


def tuned_dir(workdir: Path) -> tuple[Path, str]:
    """Where this GPU's tuned fla configurations go under ``workdir``, and the Triton version they are for."""
    from megatron_ext import fla_configs

    name, capability, triton_version = fla_configs.this_gpu()
    return fla_configs.directory(name, capability, triton_version, workdir / "fla_configs"), triton_version


def saving_tuned(workdir: Path, device: str):
    """On CUDA, fla's choices saved under ``workdir`` as they are made (:func:`megatron_ext.fla_configs.saving`),
    so that a part stopped by its time box keeps them."""
    from megatron_ext import fla_configs

    return fla_configs.saving(*tuned_dir(workdir)) if device == "cuda" else contextlib.nullcontext()


def tuned_configs(workdir: Path, part: str) -> None:
    """fla's configuration choices in this part's process (the 2B GDN geometry, forward and backward), added
    to a directory for ``megatron_ext/fla_configs/`` and read back through fla's own lookup."""
    from fla.ops.utils import cache

    from megatron_ext import fla_configs

    tuners = fla_configs.fla_autotuners()
    out, triton_version = tuned_dir(workdir)
    written = fla_configs.dump(tuners, out, triton_version)
    keys = [(t.kernel_name, key) for t in tuners for key in t.cache]
    with mock.patch.dict(os.environ, {"FLA_CONFIG_DIR": str(out)}):
        found = sum(cache.load_cached_config(name, cache.AutotuneKey(key)) is not None for name, key in keys)
    # what fla found shipped is among what it chose here: on a GPU that borrows another's (an H200 the H100's),
    # the directory written holds those too, which whoever ships it should know
    row(part, "shipped fla configurations fla started from", os.environ.get("FLA_CONFIG_DIR") or "none")
    row(part, f"tuned fla configurations written to {out} (kernels / entries)",
        f"{len(written)} / {sum(written.values())}")
    row(part, "entries fla's own lookup finds there (FLA_CACHE_MODE must not be disabled)",
        f"{found} of {len(keys)}", verdict="pass" if keys and found == len(keys) else "FAIL")


def part_parity(device: str) -> None:
    from tools.parity import compare, megatron_twin, reference_kernels
    from tools.tiny_qwen35 import causal_lm, text_config

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    hf = causal_lm(text_config(**REAL_HEADS), seed=1).to(device)
    ours = megatron_twin(hf, device=device, gdn_kernel="torch")
    gen = torch.Generator(device).manual_seed(2)
    seq = 300 if device == "cuda" else 100  # more than one 64-token GDN chunk, not a multiple of it
    ids = torch.randint(0, hf.config.vocab_size, (2, seq), generator=gen, device=device)
    with reference_kernels(hf):  # the model code on trial; fla has the kernels part
        errors = compare(hf, ours, ids, gen)
    row("parity", f"logits, megatron_ext vs transformers, fp32 on {device}", errors.pop("logits"), LIMITS["fp32 logits"])
    worst = max(errors, key=errors.get)
    row("parity", f"gradients of {len(errors)} parameters, worst ({worst})", errors[worst], LIMITS["fp32 grads"])


def demo_base(device: str, workdir: Path) -> tuple[Path, Path]:
    """The demo mix and a converted random base checkpoint (built once per workdir), stored as the Qwen3.5
    releases are (bf16, the GDN's A_log and output norm fp32: a bf16 run trains those in fp32): the trainer's
    inputs."""
    from preprocessing.build_mix import build
    from preprocessing.recipe import MixRecipe
    from tools import convert_from_hf, tiny_qwen35

    mix = workdir / "mix" / "mix.json"
    if not mix.is_file():
        # absolute: a relative output_dir is the recipe file's (data/demo/), not the working directory's
        build(MixRecipe.load(ROOT / "data" / "demo" / "recipe.yaml", output_dir=str(mix.parent.resolve())))
    base = workdir / "base"
    if not base.is_dir():  # on CPU a tiny shape: there the part checks the procedure, not the kernels
        shape = REAL_HEADS if device == "cuda" else dict(vocab_size=REAL_HEADS["vocab_size"])
        tiny_qwen35.causal_lm(tiny_qwen35.text_config(**shape), seed=3).save_pretrained(workdir / "base_hf")
        convert_from_hf.convert(tiny_qwen35.release_dtypes(workdir / "base_hf"), base)
    return mix, base


def demo_run(workdir: Path, name: str, steps: int, **fields) -> Path:
    """A trainer config for ``steps`` steps on the demo mix (see :func:`demo_base`) under ``workdir/name``."""
    import yaml

    mix, base = workdir / "mix" / "mix.json", workdir / "base"
    cfg = dict(run_dir=str(workdir / name), init_from=str(base), mix=str(mix), seq_length=256, global_batch_size=8,
               micro_batch_size=2, train_iters=steps, lr=1e-3, min_lr=1e-4, warmup_fraction=0.1,
               decay_fraction=0.2, distributed_optimizer=True, log_interval=1, eval_interval=0,
               save_interval=steps // 2, keep_last=2, tensorboard=False)
    cfg.update(fields)
    shutil.rmtree(workdir / name, ignore_errors=True)  # a fresh run: an earlier check's checkpoints would resume
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def train_losses(config: Path) -> list[float]:
    """Run the trainer on ``config`` (output to a log beside it) and return its losses."""
    with open(config.with_suffix(".log"), "w") as log:
        subprocess.run(trainer_command(config), stdout=log, stderr=subprocess.STDOUT, check=True)
    run_dir = config.with_suffix("")
    return [json.loads(x)["loss"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def part_resume(device: str, workdir: Path, resume_steps: int) -> None:
    demo_base(device, workdir)
    # masked attention: FlashAttention's backward accumulates dq with atomics, so the same steps in two
    # processes differ in the last bits (on an H100, 2026-11-27, losses after resume moved by 3e-4 with it),
    # which would hide a subtly wrong restored state; the other kernels (fla's, cuBLAS) are deterministic
    precision = "bf16" if device == "cuda" else "fp32"  # bf16 matmuls crawl on CPU
    fields = dict(precision=precision, attention_kernel="masked")
    started = time.perf_counter()
    uninterrupted, killed = (demo_run(workdir, name, resume_steps, **fields) for name in ("uninterrupted", "killed"))
    kill_after_first_checkpoint(trainer_command(killed), workdir / "killed")
    latest = (workdir / "killed" / "checkpoints" / "latest").read_text()
    row("resume", "SIGKILL right after the first checkpoint; latest checkpoint", latest,
        verdict="pass" if latest == f"iter_{resume_steps // 2:07d}" else "FAIL")
    # the uninterrupted run side by side with the resumed one (two tiny models share the device): one trainer
    # run's time less in the 6 minutes. Not before: the killed run has by now built the mix's index cache and
    # saved fla's autotuning choices, which two runs starting together would each make, perhaps differently
    # under each other's load (other reduction orders, other bits).
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        running = pool.submit(train_losses, uninterrupted)
        resumed = train_losses(killed)
        reference = running.result()
    row("resume", f"{resume_steps} steps, {precision}, distributed optimizer: first / last loss",
        f"{reference[0]:.4f} / {reference[-1]:.4f}", verdict="pass" if reference[-1] < reference[0] else "FAIL")
    came_back = f"resumed from {workdir / 'killed' / 'checkpoints' / latest}" in killed.with_suffix(".log").read_text()
    row("resume", "the rerun resumed from that checkpoint (not from the start)", "yes" if came_back else "no",
        verdict="pass" if came_back else "FAIL")
    if len(resumed) != len(reference):
        row("resume", "steps logged after resume vs uninterrupted", f"{len(resumed)} vs {len(reference)}", verdict="FAIL")
        return
    half = resume_steps // 2
    before, after = (max(abs(a - b) / abs(b) for a, b in pairs) for pairs in
                     (zip(resumed[:half], reference[:half]), zip(resumed[half:], reference[half:])))
    row("resume", f"the same first {half} steps in two processes: bit-identical (deterministic)",
        "yes" if before == 0 else f"no, max rel diff {before:.3g}")
    row("resume", "losses after resume vs uninterrupted: max rel diff", after, LIMITS["resume"],
        "pass (bit-identical)" if after == 0 else None)
    row("resume", "seconds for the three runs (the last two side by side)", f"{time.perf_counter() - started:.0f}")


def core_attention(kernel: str, heads: int, groups: int, head_dim: int, device: str = "cpu",
                   dtype: torch.dtype = torch.float32, softmax_scale: float | None = None):
    """A core attention alone (it has no weights), for packed [t, heads, dim] inputs: the local spec's with
    ``kernel``, or Transformer Engine's DotProductAttention for ``te``; ``softmax_scale`` None: megatron's
    1/sqrt(head_dim)."""
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_ext.layers import PackedDotProductAttention

    config = TransformerConfig(num_layers=1, hidden_size=heads * head_dim, num_attention_heads=heads,
                               num_query_groups=groups, kv_channels=head_dim, attention_dropout=0.0,
                               params_dtype=dtype, bf16=dtype == torch.bfloat16, use_cpu_initialization=True)
    common = dict(layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self", softmax_scale=softmax_scale)
    if kernel == "te":
        from megatron.core.extensions.transformer_engine import TEDotProductAttention

        return TEDotProductAttention(config, **common).to(device)
    return PackedDotProductAttention(config, kernel=kernel, **common).to(device)


def poison_free_memory(device: str) -> None:
    """Fill the CUDA caching allocator's free blocks with NaN, so that a kernel reading memory it never wrote
    shows NaN instead of passing on whatever a fresh process's memory held: Transformer Engine's THD attention
    backward did (H100, 2026-11-28), which runs with clean memory missed. About 3 GiB; nothing on CPU."""
    if device == "cuda":
        # made and dropped at once: the blocks go back to the allocator's cache, NaN-filled
        [torch.full((1 << k,), float("nan"), device=device) for k in range(10, 28) for _ in range(3)]


def part_attention(device: str, kernel: str = "fused", part: str = "attention") -> None:
    """A fused attention kernel in bf16 against the masked path in fp32 on a packed row with the 2B's
    attention geometry: outputs and gradients, run on memory :func:`poison_free_memory` filled with NaN. On
    CPU, where FlashAttention has no kernel, the masked path in bf16 takes the fused one's place (the same
    procedure, gradients included); FlexAttention runs eagerly there, forward only (torch refuses Flex's CPU
    backward)."""
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.enums import AttnMaskType

    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference stays fp32
    if device != "cuda" and kernel == "fused":
        kernel = "masked"
    heads, groups, head_dim = REAL_HEADS["num_attention_heads"], REAL_HEADS["num_key_value_heads"], REAL_HEADS["head_dim"]
    t = 4096 if device == "cuda" else 300
    gen = torch.Generator(device).manual_seed(0)
    q, k, v = (torch.randn(t, h, head_dim, generator=gen, device=device) for h in (heads, groups, groups))
    upstream = torch.randn(t, 1, heads * head_dim, generator=gen, device=device)
    grads = device == "cuda" or kernel != "flex"
    layouts = {"documents of 1, 1, t/3, t/2 and the rest tokens": [1, 1, t // 3, t // 2, t - 2 - t // 3 - t // 2],
               "one document": [t]}
    for layout, lengths in layouts.items():
        cu = torch.tensor([0, *lengths], device=device).cumsum(0).to(torch.int32)
        params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max(lengths),
                                 max_seqlen_kv=max(lengths))

        def run(kernel: str, dtype: torch.dtype):
            # detached: an fp32 run must not make q, k, v themselves leaves that collect gradients
            leaves = [x.detach().to(dtype).requires_grad_(grads) for x in (q, k, v)]
            module = core_attention(kernel, heads, groups, head_dim, device, dtype)
            poison_free_memory(device)
            # attn_mask_type as megatron's attention passes it: TE's forward requires it (the local one ignores it)
            out = module(*leaves, None, attn_mask_type=AttnMaskType.causal, packed_seq_params=params)
            out = out.reshape(t, 1, -1)  # TE's thd output: [t, h * d]
            if grads:
                poison_free_memory(device)
                (out.float() * upstream).sum().backward()
            return out.float(), [x.grad.float() for x in leaves] if grads else []

        (out, got), (ref, want) = run(kernel, torch.bfloat16), run("masked", torch.float32)
        row(part, f"{kernel} bf16 vs masked fp32, {layout}: output", rel_err(out, ref), LIMITS["bf16"])
        for name, a, b in zip(("dq", "dk", "dv"), got, want):
            row(part, f"{kernel} bf16 vs masked fp32, {layout}: {name}", rel_err(a, b), LIMITS["bf16"])
        if len(lengths) > 1:  # whether training with it can be bit-reproducible (the resume part needs that)
            out2, got2 = run(kernel, torch.bfloat16)
            same = all(map(torch.equal, [out, *got], [out2, *got2]))
            row(part, f"{kernel} bf16 deterministic (two runs, same bits: output{', gradients' * grads})",
                "yes" if same else "no")


def part_syncs(device: str) -> None:
    import warnings

    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_ext import build_model
    from megatron_ext.data import collate
    from megatron_ext.train import _reduce_step, build_optimizer, data_parallel, forward_step, release
    from megatron_ext.train_config import TrainConfig

    seq = 2048 if device == "cuda" else 128
    gen = torch.Generator().manual_seed(5)
    lengths = [seq // 2, 1, seq // 4, seq - seq // 2 - 1 - seq // 4]  # a 1-token document among them
    batch = collate([{"tokens": torch.randint(0, 2048, (seq,), generator=gen),
                      "labels": torch.randint(0, 2048, (seq,), generator=gen), "loss_mask": torch.ones(seq),
                      "position_ids": torch.cat([torch.arange(n) for n in lengths])}])
    if device == "cuda":  # as the trainer's loader hands them over
        batch = {k: v.pin_memory() for k, v in batch.items()}
    counts: dict[int, collections.Counter] = {}  # depth -> syncs per source line
    for depth in (4, 8):
        config = _real_heads_config(layer_types=[L, L, L, F] * (depth // 4))
        model = build_model(config, "local", params_dtype=torch.bfloat16 if device == "cuda" else torch.float32,
                            gradient_accumulation_fusion=TrainConfig.gradient_accumulation_fusion)  # the trainer's
        ddp = data_parallel(model)
        model.config.finalize_model_grads_func, model.config.no_sync_func = finalize_model_grads, ddp.no_sync
        optimizer = build_optimizer(ddp, TrainConfig(), model.config.params_dtype)

        def step():
            ddp.zero_grad_buffer()
            optimizer.zero_grad()
            out = get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([batch]), model=[ddp],
                                              num_microbatches=1, seq_length=seq, micro_batch_size=1, forward_only=False)
            _reduce_step(out, ddp, stop_requested=False)
            optimizer.step()

        step()  # compiles and autotunes; not counted
        if device != "cuda":
            step()
            row("syncs", f"training step, {depth} layers", "ran; syncs are counted on CUDA only")
        else:
            torch.cuda.synchronize()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                step()
                torch.cuda.set_sync_debug_mode("default")
            counts[depth] = collections.Counter(f"{Path(w.filename).name}:{w.lineno}" for w in caught
                                                if "synchroniz" in str(w.message))
        release(ddp)
    if counts:
        row("syncs", f"host syncs per training step, 4 / 8 layers (none per layer; at most {MAX_SYNCS})",
            f"{counts[4].total()} / {counts[8].total()}", verdict=syncs_verdict(counts))
        print("sync sources (file:line count, 4 / 8 layers):", dict(counts[4]), dict(counts[8]), file=sys.stderr)


# Host syncs a training step may keep: the trainer's one reduction of loss, finiteness and stop flag
# (train._reduce_step) and megatron's ``total_norm.item()`` for clipping, plus one-time lazy set-up in a
# process's first counted step. On an H100 (2026-11-27): 3 at 4 layers (one of them once per process,
# __init__.py:1270) and 2 at 8; before no_apex's device-side grad norm it was 45 / 82 (one per parameter).
MAX_SYNCS = 4


def syncs_verdict(counts: dict[int, collections.Counter]) -> str:
    """pass when no source line syncs more often in the deeper model (none per layer) and the syncs per step
    stay a small constant. Per line, not in total: a one-time sync in the first model counted could hide a
    sync per attention layer (1 at 4 layers, 2 at 8) in equal totals."""
    depths = sorted(counts)
    growing = any(counts[b][line] > counts[a][line] for a, b in zip(depths, depths[1:]) for line in counts[b])
    return "FAIL" if growing or max(c.total() for c in counts.values()) > MAX_SYNCS else "pass"


def _real_heads_config(**overrides):
    """The Qwen35Config of a random model with the 2B's head geometry (:data:`REAL_HEADS`), ``overrides`` applied."""
    from megatron_ext import Qwen35Config
    from tools.tiny_qwen35 import text_config

    return Qwen35Config.from_hf(text_config(**{**REAL_HEADS, **overrides}).to_dict())


def _copy_weights(src: torch.nn.Module, *dst: torch.nn.Module) -> None:
    """Same weights by name: the TE and local specs name their parameters alike (tests/te_spec_names.txt)."""
    params = dict(src.named_parameters())
    with torch.no_grad():
        for model in dst:
            for name, p in model.named_parameters():
                p.copy_(params[name])


class Bf16Errors(NamedTuple):
    logits: float  # relative error (max |ours - ref| / max |ref|)
    loss: float  # the same of the per-token losses (the trainer's: compile_elementwise's are megatron's fused ones)
    grads: float  # all parameters' gradients as one vector: |ours - ref| / |ref| (2-norms)
    worst: str  # the parameter whose gradient errs most by max-relative error, and that error
    worst_error: float
    seconds: float  # the first forward and backward, and the loss's forward


def bf16_against_fp32(device: str, seq: int, **candidates: dict) -> dict[str, Bf16Errors]:
    """Each candidate (``build_model`` keywords) in bf16 against the local spec in fp32 (TF32 off) on the
    pure-torch GDN kernels (compiling fla's fp32 ones overran 195 s on a fresh H200), all with the same weights
    and a random model of the 2B's head geometry; candidates run in the order given, so the first one's first
    step also pays for compiling fla.

    Gradients are held to their norm-wise error over all parameters: per parameter, small ones summed over
    every token with heavy cancellation (A_log, dt_bias: 16 values a layer) err by 4% to 50% in bf16 from one
    random model to the next (measured on CPU), which made "twice eager's worst" a coin toss; the norm-wise
    error varied by 3% (0.027 to 0.028)."""
    from megatron_ext import build_model

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    config = _real_heads_config()
    ref = build_model(config, "local", device=device, params_dtype=torch.float32, gdn_kernel="torch")
    models = {name: build_model(config, device=device, params_dtype=torch.bfloat16, **kw) for name, kw in candidates.items()}
    _copy_weights(ref, *models.values())
    gen = torch.Generator(device).manual_seed(4)
    ids = torch.randint(0, config.vocab_size, (2, seq), generator=gen, device=device)
    upstream = torch.randn(2, seq, config.vocab_size, generator=gen, device=device)

    def run(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        poison_free_memory(device)
        logits = model(ids).float()
        loss = model(ids, labels=torch.roll(ids, -1, 1)).float()
        poison_free_memory(device)
        # the gradients take the loss's backward too (megatron's fused one under compile_elementwise)
        ((logits * upstream).sum() + loss.sum()).backward()
        return logits.detach(), loss.detach(), {n: p.grad.float() for n, p in model.named_parameters()}

    ref_logits, ref_loss, ref_grads = run(ref)
    ref_flat = torch.cat([ref_grads[n].flatten() for n in sorted(ref_grads)])
    errors = {}
    for name, model in models.items():
        start = time.perf_counter()
        logits, loss, grads = run(model)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        flat = torch.cat([grads[n].flatten() for n in sorted(grads)])
        worst = max(grads, key=lambda n: rel_err(grads[n], ref_grads[n]))
        errors[name] = Bf16Errors(rel_err(logits, ref_logits), rel_err(loss, ref_loss),
                                  ((flat - ref_flat).norm() / ref_flat.norm()).item(),
                                  worst, rel_err(grads[worst], ref_grads[worst]), seconds)
    return errors


def bf16_rows(part: str, what: str, errors: Bf16Errors, eager: Bf16Errors) -> None:
    """``what``'s rows against the local spec's eager bf16 errors: each at most twice those (and never held to
    beat one bf16 ulp, 2^-8); the worst parameter is shown, not judged."""
    row(part, f"logits, {what} bf16 vs local fp32 (limit: 2x local eager bf16's error)", errors.logits,
        max(2 * eager.logits, 2.0**-8))
    row(part, f"per-token losses, {what} bf16 vs local fp32", errors.loss, max(2 * eager.loss, 2.0**-8))
    row(part, f"gradients (all, norm-wise), {what} bf16 vs local fp32", errors.grads, max(2 * eager.grads, 2.0**-8))
    row(part, f"gradient of the worst parameter ({errors.worst}; local eager bf16's worst: {eager.worst_error:.3g})",
        errors.worst_error)


def part_te_parity(device: str) -> None:
    errors = bf16_against_fp32(device, 512, local=dict(backend="local"), te=dict(backend="te"))
    bf16_rows("te_parity", "TE", errors["te"], errors["local"])


def part_compiled(device: str) -> None:
    """``compile_elementwise`` in bf16 (Triton kernels from inductor on CUDA; its C++ ones on CPU, where
    dynamo is turned on for this part) against the local spec in fp32, held to what eager bf16 errs by; and
    what its first step costs."""
    with torch._dynamo.config.patch(disable=False):
        torch._dynamo.reset()  # code first run while dynamo was off is marked to skip until a reset
        errors = bf16_against_fp32(device, 512 if device == "cuda" else 64, eager=dict(backend="local"),
                                   compiled=dict(backend="local", compile_elementwise=True))
    bf16_rows("compiled", "compiled elementwise", errors["compiled"], errors["eager"])
    row("compiled", f"first forward and backward, compiling included, s (eager's: {errors['eager'].seconds:.1f})",
        round(errors["compiled"].seconds, 1))


def part_te_packed(device: str) -> None:
    from megatron_ext import build_model

    config = _real_heads_config()
    model = build_model(config, "te", params_dtype=torch.bfloat16)
    lengths = [300, 1, 700, 47]
    gen = torch.Generator(device).manual_seed(6)
    ids = torch.randint(0, config.vocab_size, (1, sum(lengths)), generator=gen, device=device)
    positions = torch.cat([torch.arange(n, device=device) for n in lengths])[None]
    with torch.no_grad():
        packed = model(ids, positions).float()
        start, worst = 0, 0.0
        for n in lengths:
            alone = model(ids[:, start:start + n]).float()
            worst = max(worst, rel_err(packed[:, start:start + n], alone))
            start += n
    row("te_packed", f"logits of {len(lengths)} documents packed (THD) vs alone, worst", worst, LIMITS["bf16"])


def part_te_fp8(device: str, workdir: Path, steps: int = 50) -> None:
    demo_base(device, workdir)
    runs = {"bf16": {}, "fp8 hybrid, delayed": {"fp8": "hybrid", "fp8_recipe": "delayed"},
            "fp8 hybrid, tensorwise": {"fp8": "hybrid", "fp8_recipe": "tensorwise"}}
    losses = {}
    for label, fp8 in runs.items():
        name = "te_" + label.replace(", ", "_").replace(" ", "_")
        losses[label] = train_losses(demo_run(workdir, name, steps, precision="bf16", backend="te", **fp8))
        row("te_fp8", f"{steps} steps, TE {label}: first / last loss", f"{losses[label][0]:.4f} / {losses[label][-1]:.4f}",
            verdict="pass" if losses[label][-1] < losses[label][0] else "FAIL")
    bf16 = sum(losses["bf16"][-10:]) / 10
    for label in list(runs)[1:]:
        mean = sum(losses[label][-10:]) / 10
        row("te_fp8", f"TE {label} vs bf16: mean of the last 10 losses, relative difference", abs(mean - bf16) / bf16,
            LIMITS["fp8 loss"])


def part_te_ckpt(device: str, workdir: Path) -> None:
    from megatron_ext.checkpoint import load_model, save_model

    _, base = demo_base(device, workdir)
    ids = torch.randint(0, REAL_HEADS["vocab_size"], (1, 256), generator=torch.Generator(device).manual_seed(7),
                        device=device)

    def load(path: Path, backend: str):
        model = load_model(path, device, backend=backend, params_dtype=torch.bfloat16)
        with torch.no_grad():
            return model, model(ids)

    def same_weights(a, b) -> str:
        other = dict(b.named_parameters())
        return "pass" if all(torch.equal(p, other[n]) for n, p in a.named_parameters()) else "FAIL"

    local, _ = load(base, "local")
    te, te_logits = load(base, "te")
    row("te_ckpt", "converted (local-format) checkpoint under TE: every weight equal", "loaded", verdict=same_weights(local, te))
    save_model(te, workdir / "saved_by_te")
    back, _ = load(workdir / "saved_by_te", "local")
    row("te_ckpt", "saved under TE, loaded under local: every weight equal", "loaded", verdict=same_weights(te, back))
    save_model(back, workdir / "saved_by_local")
    again, again_logits = load(workdir / "saved_by_local", "te")
    row("te_ckpt", "and back under TE: every weight equal; logits bit-identical",
        "yes" if torch.equal(te_logits, again_logits) else "no",
        verdict="pass" if same_weights(te, again) == "pass" and torch.equal(te_logits, again_logits) else "FAIL")


def part_bench(device: str, workdir: Path) -> None:
    from tools import bench_train

    with saving_tuned(workdir, device):
        results = bench_train.measure(seqs=(4096,), micro_batch=1, warmup=2, iters=5, setups=bench_train.QUICK)
    for r in results:
        row("bench", f"{r.setup.name} [{r.setup.memory} recomputation]: {bench_train.CELLS}", " / ".join(bench_train.cells(r)))
    row("bench", "transformers' causal conv1d", bench_train.baseline_conv1d())
    if device == "cuda":
        tuned_configs(workdir, "bench")  # transformers' fla calls: batches, not packed rows, so other keys


PARTS = {"attention": part_attention, "kernels": part_kernels, "resume": part_resume, "bench": part_bench,
         "parity": part_parity, "flex": functools.partial(part_attention, kernel="flex"), "syncs": part_syncs,
         "compiled": part_compiled,
         "te_attention": functools.partial(part_attention, kernel="te", part="te_attention"),
         "te_parity": part_te_parity, "te_packed": part_te_packed, "te_fp8": part_te_fp8, "te_ckpt": part_te_ckpt}


# ------------------------------------------------------------------------------------ process control


def trainer_command(config: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "megatron_ext.train", "--config", str(config), *extra]


def process_tree(pid: int) -> list:
    """``pid`` (first) and every process started below it, as psutil processes. A process group is not
    enough: torchrun starts each rank in a session of its own, and so does the resume part its trainer."""
    import psutil

    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and everything below it, as a node failure would: all of it is stopped first (a
    stopped process starts no more children), then killed. Killing only a launcher orphans its ranks,
    which train on (and hold the GPU)."""
    import psutil

    stopped: dict[int, psutil.Process] = {}
    while new := [p for p in process_tree(pid) if p.pid not in stopped]:
        for p in new:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.suspend()
            stopped[p.pid] = p
    for p in stopped.values():
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()


def kill_children() -> None:
    """:func:`kill_tree` for each child of this process, and reap them: the parts it started, whose Popen objects
    a signal raised inside Popen never returned."""
    import psutil

    children = psutil.Process().children()
    for child in children:
        kill_tree(child.pid)
    psutil.wait_procs(children, timeout=10)


def kill_after_first_checkpoint(cmd: list[str], run_dir: Path, timeout: float = 300) -> None:
    """Start a training command and SIGKILL all its processes as soon as its first checkpoint is published."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    latest = run_dir / "checkpoints" / "latest"
    deadline = time.time() + timeout
    while not latest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    kill_tree(proc.pid)
    proc.wait()


def run_part(name: str, box: float, args: argparse.Namespace, out) -> None:
    """Run one part in a child process under its time box, echoing its rows as they come."""
    log = Path(args.workdir) / f"{name}.log"
    cmd = [sys.executable, "-m", "tools.gpu_check", "--run-part", name, "--device", args.device,
           "--resume-steps", str(args.resume_steps), "--workdir", args.workdir]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    deadline = time.monotonic() + box
    with open(log, "w") as err:
        try:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True,
                                    cwd=ROOT, env=env)
            lines: queue.Queue = queue.Queue()
            threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout] + [lines.put(None)], daemon=True).start()
            while True:
                try:
                    line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    kill_tree(proc.pid)
                    proc.wait()
                    emit(out, f"| {name} | time box | stopped after {box:.0f} s | | TIMEOUT |")
                    return
                if line is None:
                    break
                if line.startswith("| "):
                    emit(out, line.rstrip("\n"))
        except Terminated:  # the part is in a session of its own, where a signal to this one does not reach
            kill_children()  # not kill_tree(proc.pid): the signal may have come inside Popen, after the fork
            emit(out, f"| {name} | terminated | after {time.monotonic() - deadline + box:.0f} s, by a signal to "
                      "the check | | STOPPED |")
            raise
        code = proc.wait()
    if not code:
        emit(out, f"| {name} | seconds | {time.monotonic() - deadline + box:.0f} | <= {box:.0f} | |")
    if code:
        last = [x for x in log.read_text().splitlines() if x.strip()][-1:] or ["(no output)"]
        emit(out, f"| {name} | exit code {code} | {last[0][:200].replace('|', '/')} | see {log} | FAILED |")


class Terminated(Exception):
    """SIGTERM to the check (e.g. from ``timeout``): the running part is stopped with it, not orphaned."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated


def emit(out, line: str) -> None:
    print(line, flush=True)
    out.write(line + "\n")
    out.flush()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="gpu_check.md", help="markdown file the rows are appended to")
    p.add_argument("--parts", default=",".join(x for x in PARTS if x not in OPTIONAL),
                   help=f"comma-separated, from {', '.join(PARTS)}")
    p.add_argument("--box", action="append", default=[], metavar="PART=SECONDS", help="change a part's time box")
    p.add_argument("--budget", type=float, metavar="SECONDS",
                   help="seconds for the whole run (a lease's time left): each part's box is cut to what is left "
                        f"of it, and a part that would get less than {MIN_BOX} s is SKIPPED")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--resume-steps", type=int, default=20, help="steps of the resume part (checkpoint at half)")
    p.add_argument("--workdir", default="out/gpu_check", help="data, checkpoints and per-part logs")
    p.add_argument("--run-part", choices=PARTS, help=argparse.SUPPRESS)  # the child process of one part
    args = p.parse_args(argv)
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    if args.run_part:
        from megatron_ext import parallel

        if args.device == "cuda" and not torch.cuda.is_available():
            raise SystemExit("needs a CUDA device (--device cpu runs the parts that do not)")
        started = since_start()
        importlib.import_module("megatron.core.parallel_state")  # timed apart; fla comes with megatron's GDN
        imported = since_start()
        parallel.initialize()
        # to the part's log: how much of a part's box its process spends before it checks anything (on a cold
        # H100, 13 to 19 s a part: 77 s of the default run's 327)
        print(f"start-up: {started:.1f} s to start Python and import torch; {imported - started:.1f} s to import "
              f"megatron-core and fla; {since_start() - imported:.1f} s more for CUDA and the process group",
              file=sys.stderr, flush=True)
        fn = PARTS[args.run_part]
        given = {"device": args.device, "workdir": Path(args.workdir), "resume_steps": args.resume_steps}
        fn(**{name: given[name] for name in inspect.signature(fn).parameters if name in given})
        return
    boxes = dict(BOXES)
    for item in args.box:
        name, _, seconds = item.partition("=")
        if name not in boxes:
            raise SystemExit(f"--box {item}: unknown part {name!r}")
        boxes[name] = float(seconds)
    parts = [x for x in args.parts.split(",") if x]
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise SystemExit(f"--parts: unknown {sorted(unknown)}; choose from {', '.join(PARTS)}")
    from megatron_ext.gpu_stack import installed, transformer_engine_error
    from megatron_ext.signals import on_sigterm

    te_missing = transformer_engine_error() if set(parts) & set(TE_BOXES) else None

    stack = installed()
    versions = ", ".join(f"{k} {v}" for k, v in stack.versions.items() if v)
    with on_sigterm(_raise_terminated), open(args.out, "a") as out:
        emit(out, f"\n### GPU check, {date.today()}, {stack.device} ({versions})\n")
        emit(out, "| part | check | value | limit | verdict |\n|---|---|---|---|---|")
        try:
            for name in parts:
                left = float("inf") if args.budget is None else args.budget - since_start()
                if name in TE_BOXES and te_missing:
                    emit(out, f"| {name} | needs Transformer Engine | {te_missing[:150].replace('|', '/')} | | SKIPPED |")
                elif left < MIN_BOX:
                    emit(out, f"| {name} | not run: {max(left, 0):.0f} s of --budget {args.budget:.0f} left | | | SKIPPED |")
                else:
                    run_part(name, min(boxes[name], left), args, out)
        except Terminated:
            emit(out, f"| all | terminated after {since_start():.0f} s, at part {name}; the parts after it did not run "
                      "| | | STOPPED |")
            raise SystemExit(128 + signal.SIGTERM) from None
        emit(out, f"| all | seconds since the command started | {since_start():.0f} | | |")


def since_start() -> float:
    """Seconds since this process started: its imports included, as a user waits for them."""
    import psutil

    return time.time() - psutil.Process().create_time()


if __name__ == "__main__":
    main()
