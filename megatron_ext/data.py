"""Training data for the trainer, CPT or SFT, as micro-batches of ``tokens``, ``labels``, ``loss_mask`` and
``position_ids``; a row may hold several documents, and ``position_ids`` restart at each one, which is
where the model starts a new document for both layer types.

CPT (``mix.json`` from build_mix): megatron-core's BlendedMegatronDatasetBuilder + GPTDataset pack
documents into ``seq_length`` rows; ``reset_position_ids`` restarts positions after every EOS and
``eod_mask_loss`` masks the prediction made *from* an EOS (the next document's first token). Validation:
per-domain held-out splits.

SFT (``sft.json`` from build_sft): whole conversations packed into rows by best-fit, never cut, with
their per-token loss masks; validation on the held-out conversations.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import json
import logging
import math
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from megatron.core.datasets.megatron_tokenizer import MegatronLegacyTokenizer

from megatron_ext.packing import Documents

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


def read_data_json(path: str | Path, builder: str) -> dict:
    """``mix.json`` (builder ``build_mix``) or ``sft.json`` (``build_sft``), with ``dir``: where it lies.
    Its paths are relative to that directory; an absolute tokenizer path (older builds) is kept as it is."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (run python -m preprocessing.{builder} first)")
    info = json.loads(path.read_text())
    info["dir"] = str(path.parent)
    info["tokenizer"] = str(path.parent / info["tokenizer"])
    return info


def fingerprint(prefixes: dict[str, str], weights: dict[str, float] | None = None) -> dict[str, str]:
    """What identifies each named indexed dataset (``prefix.bin`` / ``.idx``): its weight in the blend, the size of
    its tokens and a hash of its index (every document's length, in order). Where the files lie and when they were
    written are left out, so a mix copied elsewhere (a node's local disk) is the same data. A resumed run checks it
    (the data order is a shuffle over these files), and it keys the blend's index cache."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    out = {}
    for name, prefix in prefixes.items():
        index, tokens = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
        for f in (index, tokens):
            if not f.is_file():
                raise FileNotFoundError(f"{f}: not found (the data of {name!r})")
        # a .bin shorter or longer than its index says (an interrupted copy, files of two builds) is found here,
        # not when a step first reads past its end, hours in, with an error that names no file. megatron's reader
        # of the documents' lengths and offsets, without mmap: an empty .bin cannot be mapped.
        ix = IndexedDataset(prefix, mmap=False).index
        expected = int(ix.sequence_pointers[-1]) + int(ix.sequence_lengths[-1]) * ix.dtype_size if len(ix) else 0
        size = tokens.stat().st_size
        if size != expected:
            raise ValueError(f"{tokens}: {size} bytes where its index ({index.name}) needs {expected}: "
                             f"truncated or from another build of the mix; copy it again or rebuild the mix")
        with index.open("rb") as f:  # streamed: the index of a large corpus can be gigabytes
            digest = hashlib.file_digest(f, "sha1").hexdigest()[:16]
        weight = "" if weights is None else f"weight {weights[name]}, "
        out[name] = f"{weight}{size} token bytes, index {digest}"
    return out


def build_train_dataset(mix: dict, seq_length: int, num_samples: int, eod: int, vocab_size: int, seed: int,
                        files: dict[str, str]):
    """The blended training dataset: sources sampled by their blend weights, ``num_samples`` rows. ``files``: the
    sources' :func:`fingerprint`, which names megatron's index cache: its own key (paths, sample count, sequence
    length, seed) would reuse the indices of files rebuilt in place (an IndexError, or other rows read silently)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    if seq_length > mix["seq_length"]:
        log.warning("training seq_length %d exceeds the mix's chunking length %d", seq_length, mix["seq_length"])
    prefixes = [str(Path(mix["dir"]) / s["prefix"]) for s in mix["sources"].values()]
    weights = [s["weight"] for s in mix["sources"].values()]
    # in blend order: megatron builds the blend in list order, so another order is other rows
    cache = Path(mix["dir"]) / "cache" / hashlib.sha1(json.dumps(list(files.items())).encode()).hexdigest()[:16]
    config = GPTDatasetConfig(
        random_seed=seed, sequence_length=seq_length, blend=(prefixes, weights), split="100,0,0",
        tokenizer=EodTokenizer(eod, vocab_size), reset_position_ids=True, reset_attention_mask=False,
        eod_mask_loss=True, create_attention_mask=False, path_to_cache=str(cache),
        mid_level_dataset_surplus=0.005,
    )
    _drop_cut_cache(cache)
    train, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, [num_samples, 0, 0], lambda: True, config).build()
    return train


