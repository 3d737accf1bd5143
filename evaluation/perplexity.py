"""Per-domain token-level perplexity of one or more HF models, side by side.

    python -m evaluation.perplexity --model base=Qwen3.5-2B-Base --model cpt=release/ \\
        --data "Patient EHR"=out/mix/heldout/ehr.jsonl --data English=out/mix/heldout/english.jsonl \\
        [--max-length 4096] [--stride 2048] [--max-docs 500] [--out results/perplexity]

Perplexity is exp(total NLL / total predicted tokens) over all documents of a domain (each document
scored on its own, from its second token). Documents longer than ``--max-length`` are scored with a
sliding window: windows start every ``--stride`` tokens, and each window scores only the tokens the
previous one did not, so every token is scored once with at least ``max_length - stride`` tokens of
context (except at the start). The improvement column is the relative perplexity reduction of each
model against the first one. Writes ``<out>.json`` and ``<out>.md``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from tqdm import tqdm

from evaluation.common import device_and_dtype, load_hf_model, mask_padded_ids, models_on_domains_parser, named_paths, write_report


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
    docs = []
    with open(path) as f:
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{i}: not a jsonl record with a {text_key!r} field ({err})") from err
            if not isinstance(record, dict) or not isinstance(record.get(text_key), str):
                raise ValueError(f"{path}:{i}: not a jsonl record with a {text_key!r} string field")
            docs.append(record[text_key])
            if max_docs and len(docs) >= max_docs:
                break
    if not docs:
        raise ValueError(f"{path}: no documents")
    return docs


def evaluate(models: dict[str, str], data: dict[str, str], max_length: int = 4096, stride: int = 2048,
             max_docs: int | None = None, device: str | None = None) -> dict:
    device, dtype = device_and_dtype(device)
    docs = {domain: read_documents(path, max_docs) for domain, path in data.items()}
    results: dict[str, dict[str, dict]] = {d: {} for d in data}
    for name, model_dir in models.items():
        model, tok = load_hf_model(model_dir, device, dtype)
        for domain, texts in docs.items():
            total, count = 0.0, 0
            for text in tqdm(texts, desc=f"{name} / {domain}", unit="doc"):
                ids = tok(text, add_special_tokens=False).input_ids
                nll, n = document_nll(model, ids, max_length, stride, device, len(tok))
                total, count = total + nll, count + n
            if not count:
                raise ValueError(f"{data[domain]}: no document of {domain!r} has two tokens or more, nothing to score")
            results[domain][name] = {"ppl": math.exp(total / count), "nll": total / count, "tokens": count,
                                     "documents": len(texts)}
        del model
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
    p.add_argument("--max-length", type=int, default=4096)
    p.add_argument("--stride", type=int, default=2048)
    p.add_argument("--out", default="results/perplexity", help="writes OUT.json and OUT.md")
    args = p.parse_args(argv)
    report = evaluate(named_paths(args.model, "model"), named_paths(args.data, "data"), args.max_length, args.stride,
                      args.max_docs, args.device)
    write_report(args.out, report, to_markdown(report))


if __name__ == "__main__":
    main()
