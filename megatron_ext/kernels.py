"""Gated DeltaNet kernels, selected by device (not by import: fla imports Triton, which has no CPU driver).

* ``fla``: flash-linear-attention's Triton kernels (``causal_conv1d``, ``chunk_gated_delta_rule``),
  both varlen through ``cu_seqlens``. GPU only.
* ``torch``: the pure-torch chunked algorithm below, one document at a time. Runs anywhere, keeps fp64
  inputs in fp64 (megatron's and transformers' torch versions force fp32 and have no ``cu_seqlens``).

Document boundaries arrive as :class:`megatron_ext.packing.Documents` (None: one document per row), the
same object for every layer of a micro-batch.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

from megatron_ext import fla_configs
from megatron_ext.packing import Documents

log = logging.getLogger(__name__)

KERNELS = ("auto", "fla", "torch")


def resolve_kernel(requested: str, device: torch.device) -> str:
    """``auto`` picks fla on CUDA tensors and torch elsewhere; an explicit choice is honoured."""
    if requested not in KERNELS:
        raise ValueError(f"unknown GatedDeltaNet kernel {requested!r}; choose one of {KERNELS}")
    chosen = ("fla" if device.type == "cuda" else "torch") if requested == "auto" else requested
    if chosen == "fla" and device.type != "cuda":
        raise ValueError("the fla kernels are Triton kernels and need CUDA tensors; use kernel='torch' on CPU")
    _log_choice(requested, chosen, device.type)
    return chosen


@functools.cache
def _log_choice(requested: str, chosen: str, device: str) -> None:
    log.info("GatedDeltaNet kernels: %s (requested %s, device %s)", chosen, requested, device)


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """At least float32, as transformers' Qwen3.5 computes the recurrence, norms and gates; float64 stays
    float64 (the parity tests)."""
    return torch.promote_types(t.dtype, torch.float32)


def _segments(total: int, docs: Documents | None) -> list[tuple[int, int]]:
    if docs is None:
        return [(0, total)]
    if docs.segments[0][0] != 0 or docs.total != total:
        raise ValueError(f"cu_seqlens {docs.cu_seqlens_cpu.tolist()} do not cover the {total} packed tokens")
    return docs.segments


def _fla_varlen(docs: Documents | None) -> dict:
    return {} if docs is None else docs.fla_kwargs()


@functools.cache
def _tuned_configs(device: torch.device) -> None:
    """Before fla's first kernel on ``device``: its tuned configurations, where they ship (fla_configs)."""
    fla_configs.use_shipped(*fla_configs.this_gpu(device))


def causal_conv1d_silu(x: torch.Tensor, weight: torch.Tensor, docs: Documents | None, kernel: str) -> torch.Tensor:
    """Depthwise causal conv + SiLU over ``x`` [B, T, D] with ``weight`` [D, W]; no state crosses a
    document boundary."""
    if kernel == "fla":
        from fla.modules.causal_conv1d import causal_conv1d

        _tuned_configs(x.device)
        out, _ = causal_conv1d(x, weight=weight, activation="silu", **_fla_varlen(docs))
        return out
    width = weight.shape[-1]
    outs = []
    for start, end in _segments(x.shape[1], docs):
        seg = x[:, start:end].transpose(1, 2)
        y = F.conv1d(seg.to(weight.dtype), weight.unsqueeze(1), padding=width - 1, groups=seg.shape[1])
        outs.append(F.silu(y[..., : end - start]).to(x.dtype).transpose(1, 2))
    return torch.cat(outs, dim=1)


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``x / sqrt(sum(x^2) + eps)`` as fla and transformers define it (eps inside the root)."""
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    docs: Documents | None,
    kernel: str,
) -> torch.Tensor:
    """Gated delta rule with L2-normed q/k.

    q, k: [B, T, Hk, K] (not yet normalised); v: [B, T, Hv, V]; g (log decay), beta: [B, T, Hv].
    Each key head serves ``Hv // Hk`` consecutive value heads. Returns [B, T, Hv, V] in v's dtype.
    """
    if kernel == "fla":
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule

        _tuned_configs(q.device)
        out, _ = chunk_gated_delta_rule(
            q, k, v, g=g, beta=beta, use_qk_l2norm_in_kernel=True, **_fla_varlen(docs)
        )
        return out
    compute = compute_dtype(v)
    q, k = l2norm(q.to(compute)), l2norm(k.to(compute))
    groups = v.shape[2] // q.shape[2]
    if groups > 1:
        q, k = q.repeat_interleave(groups, dim=2), k.repeat_interleave(groups, dim=2)
    outs = [
        torch_chunk_gated_delta_rule(q[:, s:e], k[:, s:e], v[:, s:e], g[:, s:e], beta[:, s:e])
        for s, e in _segments(v.shape[1], docs)
    ]
    return torch.cat(outs, dim=1).to(v.dtype)


def torch_chunk_gated_delta_rule(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, chunk_size: int = 64
) -> torch.Tensor:
    """Chunked (WY/UT-transform) gated delta rule for one sequence batch, zero initial state.

    q, k: [B, T, H, K] already normalised and repeated to the value heads; v: [B, T, H, V];
    g, beta: [B, T, H]. Computes in at least fp32; returns [B, T, H, V] in that precision.
    Recurrence it equals: S_t = a_t S_{t-1} + beta_t k_t (v_t - a_t S_{t-1}^T k_t)^T, o_t = S_t^T q_t / sqrt(K),
    with a_t = exp(g_t).
    """
    dtype = compute_dtype(v)
    q, k, v, g, beta = (x.transpose(1, 2).to(dtype) for x in (q, k, v, g, beta))  # [B, H, T, ...]
    batch, heads, length, k_dim = k.shape
    q = q * k_dim**-0.5
    pad = (-length) % chunk_size
    q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
    g, beta = (F.pad(x, (0, pad)) for x in (g, beta))
    n = (length + pad) // chunk_size
    q, k, v = (x.reshape(batch, heads, n, chunk_size, -1) for x in (q, k, v))
    beta = beta.reshape(batch, heads, n, chunk_size, 1)
    g = g.reshape(batch, heads, n, chunk_size).cumsum(-1)  # log of the decay from chunk start to t

    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).tril()
    decay = (g.unsqueeze(-1) - g.unsqueeze(-2)).masked_fill(~causal, float("-inf")).exp()  # exp(G_i - G_j), j <= i
    k_beta = k * beta
    # (I + strictly-lower(beta K K^T * decay)) u = beta v  and  ... w = beta k exp(G): the UT transform
    system = (k_beta @ k.transpose(-1, -2)) * decay
    u = torch.linalg.solve_triangular(system, v * beta, upper=False, unitriangular=True)
    w = torch.linalg.solve_triangular(system, k_beta * g.exp().unsqueeze(-1), upper=False, unitriangular=True)
    intra = (q @ k.transpose(-1, -2)) * decay
    q_decayed = q * g.exp().unsqueeze(-1)
    k_to_end = k * (g[..., -1:] - g).exp().unsqueeze(-1)
    chunk_decay = g[..., -1].exp()[..., None, None]

    state = q.new_zeros(batch, heads, k_dim, v.shape[-1])
    out = []
    for i in range(n):
        v_new = u[:, :, i] - w[:, :, i] @ state
        out.append(q_decayed[:, :, i] @ state + intra[:, :, i] @ v_new)
        state = state * chunk_decay[:, :, i] + k_to_end[:, :, i].transpose(-1, -2) @ v_new
    o = torch.stack(out, dim=2).reshape(batch, heads, n * chunk_size, -1)[:, :, :length]
    return o.transpose(1, 2)
