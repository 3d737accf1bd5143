"""Benchmark one training step on one GPU: our megatron-core Qwen3.5 (local spec with each attention kernel)
against transformers' Qwen3.5 with flash-linear-attention kernels, same shape, same run.

    python -m tools.bench_train [--hf-config Qwen3.5-2B-Base/config.json] [--seqs 4096,8192] [--only REGEX]

Random init, BF16 with fp32 master weights, AdamW step included (torch's fused kernel on both sides, or TE's
FusedAdam on ours where TE is installed; one row runs the multi-tensor AdamW megatron builds without TE).
Every row names its memory policy, and the "vs HF" column compares rows with the same policy only
(transformers' gradient checkpointing is megatron's full recomputation, one layer at a time; megatron's
selective recomputation has no transformers counterpart). After the table, each side's fastest row that fits,
labelled. Each row also prints its first warm-up step's seconds, what a fresh process pays once (fla's
autotuning, torch.compile), and with --profile its operator calls and kernel launches per step (a host-bound
step pays for each) and the GPU's kernel time by kind (GEMM, attention, GDN, ...: where a GPU-bound step goes).
A row that runs out of memory is reported as OOM, one that fails otherwise (e.g. a kernel that does not compile)
by its error's type with the traceback on stderr, and the run goes on. MFU counts
model FLOPs (megatron_ext/flops.py), not recomputed ones. A step is one micro-batch's forward and backward, then the
update (gradient sync, clipping, the optimizer step), timed apart: "update s", and from the two the MFU of a step
that updates once per 32 sequences on a GPU, the recipe's 256 over 8 GPUs (32 micro-batches of one sequence, or
32 / --micro-batch; --accumulate). MFU is against the GPU's dense BF16 peak, for the FP8 rows too.
"resident GiB" is what stays allocated between steps (weights, gradients, optimizer state); peak minus
resident is the step's activations and temporaries. On one GPU the distributed optimizer shards nothing, so
resident is about 18 bytes per parameter (bf16 weights, fp32 gradients, fp32 master weights, two Adam
moments), about 31.5 GiB for the 2B; over DP ranks it falls towards 6 + 12/DP bytes while the activations stay:
peak minus resident at seq 8192 is the figure for issue 12's "2B at seq 8192 in 40 GB". Goals (issue 12): >=
1.5x the transformers + fla step and >= 40% MFU without Transformer Engine on an H100.

The rows are :data:`SETUPS`, a list of named configurations, Transformer Engine's among them (BF16, and FP8
hybrid with delayed and with current (tensorwise) scaling, under the trainer's policy for a fused attention):
where TE does not import they report "needs TE" and take no time. Goals (issue 16): TE BF16 >= 45% MFU on an
H100, FP8 >= 1.4x TE BF16's tokens/s.
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import functools
import gc
import io
import pstats
import re
import time
import traceback
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Callable

import torch

# The Qwen3.5-2B shape as far as it matters for speed (pass --hf-config with the real config.json for
# recorded numbers): tied embeddings, 24 layers 3:1 GDN:attention, GDN 16 key / 16 value heads of 128.
APPROX_2B = dict(
    vocab_size=248320, hidden_size=2048, intermediate_size=6144, num_hidden_layers=24,
    num_attention_heads=8, num_key_value_heads=2, head_dim=256, linear_key_head_dim=128,
    linear_value_head_dim=128, linear_num_key_heads=16, linear_num_value_heads=16, tie_word_embeddings=True,
)

# Sequences per update and GPU in the recipe (launch/configs/neuro_cpt_2b.yaml: 256 per update over 8 GPUs):
# the micro-batches of one sequence a recipe step accumulates before its update.
RECIPE_SEQUENCES_PER_GPU = 256 // 8

# megatron's recomputation settings by policy name. "selective-attn" recomputes core attention, which the
# masked path needs (its [T, T] scores are its largest activation) and which saves next to nothing with a
# fused kernel (it keeps no scores); "selective-mlp" recomputes the MLPs, the largest activations once
# attention is fused. The trainer's ``recompute: selective`` is the one of the two that fits its kernel
# (megatron_ext.spec.selective_recompute_modules). "full" recomputes every layer from its input, as
# transformers' gradient checkpointing does.
RECOMPUTE = {
    "none": {},
    "selective-attn": dict(recompute_granularity="selective", recompute_modules=["core_attn"]),
    "selective-mlp": dict(recompute_granularity="selective", recompute_modules=["mlp"]),
    "full": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
}


@dataclass
class TrainStep:
    """A training step in its two phases, timed apart: forward and backward of one micro-batch, then the update
    (gradient sync, clipping, the optimizer step, zeroing the gradients). A step of the recipe accumulates 32
    micro-batches per GPU (256 sequences over 8 GPUs) before one update: the update's share of its time is
    far smaller than in a one-micro-batch step."""

    forward_backward: Callable[[], None]
    update: Callable[[], None]
    release: Callable[[], None] = lambda: None  # measure() calls it: the next row gets the memory back
    model: object = None  # what the step trains (for the tests)

    def __call__(self) -> None:
        self.forward_backward()
        self.update()


def ours(config, seq: int, micro_batch: int, *, memory: str, backend: str = "local", attention_kernel: str = "auto",
         fused_adam: bool = True, **overrides) -> TrainStep:
    """Our model (megatron DDP + distributed optimizer, as the trainer runs it) and its training step."""
    from megatron_ext import build_model
    from megatron_ext.packing import Documents
    from megatron_ext.train import build_optimizer, data_parallel, release, torch_adams
    from megatron_ext.train_config import TrainConfig

    overrides = {"gradient_accumulation_fusion": TrainConfig.gradient_accumulation_fusion, **overrides}  # the trainer's
    model = build_model(config, backend, attention_kernel=attention_kernel, params_dtype=torch.bfloat16,
                        **RECOMPUTE[memory], **overrides)
    ddp = data_parallel(model)
    opt = build_optimizer(ddp, TrainConfig(fused_adam=fused_adam), torch.bfloat16)  # the recipe's AdamW
    if not fused_adam and not torch_adams(opt):
        raise RuntimeError("no torch AdamW to run unfused: with Transformer Engine or Apex installed megatron runs "
                           "their FusedAdam")
    ids = torch.randint(0, config.vocab_size, (micro_batch, seq), device="cuda")
    pos = torch.arange(seq).expand(micro_batch, seq)
    documents = Documents.from_positions(pos).pin_memory()  # on the host, as the trainer's loader finds them
    pos = pos.cuda()

    def forward_backward():
        packed = documents.to("cuda").packed_seq_params()  # per micro-batch, as the trainer's forward_step
        ddp(ids, pos, labels=torch.roll(ids, -1, 1), packed_seq_params=packed).mean().backward()

    def update():
        ddp.finish_grad_sync()
        opt.step()
        ddp.zero_grad_buffer()
        opt.zero_grad()

    return TrainStep(forward_backward, update, functools.partial(release, ddp), model)


def baseline_conv1d() -> str:
    """Which causal conv1d transformers' Qwen3.5 runs in the baseline: the ``causal_conv1d`` package where
    installed, else fla's Triton kernel, which :func:`hf` puts in its slot (transformers' own fallback is
    pure torch: a slower baseline would flatter our ratio; on an H200 it ran that fallback)."""
    import importlib.util

    found = importlib.util.find_spec("causal_conv1d") is not None
    return "causal_conv1d package" if found else "fla's Triton kernel (causal_conv1d not installed)"


def conv1d_for_transformers(kernel: str) -> Callable[..., torch.Tensor]:
    """transformers' ``causal_conv1d_fn`` (x [B, C, T] in and out, SiLU, no bias, unpacked rows) computed by
    :func:`megatron_ext.kernels.causal_conv1d_silu` with ``kernel`` (fla: its Triton conv)."""
    from megatron_ext.kernels import causal_conv1d_silu

    def conv(x, weight, bias=None, activation=None, seq_idx=None, cu_seqlens=None, **_):
        # the rest of the layer's keyword arguments (use_cache, ...) reach the slot too: transformers' own
        # wrapper drops what a kernel does not take, and so does this
        packed = seq_idx is not None or cu_seqlens is not None
        if bias is not None or activation != "silu" or packed:
            raise ValueError(f"conv1d_for_transformers: SiLU without bias on unpacked rows only (bias "
                             f"{'set' if bias is not None else 'None'}, activation {activation}, packed {packed})")
        return causal_conv1d_silu(x.transpose(1, 2), weight, None, kernel).transpose(1, 2)

    return conv


def hf(config, seq: int, micro_batch: int, *, memory: str, device: str = "cuda") -> TrainStep:
    """transformers' Qwen3.5 (fla kernels for GDN and, see :func:`baseline_conv1d`, its conv; SDPA attention)
    with fused AdamW; ``memory``: none | full.

    Mixed precision as transformers' Trainer runs it with ``bf16=True`` (fp32 weights, gradients and Adam
    state; bf16 autocast): the numerics ours has (bf16 compute, fp32 master weights). Weights kept in bf16
    would be cheaper but do not train at the recipe's lr 2e-6: an update of about lr is far below half a
    bf16 ulp of a weight (2^-9 relative), so AdamW's step rounds back to the same weight. On an H100
    (2026-11-27) that pure-bf16 variant took 0.251 s per 4096-token step against ours' 0.297."""
    import importlib.util

    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig
    from transformers.models.qwen3_5 import modeling_qwen3_5

    if importlib.util.find_spec("causal_conv1d") is None:  # the module global its forward calls
        modeling_qwen3_5.causal_conv1d_fn = conv1d_for_transformers("fla" if device == "cuda" else "torch")
    hf_config = Qwen3_5TextConfig(**config.to_hf_text_dict())
    with torch.device(device):  # initialise on the GPU: a 2B init on the CPU takes longer than the benchmark
        model = Qwen3_5ForCausalLM._from_config(hf_config, dtype=torch.float32, attn_implementation="sdpa")
    model.config.use_cache = False  # training: no generation cache to build (and no final GDN states to keep)
    if {"full": True, "none": False}[memory]:
        model.gradient_checkpointing_enable()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-6, fused=True)
    ids = torch.randint(0, config.vocab_size, (micro_batch, seq), device=device)

    def forward_backward():
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()

    def update():
        opt.step()
        opt.zero_grad(set_to_none=True)

    return TrainStep(forward_backward, update, model=model)


