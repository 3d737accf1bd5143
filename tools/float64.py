"""A float64 mode for exact comparisons of transformers' and megatron's Qwen3.5 (the parity tests and
``tools.verify_conversion``): both upcast to float32 on purpose, which would cap float64 at float32 rounding."""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode


class _Float32MeansFloat64(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.float:
            func = torch.Tensor.double
        args = tuple(torch.float64 if a is torch.float32 else a for a in args)
        kwargs = {k: torch.float64 if v is torch.float32 else v for k, v in (kwargs or {}).items()}
        return func(*args, **kwargs)


@contextlib.contextmanager
def float64():
    """Everything built or run inside computes in float64. transformers' and megatron's Qwen3.5 code upcast
    to float32 on purpose (norm statistics, RoPE angles, softmax, the GDN recurrence), which would cap a
    float64 comparison at float32 rounding; here every float32 request (``.float()``, ``dtype=torch.float32``,
    the default dtype of new tensors) gets float64 instead."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with _Float32MeansFloat64():
            yield
    finally:
        torch.set_default_dtype(default)
