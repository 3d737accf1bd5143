"""Qwen3.5 text-model hyper-parameters, read from a HF ``config.json`` and turned into a megatron-core
``TransformerConfig``.

One dataclass holds what the architecture needs; everything megatron-specific (parallelism, dtype,
fusions) is decided in :meth:`Qwen35Config.to_transformer_config`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

LINEAR = "linear_attention"
FULL = "full_attention"
# Transformer Engine's FP8 settings as megatron-core's TransformerConfig names them (its ``fp8`` and
# ``fp8_recipe`` literals; "custom" is left out: it needs a quantizer factory this project never passes).
FP8_FORMATS = ("hybrid", "e4m3")  # hybrid: e4m3 forward, e5m2 gradients
FP8_RECIPES = {
    "delayed": "delayed scaling",
    "tensorwise": "current scaling, per tensor",
    "blockwise": "current scaling, per block",
    "mxfp8": "MXFP8, Blackwell only",
}


def check_fp8(fp8: str | None, recipe: str, backend: str, bf16: bool) -> None:
    """FP8 settings a run can use, checked before anything is built: one line naming what to change."""
    if recipe not in FP8_RECIPES:
        choices = ", ".join(f"{k} ({v})" for k, v in FP8_RECIPES.items())
        raise ValueError(f"fp8_recipe must be one of {choices}; got {recipe!r}")
    if fp8 is None:
        return
    if fp8 not in FP8_FORMATS:
        raise ValueError(f"fp8 must be null, {' or '.join(FP8_FORMATS)}; got {fp8!r}")
    if backend != "te":
        raise ValueError(f"fp8 runs on Transformer Engine's GEMMs: set backend: te (got backend: {backend})")
    if not bf16:
        raise ValueError("fp8 needs precision: bf16 (FP8 GEMMs with bf16 activations and fp32 master weights)")


@dataclass
class Qwen35Config:
    vocab_size: int = 248320
    hidden_size: int = 2048
    intermediate_size: int = 6144
    num_hidden_layers: int = 24
    layer_types: list[str] = field(default_factory=list)
    # gated full attention
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    head_dim: int = 256
    rope_theta: float = 10_000_000.0
    partial_rotary_factor: float = 0.25
    mrope_section: list[int] | None = None
    max_position_embeddings: int = 262144
    # Gated DeltaNet
    linear_conv_kernel_dim: int = 4
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_num_key_heads: int = 16
    linear_num_value_heads: int = 16
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    hidden_act: str = "silu"
    eos_token_id: int | None = None
    # rows of megatron's embedding/output layer: vocab_size padded (see padded_to); the extra ids are never
    # predicted (the model masks them) and are dropped again at export
    padded_vocab_size: int | None = None

    def __post_init__(self) -> None:
        if not self.layer_types:  # HF's default: every 4th layer is full attention
            self.layer_types = [FULL if (i + 1) % 4 == 0 else LINEAR for i in range(self.num_hidden_layers)]
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries, expected {self.num_hidden_layers}")
        unknown = set(self.layer_types) - {LINEAR, FULL}
        if unknown:
            raise ValueError(f"unknown layer types {sorted(unknown)}; expected {LINEAR!r} or {FULL!r}")
        if self.linear_num_value_heads % self.linear_num_key_heads:
            raise ValueError("linear_num_value_heads must be a multiple of linear_num_key_heads")
        if self.hidden_act != "silu":
            raise ValueError(f"Qwen3.5 uses silu, got hidden_act={self.hidden_act!r}")
        if self.padded_vocab_size is None:
            self.padded_vocab_size = self.vocab_size
        if self.padded_vocab_size < self.vocab_size:
            raise ValueError(f"padded_vocab_size={self.padded_vocab_size} is smaller than vocab_size={self.vocab_size}")

    def padded_to(self, multiple: int) -> "Qwen35Config":
        """This config with the vocabulary padded to a multiple of ``multiple``: megatron pads to
        ``make_vocab_size_divisible_by`` (128) x TP so that every TP rank holds an equal, GEMM-friendly slice
        of the embedding and output layer, whatever size the tokenizer has."""
        return dataclasses.replace(self, padded_vocab_size=-(-self.vocab_size // multiple) * multiple)

    # ------------------------------------------------------------------ HF I/O
    @classmethod
    def from_hf(cls, path_or_dict: str | Path | dict[str, Any]) -> "Qwen35Config":
        """Read a HF config: a directory, a ``config.json`` path, or its dict; either the multimodal
        ``Qwen3_5ForConditionalGeneration`` config (nested ``text_config``) or a plain text config."""
        if isinstance(path_or_dict, dict):
            raw = path_or_dict
        else:
            path = Path(path_or_dict)
            if path.is_dir():
                path = path / "config.json"
            if not path.is_file():
                raise FileNotFoundError(f"no HF config at {path}")
            raw = json.loads(path.read_text())
        text = raw.get("text_config", raw)
        model_type = text.get("model_type") or "qwen3_5_text"
        if not model_type.startswith("qwen3_5"):
            raise ValueError(f"not a Qwen3.5 config: model_type={model_type!r}")
        from transformers import CONFIG_MAPPING

        # transformers' own config fills in what the file leaves out as the reference model reads it (layer_types
        # from full_attention_interval, rope_theta's default, ...): defaults of ours would build another model
        hf = CONFIG_MAPPING[model_type.removesuffix("_text") + "_text"](**{k: v for k, v in text.items() if k != "model_type"})
        rope = hf.rope_parameters or {}
        if rope.get("rope_type", "default") not in ("default", "mrope"):
            raise ValueError(f"unsupported rope_type {rope.get('rope_type')!r}")
        names = {f.name for f in dataclasses.fields(cls)} - {"rope_theta", "partial_rotary_factor", "mrope_section"}
        kwargs = {k: getattr(hf, k) for k in names if hasattr(hf, k)}
        kwargs.update(rope_theta=rope["rope_theta"], partial_rotary_factor=rope.get("partial_rotary_factor", 1.0),
                      mrope_section=rope.get("mrope_section"))
        # Qwen3_5ForConditionalGeneration ties (or not) by its top-level flag, not text_config's
        kwargs["tie_word_embeddings"] = bool((raw if text is not raw else text).get("tie_word_embeddings", False))
        eos = text.get("eos_token_id", raw.get("eos_token_id"))
        kwargs["eos_token_id"] = eos[0] if isinstance(eos, list) else eos
        return cls(**kwargs)

    def to_hf_text_dict(self) -> dict[str, Any]:
        """The ``Qwen3_5TextConfig`` fields this config determines (used for text-only exports)."""
        rope = {"rope_type": "default", "rope_theta": self.rope_theta, "partial_rotary_factor": self.partial_rotary_factor}
        if self.mrope_section is not None:
            rope.update(mrope_section=self.mrope_section, mrope_interleaved=True)
        skip = {"rope_theta", "partial_rotary_factor", "mrope_section", "padded_vocab_size"}
        out = {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}
        out.update(model_type="qwen3_5_text", rope_parameters=rope)
        return out

    @property
    def rotary_percent(self) -> float:
        return self.partial_rotary_factor

    # ------------------------------------------------------------ megatron I/O
    def to_transformer_config(
        self,
        *,
        tensor_parallel: int = 1,
        pipeline_parallel: int = 1,
        params_dtype: torch.dtype = torch.float32,
        backend: str = "local",
        fp8: str | None = None,
        fp8_recipe: str = "delayed",
        use_cpu_initialization: bool | None = None,
        **overrides: Any,
    ):
        """megatron-core ``TransformerConfig`` for this architecture (overrides go straight through), with our
        ``compile_elementwise`` switch (:mod:`megatron_ext.fusions`).

        ``backend="te"`` (resolved, see :func:`megatron_ext.spec.resolve_backend`): Transformer Engine's
        modules with its fused kernels on: RoPE (TE's fused kernel takes packed THD rows and partial
        rotary, ``freqs`` narrower than the head) and SwiGLU; selective recomputation is dropped, as it only
        recomputes the core attention, which TE's flash/fused attention keeps no score matrix for (megatron
        warns about it; recomputing costs a second attention forward). ``local``: plain torch modules, and
        the same fused-RoPE slot filled by :mod:`megatron_ext.rope` when TE is absent.
        """
        from megatron_ext import rope
        from megatron_ext.fusions import Qwen35TransformerConfig

        rope.install()  # before the config validates apply_rope_fusion

        te = backend == "te"
        check_fp8(fp8, fp8_recipe, backend, bf16=params_dtype == torch.bfloat16)
        if te and overrides.get("recompute_granularity") == "selective" and overrides.get("recompute_modules") in (
                None, ["core_attn"]):
            log.info("backend te: selective recomputation (core attention only) is off; full recompute still works")
            overrides.pop("recompute_granularity")

        if self.padded_vocab_size % tensor_parallel:
            raise ValueError(f"the padded vocabulary ({self.padded_vocab_size} rows) is not divisible by "
                             f"tensor_parallel={tensor_parallel}; convert again with --tp {tensor_parallel}")
        for what, n in (
            ("num_key_value_heads", self.num_key_value_heads),
            ("linear_num_key_heads", self.linear_num_key_heads),
            ("linear_num_value_heads", self.linear_num_value_heads),
        ):
            if n % tensor_parallel:
                raise ValueError(f"{what}={n} is not divisible by tensor_parallel={tensor_parallel}")
        if use_cpu_initialization is None:
            use_cpu_initialization = not torch.cuda.is_available()
        kwargs: dict[str, Any] = dict(
            num_layers=self.num_hidden_layers,
            hidden_size=self.hidden_size,
            ffn_hidden_size=self.intermediate_size,
            num_attention_heads=self.num_attention_heads,
            num_query_groups=self.num_key_value_heads,
            kv_channels=self.head_dim,
            layernorm_epsilon=self.rms_norm_eps,
            normalization="RMSNorm",
            layernorm_zero_centered_gamma=True,  # Qwen3.5 norms compute x_hat * (1 + w)
            qk_layernorm=True,
            attention_output_gate=True,
            gated_linear_unit=True,
            activation_func=F.silu,
            add_bias_linear=False,
            add_qkv_bias=False,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            transformer_impl="transformer_engine" if te else "local",
            # megatron's SwiGLU as one compiled kernel each way (bias-free here), with TE or compile_elementwise
            bias_activation_fusion=te or overrides.get("compile_elementwise", False),
            # megatron's fused cross entropy stays off (its default): on an H200 (docs/benchmarks.md, 2026-11-30) it
            # held one more fp32 copy of the logits (+3.8 GiB a 4096-token sequence at the 2B's vocabulary) and the
            # step was no faster; "native" (no TE needed) where an override turns it on, as a bench row does
            cross_entropy_fusion_impl="native",
            masked_softmax_fusion=False,
            apply_rope_fusion=True,  # TE's fused thd kernel, else megatron_ext.rope's: neither syncs per layer
            persist_layer_norm=False,
            linear_conv_kernel_dim=self.linear_conv_kernel_dim,
            linear_key_head_dim=self.linear_key_head_dim,
            linear_value_head_dim=self.linear_value_head_dim,
            linear_num_key_heads=self.linear_num_key_heads,
            linear_num_value_heads=self.linear_num_value_heads,
            tensor_model_parallel_size=tensor_parallel,
            pipeline_model_parallel_size=pipeline_parallel,
            params_dtype=params_dtype,
            bf16=params_dtype == torch.bfloat16,
            fp16=params_dtype == torch.float16,
            use_cpu_initialization=use_cpu_initialization,
            init_method_std=0.02,
            # layers differ (GDN vs attention): store them under their global index, not stacked
            hetereogenous_dist_checkpoint=True,
        )
        if fp8:
            kwargs.update(fp8=fp8, fp8_recipe=fp8_recipe)
        kwargs.update(overrides)
        return Qwen35TransformerConfig(**kwargs)