@dataclass(frozen=True)
class Setup:
    """One benchmark row: an implementation, its memory policy, and how to build its training step."""

    name: str
    memory: str
    build: Callable[..., TrainStep]  # (config, seq, micro_batch) -> step
    baseline: bool = False  # transformers + fla: the rows the ratios are taken against
    needs_te: bool = False  # a Transformer Engine row: reported, not run, where TE does not import


def _ours(name: str, memory: str, **kwargs) -> Setup:
    return Setup(name, memory, functools.partial(ours, memory=memory, **kwargs), needs_te=kwargs.get("backend") == "te")


def _hf(memory: str) -> Setup:
    return Setup("transformers + fla", memory, functools.partial(hf, memory=memory), baseline=True)


SETUPS = [
    # the baseline first: a command cut short by its time box keeps the row every ratio is taken against
    _hf("none"),
    _hf("full"),
    # the attention kernels, each under the trainer's selective recomputation for it
    _ours("local-fused", "selective-mlp", attention_kernel="fused"),
    # each layer's elementwise chains compiled (megatron_ext/fusions.py), for the host-bound step
    _ours("local-fused, compiled elementwise", "selective-mlp", attention_kernel="fused", compile_elementwise=True),
    # what megatron's fused cross entropy would gain (off in the compiled row: megatron_ext/config.py says why), and
    # what recomputing the MLPs costs the host (its recomputed forward and megatron's checkpoint function are host
    # time in a host-bound step)
    _ours("local-fused, compiled elementwise, fused loss", "selective-mlp", attention_kernel="fused",
          compile_elementwise=True, cross_entropy_loss_fusion=True),
    # ... and what adding each weight gradient into the fp32 buffer inside its GEMM (the trainer's default) gains
    _ours("local-fused, compiled elementwise, unfused weight gradients", "selective-mlp", attention_kernel="fused",
          compile_elementwise=True, gradient_accumulation_fusion=False),
    _ours("local-fused, compiled elementwise", "none", attention_kernel="fused", compile_elementwise=True),
    _ours("local-fused, loss in 1024-token pieces", "selective-mlp", attention_kernel="fused", loss_chunk=1024),
    # megatron's torch AdamW as megatron builds it (multi-tensor) rather than the trainer's fused kernel
    _ours("local-fused, multi-tensor AdamW", "selective-mlp", attention_kernel="fused", fused_adam=False),
    _ours("local-masked", "selective-attn", attention_kernel="masked"),
    _ours("local-flex", "selective-mlp", attention_kernel="flex"),  # after masked: torch.compile builds it first
    # the fused kernel under the other policies: the like-for-like pairs with transformers are none and full
    _ours("local-fused", "none", attention_kernel="fused"),
    _ours("local-fused", "selective-attn", attention_kernel="fused"),
    _ours("local-fused", "full", attention_kernel="fused"),
    # Transformer Engine: BF16, FP8 hybrid with delayed and with current (tensorwise) scaling
    _ours("te-bf16", "selective-mlp", backend="te"),
    _ours("te-bf16, compiled elementwise", "selective-mlp", backend="te", compile_elementwise=True),
    _ours("te-fp8-delayed", "selective-mlp", backend="te", fp8="hybrid", fp8_recipe="delayed"),
    _ours("te-fp8-tensorwise", "selective-mlp", backend="te", fp8="hybrid", fp8_recipe="tensorwise"),
]
# the GPU check's bench part: one like-for-like pair that fits any 80 GB GPU
QUICK = [_ours("ours (auto)", "full", backend="auto"), _hf("full")]


