"""The few modules where Qwen3.5 differs from what megatron-core ships; everything else in the spec is
megatron-core's own (SelfAttention with ``attention_output_gate``, MLP, parallel linears, TE modules)."""

from __future__ import annotations

import functools
import inspect
import logging

import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.ssm.gated_delta_net import GatedDeltaNet
from megatron.core.tensor_parallel import ColumnParallelLinear
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from torch import Tensor

from megatron_ext.fusions import Elementwise
from megatron_ext.kernels import causal_conv1d_silu, compute_dtype, gated_delta_rule, resolve_kernel
from megatron_ext.packing import cu_seqlens_of, documents_of, token_documents

log = logging.getLogger(__name__)


@Elementwise
def rms_norm(x: Tensor, weight: Tensor, eps: float, zero_centered: bool) -> Tensor:
    """RMSNorm as transformers' Qwen3.5 computes it: statistics in fp32; zero-centred gamma scales by
    ``1 + w`` before the cast back, a plain gamma (the GDN output norm) after it."""
    wide = x.to(compute_dtype(x))
    x_hat = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + eps)
    if zero_centered:
        return (x_hat * (1.0 + weight.to(x_hat.dtype))).type_as(x)
    return weight * x_hat.type_as(x)


@Elementwise
def gated_rms_norm(x: Tensor, gate: Tensor, weight: Tensor, eps: float, act_fn) -> Tensor:
    """The GDN output: ``norm(x) * act_fn(gate)`` per value head (plain gamma), the product in fp32 and cast
    back, as transformers' gated norm computes it."""
    y = rms_norm(x, weight, eps, zero_centered=False)
    return (y * act_fn(gate.to(compute_dtype(gate)))).to(x.dtype)


@Elementwise
def gdn_gates(a: Tensor, b: Tensor, a_log: Tensor, dt_bias: Tensor) -> tuple[Tensor, Tensor]:
    """The GDN's per-head log decay ``g = -exp(A_log) * softplus(a + dt_bias)`` (fp32) and write
    strength ``beta = sigmoid(b)``."""
    g = -a_log.to(compute_dtype(a_log)).exp() * torch.nn.functional.softplus(a.to(compute_dtype(a)) + dt_bias)
    return g, b.sigmoid()


def _norm_weight(config, size: int, zero_centered: bool) -> torch.nn.Parameter:
    init = torch.zeros if zero_centered else torch.ones
    weight = torch.nn.Parameter(init(size, dtype=config.params_dtype, device=_param_device(config)))
    setattr(weight, "sequence_parallel", config.sequence_parallel)
    return weight


def _param_device(config) -> torch.device:
    if config.use_cpu_initialization or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


