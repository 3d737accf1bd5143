"""megatron-core without Apex: our device-side stand-in for its host-syncing gradient norm, and our stand-in
for Apex's weight-gradient GEMM that accumulates into the gradient buffer."""

from __future__ import annotations

import contextlib

import pytest
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


def test_weight_gradient_stand_in_accumulates_one_gemm_into_the_buffer():
    """``main_grad += grad_output^T @ input``: same-dtype operands in one GEMM (float64 here); bf16 operands into
    an fp32 buffer where torch has no GEMM for it (CPU) as unfused, bit for bit: a bf16 product, then the add.
    (On CUDA it sums in fp32: gpu_check's kernels part holds it to a quarter of the unfused path's error.)"""
    gen = torch.Generator().manual_seed(1)
    x, g, start = (torch.randn(*shape, generator=gen, dtype=torch.float64) for shape in [(96, 24), (96, 40), (40, 24)])
    buffer = start.clone()
    no_apex.wgrad_gemm_accum(x, g, buffer)
    assert torch.allclose(buffer, start + g.t() @ x, rtol=1e-13, atol=1e-13)

    x, g, start = x.bfloat16(), g.bfloat16(), start.float()
    buffer = start.clone()
    no_apex.wgrad_gemm_accum(x, g, buffer)
    assert buffer.dtype == torch.float32 and torch.equal(buffer, start + g.t() @ x)


@pytest.mark.parametrize("loss_chunk", [0, 16], ids=["whole", "loss_chunk"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_the_trainers_ddp_accumulates_weight_gradients_in_the_gemm_as_unfused(tied, loss_chunk, monkeypatch):
    """megatron's ``gradient_accumulation_fusion`` on the stand-in, through the trainer's DDP (overlapped, two
    micro-batches as its schedule runs them): the gradient buffers of the unfused path. Tied, the embedding's
    two gradients (lookup and output layer) both count: the fused output layer hands autograd a placeholder
    that megatron zeroes for it. With ``loss_chunk`` the output layer is recomputed piece by piece in the
    backward, and must still be the weight itself there (torch's checkpoint recomputed with detached copies,
    which lack the weight's DDP attributes: overlapped, megatron's hook stopped on a missing gradient).

    fp32 (megatron fuses into fp32 and half-precision buffers only). Only the weights' own gradients are
    computed another way (one GEMM adding into the buffer instead of a GEMM, then an add), and nothing
    downstream reads them: every other gradient must be bit-identical, and a weight's differs by the GEMM's
    summation order, ~1e-7 of its largest entry, where a lost, doubled or garbage contribution is O(1)."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    from megatron_ext.train import data_parallel, release
    from tools.parity import megatron_twin, rel_err
    from tools.tiny_qwen35 import causal_lm, text_config

    parallel.initialize()
    gemms = []
    monkeypatch.setattr(no_apex.FUSED_WGRAD, "wgrad_gemm_accum_fp32",
                        lambda *args: gemms.append(args[2].data_ptr()) or no_apex.wgrad_gemm_accum(*args))
    gen = torch.Generator().manual_seed(2)
    hf = causal_lm(text_config(tie_word_embeddings=tied), seed=1)
    batches = [torch.randint(0, hf.config.vocab_size, (2, 40), generator=gen) for _ in range(2)]
    buffers = {}
    for fused in (False, True):
        model = megatron_twin(hf, gradient_accumulation_fusion=fused, loss_chunk=loss_chunk)
        ddp = data_parallel(model)
        for i, ids in enumerate(batches):
            with ddp.no_sync() if i < len(batches) - 1 else contextlib.nullcontext():
                ddp(ids, labels=torch.roll(ids, -1, 1)).sum().backward()
        ddp.finish_grad_sync()
        buffers[fused] = {n: p.main_grad.clone() for n, p in model.named_parameters()}
        release(ddp)
    # every linear layer's weight (the output layer's too, tied or not), each micro-batch, went through the stand-in
    linears = [m.weight if m.weight is not None else model.shared_embedding_or_output_weight()  # tied: the embedding
               for m in model.modules() if isinstance(m, (ColumnParallelLinear, RowParallelLinear))]
    head = model.output_layer.weight if model.output_layer.weight is not None else model.shared_embedding_or_output_weight()
    pieces = -(-batches[0].numel() // loss_chunk) if loss_chunk else 1  # output-layer GEMMs a micro-batch (one row)
    assert sorted(gemms) == sorted(2 * [w.main_grad.data_ptr() for w in linears + (pieces - 1) * [head]])
    weights = {n for n, p in model.named_parameters() if any(p is w for w in linears)}
    assert buffers[True].keys() == buffers[False].keys()
    for name, unfused in buffers[False].items():
        fused = buffers[True][name]
        assert unfused.dtype == torch.float32 and unfused.abs().max() > 0, name
        if name in weights:
            assert rel_err(fused, unfused) <= 1e-5, name
        else:
            assert torch.equal(fused, unfused), name


def test_a_fused_model_refuses_a_backward_outside_megatrons_ddp():
    """Fused, a weight gradient goes into DDP's buffer (``main_grad``): unwrapped, megatron's backward failed with
    an AttributeError on None. The forward says what to do instead; evaluation (no gradients) runs as always."""
    from tools.parity import megatron_twin
    from tools.tiny_qwen35 import causal_lm, text_config

    parallel.initialize()
    hf = causal_lm(text_config(), seed=1)
    model = megatron_twin(hf, gradient_accumulation_fusion=True)
    ids = torch.randint(0, hf.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert model(ids).shape == (1, 12, hf.config.vocab_size)
    with pytest.raises(RuntimeError, match=r"wrap the model first \(megatron_ext.train.data_parallel\)"):
        model(ids)