def _drop_cut_cache(cache: Path) -> None:
    """Remove the indices of megatron's index cache ``cache`` that are cut short, so that they are built again. megatron
    writes them with ``numpy.save``, in place, and takes the cache as built once every file exists: a run killed while
    it wrote the last one left a cache every rerun failed on at start ("mmap length is greater than file size", no file
    named). Rank 0 checks: it builds the cache before the other ranks read it."""
    import torch.distributed as dist

    if not cache.is_dir() or (dist.is_initialized() and dist.get_rank() != 0):
        return
    for npy in sorted(cache.rglob("*.npy")):
        try:
            np.load(npy, allow_pickle=True, mmap_mode="r")  # as megatron loads it: a cut file fails here
        except (ValueError, OSError, EOFError):  # gone, megatron finds its dataset's cache incomplete and builds it again
            log.warning("%s is cut short (a run killed while writing it?): removed, megatron builds it again", npy)
            npy.unlink()


FIELDS = ("tokens", "labels", "loss_mask", "position_ids")


def collate(rows: list[dict]) -> dict:
    """Rows -> one micro-batch, with its packed-document boundaries computed here, on the host, before the
    batch goes to the GPU (so the model's layers need no device sync to find them)."""
    batch = {k: torch.stack([r[k] for r in rows]) for k in FIELDS}
    batch["documents"] = Documents.from_positions(batch["position_ids"])
    return batch


class MicroBatchOrder(torch.utils.data.Sampler):
    """Deterministic order: micro-step k takes rows [consumed + k*mbs*dp, ...) and this rank its slice.
    ``consumed`` (rows already trained on) is what a resumed run restores. Endless: the trainer stops."""

    def __init__(self, consumed: int, micro_batch_size: int, dp_rank: int, dp_size: int):
        self.consumed, self.mbs, self.dp_rank, self.dp_size = consumed, micro_batch_size, dp_rank, dp_size

    def __iter__(self) -> Iterator[list[int]]:
        start = self.consumed + self.dp_rank * self.mbs
        while True:
            yield list(range(start, start + self.mbs))
            start += self.mbs * self.dp_size


def micro_batches(dataset, consumed: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                  ahead: int = 2) -> Iterator[dict]:
    """This rank's micro-batches in :class:`MicroBatchOrder`, with CUDA in pinned memory (the copy to the GPU
    is then asynchronous), read up to ``ahead`` micro-batches in advance by a thread (:class:`ReadAhead`), so
    reading overlaps the step.

    A thread, not DataLoader worker processes: a rank forks them after its process group's threads are
    running, and on CI one forked worker hung at start (the whole 2-rank run with it). Reading a micro-batch
    is a few slices of memory-mapped tokens and a collate: no work for another process."""
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=MicroBatchOrder(consumed, micro_batch_size, dp_rank, dp_size), collate_fn=collate,
        pin_memory=torch.cuda.is_available(),
    )
    return ReadAhead(loader, ahead) if ahead else iter(loader)


class ReadAhead:
    """``items`` as a background thread produces them, at most ``depth`` ahead of the consumer; an error raised
    there is raised here. The thread works on this thread's CUDA device (pinning memory in a new thread would
    otherwise open a context on GPU 0).

    :meth:`paused` keeps the thread from reading, for a checkpoint save: megatron's writer forks processes, and
    a fork copies every lock as it is at that moment; one the thread held while reading (torch's pinned-memory
    allocator's, malloc's) stays held forever in the child."""

    def __init__(self, items: Iterator, depth: int):
        self._buffer: queue.Queue = queue.Queue(maxsize=depth)
        self._reading = threading.Lock()  # held by the thread while it reads an item
        self._end = object()
        self._done = False
        device = torch.cuda.current_device() if torch.cuda.is_available() else None
        threading.Thread(target=self._produce, args=(iter(items), device), name="read-ahead", daemon=True).start()

    def _produce(self, items: Iterator, device) -> None:
        try:
            if device is not None:
                torch.cuda.set_device(device)
            while True:
                with self._reading:
                    item = next(items, self._end)
                self._buffer.put((item, None))
                if item is self._end:
                    return
        except BaseException as error:  # handed to the consumer, which raises it where the data is wanted
            self._buffer.put((self._end, error))

    def __iter__(self) -> "ReadAhead":
        return self

    def __next__(self):
        if self._done:
            raise StopIteration
        item, error = self._buffer.get()
        if error is not None or item is self._end:
            self._done = True
            if error is not None:
                raise error
            raise StopIteration
        return item

    @contextlib.contextmanager
    def paused(self):
        """No read in progress or started for the duration (the one in progress, if any, finishes first)."""
        with self._reading:
            yield