@dataclass
class Result:
    setup: Setup
    seq: int
    seconds: float | None = None  # None: did not run, see ``failure``
    update_seconds: float | None = None  # the update's part of ``seconds``
    peak_gib: float | None = None
    resident_gib: float | None = None
    tokens_per_s: float | None = None
    mfu: float | None = None
    mfu_accumulated: float | None = None  # at ``accumulate`` micro-batches per update (see measure)
    failure: str = ""  # "OOM", or the type of the error it raised


def _time_steps(step: TrainStep, warmup: int, iters: int) -> tuple[float, float, float, float, float | None]:
    """Seconds per step and of its update, peak GiB over the timed steps, GiB still allocated after them, and
    the first warm-up step's seconds (what a fresh process pays once: fla's autotuning where no configurations
    ship, torch.compile's compiling). A synchronisation between the phases (to time them apart) costs the
    step next to nothing."""
    first = None
    for i in range(warmup):
        begin = time.perf_counter()
        step()
        torch.cuda.synchronize()
        first = time.perf_counter() - begin if i == 0 else first
    torch.cuda.reset_peak_memory_stats()
    start, update = time.perf_counter(), 0.0
    for _ in range(iters):
        step.forward_backward()
        torch.cuda.synchronize()
        begin = time.perf_counter()
        step.update()
        torch.cuda.synchronize()
        update += time.perf_counter() - begin
    return (time.perf_counter() - start) / iters, update / iters, torch.cuda.max_memory_allocated() / 2**30, \
        torch.cuda.memory_allocated() / 2**30, first


