"""Per-domain token-level perplexity of one or more HF models, side by side.

    python -m evaluation.perplexity --model base=Qwen3.5-2B-Base --model cpt=release/ \\
        --data "Patient EHR"=out/mix/heldout/ehr.jsonl --data English=out/mix/heldout/english.jsonl \\
        [--max-length 4096] [--stride 2048 (half of --max-length)] [--max-docs 500] [--out results/perplexity]

Perplexity is exp(total NLL / total predicted tokens) over all documents of a domain (each document
scored on its own, from its second token). Documents longer than ``--max-length`` are scored with a
sliding window: windows start every ``--stride`` tokens, and each window scores only the tokens the
previous one did not, so every token is scored once with at least ``max_length - stride`` tokens of
context (except at the start). The improvement column is the relative perplexity reduction of each
model against the first one. Writes ``<out>.json`` and ``<out>.md``.

Resumable: each (model, domain) result is kept in ``<out>.units.json`` as it finishes, keyed by the checkpoint's
and data file's path, sizes and modification times, ``--max-length``, ``--stride``, ``--max-docs`` and dtype. A
rerun skips what is finished (a model with nothing left is not even loaded); a model that fails is named, and
what finished before it is kept.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from tqdm import tqdm

from evaluation.common import (FinishedUnits, device_and_dtype, each_model_on_each_domain, load_hf_model, mask_padded_ids,
                               models_on_domains_parser, run_models_on_domains, text_lines)
from preprocessing.cli import positive_int


@torch.no_grad()
def document_nll(model, ids: list[int], max_length: int, stride: int, device: str, vocab: int) -> tuple[float, int]:
    """(sum of NLL, number of scored tokens) of one document, sliding window for long ones; the softmax
    runs over the tokenizer's ``vocab`` ids only (padded embedding rows are no tokens)."""
    if len(ids) < 2:
        return 0.0, 0
    if not 0 < stride < max_length:
        raise ValueError(f"stride must be in (0, max_length), got {stride} (max_length {max_length})")
    total, count, scored_to = 0.0, 0, 1  # token 0 has no context: positions [1, len) are scored
    start = 0
    while scored_to < len(ids):
        end = min(start + max_length, len(ids))
        window = torch.tensor(ids[start:end], device=device).unsqueeze(0)
        logits = mask_padded_ids(model(input_ids=window).logits[0, :-1].float(), vocab)
        targets = window[0, 1:]
        nll = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
        new = nll[scored_to - start - 1 :]  # target at position p is logits index p - start - 1
        total += new.sum().item()
        count += new.numel()
        scored_to = end
        start += stride
        if end == len(ids):
            break
    return total, count


def read_documents(path: str | Path, max_docs: int | None, text_key: str = "text") -> list[str]:
    """The ``text_key`` strings of a jsonl file, the first ``max_docs`` of them (None: all)."""
    if max_docs is not None and max_docs < 1:
        raise ValueError(f"max_docs must be at least 1 (None reads all), got {max_docs}")
    docs = []
    for i, line in text_lines(path):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{i}: not a jsonl record with a {text_key!r} field ({err})") from err
        if not isinstance(record, dict) or not isinstance(record.get(text_key), str):
            raise ValueError(f"{path}:{i}: not a jsonl record with a {text_key!r} string field")
        docs.append(record[text_key])
        if len(docs) == max_docs:
            break
    if not docs:
        raise ValueError(f"{path}: no documents")
    return docs


def domain_perplexity(model, tok, texts: list[str], max_length: int, stride: int, device: str, desc: str) -> dict:
    total, count = 0.0, 0
    for text in tqdm(texts, desc=desc, unit="doc"):
        ids = tok(text, add_special_tokens=False, split_special_tokens=True).input_ids  # as trained on
        nll, n = document_nll(model, ids, max_length, stride, device, len(tok))
        total, count = total + nll, count + n
    if not count:
        raise ValueError("no document has two tokens or more, nothing to score")
    return {"ppl": math.exp(total / count), "nll": total / count, "tokens": count, "documents": len(texts)}


def evaluate(models: dict[str, str], data: dict[str, str], max_length: int = 4096, stride: int = 2048,
             max_docs: int | None = None, device: str | None = None, units: FinishedUnits | None = None) -> dict:
    """The report; each (model, domain) result is taken from ``units`` when finished before, else computed and put
    there. Raises :class:`ModelFailed` naming the model (and the domain's file) when one fails."""
    device, dtype = device_and_dtype(device)
    docs = {domain: read_documents(path, max_docs) for domain, path in data.items()}
    results = each_model_on_each_domain(
        "perplexity", models, data, (max_length, stride, max_docs, str(dtype)), units or FinishedUnits(None),
        load=lambda model_dir: load_hf_model(model_dir, device, dtype),
        score=lambda loaded, name, domain: domain_perplexity(*loaded, docs[domain], max_length, stride, device,
                                                             f"{name} / {domain}"))
    first = next(iter(models))
    for domain in results:
        base = results[domain][first]["ppl"]
        for name in models:
            results[domain][name]["improvement_vs_" + first] = (base - results[domain][name]["ppl"]) / base
    return {"models": models, "data": data, "max_length": max_length, "stride": stride, "results": results}


def to_markdown(report: dict) -> str:
    names = list(report["models"])
    first = names[0]
    head = "| Domain | " + " | ".join(f"{n} PPL" for n in names) + "".join(f" | {n} vs {first}" for n in names[1:]) + " |"
    lines = [head, "|" + "---|" * (1 + len(names) + len(names) - 1)]
    for domain, row in report["results"].items():
        cells = [f"{row[n]['ppl']:.3f}" for n in names] + [f"{100 * row[n]['improvement_vs_' + first]:+.1f}%" for n in names[1:]]
        lines.append(f"| {domain} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = models_on_domains_parser(__doc__, "the first one is the baseline")
    p.add_argument("--max-length", type=positive_int, default=4096, help="tokens per window")
    p.add_argument("--stride", type=int, help="tokens between window starts, below --max-length (default: half of it)")
    p.add_argument("--out", default="results/perplexity", help="writes OUT.json and OUT.md (OUT.units.json: finished results)")
    args = p.parse_args(argv)
    if args.stride is None:  # a fixed default would refuse a --max-length at or below it given alone
        args.stride = max(1, args.max_length // 2)
    if not 0 < args.stride < args.max_length:
        p.error(f"--stride must be between 1 and --max-length - 1 ({args.max_length - 1}), got {args.stride}")
    run_models_on_domains("perplexity", args, lambda models, data, units: evaluate(
        models, data, args.max_length, args.stride, args.max_docs, args.device, units), to_markdown)


if __name__ == "__main__":
    main()
