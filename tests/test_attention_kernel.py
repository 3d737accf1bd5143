"""The local spec's core attention on packed documents: which kernel runs where, and that each keeps
documents apart exactly like attention over each document alone (float64, so a leak or a wrong scale
shows far above rounding). FlashAttention (``fused``) has no CPU kernel: its call is checked here through
stand-ins with the signatures and documented semantics of ``varlen_attn`` in two torch releases, its numbers
by ``tools/gpu_check.py``'s attention part on CUDA. FlexAttention runs eagerly on CPU, forward only (torch
refuses its CPU backward)."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams

from megatron_ext import layers
from megatron_ext.layers import document_causal_block_mask, resolve_attention_kernel
from megatron_ext.spec import selective_recompute_modules
from tools.gpu_check import core_attention

HEADS, GROUPS, HEAD_DIM = 4, 2, 16  # the 2B's GQA (8 query heads on 2 KV heads of 256), scaled down
TOL = dict(atol=1e-12, rtol=1e-10)
LAYOUTS = {  # document lengths of one packed row
    "documents of length 1 among longer ones": [1, 6, 1, 1, 9, 1],
    "one document": [19],
}


def _packed(lengths: list[int]) -> PackedSeqParams:
    cu = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max(lengths),
                           max_seqlen_kv=max(lengths))


def _qkv(total: int, seed: int = 0, requires_grad: bool = True) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(total, HEADS, HEAD_DIM), (total, GROUPS, HEAD_DIM), (total, GROUPS, HEAD_DIM)]
    return [torch.randn(s, generator=gen, dtype=torch.float64).requires_grad_(requires_grad) for s in shapes]


def _each_document_alone(q, k, v, lengths: list[int]) -> torch.Tensor:
    """Causal attention over every document on its own (torch SDPA), as [t, 1, heads * dim]."""
    outs = [F.scaled_dot_product_attention(*(x.transpose(0, 1) for x in part), is_causal=True, enable_gqa=True)
            for part in zip(*(x.split(lengths) for x in (q, k, v)))]
    return torch.cat(outs, dim=1).transpose(0, 1).reshape(q.shape[0], 1, -1)


def _grads(out: torch.Tensor, leaves: list[torch.Tensor]) -> list[torch.Tensor]:
    upstream = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
    return torch.autograd.grad((out * upstream).sum(), leaves)


def test_auto_is_masked_on_cpu_and_logged_once(caplog):
    layers._log_attention_choice.cache_clear()
    with caplog.at_level(logging.INFO, logger="megatron_ext.layers"):
        for _ in range(2):
            assert resolve_attention_kernel("auto", torch.device("cpu"), torch.float32) == "masked"
    assert [r.getMessage() for r in caplog.records] == ["attention kernel: masked (requested auto, device cpu, float32)"]


def test_fused_is_refused_on_cpu_and_unknown_kernels_are_refused():
    with pytest.raises(ValueError, match=r"'fused' is FlashAttention-2 .* needs CUDA tensors in bf16 or fp16, got cpu"):
        resolve_attention_kernel("fused", torch.device("cpu"), torch.bfloat16)
    with pytest.raises(ValueError, match="unknown attention kernel 'flash'"):
        resolve_attention_kernel("flash", torch.device("cpu"), torch.float32)


def test_te_attention_is_transformer_engines_and_only_under_backend_te():
    """Under either backend the core attention is the packed one unless 'te' asks for TE's (whose THD backward
    gave NaN gradients on an H100, megatron_ext.spec.core_attention), and 'te' is refused where it cannot be."""
    from megatron.core.transformer.spec_utils import ModuleSpec

    from megatron_ext import Qwen35Config, spec
    from tools.tiny_qwen35 import text_config

    class TEProvider:  # stands in for megatron's TESpecProvider, which needs TE to import
        def core_attention(self):
            return ModuleSpec(module=torch.nn.Identity)

    for backend in ("te", "local"):
        for kernel in ("auto", "fused", "masked"):
            chosen = spec.core_attention(TEProvider(), backend, kernel)
            assert (chosen.module, chosen.params) == (layers.PackedDotProductAttention, {"kernel": kernel})
    assert spec.core_attention(TEProvider(), "te", "te").module is torch.nn.Identity
    with pytest.raises(ValueError, match="attention_kernel 'te' is Transformer Engine's attention: it needs backend 'te'"):
        spec.layer_specs(Qwen35Config.from_hf(text_config().to_dict()), "local", attention_kernel="te")
    with pytest.raises(ValueError, match=r"unknown attention kernel 'te' for the packed attention.*with backend 'te'"):
        resolve_attention_kernel("te", torch.device("cuda"), torch.bfloat16)


def test_the_setting_reaches_every_attention_layer_and_fused_stops_a_cpu_forward():
    from tools.parity import megatron_twin
    from tools.tiny_qwen35 import causal_lm, text_config

    hf = causal_lm(text_config(), seed=0)
    model = megatron_twin(hf, attention_kernel="fused")
    kernels = [m.kernel for m in model.modules() if isinstance(m, layers.PackedDotProductAttention)]
    assert kernels == ["fused"] * hf.config.layer_types.count("full_attention") and kernels
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        model(torch.zeros(1, 8, dtype=torch.long))


def test_selective_recomputation_recomputes_core_attention_only_when_it_is_masked():
    from tools.parity import megatron_twin
    from tools.tiny_qwen35 import causal_lm, text_config

    cpu, cuda, bf16, fp32 = torch.device("cpu"), torch.device("cuda"), torch.bfloat16, torch.float32
    assert selective_recompute_modules("local", "auto", cpu, fp32) == ["core_attn"]  # the [T, T] scores
    assert selective_recompute_modules("local", "masked", cuda, bf16) == ["core_attn"]
    assert selective_recompute_modules("local", "auto", cuda, bf16) == ["mlp"]  # fused: no scores kept
    assert selective_recompute_modules("local", "flex", cpu, fp32) == ["mlp"]
    assert selective_recompute_modules("te", "auto", cuda, bf16) is None  # TE: none unless full (see test_te_spec)
    model = megatron_twin(causal_lm(text_config(), seed=0), recompute_granularity="selective")
    assert model.config.recompute_modules == ["core_attn"]  # what build_model gives the trainer on CPU


@pytest.mark.parametrize("lengths", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_masked_equals_each_document_alone_forward_and_gradients(lengths):
    q, k, v = _qkv(sum(lengths))
    out = core_attention("masked", HEADS, GROUPS, HEAD_DIM, dtype=torch.float64)(q, k, v, None,
                                                                                packed_seq_params=_packed(lengths))
    ref = _each_document_alone(q, k, v, lengths)
    torch.testing.assert_close(out, ref, **TOL)
    for got, want in zip(_grads(out, [q, k, v]), _grads(ref, [q, k, v])):
        torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("lengths", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_flex_equals_masked_forward(lengths, monkeypatch):
    q, k, v = _qkv(sum(lengths), requires_grad=False)
    params = _packed(lengths)
    flex, masked = (core_attention(kernel, HEADS, GROUPS, HEAD_DIM, dtype=torch.float64) for kernel in ("flex", "masked"))
    want = masked(q, k, v, None, packed_seq_params=params)
    ran = []  # FlexAttention itself, not a fallback to the masked path (which would equal the reference trivially)
    monkeypatch.setattr(layers, "_flex_attention", lambda *a, real=layers._flex_attention, **kw: ran.append(1) or real(*a, **kw))
    monkeypatch.setattr(layers.PackedDotProductAttention, "_masked", lambda *a, **kw: pytest.fail("flex ran the masked path"))
    torch.testing.assert_close(flex(q, k, v, None, packed_seq_params=params), want, **TOL)
    assert ran == [1]


@pytest.mark.parametrize("block", [1, 4, 5])
@pytest.mark.parametrize("lengths", [*LAYOUTS.values(), [4, 4, 8, 3]], ids=[*LAYOUTS.keys(), "block-aligned"])
def test_block_mask_skips_exactly_the_hidden_tiles_and_marks_the_full_ones(lengths, block):
    """The kernel computes only listed tiles and applies the mask only on partial ones: a listed hidden
    tile costs time, an unlisted visible one or a "full" tile with a hidden pair would be wrong."""
    total = sum(lengths)
    mask = document_causal_block_mask(_packed(lengths).cu_seqlens_q, total, block)
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    pos = torch.arange(total)
    visible = (doc[:, None] == doc[None, :]) & (pos[None, :] <= pos[:, None])

    def listed(counts, indices) -> set[tuple[int, int]]:
        return {(i, int(j)) for i in range(counts.shape[-1]) for j in indices[0, 0, i, : counts[0, 0, i]]}

    partial, full = listed(mask.kv_num_blocks, mask.kv_indices), listed(mask.full_kv_num_blocks, mask.full_kv_indices)
    n = -(-total // block)
    tiles = {(i, j): visible[i * block:(i + 1) * block, j * block:(j + 1) * block] for i in range(n) for j in range(n)}
    assert partial.isdisjoint(full)
    assert partial | full == {t for t, m in tiles.items() if m.any()}
    assert full == {(i, j) for (i, j), m in tiles.items() if m.all() and j < i}


def _varlen_stand_in(gqa_flag: bool, seen: dict):
    """``varlen_attn`` without CUDA, with the signature and checks of a torch release (read from its wheel):
    2.11 has no ``enable_gqa`` (FlashAttention-2 takes fewer key/value heads as they are), 2.13 and 2.14
    refuse fewer key/value heads without it. Computes what torch documents (causal iff ``window_size == (-1,
    0)``, ``scale``) document by document."""

    def attend(q, k, v, cu_q, cu_k, max_q, max_k, scale, window_size):
        seen.update(cu=(cu_q, cu_k), max=(max_q, max_k), scale=scale)
        bounds = cu_q.tolist()
        outs = [F.scaled_dot_product_attention(*(x[s:e].transpose(0, 1) for x in (q, k, v)), scale=scale,
                                               is_causal=window_size == (-1, 0), enable_gqa=True).transpose(0, 1)
                for s, e in zip(bounds[:-1], bounds[1:])]
        return torch.cat(outs)

    def torch_2_11(q, k, v, cu_q, cu_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1)):
        return attend(q, k, v, cu_q, cu_k, max_q, max_k, scale, window_size)

    def torch_2_13(q, k, v, cu_q, cu_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1),
                   enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
        if not enable_gqa and q.shape[1] != k.shape[1]:
            raise ValueError("Expect query and key/value to have the same number of heads")
        return attend(q, k, v, cu_q, cu_k, max_q, max_k, scale, window_size)

    return torch_2_13 if gqa_flag else torch_2_11


@pytest.fixture
def fresh_varlen():
    layers._varlen_attn.cache_clear()
    yield
    layers._varlen_attn.cache_clear()  # not the stand-in for later tests


@pytest.mark.parametrize("release", ["torch 2.11", "torch 2.13"])
def test_fused_call_passes_the_packed_documents_causally_with_gqa_and_the_layer_scale(monkeypatch, fresh_varlen, release):
    """The varlen call without CUDA, through a stand-in for each ``varlen_attn`` signature: the packed
    documents' own ``cu_seqlens`` and longest length, causal, GQA and the layer's scale, equal to the masked
    reference in float64, forward and gradients."""
    from torch.nn.attention import varlen

    lengths = LAYOUTS["documents of length 1 among longer ones"]
    params = _packed(lengths)
    seen = {}
    monkeypatch.setattr(varlen, "varlen_attn", _varlen_stand_in(release == "torch 2.13", seen))
    monkeypatch.setattr(layers, "resolve_attention_kernel", lambda requested, device, dtype: requested)
    q, k, v = _qkv(sum(lengths), seed=1)
    # not 1/sqrt(head_dim), which the kernel would apply by itself when given no scale
    fused, masked = (core_attention(kernel, HEADS, GROUPS, HEAD_DIM, dtype=torch.float64, softmax_scale=0.3)
                     for kernel in ("fused", "masked"))
    out, ref = fused(q, k, v, None, packed_seq_params=params), masked(q, k, v, None, packed_seq_params=params)
    assert all(cu is params.cu_seqlens_q for cu in seen["cu"]) and seen["max"] == (9, 9) and seen["scale"] == 0.3
    torch.testing.assert_close(out, ref, **TOL)
    for got, want in zip(_grads(out, [q, k, v]), _grads(ref, [q, k, v])):
        torch.testing.assert_close(got, want, **TOL)