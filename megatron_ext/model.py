"""Build the Qwen3.5 language model as a megatron-core GPTModel."""

from __future__ import annotations

import logging

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.packed_seq_params import PackedSeqParams
from torch import Tensor

from megatron_ext import parallel
from megatron_ext.config import Qwen35Config
from megatron_ext.packing import Documents
from megatron_ext.spec import block_spec, resolve_backend, selective_recompute_modules

log = logging.getLogger(__name__)


def _batch_positions(position_ids: Tensor, b: int, s: int) -> Tensor:
    """``position_ids`` as [b, s]: one row ([s] or [1, s]) serves the whole batch, as in transformers."""
    shape = list(position_ids.shape)
    if shape in ([s], [1, s]):
        return position_ids.reshape(1, s).expand(b, s)
    if shape != [b, s]:
        raise ValueError(f"position_ids of shape {shape} do not fit input_ids of shape [{b}, {s}]: "
                         f"pass [{b}, {s}], [1, {s}] or [{s}]")
    return position_ids


class Qwen35GPTModel(GPTModel):
    """megatron-core GPTModel for Qwen3.5 that always runs packed (thd), so documents never see each other.

    ``forward(input_ids, position_ids, attention_mask=None)`` takes a [b, s] batch (``position_ids``
    [b, s], or one row of them, [s] or [1, s], for every row, as transformers takes them); without explicit
    ``packed_seq_params`` the document boundaries come from ``position_ids`` resets and the optional
    [b, s] padding ``attention_mask``, read on the host (the trainer passes the params it built before
    copying the batch: :class:`~megatron_ext.packing.Documents`). Returns logits [b, s, vocab] (gathered
    over TP), or the per-token loss [b, s] when ``labels`` are given.

    The output layer has ``padded_vocab_size`` rows (a multiple of 128 x TP, as megatron pads); the ids
    past ``vocab_size`` do not exist for the tokenizer, so they are never predicted: gathered logits stop
    at ``vocab_size``, vocab-parallel logits and the loss see them as -inf (zero probability, no gradient).
    """

    def forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
        runtime_gather_output: bool | None = None,
        **kwargs,
    ) -> Tensor:
        b, s = input_ids.shape
        if self.config.gradient_accumulation_fusion and torch.is_grad_enabled():
            weight = next((p for p in self.parameters() if p.requires_grad), None)
            if weight is not None and not hasattr(weight, "main_grad"):
                raise RuntimeError("gradient_accumulation_fusion adds weight gradients into megatron DDP's buffers: wrap "
                                   "the model first (megatron_ext.train.data_parallel), or build it without the flag")
        if position_ids is not None:
            position_ids = _batch_positions(position_ids, b, s)
        if packed_seq_params is None:
            if attention_mask is not None and attention_mask.dim() != 2:
                raise ValueError("attention_mask must be a [batch, seq] padding mask; pass packed_seq_params for documents")
            if position_ids is None:
                position_ids = torch.arange(s, device=input_ids.device).expand(b, s)
            packed_seq_params = Documents.from_positions(position_ids, attention_mask).to(input_ids.device).packed_seq_params()
        if runtime_gather_output is None:
            runtime_gather_output = labels is None  # users get full-vocab logits; the loss stays vocab-parallel
        out = super().forward(
            input_ids.reshape(1, b * s),
            position_ids.reshape(1, b * s) if position_ids is not None else None,
            None,
            labels=labels.reshape(1, b * s) if labels is not None else None,
            packed_seq_params=packed_seq_params,
            runtime_gather_output=runtime_gather_output,
            **kwargs,
        )
        if not self.post_process:
            return out
        if labels is None:
            out = out[..., : self.qwen35_config.vocab_size] if runtime_gather_output else self._mask_padded_vocab(out)
        return out.reshape(b, s, *out.shape[2:])

    loss_chunk = 0  # tokens per piece of the output layer + loss in training; 0: all at once (build_model sets it)

    def _postprocess(self, hidden_states, input_ids, position_ids, labels, *args, **kwargs):
        """megatron's output layer and loss, or with ``loss_chunk`` the same in pieces of that many tokens,
        each piece's logits recomputed in the backward instead of kept: at the 2B's 248k vocabulary the
        logits of 8192 tokens and the loss's fp32 softmax saved for the backward take about 11 GiB, a
        piece of 1024 tokens about 1.4 GiB (the price: the output layer's forward once more, about 7% of
        the 2B's step). Not with MTP or sequence parallelism (a rank holds a slice of the sequence)."""
        if (labels is None or not self.loss_chunk or not self.post_process or self.mtp_process
                or self.config.mtp_num_layers or self.output_layer.sequence_parallel
                or hidden_states.shape[0] <= self.loss_chunk):
            return super()._postprocess(hidden_states, input_ids, position_ids, labels, *args, **kwargs)
        pieces = zip(hidden_states.split(self.loss_chunk, dim=0), labels.split(self.loss_chunk, dim=1))
        # megatron's checkpoint, as for its own recomputation: it recomputes with the parameters themselves, where
        # torch's non-reentrant one hands the recomputed layer detached copies, without the attributes
        # gradient_accumulation_fusion reads and sets on a weight (main_grad, grad_added_to_main_grad)
        return torch.cat([tensor_parallel.checkpoint(self._head_loss, False, h, y) for h, y in pieces], dim=1)

    def _head_loss(self, hidden_states: Tensor, labels: Tensor) -> Tensor:
        weight = self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else None
        logits, _ = self.output_layer(hidden_states, weight=weight, runtime_gather_output=False)
        return self.compute_language_model_loss(labels, logits)

    def compute_language_model_loss(self, labels: Tensor, logits: Tensor) -> Tensor:
        return super().compute_language_model_loss(labels, self._mask_padded_vocab(logits))

    def _mask_padded_vocab(self, logits: Tensor) -> Tensor:
        """-inf for the padded ids in vocab-parallel logits (this TP rank's slice of the vocabulary)."""
        c = self.qwen35_config
        if c.padded_vocab_size == c.vocab_size:
            return logits
        width = logits.shape[-1]
        first = parallel_state.get_tensor_model_parallel_rank() * width if width != c.padded_vocab_size else 0
        ids = torch.arange(first, first + width, device=logits.device)
        return logits.masked_fill(ids >= c.vocab_size, float("-inf"))