def profile_step(step: Callable[[], None], path: Path, rows: int = 30) -> str:
    """Two more steps, profiled, written to ``path`` after a line of counts (:func:`launch_counts`) and, on a GPU,
    its kernel time by kind (:func:`device_time_line`), the line returned.
    Under torch.profiler: the operators and kernels that took the most device time (CPU time without CUDA), then
    the operators by their own host time. Under cProfile: the Python functions by their own time and with what
    they call, for a host-bound step the answer to where the host's time goes (fla's wrappers and Triton's launcher are Python,
    which torch.profiler counts in the enclosing operator's own time); cProfile slows Python calls, so read it
    for shares, not seconds."""
    cuda = torch.cuda.is_available()
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as prof:
        step()
        if cuda:
            torch.cuda.synchronize()
    python = cProfile.Profile()
    python.runcall(step)
    if cuda:
        torch.cuda.synchronize()
    by_own, by_cumulative = io.StringIO(), io.StringIO()
    pstats.Stats(python, stream=by_own).sort_stats("tottime").print_stats(rows)
    pstats.Stats(python, stream=by_cumulative).sort_stats("cumulative").print_stats(rows)
    key = "cuda_time_total" if cuda else "cpu_time_total"
    events = prof.events()
    by_kind = device_time_line(events)
    counts = launch_counts(events) + (f"; {by_kind}" if by_kind else "")
    sections = [counts, "Device time:", prof.key_averages().table(sort_by=key, row_limit=rows),
                "Host time, by operator (its own, without the operators it calls):",
                prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows),
                "Host time, by Python function, its own (cProfile, one more step):", by_own.getvalue().strip(),
                "Host time, by Python function, with what it calls (the same step):", by_cumulative.getvalue().strip()]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(sections) + "\n")
    return counts


