"""The pure-torch chunked gated delta rule against the token-by-token recurrence it implements."""

from __future__ import annotations

import pytest
import torch

from megatron_ext.kernels import causal_conv1d_silu, gated_delta_rule, l2norm, torch_chunk_gated_delta_rule
from megatron_ext.packing import Documents


def naive_recurrence(q, k, v, g, beta):
    """S_t = a_t S_{t-1} + beta_t k_t (v_t - a_t S_{t-1}^T k_t)^T ;  o_t = S_t^T q_t / sqrt(K)."""
    b, t, h, kd = q.shape
    state = q.new_zeros(b, h, kd, v.shape[-1])
    out = []
    for i in range(t):
        state = state * g[:, i].exp()[..., None, None]
        pred = torch.einsum("bhkv,bhk->bhv", state, k[:, i])
        state = state + torch.einsum("bhk,bhv->bhkv", k[:, i], (v[:, i] - pred) * beta[:, i, :, None])
        out.append(torch.einsum("bhkv,bhk->bhv", state, q[:, i] * kd**-0.5))
    return torch.stack(out, dim=1)


def _inputs(t, hk=2, hv=2, kd=8, vd=6, b=2, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, t, hk, kd, generator=gen, dtype=dtype)
    k = torch.randn(b, t, hk, kd, generator=gen, dtype=dtype)
    v = torch.randn(b, t, hv, vd, generator=gen, dtype=dtype)
    g = -torch.rand(b, t, hv, generator=gen, dtype=dtype) * 2  # log decays <= 0
    beta = torch.rand(b, t, hv, generator=gen, dtype=dtype)
    return q, k, v, g, beta


@pytest.mark.parametrize("length", [1, 5, 63, 64, 65, 130])
def test_chunked_equals_recurrence_fp64(length):
    q, k, v, g, beta = _inputs(length)
    q, k = l2norm(q), l2norm(k)
    chunked = torch_chunk_gated_delta_rule(q, k, v, g, beta)
    assert chunked.dtype == torch.float64
    torch.testing.assert_close(chunked, naive_recurrence(q, k, v, g, beta), atol=1e-10, rtol=0)


def test_grouped_value_heads_and_documents():
    """Each key head serves consecutive value heads; the state restarts at every document."""
    q, k, v, g, beta = _inputs(90, hk=2, hv=6, b=1)
    docs = Documents.from_cu_seqlens(torch.tensor([0, 20, 71, 90], dtype=torch.int32))
    out = gated_delta_rule(q, k, v, g, beta, docs, "torch")
    qn, kn = (l2norm(x).repeat_interleave(3, dim=2) for x in (q, k))
    expected = torch.cat(
        [naive_recurrence(qn[:, s:e], kn[:, s:e], v[:, s:e], g[:, s:e], beta[:, s:e]) for s, e in [(0, 20), (20, 71), (71, 90)]],
        dim=1,
    )
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=0)
    unpacked = gated_delta_rule(q, k, v, g, beta, None, "torch")
    assert not torch.allclose(unpacked[:, 20:], expected[:, 20:])  # the boundaries did something


def test_causal_conv_is_causal_and_respects_documents():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 30, 5, dtype=torch.float64, generator=gen)
    w = torch.randn(5, 4, dtype=torch.float64, generator=gen)
    packed = causal_conv1d_silu(x, w, Documents(torch.tensor([0, 12, 30])), "torch")
    second_alone = causal_conv1d_silu(x[:, 12:], w, None, "torch")
    torch.testing.assert_close(packed[:, 12:], second_alone)
    # the reference definition: out[t] = silu(sum_j w[:, j] * x[t - 3 + j]) with zeros before the start
    padded = torch.nn.functional.pad(x[:, :12].transpose(1, 2), (3, 0))
    ref = torch.stack([(padded[..., t : t + 4] * w).sum(-1) for t in range(12)], dim=-1)
    torch.testing.assert_close(packed[:, :12], torch.nn.functional.silu(ref).transpose(1, 2))


def test_kernel_selection_is_by_device():
    from megatron_ext.kernels import resolve_kernel

    assert resolve_kernel("auto", torch.device("cpu")) == "torch"
    assert resolve_kernel("torch", torch.device("cpu")) == "torch"
    with pytest.raises(ValueError, match="CUDA"):
        resolve_kernel("fla", torch.device("cpu"))
    with pytest.raises(ValueError, match="unknown"):
        resolve_kernel("triton", torch.device("cpu"))


def test_without_cuda_megatron_ext_starts_without_importing_fla():
    """Without CUDA fla's Triton kernels never run, and fla's package import loads its model zoo (transformers'
    modeling code, about 3 s of every rank's start) before failing at Triton: megatron's GDN import meets fla as not
    installed (cpu_patches), our GDN layers still build and run, and fla imports afterwards for whoever asks."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import importlib.util, sys, torch\n"
        "import megatron_ext.train\n"
        "from megatron_ext import Qwen35Config, build_model\n"
        "from megatron_ext.parallel import initialize\n"
        "from tools.tiny_qwen35 import text_config\n"
        "initialize()\n"
        "model = build_model(Qwen35Config.from_hf(text_config().to_dict()), params_dtype=torch.float32)\n"
        "assert torch.isfinite(model(torch.randint(0, 96, (1, 8)), torch.arange(8)[None])).all()\n"
        "loaded = sorted(m for m in sys.modules if m == 'fla' or m.startswith(('fla.', 'transformers.modeling_utils')))\n"
        "assert not loaded, loaded\n"
        "assert importlib.util.find_spec('fla') is not None\n"
        "print('ok')\n"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                         text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]