def _mark_tensor_parallel_weights(model: torch.nn.Module) -> None:
    """megatron-core sets ``tensor_model_parallel`` on sharded weights inside its init functions, which
    ``perform_initialization=False`` (weights come from a checkpoint) skips; grad norms, clipping and
    the optimizer need it to count each shard once."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

    for module in model.modules():
        dim = 0 if isinstance(module, (ColumnParallelLinear, VocabParallelEmbedding)) else 1 if isinstance(module, RowParallelLinear) else None
        if dim is None or module.weight is None:  # tied embeddings: the output layer owns no weight
            continue
        if not getattr(module.weight, "tensor_model_parallel", False):
            set_tensor_model_parallel_attributes(module.weight, is_parallel=True, dim=dim, stride=1)


def widen_parameters(model: torch.nn.Module, dtypes: dict[str, torch.dtype]) -> None:
    """Give each parameter named in ``dtypes`` that dtype where it is wider than the parameter's own (the
    values are left to a load). A Qwen3.5 release is bf16 but stores the GDN ``A_log`` and output norm in
    fp32: widened, they are loaded, trained and saved unrounded."""
    for name, param in model.named_parameters():
        wide = torch.promote_types(param.dtype, dtypes.get(name, param.dtype))
        if wide != param.dtype:
            param.data = torch.empty_like(param.data, dtype=wide)


def build_model(
    config: Qwen35Config,
    backend: str = "auto",
    *,
    gdn_kernel: str = "auto",
    attention_kernel: str = "auto",
    params_dtype: torch.dtype = torch.float32,
    device: str | None = None,
    vp_stage: int | None = None,
    loss_chunk: int = 0,
    **transformer_overrides,
) -> Qwen35GPTModel:
    """The Qwen3.5 model for this rank's TP/PP position (initialises a 1-process world if needed).

    backend: ``auto`` | ``te`` | ``local`` (see :func:`megatron_ext.spec.resolve_backend`);
    gdn_kernel: ``auto`` | ``fla`` | ``torch`` (see :mod:`megatron_ext.kernels`);
    attention_kernel: ``auto`` | ``fused`` | ``flex`` | ``masked``, the packed core attention under either backend
    (see :func:`megatron_ext.layers.resolve_attention_kernel`), or ``te``: Transformer Engine's (backend te; see
    :func:`megatron_ext.spec.core_attention`);
    device: ``cuda`` (default when available) or ``cpu``;
    loss_chunk: tokens per piece of the output layer + loss in training, recomputed in the backward (0: the
    whole sequence at once; see :meth:`Qwen35GPTModel._postprocess`).
    """
    if loss_chunk < 0:
        raise ValueError(f"loss_chunk must be >= 0 (0: no chunks), got {loss_chunk}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if not parallel_state.model_parallel_is_initialized():
        parallel.initialize()
    backend = resolve_backend(backend)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    transformer_overrides.setdefault("use_cpu_initialization", device == "cpu")
    if transformer_overrides.get("recompute_granularity") == "selective":
        transformer_overrides.setdefault("recompute_modules", selective_recompute_modules(
            backend, attention_kernel, device, params_dtype))
    tcfg = config.to_transformer_config(
        tensor_parallel=tp, pipeline_parallel=pp, params_dtype=params_dtype, backend=backend, **transformer_overrides
    )
    model = Qwen35GPTModel(
        config=tcfg,
        transformer_layer_spec=block_spec(config, tcfg, backend, gdn_kernel, vp_stage=vp_stage,
                                           attention_kernel=attention_kernel),
        vocab_size=config.padded_vocab_size,
        max_sequence_length=config.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage),
        share_embeddings_and_output_weights=config.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_percent=config.rotary_percent,
        rotary_base=config.rope_theta,
        parallel_output=True,
        vp_stage=vp_stage,
    )
    if not tcfg.perform_initialization:
        _mark_tensor_parallel_weights(model)
    model.qwen35_config = config
    model.backend = backend
    model.loss_chunk = loss_chunk
    if device == "cuda":
        model.cuda(torch.cuda.current_device())
    return model