def operator_calls(events) -> collections.Counter:
    """Calls per aten operator (``aten::`` dropped) among profiler ``events``: those not called by another aten
    operator, i.e. what Python and autograd ask ATen for; a compiled chain counts only its extern calls (such
    as matmuls)."""
    return collections.Counter(e.name.removeprefix("aten::") for e in events if e.name.startswith("aten::")
                               and not (e.cpu_parent and e.cpu_parent.name.startswith("aten::")))


def launch_counts(events) -> str:
    """What a host-bound step pays for, counted: operator calls (:func:`operator_calls`) and, on CUDA, kernel
    launches (the runtime's and the driver's launch calls: ATen's kernels, and Triton's, i.e. fla's and
    inductor's)."""
    launches = sum(e.name.startswith(("cudaLaunchKernel", "cuLaunchKernel")) for e in events)
    calls = f"operator calls: {operator_calls(events).total()}"
    return calls + (f"; kernel launches: {launches}" if torch.cuda.is_available() else "")


# What a GPU's time in a step goes to, by kernel name (the first pattern that matches; torch.profiler's kernel names
# on Hopper: cuBLAS's nvjet and sm90 GEMMs, FlashAttention-2 through torch, fla's Triton kernels named after
# their stage, inductor's triton_poi/red/per chains, ATen's elementwise and reduction templates)
KERNEL_KINDS = [
    ("compiled chains", r"^triton_(poi|red|per|tem)_"),
    ("optimizer", r"(?i)adam|multi_tensor_apply"),
    ("communication", r"(?i)nccl"),
    ("attention", r"(?i)flash|fmha|sdpa|fused_attn"),
    ("GDN (fla)", r"chunk|delta|l2norm|solve_tril|merge_16x16|wy_repr|w_u_|kkt|conv1d|cumsum|gdn_gate|beta_sigmoid"),
    ("GEMM", r"(?i)nvjet|gemm|cutlass|xmma"),
    ("copies and fills", r"(?i)copy|memcpy|memset|fill|CatArray"),
    ("reductions", r"reduce_kernel"),
    ("elementwise", r"elementwise_kernel"),
]


