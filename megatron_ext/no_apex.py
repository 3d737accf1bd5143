"""megatron-core without Apex: torch stand-ins for the two Apex kernels whose absence costs a training step.

* The gradient norm. Without TE and Apex, megatron-core's gradient clipping takes the total gradient norm from
  ``megatron.core.utils.local_multi_tensor_l2_norm``, which turns every parameter's norm into a Python
  float: one host synchronisation per parameter tensor, each training step (measured on an H200 with
  ``python -m tools.gpu_check --parts syncs``: 45 syncs per step at 4 layers, 82 at 8). Its replacement
  keeps the norms on the device (torch's foreach norm, as ``torch.nn.utils.clip_grad_norm_`` computes them).
* The weight gradient accumulated inside its GEMM (megatron's ``gradient_accumulation_fusion``, which needs
  Apex's ``fused_weight_gradient_mlp_cuda`` for megatron's own linear layers: the local spec's, and the output
  layer under TE too). Unfused, every linear layer's backward writes a bf16 weight gradient and megatron's DDP
  hook adds it into the fp32 gradient buffer: one more kernel per weight and a bf16 rounding of each product
  (among the 315 ``add_`` kernels, 9.9 ms of 175 ms of GPU work, of the 2B step at seq 4096 on an H100:
  docs/benchmarks.md). Fused, the GEMM adds
  into the buffer itself (cuBLAS's beta = 1), at fp32 for bf16 operands.

Where TE or Apex provides a kernel, megatron uses theirs and :func:`apply` leaves it.
"""

from __future__ import annotations

import functools
import logging
import types

import torch

log = logging.getLogger(__name__)


def multi_tensor_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """``amp_C.multi_tensor_l2norm``'s contract as megatron uses it (the total norm of ``tensor_lists[0]``
    as a 1-element fp32 tensor on their device, and None), computed without leaving the device."""
    if per_tensor:
        raise NotImplementedError("per-tensor norms: megatron-core's gradient clipping asks for the total only")
    return torch.nn.utils.get_total_norm(tensor_lists[0], norm_type=2.0).float().view(1), None


def wgrad_gemm_accum(total_input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor) -> None:
    """``main_grad += grad_output^T @ total_input`` in one GEMM: Apex's ``wgrad_gemm_accum_fp32`` / ``_fp16``
    contract as megatron calls them (2-D ``[tokens, in]`` and ``[tokens, out]``, ``main_grad`` ``[out, in]``)."""
    a, b = grad_output.t(), total_input
    if a.dtype == main_grad.dtype:
        main_grad.addmm_(a, b)
    elif main_grad.dtype == torch.float32 and _gemm_into_fp32(main_grad.device):
        torch.addmm(main_grad, a, b, out_dtype=torch.float32, out=main_grad)  # bf16/fp16 operands, fp32 sums
    else:  # where torch has no such GEMM: the unfused arithmetic (a half-precision product, then the add)
        main_grad.add_(a @ b)


@functools.cache
def _gemm_into_fp32(device: torch.device) -> bool:
    """Whether torch adds a bf16 GEMM into an fp32 tensor on ``device``: CUDA with ``out_dtype`` and an fp32
    ``self`` (torch 2.10 on; before, addmm wanted ``self`` in the operands' dtype), compute capability 8.0 or later
    (cuBLAS has no such GEMM before Ampere). Tried once, as megatron calls it (a transposed first operand, random
    values), so that a torch or GPU without it trains on (as unfused), with a warning, rather than stopping at
    the backward or summing wrongly."""
    if device.type != "cuda":
        return False  # torch has no CPU kernel for it
    gen = torch.Generator(device).manual_seed(0)
    g, x, start = (torch.randn(*shape, generator=gen, device=device) for shape in [(64, 24), (64, 40), (24, 40)])
    g, x = g.bfloat16(), x.bfloat16()
    acc = start.clone()
    try:
        torch.addmm(acc, g.t(), x, out_dtype=torch.float32, out=acc)
        error = ((acc.double() - start.double() - g.double().t() @ x.double()).abs().max()).item()
        why = f"sums off by {error:.2g}"
        works = error <= 1e-4  # fp32 sums of 64 exact products of numbers ~1: ~1e-6; a wrong layout errs by ~1
    except (RuntimeError, TypeError) as e:
        works, why = False, f"{type(e).__name__}: {e}".splitlines()[0]
    if not works:
        log.warning("no bf16 GEMM into fp32 on %s (%s): each weight gradient of megatron's own layers is a bf16 GEMM, "
                    "then an fp32 add, as unfused", device, why)
    return works


def wgrad_path(dtype: torch.dtype, device: torch.device) -> str:
    """How megatron's own linear layers add a weight gradient of ``dtype`` operands into an fp32 gradient buffer on
    ``device`` under ``gradient_accumulation_fusion`` (for the trainer's log; TE's layers fuse it themselves)."""
    import megatron.core.tensor_parallel.layers as layers

    if getattr(layers, "fused_weight_gradient_mlp_cuda", None) is not FUSED_WGRAD:
        return "Apex's kernel"
    if dtype == torch.float32 or _gemm_into_fp32(device):
        return "one GEMM adding into the buffer"
    return "a bf16 GEMM, then an fp32 add, as unfused (no bf16 GEMM into fp32 here)"


# what megatron.core.tensor_parallel.layers imports Apex's extension as
FUSED_WGRAD = types.SimpleNamespace(wgrad_gemm_accum_fp32=wgrad_gemm_accum, wgrad_gemm_accum_fp16=wgrad_gemm_accum)


def apply() -> None:
    """Use :func:`multi_tensor_l2_norm` where megatron fell back to its host-syncing local version, and
    :func:`wgrad_gemm_accum` where Apex's weight-gradient extension did not import."""
    import megatron.core.optimizer.clip_grads as clip_grads
    import megatron.core.tensor_parallel.layers as layers
    from megatron.core.utils import local_multi_tensor_l2_norm

    if clip_grads.l2_norm_impl is local_multi_tensor_l2_norm:
        clip_grads.l2_norm_impl = multi_tensor_l2_norm
    if not layers._grad_accum_fusion_available:
        layers.fused_weight_gradient_mlp_cuda = FUSED_WGRAD
        layers._grad_accum_fusion_available = True
