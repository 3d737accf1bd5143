"""Benchmark: tokenise + write megatron binaries, our datatrove step vs a Megatron-LM
``tools/preprocess_data.py``-style baseline, on the same data in the same run.

    python -m tools.bench_tokenize [--docs 40000] [--workers 2] [--tokenizer data/demo/tokenizer]

Baseline: one process, the HF tokenizer called per document, ``IndexedDatasetBuilder.add_document``
(what preprocess_data.py does with ``--workers 1``). Ours: ``MegatronTokenWriter`` (batched Rust
tokenisation) under datatrove's local executor with ``--workers`` tasks, then the per-rank merge.
Both outputs are checked to hold the same tokens. Goal: >= 2x on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import shutil
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np


def make_corpus(folder: Path, docs: int, files: int = 8, seed: int = 0) -> int:
    """``files`` jsonl shards of synthetic clinical/abstract/web documents (the demo generators), as a
    corpus usually comes; returns the total bytes."""
    from preprocessing import demo_corpus as g

    rng = random.Random(seed)
    outs = [open(folder / f"part_{k:03d}.jsonl", "w") for k in range(files)]
    for i in range(docs):
        kind = i % 3
        text = (g.clinical_note(rng, i, with_phi=False) if kind == 0 else
                g.abstract(rng)["text"] if kind == 1 else g.english_doc(rng))
        outs[i % files].write(json.dumps({"id": str(i), "text": text}) + "\n")
    for f in outs:
        f.close()
    return sum(p.stat().st_size for p in folder.iterdir())


def baseline(corpus: Path, tokenizer_dir: str, out_prefix: Path) -> int:
    """Every file of ``corpus`` in order, one document at a time."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    dtype = np.int32 if len(tok) > 65535 else np.uint16
    builder = IndexedDatasetBuilder(f"{out_prefix}.bin", dtype=dtype)
    n = 0
    for path in sorted(corpus.iterdir()):
        with open(path) as f:
            for line in f:
                text = json.loads(line)["text"]
                ids = tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"] + [tok.eos_token_id]
                builder.add_document(np.asarray(ids, dtype=dtype), [len(ids)])
                n += len(ids)
    builder.finalize(f"{out_prefix}.idx")
    return n


def ours(corpus_dir: Path, tokenizer_dir: str, work: Path, workers: int, documents: int, tokens: int) -> int:
    """``documents`` and ``tokens``: the baseline's, which the merge checks its parts against (as the build checks
    them against its stages' counts)."""
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.readers import JsonlReader
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from preprocessing.steps import MegatronTokenWriter, merge_indexed
    from preprocessing.tokenizer import load_tokenizer, token_dtype

    class TagSource:  # the writer groups by metadata.source; the demo corpus has one source here
        def __call__(self, data, rank=0, world_size=1):
            for doc in data:
                doc.metadata["source"] = "bench"
                yield doc

    pipeline = [JsonlReader(str(corpus_dir)), TagSource(),
                MegatronTokenWriter(str(work / "tokens"), tokenizer_dir, seq_length=1 << 30, overlaps={})]
    LocalPipelineExecutor(pipeline, tasks=workers, workers=workers, logging_dir=str(work / "logs"),
                          start_method="fork").run()
    dtype = token_dtype(load_tokenizer(tokenizer_dir).get_vocab_size())
    merge_indexed(sorted((work / "tokens" / "bench").glob("*.idx")), work / "merged", dtype, documents, tokens)
    merged = IndexedDataset(str(work / "merged"))
    return int(merged.sequence_lengths.sum())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=int, default=40000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--tokenizer", default="data/demo/tokenizer")
    args = p.parse_args(argv)
    import logging

    logging.disable(logging.INFO)
    from datatrove.utils.logging import logger

    logger.remove()
    work = Path(tempfile.mkdtemp(prefix="bench_tokenize_"))
    try:
        (work / "corpus").mkdir()
        size = make_corpus(work / "corpus", args.docs)
        t = time.perf_counter()
        base_tokens = baseline(work / "corpus", args.tokenizer, work / "baseline")
        base_s = time.perf_counter() - t
        t = time.perf_counter()
        our_tokens = ours(work / "corpus", args.tokenizer, work / "ours", args.workers, args.docs, base_tokens)
        our_s = time.perf_counter() - t
        if our_tokens != base_tokens:
            raise SystemExit(f"token counts differ: ours {our_tokens} vs baseline {base_tokens}")
        print(f"\n### Tokenise + write ({date.today()}, {platform.machine()}, {args.workers} workers)\n")
        print(f"{args.docs} documents in 8 jsonl files, {size / 1e6:.1f} MB, {base_tokens:,} tokens (tokenizer: {args.tokenizer}).\n")
        print("| pipeline | seconds | MB/s | tokens/s | speed-up |\n|---|---|---|---|---|")
        for name, s in [("preprocess_data-style baseline (1 process, per-document HF tokenizer)", base_s),
                        (f"datatrove MegatronTokenWriter ({args.workers} tasks, batched) + merge", our_s)]:
            print(f"| {name} | {s:.2f} | {size / 1e6 / s:.1f} | {base_tokens / s:,.0f} | {base_s / s:.2f}x |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
