"""RoPE on packed (thd) rows without host syncs, for when Transformer Engine's fused kernel is absent.

megatron-core applies RoPE to packed documents in one of two ways: TE's fused thd kernel (its
``apply_rope_fusion`` slot, filled when TE is importable), or a loop that reads every document's length to
the host (``tolist()`` on the device ``cu_seqlens``: two syncs per attention layer) and rotates each
document separately. Here the position of every token inside its document comes from ``cu_seqlens`` on the
device (:func:`megatron_ext.packing.token_positions`), so the whole row rotates at once with no sync; it fills
the same slot.
"""

from __future__ import annotations

from megatron.core.models.common.embeddings import rope_utils
from torch import Tensor

from megatron_ext.packing import token_positions


def thd_rotary(t: Tensor, cu_seqlens: Tensor, freqs: Tensor, cp_size: int = 1, cp_rank: int = 0) -> Tensor:
    """``t`` [tokens, heads, dim] rotated by ``freqs`` [max_len, 1, 1, rot_dim] at each token's position in
    its document; dims past ``rot_dim`` pass through (partial RoPE). Not interleaved (Qwen3.5 is not)."""
    if cp_size != 1:
        raise NotImplementedError("context parallelism is not supported")
    positions = token_positions(cu_seqlens, t.shape[0])
    return rope_utils._apply_rotary_pos_emb_bshd(t.unsqueeze(1), freqs[positions]).squeeze(1)


def install() -> None:
    """Fill megatron's fused-thd-RoPE slot with :func:`thd_rotary` unless TE has filled it (its kernel does
    not sync either); ``apply_rope_fusion`` in the transformer config then uses the slot."""
    if rope_utils.fused_apply_rotary_pos_emb_thd is None:
        rope_utils.fused_apply_rotary_pos_emb_thd = thd_rotary