def reading_paused(data: Iterator):
    """:meth:`ReadAhead.paused` for ``data`` read ahead, else nothing to pause."""
    return data.paused() if isinstance(data, ReadAhead) else contextlib.nullcontext()


def heldout_batches(mix: dict, tokenizer_dir: str, seq_length: int, max_docs: int, micro_batch_size: int,
                    eod: int) -> dict[str, list[dict]]:
    """Per domain: the first ``max_docs`` held-out documents, tokenised, EOS-separated and packed into
    ``seq_length`` rows (the last row padded with masked EOS), in micro-batches."""
    from preprocessing.tokenizer import text_tokenizer

    tok = text_tokenizer(tokenizer_dir)  # as the mix's documents were tokenised
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
        out[name] = stack_micro_batches(rows, micro_batch_size)
    return out


def stack_micro_batches(rows: list[dict], micro_batch_size: int) -> list[dict]:
    return [collate(rows[i : i + micro_batch_size]) for i in range(0, len(rows), micro_batch_size)]


# ------------------------------------------------------------------------------------------------ SFT


def pack(lengths: np.ndarray, capacity: int, rng: np.random.Generator | None, window: int = 8192) -> list[list[int]]:
    """Rows of sample indices whose lengths fit ``capacity``: best-fit decreasing within windows of a
    shuffled order (``rng``; None keeps the order), rows shuffled again so long and short ones mix."""
    order = rng.permutation(len(lengths)) if rng is not None else np.arange(len(lengths))
    rows: list[list[int]] = []
    for w in range(0, len(order), window):
        block = order[w : w + window]
        block = block[np.argsort(-lengths[block], kind="stable")]
        bins: list[list[int]] = []
        free: list[tuple[int, int]] = []  # (space left, bin), sorted: the best fit is the first that fits
        for i in block.tolist():
            k = bisect.bisect_left(free, (int(lengths[i]), -1))
            if k == len(free):
                bins.append([i])
                bisect.insort(free, (capacity - int(lengths[i]), len(bins) - 1))
            else:
                space, b = free.pop(k)
                bins[b].append(i)
                bisect.insort(free, (space - int(lengths[i]), b))
        if rng is not None:
            rng.shuffle(bins)
        rows += bins
    return rows


class PackedSFTDataset(torch.utils.data.Dataset):
    """SFT samples packed whole into ``seq_length`` rows, a fresh shuffle and packing per epoch (seeded).
    A sample of n tokens gives n - 1 (input, label) pairs with its own positions 0..n-2; a row's tail is
    padding with loss mask 0. Written here because megatron-core's GPTDataset concatenates documents
    across rows and has no per-token loss mask."""

    def __init__(self, tokens_prefix: str, mask_prefix: str, seq_length: int, pad_id: int, seed: int,
                 shuffle: bool = True):
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        self.tokens, self.masks = IndexedDataset(tokens_prefix), IndexedDataset(mask_prefix)
        pairs = np.array(self.tokens.sequence_lengths, dtype=np.int64) - 1
        if not np.array_equal(pairs + 1, self.masks.sequence_lengths):
            raise ValueError(f"{tokens_prefix} and {mask_prefix} disagree in sample lengths; rebuild the SFT data")
        if len(pairs) and pairs.max() > seq_length:
            raise ValueError(f"{tokens_prefix}: a sample has {pairs.max() + 1} tokens, more than seq_length + 1 = "
                             f"{seq_length + 1}; build the SFT data with this seq_length")
        self.seq_length, self.pad_id = seq_length, pad_id
        self.seed, self.shuffle, self.pairs = seed, shuffle, pairs
        self.rows = self._epoch(0)
        self.rows_per_epoch = len(self.rows)  # of the first; each epoch packs into a few more or fewer
        self.epochs = 1

    def _epoch(self, epoch: int) -> list[list[int]]:
        return pack(self.pairs, self.seq_length, np.random.default_rng([self.seed, epoch]) if self.shuffle else None)

    def resize(self, num_rows: int) -> "PackedSFTDataset":
        """Exactly ``num_rows`` rows: more epochs, each shuffled and packed anew, or the first rows."""
        while len(self.rows) < num_rows:  # counted, not rows // rows_per_epoch: that repeated an epoch's shuffle
            self.rows += self._epoch(self.epochs)
            self.epochs += 1
        self.rows = self.rows[:num_rows]
        return self

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        tokens, labels, mask, positions = [], [], [], []
        for s in self.rows[i]:
            t, m = self.tokens[s].astype(np.int64), self.masks[s]
            tokens.append(t[:-1])
            labels.append(t[1:])
            mask.append(m[1:].astype(np.float32))  # the loss of predicting token k is token k's mask
            positions.append(np.arange(len(t) - 1))
        pad = self.seq_length - sum(len(t) for t in tokens)
        tokens.append(np.full(pad, self.pad_id))
        labels.append(np.full(pad, self.pad_id))
        mask.append(np.zeros(pad, dtype=np.float32))
        positions.append(np.arange(pad))
        row = {"tokens": tokens, "labels": labels, "loss_mask": mask, "position_ids": positions}
        return {k: torch.from_numpy(np.concatenate(parts)) for k, parts in row.items()}


