"""Qwen3.5's multimodal RoPE reduces to plain 1-D partial RoPE for text, which megatron's RoPE computes."""

from __future__ import annotations

import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from transformers import Qwen3_5TextConfig
from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5TextRotaryEmbedding

# the real Qwen3.5 attention geometry: head_dim 256, a quarter of it rotated, 3 mRoPE sections
HF = Qwen3_5TextConfig(
    head_dim=256, num_hidden_layers=4,
    rope_parameters={"rope_type": "default", "rope_theta": 10_000_000.0, "partial_rotary_factor": 0.25,
                     "mrope_section": [11, 11, 10], "mrope_interleaved": True},
)


def _hf_cos_sin(position_ids_3d: torch.Tensor):
    rope = Qwen3_5TextRotaryEmbedding(HF)
    x = torch.zeros(1, dtype=torch.float32)
    return rope(x, position_ids_3d)


def test_text_positions_reduce_to_plain_rope():
    seq, offset = 300, 1000
    text_positions = (torch.arange(seq) + offset).view(1, 1, seq).expand(3, 1, seq)  # t = h = w
    cos, sin = _hf_cos_sin(text_positions)

    ours = RotaryEmbedding(kv_channels=256, rotary_percent=0.25, rotary_base=10_000_000.0)
    emb = ours(seq, offset=offset)[:, 0, 0].float()  # [seq, 64]: megatron's plain 1-D RoPE angles
    assert emb.shape[-1] == cos.shape[-1] == 64
    torch.testing.assert_close(cos[0], emb.cos(), atol=1e-5, rtol=0)
    torch.testing.assert_close(sin[0], emb.sin(), atol=1e-5, rtol=0)


def test_distinct_vision_positions_do_not_reduce():
    """Guard: the comparison above is meaningful, i.e. the sections do matter for non-text positions."""
    seq = 50
    pos = torch.arange(seq).view(1, 1, seq).expand(3, 1, seq).clone()
    pos[1] += 7  # an image token's height index differs from its temporal index
    cos_text, _ = _hf_cos_sin(torch.arange(seq).view(1, 1, seq).expand(3, 1, seq))
    cos_image, _ = _hf_cos_sin(pos)
    assert not torch.allclose(cos_text, cos_image)


def test_sync_free_packed_rope_equals_megatrons_per_document_rope():
    """megatron_ext.rope rotates a packed row at once (positions from cu_seqlens on the device); megatron's
    unfused thd RoPE rotates each document alone. Same numbers, float64, partial rotary, a 1-token document."""
    from megatron.core import parallel_state
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_thd

    from megatron_ext import parallel
    from megatron_ext.rope import thd_rotary

    parallel.initialize()
    gen = torch.Generator().manual_seed(0)
    cu = torch.tensor([0, 5, 6, 40, 71], dtype=torch.int32)
    t = torch.randn(71, 3, 256, generator=gen, dtype=torch.float64)
    rope = RotaryEmbedding(kv_channels=256, rotary_percent=0.25, rotary_base=10_000_000.0)
    freqs = rope(34).double()  # as long as the longest document
    ours = thd_rotary(t, cu, freqs)
    theirs = _apply_rotary_pos_emb_thd(t, cu, freqs, cp_group=parallel_state.get_context_parallel_group())
    torch.testing.assert_close(ours, theirs, atol=1e-12, rtol=0)
    assert torch.equal(ours[..., 64:], t[..., 64:])  # the unrotated three quarters pass through
    one_document = thd_rotary(t, torch.tensor([0, 71], dtype=torch.int32), rope(71).double())
    assert not torch.allclose(ours[6:40], one_document[6:40])  # guard: positions restart at each document
