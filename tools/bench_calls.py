"""Operator calls and host time per training micro-batch on CPU, eager against ``compile_elementwise``: what a
host-bound GPU step pays for (docs/benchmarks.md), measured where no GPU is needed.

    python -m tools.bench_calls [--layers 4] [--tokens 64] [--rounds 5]

A tiny random bf16 model (GDN and attention layers 3:1, as the releases lay them out; selective-mlp recomputation
unless a row says otherwise: :data:`ROWS`) in megatron's DDP as the trainer wraps it, one micro-batch's forward
and backward after two warm-up ones (the compiled model compiles with inductor's C++ backend there), counted as
``tools/bench_train.py --profile`` counts them (:func:`tools.bench_train.operator_calls`), then timed, the best
of ``--rounds`` rounds of 5 micro-batches on one thread. The GDN kernels are stood in by an identity, since on a
GPU they are fla's Triton kernels, not the pure-torch ones the CPU runs; ``--with-gdn-kernels`` counts those
too.

The host time is a proxy, not a GPU figure: the host's own work per micro-batch (Python, megatron, dynamo's
guards and wrappers, dispatch, and the tiny model's arithmetic), without the kernel launches and fla's Triton
launcher that a GPU step adds. On the H100 (docs/benchmarks.md) the compiled chains left the host-bound step
at seq 4096 where it was (0.288 s, eager 0.293 s), as this proxy shows them.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import math
import time
from typing import Callable, Iterator
from unittest import mock

import torch

SHOWN = ("mul", "add", "to", "pow", "rsqrt")  # the elementwise operators the compiled chains absorb
# (row, compile_elementwise, micro_batch()'s keywords): selective-mlp recomputation unless a row says otherwise
ROWS = [
    ("eager (default)", False, {}),
    ("`compile_elementwise: true`", True, {}),
    ("`compile_elementwise: true`, fused loss", True, dict(cross_entropy_loss_fusion=True)),
    ("`compile_elementwise: true`, no recomputation", True, dict(memory="none")),
    ("eager, no recomputation", False, dict(memory="none")),
]


class _Identity(torch.autograd.Function):
    """A GDN kernel's stand-in: passes its value input (and its gradient) through, calling nothing else."""

    @staticmethod
    def forward(ctx, values):
        return values.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad


@contextlib.contextmanager
def micro_batch(compile_elementwise: bool, layers: int = 4, tokens: int = 64, gdn_kernels: bool = False,
                memory: str = "selective-mlp", **overrides) -> Iterator[Callable[[], None]]:
    """One training micro-batch of a tiny model (forward and backward, its gradients added to the others' as in
    a step's accumulation) as a function, compiled and warmed up by two steps, under ``memory`` (a
    :data:`tools.bench_train.RECOMPUTE` policy); ``overrides``: megatron config values."""
    from megatron_ext import Qwen35Config, build_model, layers as model_layers
    from megatron_ext.train import data_parallel, release
    from tools.bench_train import RECOMPUTE
    from tools.tiny_qwen35 import text_config

    # the releases' 3:1 layout (every fourth layer attention, as the 2B's 24), the last one attention too
    config = Qwen35Config.from_hf(text_config(layer_types=[
        "full_attention" if i % 4 == 3 or i == layers - 1 else "linear_attention" for i in range(layers)]).to_dict())
    model = build_model(config, "local", params_dtype=torch.bfloat16, compile_elementwise=compile_elementwise,
                        **RECOMPUTE[memory], **overrides)
    # as the trainer wraps it (its hooks add each gradient to the fp32 main_grad), but not overlapped: that waits
    # for every parameter's gradient, and the stand-in GDN kernel below gives q, k and the gates none
    ddp = data_parallel(model, overlap=False)
    ids = torch.randint(0, config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(tokens)[None]
    stand_ins = contextlib.ExitStack()
    if not gdn_kernels:
        stand_ins.enter_context(mock.patch.object(model_layers, "gated_delta_rule", lambda q, k, v, *_: _Identity.apply(v)))
        stand_ins.enter_context(mock.patch.object(model_layers, "causal_conv1d_silu", lambda x, *_: _Identity.apply(x)))

    def step():
        ddp(ids, positions, labels=torch.roll(ids, -1, 1)).float().mean().backward()

    def update():  # what the trainer does after a step's micro-batches, minus the optimizer
        ddp.finish_grad_sync()
        ddp.zero_grad_buffer()

    with stand_ins, torch._dynamo.config.patch(disable=False):
        torch._dynamo.reset()  # code first run while dynamo was off stays uncompiled otherwise
        step(), update(), step(), update()
        try:
            yield step
        finally:
            release(ddp)


def count(compile_elementwise: bool, **kwargs) -> collections.Counter:
    """Calls per aten operator of one micro-batch (:func:`micro_batch` takes ``kwargs``)."""
    with micro_batch(compile_elementwise, **kwargs) as step:
        return calls(step)


def calls(step: Callable[[], None]) -> collections.Counter:
    """Calls per aten operator (``aten::`` dropped) of one ``step``."""
    from tools.bench_train import operator_calls

    with torch.profiler.profile() as prof:
        step()
    return operator_calls(prof.events())


def host_ms(step: Callable[[], None], rounds: int = 5, steps: int = 5) -> float:
    """Milliseconds of one ``step`` on this CPU, the best of ``rounds`` rounds of ``steps``: the host's own work,
    which a host-bound GPU step waits on (kernel launches aside). On one thread, so that the arithmetic does not
    hide the host's work on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        best = math.inf
        for _ in range(rounds):
            start = time.perf_counter()
            for _ in range(steps):
                step()
            best = min(best, (time.perf_counter() - start) / steps)
    finally:
        torch.set_num_threads(threads)
    return best * 1e3


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5, help="timed rounds of 5 micro-batches (0: count only)")
    p.add_argument("--with-gdn-kernels", action="store_true", help="count the pure-torch GDN kernels too")
    args = p.parse_args(argv)
    print(f"| {args.layers} layers, {args.tokens} tokens, bf16 | operator calls | "
          + " | ".join(f"`{op}`" for op in SHOWN) + " | host ms (CPU, one thread) |")
    print("|---" * (3 + len(SHOWN)) + "|")
    for name, compiled, kwargs in ROWS:
        with micro_batch(compiled, args.layers, args.tokens, args.with_gdn_kernels, **kwargs) as step:
            counted = calls(step)
            host = f"{host_ms(step, args.rounds):.1f}" if args.rounds else "n/a"
        print(f"| {name} | {counted.total():,} | " + " | ".join(str(counted[op]) for op in SHOWN) + f" | {host} |",
              flush=True)


if __name__ == "__main__":
    main()
