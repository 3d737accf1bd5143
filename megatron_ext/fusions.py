"""A layer's elementwise chains, compiled into a few kernels by ``torch.compile`` when the model's config asks
(``compile_elementwise``; the trainer's key of the same name).

Why: on an H100 the local spec's step is host-bound (docs/benchmarks.md, the fourth GPU session): the GPU
idles for about 40% of it while Python launches thousands of small kernels. Run eagerly, an RMSNorm is about
ten of them forward and more backward, and a model has four to five norms per layer; compiled, it is one or
two each way. With the flag on, the MLP also runs megatron-core's compiled SwiGLU (``bias_activation_fusion``).
The loss stays megatron's unfused cross entropy: the fused one (``cross_entropy_loss_fusion``) held 3.8 GiB more
a 4096-token sequence on an H200 and was no faster (docs/benchmarks.md, 2026-11-30).

Measured on an H100 (docs/benchmarks.md, 2026-11-28): the 2B step 1.27x at seq 8192 and 1.02x at 4096, half the
kernel launches, 11-12 s of compiling in a fresh process; on an H200 (2026-11-30) 1.24x eager at seq 4096 without
recomputation. The flagship recipes turn it on; the library default stays off. Where dynamo is off (on CPU
:mod:`megatron_ext.cpu_patches` turns it off, or ``TORCHDYNAMO_DISABLE=1``) the chains run eagerly either way.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
from megatron.core.transformer.transformer_config import TransformerConfig


# Compiled variants each chain may keep (dynamo's default: 8, then it runs the chain eagerly with a warning). An
# RMSNorm alone meets hidden states and attention heads (q and k: other strides), with and without grad
# (training, recomputation, evaluation): 8, the default, after two training steps of the tiny model and
# evaluation forwards at three lengths; 12 with two more training steps, one at a new length.
RECOMPILE_LIMIT = 32


@dataclass
class Qwen35TransformerConfig(TransformerConfig):
    """megatron-core's TransformerConfig with the one switch of ours that the layers read from it."""

    compile_elementwise: bool = False

    def __post_init__(self):
        super().__post_init__()
        # here, once per model, not in Elementwise.on: reading dynamo's config costs ~10 us a call, per norm
        if self.compile_elementwise and torch._dynamo.config.recompile_limit < RECOMPILE_LIMIT:
            torch._dynamo.config.recompile_limit = RECOMPILE_LIMIT


class Elementwise:
    """A decorator: an elementwise function with a compiled twin (made lazily: nothing compiles until it is
    called). ``fn(...)`` runs it eagerly; ``fn.on(config)(...)`` picks by ``config.compile_elementwise``."""

    def __init__(self, fn: Callable):
        functools.update_wrapper(self, fn)
        self.eager = fn
        # not fullgraph: where dynamo is off that raises instead of running eagerly, and a graph break in some
        # torch version should cost speed, not the run (tests/test_fusions.py checks that there is none).
        # Dynamic shapes are left to torch (static first, dynamic after a recompile).
        self.compiled = torch.compile(fn)

    def __call__(self, *args, **kwargs):
        return self.eager(*args, **kwargs)

    def on(self, config: TransformerConfig) -> Callable:
        """The twin ``config`` asks for (eager where it lacks the switch: a plain megatron config)."""
        return self.compiled if getattr(config, "compile_elementwise", False) else self.eager
