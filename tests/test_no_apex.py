"""megatron-core's gradient norm without TE or Apex: our device-side stand-in for its host-syncing fallback."""

from __future__ import annotations

import torch

from megatron_ext import no_apex, parallel


def test_gradient_clipping_norm_uses_the_device_side_stand_in_and_is_exact():
    from megatron.core.optimizer import clip_grads
    from megatron.core.utils import local_multi_tensor_l2_norm

    parallel.initialize()  # applies the stand-in, before any optimizer exists
    assert clip_grads.l2_norm_impl is not local_multi_tensor_l2_norm  # TE's or Apex's kernel, else ours
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(*shape, generator=gen) for shape in [(3,), (17, 5), (1,), (64, 64)]]
    want = sum(g.double().square().sum() for g in grads).sqrt().item()
    norm, per_tensor = no_apex.multi_tensor_l2_norm(2048, None, [grads], False)
    assert per_tensor is None and norm.shape == (1,) and norm.dtype == torch.float32
    assert abs(norm.item() - want) <= 1e-6 * want
    if clip_grads.l2_norm_impl is no_apex.multi_tensor_l2_norm:  # neither TE nor Apex (as on CPU)
        # megatron's own caller, all-reduce included: the same total
        assert abs(clip_grads.get_grad_norm_fp32(grads) - want) <= 1e-6 * want