class RMSNorm(torch.nn.Module):
    """RMSNorm for the local (non-TE) spec. Differs from megatron's local norms: those reject
    ``layernorm_zero_centered_gamma``, which Qwen3.5 uses (``x_hat * (1 + w)``)."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-6, zero_centered_gamma: bool | None = None):
        super().__init__()
        self.config = config
        self.zero_centered = config.layernorm_zero_centered_gamma if zero_centered_gamma is None else zero_centered_gamma
        self.eps = eps
        self.weight = _norm_weight(config, hidden_size, self.zero_centered)

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm.on(self.config)(x, self.weight, self.eps, self.zero_centered)


class NormColumnParallelLinear(ColumnParallelLinear):
    """Local twin of TE's ``TELayerNormColumnParallelLinear``: the pre-norm lives inside the linear as
    ``layer_norm_weight``. Differs from megatron's local spec (separate norm modules) so that local and TE
    models have the same parameter names, and a checkpoint converted on CPU trains under TE unchanged."""

    def __init__(self, input_size: int, output_size: int, *, config, **kwargs):
        super().__init__(input_size, output_size, config=config, **kwargs)
        self.eps = config.layernorm_epsilon
        self.zero_centered = config.layernorm_zero_centered_gamma
        self.layer_norm_weight = _norm_weight(config, input_size, self.zero_centered)
        # registered first, as TE's LayerNormLinear does: the gradient buffers follow the parameter order, and
        # the distributed optimizer's checkpoint (dp_reshardable) stores its state in buffer order, so a run's
        # optimizer state resumes under the other backend only with the same order
        self._parameters = {"layer_norm_weight": self._parameters.pop("layer_norm_weight"), **self._parameters}

    def forward(self, x: Tensor, *args, **kwargs):
        normed = rms_norm.on(self.config)(x, self.layer_norm_weight, self.eps, self.zero_centered)
        return super().forward(normed, *args, **kwargs)


class Qwen35GatedDeltaNet(GatedDeltaNet):
    """megatron-core's GatedDeltaNet (parameters, TP layout, sharded checkpoint) with a forward that
    differs in two ways: packed documents reset the conv and recurrent state (the micro-batch's
    :class:`~megatron_ext.packing.Documents`, shared by all layers), and the kernels are chosen by device
    (megatron's forward rejects packed input and always calls fla)."""

    def __init__(self, *args, kernel: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self.kernel = kernel

    def forward(
        self,
        hidden_states: Tensor,
        attention_mask: Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
        inference_context=None,
        **kwargs,
    ) -> tuple[Tensor, Tensor | None]:
        if inference_context is not None:
            raise NotImplementedError("incremental decoding is not supported; export to HF/vLLM for generation")
        qkvzba, _ = self.in_proj(hidden_states)
        qkvzba = qkvzba.transpose(0, 1)  # [s, b, d] -> [b, s, d]
        batch, seq_len, _ = qkvzba.shape
        docs = documents_of(packed_seq_params)
        if docs is not None and batch != 1:
            raise ValueError(f"packed (thd) input must have batch 1, got {batch}")
        kernel = resolve_kernel(self.kernel, qkvzba.device)

        tp = self.tp_size
        qkv, z, b, a = torch.split(
            qkvzba,
            [(self.qk_dim * 2 + self.v_dim) // tp, self.v_dim // tp, self.num_value_heads // tp, self.num_value_heads // tp],
            dim=-1,
        )
        qkv = causal_conv1d_silu(qkv, self.conv1d.weight.squeeze(1), docs, kernel)
        q, k, v = torch.split(qkv, [self.qk_dim // tp, self.qk_dim // tp, self.v_dim // tp], dim=-1)
        q = q.reshape(batch, seq_len, -1, self.key_head_dim)
        k = k.reshape(batch, seq_len, -1, self.key_head_dim)
        v = v.reshape(batch, seq_len, -1, self.value_head_dim)
        g, beta = gdn_gates.on(self.config)(a, b, self.A_log, self.dt_bias)

        core = gated_delta_rule(q, k, v, g, beta, docs, kernel)
        out = self._gated_norm(core, z)
        out = out.reshape(batch, seq_len, -1).transpose(0, 1).contiguous()
        return self.out_proj(out)

    def _gated_norm(self, x: Tensor, gate: Tensor) -> Tensor:
        """norm(x) * silu(z) per value head; megatron's ``_apply_gated_norm``, compiled where the config asks."""
        dim = x.shape[-1]
        return gated_rms_norm.on(self.config)(x.reshape(-1, dim), gate.reshape(-1, dim), self.out_norm.weight,
                                              self.out_norm.eps, self.act_fn)


def allreduce_gdn_out_norm_grads(model: torch.nn.Module) -> None:
    """Sum the GDN output-norm gradient over tensor-parallel ranks. Its weight is shared by all value
    heads but each rank only sees its own heads; megatron's ``finalize_model_grads`` does this for the
    q/k layernorms but not for this norm."""
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    if torch.distributed.get_world_size(group) == 1:
        return
    grads = [getattr(p, "main_grad", p.grad) for n, p in model.named_parameters() if n.endswith("out_norm.weight")]
    grads = [g for g in grads if g is not None]
    if grads:
        flat = torch._utils._flatten_dense_tensors(grads)
        torch.distributed.all_reduce(flat, group=group)
        for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
            g.copy_(synced)


ATTENTION_KERNELS = ("auto", "fused", "flex", "masked")  # the packed attention's; "te" is TE's (spec.core_attention)


@functools.cache
def _varlen_attn():
    """torch's FlashAttention-2 for packed rows (``torch.nn.attention.varlen``) as
    ``attend(q, k, v, cu_seqlens, max_seqlen, scale)``: causal within each document, key/value heads shared by
    groups of query heads (GQA). None when the installed torch lacks it.

    Causal is ``window_size=(-1, 0)``, there since torch 2.11. GQA: torch 2.11's ``varlen_attn`` has no
    ``enable_gqa`` and refuses it (FlashAttention-2 takes fewer key/value heads as they are); later versions
    refuse fewer key/value heads without it (2.13, 2.14)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    accepts = inspect.signature(varlen_attn).parameters
    if "window_size" not in accepts:
        return None
    gqa = {"enable_gqa": True} if "enable_gqa" in accepts else {}

    def attend(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, scale: float) -> Tensor:
        return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, scale=scale,
                           window_size=(-1, 0), **gqa)

    return attend


def resolve_attention_kernel(requested: str, device: torch.device, dtype: torch.dtype) -> str:
    """The core-attention kernel for packed rows, like :func:`megatron_ext.kernels.resolve_kernel`.

    * ``fused``: FlashAttention-2 through ``torch.nn.attention.varlen``: CUDA, bf16/fp16 only.
    * ``flex``: FlexAttention with a document block mask (compiled on CUDA; on CPU eager and forward only).
    * ``masked``: megatron's unfused attention under a [T, T] block-diagonal causal mask; any device and
      dtype, the reference.

    ``auto`` picks ``fused`` where it runs and ``masked`` elsewhere (CPU, fp32 parity runs). ``fused`` is
    the default over ``flex`` because FlashAttention-2 needs no compilation and no mask, and runs head_dim
    256 forward and backward on sm80/sm90 with its own tiles, while FlexAttention's Triton templates fall
    back to 32x64 tiles at head_dim 256 (torch/_inductor/template_heuristics); ``tools/bench_train.py``
    measures both (rows local-fused and local-flex) so a measurement can overturn this.
    """
    if requested not in ATTENTION_KERNELS:
        raise ValueError(f"unknown attention kernel {requested!r} for the packed attention; choose one of "
                         f"{ATTENTION_KERNELS} ('te' is Transformer Engine's, with backend 'te')")
    device = torch.device(device)
    fused_runs = device.type == "cuda" and dtype in (torch.bfloat16, torch.float16) and _varlen_attn() is not None
    chosen = ("fused" if fused_runs else "masked") if requested == "auto" else requested
    if chosen == "fused" and not fused_runs:
        raise ValueError(
            "attention_kernel='fused' is FlashAttention-2 through torch.nn.attention.varlen (torch >= 2.11): "
            f"it needs CUDA tensors in bf16 or fp16, got {device.type} {dtype}; "
            "use 'masked' (any device and dtype) or 'auto'"
        )
    _log_attention_choice(requested, chosen, device.type, str(dtype).removeprefix("torch."))
    return chosen


@functools.cache
def _log_attention_choice(requested: str, chosen: str, device: str, dtype: str) -> None:
    log.info("attention kernel: %s (requested %s, device %s, %s)", chosen, requested, device, dtype)


def document_causal_block_mask(cu_seqlens: Tensor, total: int, block: int = 128):
    """Causal attention within each packed document as a FlexAttention ``BlockMask``, without a [T, T]
    mask or a host sync: blocks are classified from the documents of their first and last tokens.

    With document ids non-decreasing along the row, a (query block i, key block j) tile has a visible
    pair iff j <= i and the key block's last document reaches the query block's first one; every pair is
    visible iff j < i and both blocks lie in one document ("full": the kernel skips the mask there).
    """
    from torch.nn.attention.flex_attention import BlockMask

    device = cu_seqlens.device
    doc = token_documents(cu_seqlens, total)
    starts = torch.arange(0, total, block, device=device)
    first, last = doc[starts], doc[(starts + block - 1).clamp(max=total - 1)]
    i, j = starts[:, None] // block, starts[None, :] // block
    visible = (j <= i) & (last[None, :] >= first[:, None])
    full = (j < i) & (first[None, :] == last[:, None])

    def ordered(blocks: Tensor) -> tuple[Tensor, Tensor]:  # BlockMask's layout: counts, then indices first
        counts = blocks.sum(-1, dtype=torch.int32)
        return counts[None, None], blocks.int().argsort(dim=-1, descending=True, stable=True).int()[None, None]

    def causal_document(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (kv_idx <= q_idx)

    return BlockMask.from_kv_blocks(*ordered(visible & ~full), *ordered(full), BLOCK_SIZE=block,
                                    mask_mod=causal_document, seq_lengths=(total, total))


@functools.cache
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)  # uncompiled, flex materialises the scores


def _flex_attention(q: Tensor, k: Tensor, v: Tensor, block_mask, scale: float) -> Tensor:
    """FlexAttention on [1, heads, t, dim]: compiled on CUDA; on CPU eagerly, forward only. The eager
    path traces the mask with dynamo, which ``megatron_ext.cpu_patches`` turns off on CPU."""
    if q.is_cuda:
        return _compiled_flex_attention()(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=True)
    from torch.nn.attention.flex_attention import flex_attention

    with torch._dynamo.config.patch(disable=False):
        return flex_attention(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=True)


class PackedDotProductAttention(DotProductAttention):
    """megatron-core's local attention, which rejects packed (thd) input. Packed documents stay
    independent like in TE's thd kernels, by the kernel :func:`resolve_attention_kernel` picks: a fused
    kernel that reads the boundaries (``cu_seqlens_q``, ``max_seqlen_q``) without host syncs, or a
    block-diagonal causal [T, T] mask (the reference)."""

    def __init__(self, *args, kernel: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self.kernel = kernel

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
    ) -> Tensor:
        if packed_seq_params is None:
            return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias)
        # thd: [t, heads, dim], k and v with the query groups' heads
        cu = cu_seqlens_of(packed_seq_params)
        kernel = resolve_attention_kernel(self.kernel, query.device, query.dtype)
        if kernel == "masked":
            return self._masked(query, key, value, cu, attention_bias)
        if attention_bias is not None or (self.training and self.attention_dropout.p):
            raise ValueError(f"attention_kernel={kernel!r} supports neither attention_bias nor attention dropout")
        if kernel == "fused":
            out = _varlen_attn()(query, key, value, cu, packed_seq_params.max_seqlen_q, self.softmax_scale)
        else:
            q, k, v = (x.transpose(0, 1).unsqueeze(0) for x in (query, key, value))  # [1, heads, t, dim]
            mask = document_causal_block_mask(cu, query.shape[0])
            out = _flex_attention(q, k, v, mask, self.softmax_scale)[0].transpose(0, 1)
        return out.reshape(out.shape[0], 1, -1)  # [t, 1, heads * dim]; Attention reshapes it for thd

    def _masked(self, query: Tensor, key: Tensor, value: Tensor, cu: Tensor, attention_bias: Tensor | None) -> Tensor:
        total = query.shape[0]
        if int(cu[-1]) != total:  # a host sync: this is the reference path, not the fast one
            raise ValueError(f"cu_seqlens cover {int(cu[-1])} tokens but the packed row has {total}")
        doc = token_documents(cu.to(query.device), total)
        future = torch.ones(total, total, dtype=torch.bool, device=query.device).triu(1)
        mask = (doc[:, None] != doc[None, :]) | future  # True = masked out
        return super().forward(
            query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1), mask[None, None], AttnMaskType.arbitrary, attention_bias
        )  # [t, 1, heads * dim]
