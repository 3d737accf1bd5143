"""Benchmark the PHI guard (:mod:`preprocessing.phi`): recall per identifier kind, false positives per 1,000
words on identifier-free clinical text, and throughput per core.

    python -m tools.bench_phi [--notes 400] [--clean 300] [--seed 0] [--holdout-notes 200] [--holdout-clean 150]
                              [--model DIR [--model-label LABEL=KIND ...] [--model-device cpu] [--model-batch-size 32]]

Recall is measured on two labelled sets: the synthetic set of ``tests/phi_eval_set.py`` (every Safe Harbor
kind in several formats), and the five i2b2 2014 sample notes that philter-lite ships with their
annotations (real note layout, surrogate identifiers, annotated independently of this guard). An identifier
counts as caught when every letter and digit of it is redacted. False positives: spans found in the
synthetic identifier-free notes, spans of the i2b2 notes that overlap no annotation, and any eponym, drug
name or placeholder touched.

A second pair of tables measures the independent set of ``tests/phi_holdout_set.py``, written by an outside
audit without the guard's tuning set (other templates, names, places and formats, and its own traps): its DEV
half, whose misses are listed for whoever fixes the guard, and its HELDOUT half, whose misses are only counted,
so that it stays a test of text nobody tuned the guard on. Throughput: bytes of
note text per CPU second of this process (one core), and that x 16 against the goal of 1 GB in an hour on
16 cores (0.017 MB/s per core).

``--model``: the same with a de-identification model beside the rules, as a recipe's ``phi_model:`` runs it (a local
transformers token-classification folder; ``--model-label`` maps a label :data:`preprocessing.phi.MODEL_LABELS`
lacks). On the CPU the model runs on one thread, so that the throughput stays per core.
"""

from __future__ import annotations

import argparse
import platform
import time
import xml.etree.ElementTree as ET
from collections import Counter
from datetime import date
from importlib import resources

GOAL_MB_S_PER_CORE = 1000 / 3600 / 16

# i2b2 2014 annotation (tag, TYPE) -> Safe Harbor kind; absent: not a Safe Harbor identifier (a profession,
# a hospital name); an AGE only over 89
I2B2_KIND = {("NAME", "PATIENT"): "name", ("NAME", "DOCTOR"): "name", ("NAME", "USERNAME"): "other_id",
             ("DATE", "DATE"): "date", ("ID", "MEDICALRECORD"): "mrn", ("ID", "IDNUM"): "other_id",
             ("CONTACT", "PHONE"): "phone", ("CONTACT", "EMAIL"): "email", ("LOCATION", "STREET"): "address",
             ("LOCATION", "CITY"): "city", ("LOCATION", "ZIP"): "zip"}


def i2b2_samples():
    """The i2b2 2014 sample notes in philter-lite as ``Note``s labelled with Safe Harbor kinds, and per note
    the spans of every annotation (Safe Harbor or not: hospital names, professions)."""
    from tests.phi_eval_set import Note

    notes, annotated = [], []
    for xml in sorted(resources.files("philter_lite").joinpath("data", "i2b2_xml").iterdir()):
        root = ET.fromstring(xml.read_text())
        labels, spans = [], []
        for tag in root.find("TAGS"):
            start, end = int(tag.get("start")), int(tag.get("end"))
            kind = "age" if tag.tag == "AGE" and int(tag.get("text")) > 89 else I2B2_KIND.get((tag.tag, tag.get("TYPE")))
            if kind:
                labels.append((kind, start, end))
            spans.append((start, end))
        notes.append(Note(root.find("TEXT").text, labels))
        annotated.append(spans)
    return notes, annotated


def unannotated(found, annotated) -> list:
    """Spans found that overlap no annotation: false positives."""
    return [s for s in found if not any(s.start < e and b < s.end for b, e in annotated)]


