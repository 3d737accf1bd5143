"""Our megatron-core Qwen3.5 against transformers' reference with the same weights: the comparison behind
the parity tests (CPU, float64) and the GPU check (CUDA, float32, the pure-torch GDN kernels on both sides)."""

from __future__ import annotations

import contextlib
import inspect
import sys

import torch

import megatron_ext
from megatron_ext import hf_mapping


def megatron_twin(hf_model, device: str = "cpu", **build_kwargs):
    """The megatron model (local spec) with the HF model's weights, copied through the converters' mapping."""
    config = megatron_ext.Qwen35Config.from_hf(hf_model.config.to_dict())
    model = megatron_ext.build_model(config, backend="local", device=device, **build_kwargs)
    state = hf_model.state_dict()
    hf_mapping.copy_hf_into(model, config, state.__getitem__, hf_mapping.lm_prefix(state))
    return model


# transformers' Qwen3.5 GDN kernels: module functions that dispatch to fla / causal_conv1d where installed
HF_KERNELS = ("causal_conv1d_fn", "causal_conv1d_update", "torch_chunk_gated_delta_rule",
              "torch_recurrent_gated_delta_rule")


@contextlib.contextmanager
def reference_kernels(hf_model):
    """transformers' model on its pure-torch GDN kernels while inside: its kernel functions are wrapped at
    import to call fla or causal_conv1d when installed, and unwrapped they are the readable references.
    For a model-code comparison on CUDA without compiling fla's fp32 kernels (more than 195 s on a fresh
    H200); fla against the same references is ``tools.gpu_check``'s kernels part."""
    module = sys.modules[type(hf_model).__module__]
    dispatching = {name: getattr(module, name) for name in HF_KERNELS if hasattr(module, name)}
    try:
        for name, fn in dispatching.items():
            setattr(module, name, inspect.unwrap(fn))
        yield
    finally:
        for name, fn in dispatching.items():
            setattr(module, name, fn)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference relative to the reference's largest magnitude."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def compare(hf_model, ours, ids: torch.Tensor, generator: torch.Generator) -> dict[str, float]:
    """Relative errors of ours vs transformers on ``ids``: ``logits``, then every HF parameter's gradient
    (by HF name) under the same random upstream gradient drawn from ``generator``."""
    ref = hf_model(ids).logits
    out = ours(ids)
    if out.shape != ref.shape:
        raise ValueError(f"logits shape {tuple(out.shape)} != transformers' {tuple(ref.shape)}")
    errors = {"logits": rel_err(out, ref)}
    weights = torch.randn(ref.shape, generator=generator, dtype=ref.dtype, device=ref.device)
    (ref * weights).sum().backward()
    (out * weights).sum().backward()
    errors.update((name, rel_err(grad, hf_grad)) for name, grad, hf_grad in gradient_pairs(ours, hf_model))
    return errors


def gradient_pairs(ours, hf_model) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(HF name, our gradient in HF layout, HF gradient) for every HF parameter after a backward on both."""
    ours_grads = {n: p.grad for n, p in ours.named_parameters()}
    hf_grads = {n: p.grad for n, p in hf_model.named_parameters()}
    pairs = [(name, grad, hf_grads[name]) for name, grad in
             hf_mapping.megatron_to_hf(ours.qwen35_config, ours_grads.__getitem__, hf_mapping.lm_prefix(hf_grads))]
    missing = set(hf_grads) - {name for name, _, _ in pairs}
    if missing:  # a tied head is one parameter on both sides; anything else unmapped is a mapping bug
        raise KeyError(f"HF parameters without a megatron gradient: {sorted(missing)}")
    return pairs
