"""Packed documents: where each document of a packed (thd) row starts, built once per micro-batch.

Every layer needs the boundaries: attention and RoPE as int32 ``cu_seqlens`` on the device, fla's varlen
kernels as int64 ``cu_seqlens`` with a host copy and a chunk table, the pure-torch kernels as host integers.
Built from ``position_ids`` on the host, before the batch is copied to the GPU, they cost no device sync;
built per layer from device tensors they cost several per layer (``nonzero``, ``max``, ``tolist``, and fla
recomputed its chunk table for every new tensor: its caches are keyed by tensor identity). So one
:class:`Documents` is made per micro-batch and the same objects reach every layer.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
from megatron.core.packed_seq_params import PackedSeqParams
from torch import Tensor

FLA_CHUNK = 64  # the chunk size of fla's chunk_gated_delta_rule and causal_conv1d (their defaults)


def _to_device(t: Tensor, device: torch.device) -> Tensor:
    """Host -> device without a sync: pinned memory and ``non_blocking`` (a no-op on the host)."""
    if device.type != "cuda":
        return t
    return (t if t.is_pinned() else t.pin_memory()).to(device, non_blocking=True)


@dataclass(eq=False)
class Documents:
    """Document boundaries of one packed row. ``cu_seqlens_cpu``: int64 on the host, ``[0, ..., total]``.
    The device tensors are made on first use and then shared, so every layer gets the same objects."""

    cu_seqlens_cpu: Tensor
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @classmethod
    def from_positions(cls, position_ids: Tensor, attention_mask: Tensor | None = None) -> "Documents":
        """Boundaries of a [b, s] batch flattened to one row. A document starts at every row start, wherever
        ``position_ids`` do not continue by +1 (the packed-documents convention of HF and megatron's
        GPTDataset with ``reset_position_ids``), and where a padding ``attention_mask`` (1 = token, 0 = pad)
        switches. Device tensors are copied to the host first (one sync; the trainer passes host tensors)."""
        position_ids = position_ids.cpu()
        b, s = position_ids.shape
        start = torch.ones_like(position_ids, dtype=torch.bool)
        start[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
        if attention_mask is not None:
            mask = attention_mask.cpu()
            start[:, 1:] |= mask[:, 1:] != mask[:, :-1]
        starts = start.flatten().nonzero().flatten()
        return cls(torch.cat([starts, starts.new_tensor([b * s])]))

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens: Tensor) -> "Documents":
        """From given boundaries (e.g. a caller's PackedSeqParams); a device tensor costs one host copy."""
        docs = cls(cu_seqlens.detach().to("cpu", torch.int64), cu_seqlens.device)
        if cu_seqlens.dtype == torch.int32:
            docs.__dict__["cu_seqlens"] = cu_seqlens  # the caller's tensor serves as ours
        return docs

    def pin_memory(self) -> "Documents":
        """Called by torch's DataLoader (``pin_memory=True``) for the loader's batches."""
        return Documents(self.cu_seqlens_cpu.pin_memory(), self.device)

    def to(self, device: torch.device | str) -> "Documents":
        """The same boundaries for layers on ``device`` (copies made on first use, without a sync)."""
        return Documents(self.cu_seqlens_cpu, torch.device(device))

    @functools.cached_property
    def segments(self) -> list[tuple[int, int]]:
        """(start, end) of every document, as Python ints (the torch kernels loop over them)."""
        bounds = self.cu_seqlens_cpu.tolist()
        return list(zip(bounds[:-1], bounds[1:]))

    @functools.cached_property
    def max_seqlen(self) -> int:
        return int((self.cu_seqlens_cpu[1:] - self.cu_seqlens_cpu[:-1]).max())

    @property
    def total(self) -> int:
        return int(self.cu_seqlens_cpu[-1])

    @functools.cached_property
    def cu_seqlens(self) -> Tensor:
        """int32 on the device: attention kernels and RoPE."""
        return _to_device(self.cu_seqlens_cpu.to(torch.int32), self.device)

    @functools.cached_property
    def cu_seqlens_long(self) -> Tensor:
        """int64 on the device: fla's ``cu_seqlens``."""
        return _to_device(self.cu_seqlens_cpu, self.device)

    @functools.cached_property
    def fla_chunk_indices(self) -> Tensor:
        """fla's (document, chunk) table for its 64-token chunks, computed on the host (fla's own function)."""
        from fla.ops.utils.index import prepare_chunk_indices

        table = prepare_chunk_indices(self.cu_seqlens_cpu, FLA_CHUNK, cu_seqlens_cpu=self.cu_seqlens_cpu)
        return _to_device(table, self.device)

    def fla_kwargs(self) -> dict:
        """What fla's varlen kernels take, so that none of them derives it again (each would sync). Read in fla
        0.6.0: the GDN forward and backward and causal_conv1d hand ``chunk_indices`` to every varlen helper, so
        none rebuilds the table; what they still derive (``prepare_chunk_offsets``) is device arithmetic
        without a sync, cached by tensor identity (a 4-entry cache per function: each sees one key here)."""
        return {"cu_seqlens": self.cu_seqlens_long, "cu_seqlens_cpu": self.cu_seqlens_cpu,
                "chunk_indices": self.fla_chunk_indices}

    def packed_seq_params(self) -> "PackedDocuments":
        cu, longest = self.cu_seqlens, self.max_seqlen
        return PackedDocuments(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest,
                               max_seqlen_kv=longest, documents=self)


@dataclass
class PackedDocuments(PackedSeqParams):
    """megatron's PackedSeqParams (what its attention and RoPE read) carrying the :class:`Documents` they
    came from, for the layers that need more than ``cu_seqlens`` (Gated DeltaNet)."""

    documents: Documents | None = None


def cu_seqlens_of(params: PackedSeqParams) -> Tensor:
    """The packed row's boundaries on the device, as megatron's attention reads them (padded ones first)."""
    return params.cu_seqlens_q_padded if params.cu_seqlens_q_padded is not None else params.cu_seqlens_q


def token_documents(cu_seqlens: Tensor, total: int) -> Tensor:
    """The document of each of the row's ``total`` tokens (0, 0, 1, 2, 2, ...), on ``cu_seqlens``' device and
    without a host sync (``searchsorted``); tokens past ``cu_seqlens[-1]`` get ``len(cu_seqlens) - 1``."""
    return _documents_and_tokens(cu_seqlens, total)[0]


def token_positions(cu_seqlens: Tensor, total: int) -> Tensor:
    """The position of each of the row's ``total`` tokens inside its document (0, 1, 0, 0, 1, ...), from the
    documents :func:`token_documents` finds and the same ``arange``, on the device without a host sync; tokens
    past ``cu_seqlens[-1]`` count on from it."""
    doc, tokens = _documents_and_tokens(cu_seqlens, total)
    return tokens - cu_seqlens[doc]


def _documents_and_tokens(cu_seqlens: Tensor, total: int) -> tuple[Tensor, Tensor]:
    tokens = torch.arange(total, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.searchsorted(cu_seqlens, tokens, right=True) - 1, tokens


def documents_of(params: PackedSeqParams | None) -> Documents | None:
    """The Documents of packed params: ours carry them; megatron's own are converted (one host copy)."""
    if params is None:
        return None
    docs = getattr(params, "documents", None)
    if docs is None:
        docs = params.documents = Documents.from_cu_seqlens(cu_seqlens_of(params))  # kept: later layers reuse it
    return docs