def recall_table(title: str, recall: dict[str, tuple[int, int]]) -> list[str]:
    found, planted = (sum(x) for x in zip(*recall.values()))
    rows = [f"### {title}", "", "| kind | caught | planted | recall |", "|---|---|---|---|"]
    rows += [f"| {k} | {a} | {b} | {a / b:.1%} |" for k, (a, b) in recall.items()]
    return rows + [f"| **all** | {found} | {planted} | **{found / planted:.1%}** |", ""]


def misses(notes, spans, removed) -> list[str]:
    return [f"{kind}: {n.text[a:b]!r}" for n, found in zip(notes, spans) for kind, a, b in n.labels
            if not removed(n.text, a, b, found)]


def model_tokens(model, texts: list[str]) -> int:
    """Tokens of ``texts`` as the model's tokenizer counts them: the model's cost scales with these."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model.path)
    return sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)


def spans_of(texts: list[str], model=None) -> list:
    """Each text's identifier spans, in batches of documents as the guard takes them."""
    from preprocessing.phi import documents_per_batch, phi_spans_of

    size = documents_per_batch(model)
    return [spans for i in range(0, len(texts), size) for spans in phi_spans_of(texts[i:i + size], model)]


def holdout_report(n_notes: int, n_clean: int, model=None) -> tuple[list[str], list[str]]:
    """Tables for both halves of the independent set (recall per kind; false positives per 1,000 words of its
    identifier-free notes; trap terms touched), and the DEV half's misses and false positives."""
    from tests.phi_eval_set import recall_by_kind, removed
    from tests.phi_holdout_set import DEV, HELDOUT, holdout_clean_notes, holdout_notes, traps_hit

    lines, details = [], []
    for half in (DEV, HELDOUT):
        notes, clean = holdout_notes(half, n_notes), holdout_clean_notes(half, n_clean)
        spans, clean_spans = spans_of([n.text for n in notes], model), spans_of(clean, model)
        words = sum(len(t.split()) for t in clean)
        fps = Counter((s.kind, t[s.start:s.end]) for t, ss in zip(clean, clean_spans) for s in ss)
        touched = traps_hit(clean, clean_spans) + traps_hit([n.text for n in notes], spans)
        lines += [*recall_table(f"Independent set, {half} half: {n_notes} notes (tests/phi_holdout_set.py, written "
                                f"without the guard's tuning set)", recall_by_kind(notes, spans)),
                  f"| {half}: false positives per 1,000 words ({n_clean} identifier-free notes, {words} words) | "
                  f"{1000 * sum(fps.values()) / words:.2f} ({sum(fps.values())} spans) |",
                  f"| {half}: trap terms touched (eponyms, scales, drugs, genes, services) | {len(touched)} |", ""]
        if half == DEV:  # the held-out half's misses stay unlisted: nobody tunes on them
            details += [f"dev misses: {misses(notes, spans, removed)[:60] or 'none'}",
                        f"dev false positives: {dict(fps.most_common(30)) or 'none'}",
                        f"dev traps touched: {Counter(touched).most_common(20) or 'none'}"]
    return lines, details


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--notes", type=int, default=400, help="synthetic notes with identifiers")
    p.add_argument("--clean", type=int, default=300, help="synthetic identifier-free notes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--holdout-notes", type=int, default=200, help="notes per half of the independent set")
    p.add_argument("--holdout-clean", type=int, default=150, help="identifier-free notes per half of it")
    p.add_argument("--model", help="a de-identification model folder to run beside the rules (a recipe's phi_model)")
    p.add_argument("--model-label", action="append", default=[], metavar="LABEL=KIND",
                   help="a model label's kind (or LABEL=null: not an identifier), over phi.MODEL_LABELS")
    p.add_argument("--model-device", default=None, help="cpu, cuda, cuda:N (default: a GPU where there is one)")
    p.add_argument("--model-batch-size", type=int, default=None,
                   help="chunks a forward pass takes (default: 32 on a GPU, 1 on a CPU; a recipe's phi_model)")
    args = p.parse_args(argv)

    from tests.phi_eval_set import clean_notes, phi_notes, protected_terms_hit, recall_by_kind, removed

    from preprocessing.phi import PHIModel, analyzer, model_batch_size, model_labels

    model = None
    if args.model:
        labels = {k: None if v == "null" else v for k, v in (x.split("=", 1) for x in args.model_label)}
        model = PHIModel(args.model, model_labels(args.model, labels), args.model_device, args.model_batch_size)
        import torch

        torch.set_num_threads(1)  # on the CPU: per core, as a build's workers run it
    t0 = time.perf_counter()
    analyzer()
    spans_of(["Seen today."], model)  # the model loads at its first text
    load_s = time.perf_counter() - t0
    notes, clean = phi_notes(args.notes, args.seed), clean_notes(args.clean, args.seed + 1)
    i2b2, i2b2_annotated = i2b2_samples()
    texts = [n.text for n in notes] + clean
    cpu0, wall0 = time.process_time(), time.perf_counter()
    found = spans_of(texts, model)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    spans, clean_spans = found[:len(notes)], found[len(notes):]
    i2b2_spans = spans_of([n.text for n in i2b2], model)

    mb = sum(len(t.encode()) for t in texts) / 1e6
    words = sum(len(t.split()) for t in clean)
    fps = Counter((s.kind, t[s.start:s.end]) for t, ss in zip(clean, clean_spans) for s in ss)
    touched = protected_terms_hit(clean, clean_spans) + protected_terms_hit([n.text for n in notes], spans)
    per_core = mb / cpu
    tokens = model_tokens(model, texts) if model else 0
    i2b2_words = sum(len(n.text.split()) for n in i2b2)
    i2b2_fp = sum(len(unannotated(f, a)) for f, a in zip(i2b2_spans, i2b2_annotated))
    lines = [f"{date.today()}, {platform.machine()}, {platform.node()}; analyzer built in {load_s:.1f} s"
             + (f"; with the model {args.model} ({model.device or 'auto'}, batch {model_batch_size(model)})" if model
                else "; the rules alone"), "",
             *recall_table(f"Synthetic set: {args.notes} notes (seed {args.seed})", recall_by_kind(notes, spans)),
             *recall_table("i2b2 2014 samples shipped with philter-lite (5 notes)", recall_by_kind(i2b2, i2b2_spans)),
             "| precision and speed | value |", "|---|---|",
             f"| false positives per 1,000 words ({args.clean} identifier-free notes, {words} words) | "
             f"{1000 * sum(fps.values()) / words:.2f} ({sum(fps.values())} spans) |",
             f"| false positives per 1,000 words (i2b2 samples, {i2b2_words} words) | {1000 * i2b2_fp / i2b2_words:.2f} "
             f"({i2b2_fp} spans) |",
             f"| eponyms, drug names, placeholders touched | {len(touched)} |",
             f"| throughput, MB/s per core (CPU time, {mb:.2f} MB) | {per_core:.4f} (goal >= {GOAL_MB_S_PER_CORE:.3f}) |",
             *([f"| the model's tokens (its tokenizer) per CPU second; characters a token | "
                f"{tokens / cpu:,.0f}; {sum(map(len, texts)) / tokens:.2f} |"] if model else []),
             f"| x 16 cores: MB/s; hours for 1 GB | {16 * per_core:.2f}; {1000 / (16 * per_core) / 3600:.2f} |",
             f"| wall clock, MB/s (this process; shared machine) | {mb / wall:.3f} |", ""]
    print("\n".join(lines))
    if args.holdout_notes:
        holdout, details = holdout_report(args.holdout_notes, args.holdout_clean, model)
        print("\n".join(holdout))
    print("false positives:", dict(fps.most_common(20)) or "none")
    print("touched:", Counter(touched).most_common(10) or "none")
    print("synthetic misses:", misses(notes, spans, removed)[:20] or "none")
    print("i2b2 misses:", misses(i2b2, i2b2_spans, removed) or "none")
    print("i2b2 false positives:", [n.text[s.start:s.end] for n, found, ann in zip(i2b2, i2b2_spans, i2b2_annotated)
                                     for s in unannotated(found, ann)] or "none")
    if args.holdout_notes:
        print("\n".join(details))


if __name__ == "__main__":
    main()