@dataclass
class TrainingData:
    train: Any  # rows indexed by sample number: what micro_batches reads
    eval_sets: dict[str, list[dict]]  # name -> micro-batches
    iters: int
    files: dict[str, str]  # the training files' fingerprint: part of a run's plan
    chat: dict | None = None  # SFT: how sft.json says its conversations were rendered (preprocessing.chat.SFT_CHAT_FILE)


def load_training_data(cfg, model_vocab: int) -> TrainingData:
    """The run's data, CPT (``cfg.mix``) or SFT (``cfg.sft_data``), and its number of steps: ``train_iters``,
    else the mix's token budget (CPT) or ``epochs`` over the packed conversations (SFT)."""
    from preprocessing.tokenizer import eos_id, load_tokenizer

    info = read_data_json(cfg.sft_data, "build_sft") if cfg.sft_data else read_data_json(cfg.mix, "build_mix")
    tokenizer_dir = info["tokenizer"]
    vocab = load_tokenizer(tokenizer_dir).get_vocab_size()
    if vocab > model_vocab:
        raise SystemExit(f"the data's tokenizer ({tokenizer_dir}) has {vocab} tokens but the model only {model_vocab}")
    eod = eos_id(tokenizer_dir)
    if cfg.sft_data:
        if cfg.seq_length != info["seq_length"]:
            log.warning("training seq_length %d differs from the SFT data's %d", cfg.seq_length, info["seq_length"])
        split = {s: (str(Path(info["dir"]) / info[s]["tokens_prefix"]), str(Path(info["dir"]) / info[s]["loss_mask_prefix"]))
                 for s in ("train", "valid") if info[s]["samples"]}  # an empty split has no files
        files = fingerprint(dict(zip(("tokens", "loss mask"), split["train"])))
        train = PackedSFTDataset(*split["train"], cfg.seq_length, eod, cfg.seed)
        iters = cfg.train_iters or max(1, math.ceil(cfg.epochs * train.rows_per_epoch / cfg.global_batch_size))
        train.resize(iters * cfg.global_batch_size)
        eval_sets = {}
        if info["valid"]["samples"] and cfg.eval_docs:
            valid = PackedSFTDataset(*split["valid"], cfg.seq_length, eod, cfg.seed, shuffle=False)
            eval_sets["sft"] = stack_micro_batches([valid[i] for i in range(len(valid))], cfg.micro_batch_size)
        log.info("SFT data: %d conversation rows per epoch, %d steps = %.2f epochs", train.rows_per_epoch, iters,
                 iters * cfg.global_batch_size / train.rows_per_epoch)
        chat = {key: info.get(key) for key in ("chat_template_kwargs", "chat_template_sha256")}
        return TrainingData(train, eval_sets, iters, files, chat)
    iters = cfg.train_iters or max(1, info["token_budget"] // (cfg.global_batch_size * cfg.seq_length))
    sources = info["sources"]
    files = fingerprint({name: str(Path(info["dir"]) / s["prefix"]) for name, s in sources.items()},
                        {name: s["weight"] for name, s in sources.items()})
    train = build_train_dataset(info, cfg.seq_length, iters * cfg.global_batch_size, eod, model_vocab, cfg.seed, files)
    eval_sets = heldout_batches(info, tokenizer_dir, cfg.seq_length, cfg.eval_docs, cfg.micro_batch_size, eod)
    return TrainingData(train, eval_sets, iters, files)
