"""Documents packed in one row are independent, for both layer types; padding does not leak either.
In float64 (``conftest.float64``), so "independent" is checked to 1e-10, far below any real leak."""

from __future__ import annotations

import pytest
import torch
from conftest import float64, megatron_twin

from tools.tiny_qwen35 import causal_lm, text_config

L, F = "linear_attention", "full_attention"
TOL = dict(atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("pattern", [[L, F, L, F], [L, L], [F, F]], ids=["hybrid", "gdn_only", "attention_only"])
def test_packed_documents_equal_documents_alone(pattern):
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randint(0, 96, (1, 37), generator=gen), torch.randint(0, 96, (1, 70), generator=gen)
    packed_ids = torch.cat([a, b], dim=1)
    positions = torch.cat([torch.arange(37), torch.arange(70)]).unsqueeze(0)  # reset = new document
    with float64(), torch.no_grad():
        model = megatron_twin(causal_lm(text_config(layer_types=pattern), seed=2)).eval()
        packed = model(packed_ids, positions)
        alone_a, alone_b = model(a), model(b)
        leaky = model(packed_ids, torch.arange(107).unsqueeze(0))  # same tokens, one long document
    assert packed.dtype == torch.float64
    torch.testing.assert_close(packed[:, :37], alone_a, **TOL)
    torch.testing.assert_close(packed[:, 37:], alone_b, **TOL)
    assert (leaky[:, 37:] - alone_b).abs().max() > 1e-3  # without the boundary, document 1 leaks into 2


def test_rows_of_a_batch_and_left_padding_are_independent():
    gen = torch.Generator().manual_seed(1)
    short, long = torch.randint(1, 96, (1, 20), generator=gen), torch.randint(1, 96, (1, 33), generator=gen)
    batch = torch.cat([torch.cat([torch.zeros(1, 13, dtype=torch.long), short], 1), long])
    mask = torch.ones_like(batch)
    mask[0, :13] = 0
    with float64(), torch.no_grad():
        model = megatron_twin(causal_lm(text_config(), seed=3)).eval()
        out = model(batch, attention_mask=mask)
        torch.testing.assert_close(out[0, 13:], model(short)[0], **TOL)
        torch.testing.assert_close(out[1], model(long)[0], **TOL)


def test_documents_are_found_once_per_micro_batch_and_every_layer_gets_the_same_objects(monkeypatch):
    """The trainer's path (collate in the loader, then forward_step): the boundaries are computed once, on the
    host, and every layer, RoPE included, receives the very same objects (fla's caches are keyed by identity;
    anything rebuilt per layer costs device syncs on a GPU)."""
    from megatron.core.models.common.embeddings import rope_utils
    from megatron.core.transformer.attention import SelfAttention

    from megatron_ext.data import collate
    from megatron_ext.layers import Qwen35GatedDeltaNet
    from megatron_ext.packing import Documents
    from megatron_ext.train import forward_step

    built, rotated, seen = [], [], []
    find = Documents.from_positions.__func__
    monkeypatch.setattr(Documents, "from_positions", classmethod(lambda cls, *a: built.append(1) or find(cls, *a)))
    rotate = rope_utils.fused_apply_rotary_pos_emb_thd
    monkeypatch.setattr(rope_utils, "fused_apply_rotary_pos_emb_thd", lambda t, cu, *a, **k: rotated.append(cu) or rotate(t, cu, *a, **k))

    model = megatron_twin(causal_lm(text_config(layer_types=[L, F, L, F]), seed=2))
    for module in model.modules():
        if isinstance(module, (Qwen35GatedDeltaNet, SelfAttention)):
            module.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["packed_seq_params"]), with_kwargs=True)
    gen = torch.Generator().manual_seed(4)
    rows = [{"tokens": torch.randint(0, 96, (24,), generator=gen), "labels": torch.randint(0, 96, (24,), generator=gen),
             "loss_mask": torch.ones(24), "position_ids": torch.cat([torch.arange(n) for n in lengths])}
            for lengths in ([10, 1, 13], [24])]
    batch = collate(rows)
    output, loss_func = forward_step(iter([batch]), model)
    loss_func(output)[0].backward()

    assert len(built) == 1  # in collate; the model did not look for them again
    assert len(seen) == 4 and all(params is seen[0] for params in seen)
    docs = seen[0].documents
    assert docs.segments == [(0, 10), (10, 11), (11, 24), (24, 48)]  # a 1-token document; row 2 is one document
    assert seen[0].cu_seqlens_q is docs.cu_seqlens and seen[0].max_seqlen_q == 24
    assert len(rotated) == 4 and all(cu is docs.cu_seqlens for cu in rotated)  # q and k of both attention layers
    # fla's varlen arguments (GPU only: fla needs Triton) come from the same object: tools.gpu_check's kernels part


def test_token_documents_and_positions_come_from_cu_seqlens():
    """Each token's document and its position inside it, a 1-token document and tokens past the last boundary
    (padding) included; the positions are what thd RoPE rotates by."""
    from megatron_ext.packing import token_documents, token_positions

    cu = torch.tensor([0, 2, 3, 5], dtype=torch.int32)
    assert token_documents(cu, 7).tolist() == [0, 0, 1, 2, 2, 3, 3]
    assert token_positions(cu, 7).tolist() == [0, 1, 0, 0, 1, 0, 1]
