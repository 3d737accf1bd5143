"""Training data from ``mix.json`` through megatron-core's BlendedMegatronDatasetBuilder + GPTDataset, and
per-domain validation batches from the held-out splits.

Documents are packed into ``seq_length`` rows by GPTDataset; ``reset_position_ids`` restarts positions
after every EOS, which is where the model starts a new document for both layer types, and
``eod_mask_loss`` masks the prediction made *from* an EOS (the next document's first token).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Iterator

import torch
from megatron.core.datasets.megatron_tokenizer import MegatronLegacyTokenizer

log = logging.getLogger(__name__)


class EodTokenizer(MegatronLegacyTokenizer):
    """What GPTDataset needs of a tokenizer: the EOD id (text is tokenised by build_mix)."""

    def __init__(self, eod: int, vocab_size: int):
        super().__init__("neurocpt")
        self._eod, self._vocab_size = eod, vocab_size

    @property
    def eod(self) -> int:
        return self._eod

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    vocab = inv_vocab = property(lambda self: {})

    def tokenize(self, text):
        raise NotImplementedError("build_mix tokenises; the trainer reads token ids")

    def detokenize(self, ids):
        raise NotImplementedError


def read_mix(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no mix.json (run python -m preprocessing.build_mix first)")
    mix = json.loads(path.read_text())
    mix["dir"] = str(path.parent)
    return mix


def build_train_dataset(mix: dict, seq_length: int, num_samples: int, eod: int, vocab_size: int, seed: int):
    """The blended training dataset: sources sampled by their blend weights, ``num_samples`` rows."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    if seq_length > mix["seq_length"]:
        log.warning("training seq_length %d exceeds the mix's chunking length %d", seq_length, mix["seq_length"])
    prefixes = [str(Path(mix["dir"]) / s["prefix"]) for s in mix["sources"].values()]
    weights = [s["weight"] for s in mix["sources"].values()]
    config = GPTDatasetConfig(
        random_seed=seed, sequence_length=seq_length, blend=(prefixes, weights), split="100,0,0",
        tokenizer=EodTokenizer(eod, vocab_size), reset_position_ids=True, reset_attention_mask=False,
        eod_mask_loss=True, create_attention_mask=False, path_to_cache=str(Path(mix["dir"]) / "cache"),
        mid_level_dataset_surplus=0.005,
    )
    train, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, [num_samples, 0, 0], lambda: True, config).build()
    return train


def micro_batches(dataset, consumed: int, micro_batch_size: int, dp_rank: int, dp_size: int) -> Iterator[dict]:
    """Deterministic order: micro-step k takes rows [consumed + k*mbs*dp, ...) and this rank its slice.
    ``consumed`` (rows already trained on) is what a resumed run restores."""
    step_rows = micro_batch_size * dp_size
    start = consumed
    while True:
        rows = [dataset[start + dp_rank * micro_batch_size + i] for i in range(micro_batch_size)]
        yield {k: torch.stack([r[k] for r in rows]) for k in ("tokens", "labels", "loss_mask", "position_ids")}
        start += step_rows


def heldout_batches(mix: dict, tokenizer_dir: str, seq_length: int, max_docs: int, micro_batch_size: int,
                    eod: int) -> dict[str, list[dict]]:
    """Per domain: the first ``max_docs`` held-out documents, tokenised, EOS-separated and packed into
    ``seq_length`` rows (the last row padded with masked EOS), in micro-batches."""
    from preprocessing.steps import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    out = {}
    for name, source in mix["sources"].items():
        path = Path(mix["dir"]) / source["heldout"]
        texts = [json.loads(line)["text"] for line in path.read_text().splitlines()[:max_docs]] if path.is_file() else []
        if not texts:
            continue
        stream: list[int] = []
        for enc in tok.encode_batch(texts, add_special_tokens=False):
            stream += enc.ids + [eod]
        rows = []
        for start in range(0, len(stream) - 1, seq_length):
            piece = stream[start : start + seq_length + 1]
            tokens, labels = piece[:-1], piece[1:]
            mask = [0.0 if t == eod else 1.0 for t in tokens]
            pad = seq_length - len(tokens)
            tokens, labels, mask = tokens + [eod] * pad, labels + [eod] * pad, mask + [0.0] * pad
            positions, p = [], 0
            for t in tokens:
                positions.append(p)
                p = 0 if t == eod else p + 1
            rows.append({"tokens": torch.tensor(tokens), "labels": torch.tensor(labels),
                         "loss_mask": torch.tensor(mask), "position_ids": torch.tensor(positions)})
        out[name] = [{k: torch.stack([r[k] for r in rows[i : i + micro_batch_size]]) for k in rows[0]}
                     for i in range(0, len(rows), micro_batch_size)]
    return out