def device_time_by_kind(events) -> list[tuple[str, float, int]]:
    """(kind, milliseconds, kernels) of the device's events among profiler ``events`` (:data:`KERNEL_KINDS`,
    then "other"), the largest first: where the GPU's share of a step goes. Empty without device events."""
    totals: dict[str, list] = {}
    for e in events:
        if e.device_type == torch.autograd.DeviceType.CPU:
            continue
        kind = next((k for k, pattern in KERNEL_KINDS if re.search(pattern, e.name)), "other")
        total = totals.setdefault(kind, [0.0, 0])
        total[0] += e.time_range.elapsed_us() / 1e3
        total[1] += 1
    return sorted(((k, ms, n) for k, (ms, n) in totals.items()), key=lambda row: -row[1])


def device_time_line(events) -> str:
    """:func:`device_time_by_kind` as one line, or "" without device events."""
    kinds = device_time_by_kind(events)
    if not kinds:
        return ""
    return (f"GPU kernel time {sum(ms for _, ms, _ in kinds):.1f} ms: "
            + ", ".join(f"{kind} {ms:.1f} ({n})" for kind, ms, n in kinds))


def measure(config=None, seqs=(4096, 8192), micro_batch: int = 1, warmup: int = 3, iters: int = 10,
            setups: list[Setup] = SETUPS, profile_dir: Path | None = None,
            accumulate: int = RECIPE_SEQUENCES_PER_GPU) -> list[Result]:
    """Every setup at every sequence length, one after the other on this GPU (each model is freed before
    the next is built); a setup that fails gives a Result with ``seconds=None`` and its ``failure``. With
    ``profile_dir``, each setup that ran profiles one more step there (:func:`profile_step`). Besides the
    measured one-micro-batch step, ``mfu_accumulated`` is the MFU of a step of ``accumulate`` micro-batches
    and one update, from the two phases' times (the recipe's step: 32 at 8 GPUs)."""
    if not torch.cuda.is_available():
        raise RuntimeError("tools.bench_train needs a CUDA device")
    from megatron_ext import Qwen35Config, parallel
    from megatron_ext.flops import peak_tflops, train_flops_per_token
    from megatron_ext.spec import have_transformer_engine

    parallel.initialize()
    config = config or Qwen35Config(**APPROX_2B)
    peak = peak_tflops(torch.cuda.get_device_name())
    results = []
    for seq in seqs:
        tokens = seq * micro_batch
        for setup in setups:
            result, step = Result(setup, seq), None
            if setup.needs_te and not have_transformer_engine():
                result.failure = "needs TE"
                results.append(result)
                continue
            try:
                step = setup.build(config, seq, micro_batch)
                seconds, update, result.peak_gib, result.resident_gib, first = _time_steps(step, warmup, iters)
                if first is not None:
                    print(f"# {setup.name} [{setup.memory}] seq {seq}: first step {first:.1f} s (compiling and "
                          "autotuning included)", flush=True)
                result.seconds, result.update_seconds, result.tokens_per_s = seconds, update, tokens / seconds
                if peak:
                    flops = train_flops_per_token(config, seq) * tokens
                    result.mfu = flops / seconds / (peak * 1e12)
                    result.mfu_accumulated = flops * accumulate / ((seconds - update) * accumulate + update) / (peak * 1e12)
                if profile_dir is not None:
                    rows = f"x{micro_batch}" if micro_batch > 1 else ""  # another micro-batch, another file
                    name = re.sub(r"[^A-Za-z0-9.-]+", "_", f"{setup.name}-{setup.memory}-{seq}{rows}")
                    print(f"# {setup.name} [{setup.memory}] seq {seq} profiled: "
                          f"{profile_step(step, Path(profile_dir) / f'{name}.txt')}", flush=True)
            except torch.OutOfMemoryError:
                result.failure = "OOM"
            except Exception as e:  # one broken setup must not cost the others' measurements
                traceback.print_exc()
                result.failure = type(e).__name__
            if step is not None:
                step.release()
            step = None
            gc.collect()  # this setup's model and optimizer (also when an OOM left them in a traceback)
            torch.cuda.empty_cache()
            results.append(result)
            # as soon as it is known: a run stopped at a time limit still reports the rows it finished
            print(f"# {setup.name} [{setup.memory}] seq {seq}: {' / '.join(cells(result))}", flush=True)
    return results


