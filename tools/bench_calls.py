"""Operator calls per training micro-batch on CPU, eager against ``compile_elementwise``: what a host-bound GPU
step pays for (docs/benchmarks.md), counted where no GPU is needed.

    python -m tools.bench_calls [--layers 4] [--tokens 64]

A tiny random bf16 model (3 GDN layers to 1 attention layer, selective-mlp recomputation unless a row says
otherwise: :data:`ROWS`) in megatron's DDP as the trainer wraps it, one micro-batch's forward and backward after
two warm-up ones (the compiled model compiles with inductor's C++ backend there), counted as
``tools/bench_train.py --profile`` counts them (:func:`tools.bench_train.operator_calls`). The GDN kernels are
stood in by an identity, since on a GPU they are fla's Triton kernels, not the pure-torch ones the CPU runs;
``--with-gdn-kernels`` counts those too.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
from unittest import mock

import torch

SHOWN = ("mul", "add", "to", "pow", "rsqrt")  # the elementwise operators the compiled chains absorb
# (row, compile_elementwise, count()'s keywords): selective-mlp recomputation unless a row says otherwise
ROWS = [
    ("eager (default)", False, {}),
    ("`compile_elementwise: true`", True, {}),
    ("`compile_elementwise: true`, unfused loss", True, dict(cross_entropy_loss_fusion=False)),
    ("`compile_elementwise: true`, no recomputation", True, dict(memory="none")),
]


class _Identity(torch.autograd.Function):
    """A GDN kernel's stand-in: passes its value input (and its gradient) through, calling nothing else."""

    @staticmethod
    def forward(ctx, values):
        return values.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad


def count(compile_elementwise: bool, layers: int = 4, tokens: int = 64, gdn_kernels: bool = False,
          memory: str = "selective-mlp", **overrides) -> collections.Counter:
    """Calls per aten operator (``aten::`` dropped) of one micro-batch, forward and backward, under ``memory`` (a
    :data:`tools.bench_train.RECOMPUTE` policy); ``overrides``: megatron config values."""
    from megatron_ext import Qwen35Config, build_model, layers as model_layers
    from megatron_ext.train import data_parallel, release
    from tools.bench_train import RECOMPUTE, operator_calls
    from tools.tiny_qwen35 import text_config

    config = Qwen35Config.from_hf(text_config(
        layer_types=["linear_attention"] * (layers - 1) + ["full_attention"]).to_dict())
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

    def update():  # what the trainer does between micro-batches' updates, minus the optimizer: not counted
        ddp.finish_grad_sync()
        ddp.zero_grad_buffer()

    with stand_ins, torch._dynamo.config.patch(disable=False):
        torch._dynamo.reset()  # code first run while dynamo was off stays uncompiled otherwise
        step(), update(), step(), update()
        with torch.profiler.profile() as prof:
            step()
    release(ddp)
    return operator_calls(prof.events())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--with-gdn-kernels", action="store_true", help="count the pure-torch GDN kernels too")
    args = p.parse_args(argv)
    print(f"| {args.layers} layers, {args.tokens} tokens, bf16 | operator calls | "
          + " | ".join(f"`{op}`" for op in SHOWN) + " |")
    print("|---" * (2 + len(SHOWN)) + "|")
    for name, compiled, kwargs in ROWS:
        calls = count(compiled, args.layers, args.tokens, args.with_gdn_kernels, **kwargs)
        print(f"| {name} | {calls.total():,} | " + " | ".join(str(calls[op]) for op in SHOWN) + " |", flush=True)


if __name__ == "__main__":
    main()
