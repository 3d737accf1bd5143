"""The Qwen3.5 layer specs: megatron-core ModuleSpecs, one per layer, picked from ``layer_types``.

Backends follow megatron-core's ``BackendSpecProvider``: Transformer Engine modules (fused norm+linear,
TE attention, BF16/FP8) when TE and CUDA are present, megatron's local modules otherwise.
"""

from __future__ import annotations

import logging

import torch
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.backends import BackendSpecProvider, LocalSpecProvider
from megatron.core.ssm.gated_delta_net import GatedDeltaNetSubmodules
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
    get_transformer_layer_offset,
)

from megatron_ext.config import LINEAR, Qwen35Config
from megatron_ext.gpu_stack import transformer_engine_error
from megatron_ext.layers import (
    ATTENTION_KERNELS,
    NormColumnParallelLinear,
    PackedDotProductAttention,
    Qwen35GatedDeltaNet,
    RMSNorm,
)

log = logging.getLogger(__name__)

BACKENDS = ("auto", "te", "local")


def have_transformer_engine() -> bool:
    return transformer_engine_error() is None


def resolve_backend(requested: str = "auto") -> str:
    """``auto``: TE when it is installed and CUDA is present, else megatron's local modules."""
    if requested not in BACKENDS:
        raise ValueError(f"unknown backend {requested!r}; choose one of {BACKENDS}")
    te_missing = transformer_engine_error()
    if requested == "te" and te_missing:
        raise RuntimeError(f"backend 'te' needs Transformer Engine, which does not import here ({te_missing}); install "
                           "it as README's 'Transformer Engine' section says, or use backend 'local'")
    if requested == "te" and not torch.cuda.is_available():
        raise RuntimeError("backend 'te' needs a CUDA device and torch sees none; on a CPU machine use backend 'local'")
    chosen = ("te" if not te_missing and torch.cuda.is_available() else "local") if requested == "auto" else requested
    log.info("Qwen3.5 spec backend: %s (requested %s)", chosen, requested)
    return chosen


def selective_recompute_modules(backend: str, attention_kernel: str, device, dtype: torch.dtype) -> list[str] | None:
    """What megatron's selective recomputation recomputes for this model: core attention when it is the
    masked path (its [T, T] scores are the largest activation; megatron's default), else the MLPs, the
    largest activations once attention is fused (a fused kernel keeps no scores, so recomputing it saves
    next to nothing, as megatron itself warns). Under TE: None, megatron's default, which
    ``Qwen35Config.to_transformer_config`` turns off (TE runs without recomputation unless ``full``)."""
    from megatron_ext.layers import resolve_attention_kernel

    if backend == "te":
        return None
    masked = resolve_attention_kernel(attention_kernel, device, dtype) == "masked"
    return ["core_attn"] if masked else ["mlp"]


class LocalQwen35SpecProvider(LocalSpecProvider):
    """megatron's local modules, with norm+linear fused like TE's, a norm that supports zero-centred gamma,
    and packed-aware attention with a choice of kernel."""

    def __init__(self, attention_kernel: str = "auto"):
        super().__init__()
        self.attention_kernel = attention_kernel

    def fuse_layernorm_and_linear(self) -> bool:
        return True

    def column_parallel_layer_norm_linear(self) -> type:
        return NormColumnParallelLinear

    def layer_norm(self, rms_norm: bool = False, for_qk: bool = False) -> type:
        return RMSNorm

    def core_attention(self) -> ModuleSpec:
        return packed_attention(self.attention_kernel)


def packed_attention(attention_kernel: str) -> ModuleSpec:
    return ModuleSpec(module=PackedDotProductAttention, params={"kernel": attention_kernel})


def core_attention(p: BackendSpecProvider, backend: str, attention_kernel: str) -> ModuleSpec:
    """The local spec's packed attention (:func:`megatron_ext.layers.resolve_attention_kernel`) under either
    backend, unless ``attention_kernel`` is ``te``: Transformer Engine's DotProductAttention (cuDNN's fused
    attention on packed THD rows), by request only. On an H100 (2026-11-28: TE 2.11, the cuDNN of torch
    2.11+cu130's wheels) its THD backward read memory it had not written: with the allocator's free blocks
    filled with NaN every packed row, one document too, gave NaN gradients, and a TE training run stopped at
    step 1 on non-finite gradients (docs/benchmarks.md). FlashAttention-2 through torch (``fused``) passes the
    same check there."""
    if attention_kernel != "te":
        return packed_attention(attention_kernel)
    if backend != "te":
        raise ValueError("attention_kernel 'te' is Transformer Engine's attention: it needs backend 'te'; "
                         f"the local backend's kernels are {', '.join(ATTENTION_KERNELS)}")
    return p.core_attention()


def spec_provider(backend: str, attention_kernel: str = "auto") -> BackendSpecProvider:
    if backend == "te":
        from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

        return TESpecProvider()
    return LocalQwen35SpecProvider(attention_kernel)


def layer_specs(config: Qwen35Config, backend: str, gdn_kernel: str = "auto",
                attention_kernel: str = "auto") -> list[ModuleSpec]:
    """One TransformerLayer spec per HF layer: Gated DeltaNet or gated full attention, then SwiGLU.
    ``attention_kernel``: see :func:`core_attention`."""
    p = spec_provider(backend, attention_kernel)
    norm_linear = p.column_parallel_layer_norm_linear()  # pre-norms live inside the following linear

    gated_delta_net = ModuleSpec(
        module=Qwen35GatedDeltaNet,
        params={"kernel": gdn_kernel},
        submodules=GatedDeltaNetSubmodules(
            in_proj=norm_linear,
            # the output norm is a plain-gamma RMSNorm in Qwen3.5 (weights init to 1, not zero-centred)
            out_norm=ModuleSpec(module=RMSNorm, params={"zero_centered_gamma": False}),
            out_proj=p.row_parallel_linear(),
        ),
    )
    gated_attention = ModuleSpec(
        module=SelfAttention,
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=SelfAttentionSubmodules(
            linear_qkv=norm_linear,
            core_attention=core_attention(p, backend, attention_kernel),
            linear_proj=p.row_parallel_linear(),
            q_layernorm=p.layer_norm(rms_norm=True, for_qk=True),
            k_layernorm=p.layer_norm(rms_norm=True, for_qk=True),
        ),
    )
    mlp = ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=norm_linear, linear_fc2=p.row_parallel_linear()))

    def layer(mixer: ModuleSpec) -> ModuleSpec:
        return ModuleSpec(
            module=TransformerLayer,
            submodules=TransformerLayerSubmodules(
                input_layernorm=IdentityOp,  # folded into the mixer's input linear
                self_attention=mixer,
                self_attn_bda=get_bias_dropout_add,
                pre_mlp_layernorm=IdentityOp,  # folded into linear_fc1
                mlp=mlp,
                mlp_bda=get_bias_dropout_add,
            ),
        )

    return [layer(gated_delta_net if t == LINEAR else gated_attention) for t in config.layer_types]


def block_spec(config: Qwen35Config, transformer_config, backend: str, gdn_kernel: str = "auto",
               vp_stage: int | None = None, attention_kernel: str = "auto") -> TransformerBlockSubmodules:
    """The decoder block for this pipeline stage: its slice of the layers plus the final norm."""
    specs = layer_specs(config, backend, gdn_kernel, attention_kernel)
    offset = get_transformer_layer_offset(transformer_config, vp_stage=vp_stage)
    count = get_num_layers_to_build(transformer_config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(
        layer_specs=specs[offset : offset + count], layer_norm=spec_provider(backend).layer_norm(rms_norm=True)
    )
