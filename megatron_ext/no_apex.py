"""megatron-core without Transformer Engine or Apex: a sync-free stand-in for the one fallback that stalls.

Without TE and Apex, megatron-core's gradient clipping takes the total gradient norm from
``megatron.core.utils.local_multi_tensor_l2_norm``, which turns every parameter's norm into a Python
float: one host synchronisation per parameter tensor, each training step (measured on an H200 with
``python -m tools.gpu_check --parts syncs``: 45 syncs per step at 4 layers, 82 at 8). Its replacement
keeps the norms on the device (torch's foreach norm, as ``torch.nn.utils.clip_grad_norm_`` computes
them). Where TE or Apex is installed, megatron uses their fused kernel and :func:`apply` changes nothing.
"""

from __future__ import annotations

import torch


def multi_tensor_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """``amp_C.multi_tensor_l2norm``'s contract as megatron uses it (the total norm of ``tensor_lists[0]``
    as a 1-element fp32 tensor on their device, and None), computed without leaving the device."""
    if per_tensor:
        raise NotImplementedError("per-tensor norms: megatron-core's gradient clipping asks for the total only")
    return torch.nn.utils.get_total_norm(tensor_lists[0], norm_type=2.0).float().view(1), None


def apply() -> None:
    """Use :func:`multi_tensor_l2_norm` where megatron fell back to its host-syncing local version."""
    import megatron.core.optimizer.clip_grads as clip_grads
    from megatron.core.utils import local_multi_tensor_l2_norm

    if clip_grads.l2_norm_impl is local_multi_tensor_l2_norm:
        clip_grads.l2_norm_impl = multi_tensor_l2_norm