CELLS = "s/step / update s / tokens/s / MFU / MFU accumulated / peak GiB / resident GiB"


def cells(r: Result) -> list[str]:
    """:data:`CELLS` as table cells (the failure when it did not run)."""
    if r.seconds is None:
        return [r.failure] * 7
    percent = [f"{m:.1%}" if m is not None else "n/a" for m in (r.mfu, r.mfu_accumulated)]
    return [f"{r.seconds:.3f}", f"{r.update_seconds:.3f}", f"{r.tokens_per_s:,.0f}", *percent,
            f"{r.peak_gib:.1f}", f"{r.resident_gib:.1f}"]


def table(results: list[Result], accumulate: int = RECIPE_SEQUENCES_PER_GPU) -> list[str]:
    """Markdown: every row with its ratio to transformers under the same memory policy, then each side's
    fastest row that fits at each sequence length."""
    hf_time = {(r.seq, r.setup.memory): r.seconds for r in results if r.setup.baseline and r.seconds}
    lines = ["| implementation | memory policy | seq | s/step | update s | tokens/s | MFU | MFU at "
             f"{accumulate} micro-batches per update | peak GiB | resident GiB | vs HF, same policy |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        base = hf_time.get((r.seq, r.setup.memory))
        ratio = f"{base / r.seconds:.2f}x" if base and r.seconds and not r.setup.baseline else ""
        lines.append(f"| {r.setup.name} | {r.setup.memory} | {r.seq} | {' | '.join(cells(r))} | {ratio} |")
    lines += ["", "| seq | best of ours that fits | best of transformers + fla that fits | ratio |", "|---|---|---|---|"]
    for seq in dict.fromkeys(r.seq for r in results):
        best = [max((r for r in results if r.seq == seq and r.seconds and r.setup.baseline == side),
                    key=lambda r: r.tokens_per_s, default=None) for side in (False, True)]
        shown = [f"{b.setup.name} [{b.setup.memory}]: {b.tokens_per_s:,.0f} tok/s, {b.peak_gib:.1f} GiB" if b else "none"
                 for b in best]
        ratio = f"{best[1].seconds / best[0].seconds:.2f}x" if all(best) else ""
        lines.append(f"| {seq} | {shown[0]} | {shown[1]} | {ratio} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-config")
    p.add_argument("--seqs", default="4096,8192", help="comma-separated sequence lengths")
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--only", help="run only the setups whose 'name [memory]' matches this regular expression")
    p.add_argument("--profile", metavar="DIR", help="profile one more step of each row: top kernels, a table per row")
    p.add_argument("--accumulate", type=int,
                   help="micro-batches per update for the 'MFU accumulated' column (default: the recipe's 256 "
                        "sequences per update over 8 GPUs, 32 / micro-batch)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    from megatron_ext import Qwen35Config

    setups = [s for s in SETUPS if not args.only or re.search(args.only, f"{s.name} [{s.memory}]")]
    config = Qwen35Config.from_hf(args.hf_config) if args.hf_config else None
    seqs = [int(x) for x in args.seqs.split(",")]
    args.accumulate = args.accumulate or max(1, RECIPE_SEQUENCES_PER_GPU // args.micro_batch)
    results = measure(config, seqs, args.micro_batch, args.warmup, args.iters, setups, args.profile, args.accumulate)
    print(f"\n### Training step ({date.today()}, {torch.cuda.get_device_name()}, micro-batch {args.micro_batch}, "
          f"shape {'from ' + args.hf_config if args.hf_config else 'APPROX_2B'})\n")
    print("\n".join(table(results, args.accumulate)))
    print(f"\ntransformers' causal conv1d: {baseline_conv1d()}")


if __name__ == "__main__":
    main()
