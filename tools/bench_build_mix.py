"""Benchmark: the whole mix build on a synthetic corpus of a chosen size, as the user runs it, with time, CPU and
memory per stage and the disk ``output_dir`` takes at its peak.

    python -m tools.bench_build_mix [--mb 200] [--ehr-mb 15] [--workers 2] [--ehr-files 24] [--tokenizer data/demo/tokenizer]

The corpus has the demo recipe's five sources and formats (EHR notes jsonl with planted PHI, one folder per LaTeX
paper, PubMed jsonl.gz, general-medical parquet, web jsonl), many files each, lognormal document lengths (short
notes, long papers and full texts, a few documents of several MB, one over ``max_doc_chars``), exact and near
duplicates across sources and malformed lines. Text is Zipf-distributed pseudo-words, so documents are as unique
as real ones to MinHash and pass the Gopher filters. The EHR share is kept small in absolute terms (``--ehr-mb``):
the PHI guard runs at ~0.15 MB/s a core. ``--ehr-files 1``: the notes as one export.

The build runs in a subprocess (``python -m preprocessing.build_mix --workers N --keep-work``), sampled every
0.5 s: CPU seconds of the process tree per stage (stage starts from ``build_mix.log``), peak RSS of the main
process, of one worker and of the sum, and the disk of ``output_dir/work`` and ``output_dir``. Wall times depend
on other jobs on the machine; CPU seconds much less.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gzip
import json
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

STOP = ["the", "of", "and", "to", "in", "a", "is", "that", "for", "with", "was", "as", "on", "be", "by", "are", "this",
        "have", "from", "at", "or", "an", "were", "which", "not", "it", "patients", "we", "been", "these"]
SYLLABLES = ["ba", "ce", "di", "fo", "gu", "ha", "je", "ki", "lo", "mu", "na", "pe", "qui", "ra", "se", "ti", "vo", "xa",
             "ze", "tro", "pla", "neu", "car", "dio", "gen", "ism", "tic", "al", "ory", "ine", "ase", "ol", "ex", "con"]


class Words:
    """Sentences and paragraphs of Zipf-distributed pseudo-words (English stop words at the top ranks)."""

    def __init__(self, rng: np.random.Generator, size: int = 40000):
        vocab, seen = list(STOP), set(STOP)
        while len(vocab) < size:
            w = "".join(rng.choice(SYLLABLES, size=rng.integers(1, 5)))
            if w not in seen:
                seen.add(w)
                vocab.append(w)
        self.vocab, self.rng = np.array(vocab, dtype=object), rng
        p = 1.0 / np.arange(1, size + 1)
        self.cdf = np.cumsum(p / p.sum())

    def text(self, chars: int) -> str:
        n = max(5, chars // 7)
        words = list(self.vocab[np.minimum(np.searchsorted(self.cdf, self.rng.random(n)), len(self.vocab) - 1)])
        ends = np.cumsum(self.rng.integers(6, 26, size=n // 6 + 2))
        for k, e in enumerate(ends[ends < n]):
            words[e] += ".\n\n" if k % 7 == 6 else "."
        return " ".join(words) + "."


def make_corpus(out: Path, mb: float, ehr_mb: float, ehr_files: int, tokenizer: str, seed: int = 0) -> dict[str, list[int]]:
    """The five sources under ``out`` and ``out/recipe.yaml`` (the demo recipe's, at seq_length 4096); returns the
    document lengths (characters) per source."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from preprocessing import demo_corpus as demo

    rng, prng = np.random.default_rng(seed), random.Random(seed)
    words, rest = Words(rng), max(mb - ehr_mb, 1.0)

    def length(median, sigma, lo, hi):
        return int(min(hi, max(lo, rng.lognormal(np.log(median), sigma))))

    def fill(target_mb, make):
        docs, size = [], 0
        while size < target_mb * 1e6:
            docs.append(make(len(docs)))
            size += len(docs[-1]["text"])
        return docs

    def shards(docs, files):
        return [docs[k::files] for k in range(files)]

    lengths, copies = {}, []
    notes = fill(ehr_mb, lambda i: {"id": f"note-{i}", "text": demo.clinical_note(prng, i, with_phi=i % 20 == 0).replace(
        "PLAN:", f"COURSE: {words.text(length(900, 0.8, 100, 40000))}\nPLAN:")})
    notes += [{"id": f"note-redup-{j}", "text": notes[j]["text"]} for j in range(0, len(notes), 97)]
    notes += [{"id": f"note-near-{j}", "text": notes[j]["text"] + "\nAddendum: discussed."} for j in range(0, len(notes), 113)]
    prng.shuffle(notes)
    (out / "ehr").mkdir(parents=True)
    for k, part in enumerate(shards(notes, ehr_files)):
        lines = [json.dumps(n) for n in part]
        if k == 0:
            lines.insert(min(5, len(lines)), '{"id": "note-broken", "text": "Truncated export')
        (out / "ehr" / f"part_{k:04d}.jsonl").write_text("\n".join(lines) + "\n")
    lengths["ehr"] = [len(n["text"]) for n in notes]

    papers = fill(0.15 * rest, lambda i: {"text": demo.latex_paper(prng, i).replace("\\section{Discussion}", "\n\n".join(
        f"\\section{{Part {s}}}\n{words.text(20000)} We find $x_{{i}} = \\alpha^{{2}}$ \\cite{{ref3}}."
        for s in range(max(1, (3_000_000 if i in (7, 311) else length(30000, 0.8, 3000, 600000)) // 20000)))
        + "\n\\section{Discussion}")})
    for i, p in enumerate(papers):
        folder = out / "arxiv" / f"{2100 + i % 12}" / f"{2100 + i % 12}.{i:05d}"
        folder.mkdir(parents=True)
        (folder / "main.tex").write_text(p["text"])
    lengths["arxiv_neuro"] = [len(p["text"]) for p in papers]

    abstracts = fill(0.25 * rest, lambda i: {"pmid": str(30000000 + i), "text": words.text(
        length(40000, 0.9, 300, 800000) if rng.random() < 0.04 else length(1500, 0.4, 300, 20000))})
    copies += [a["text"] for a in abstracts[::50]]
    (out / "pubmed").mkdir()
    for k, part in enumerate(shards(abstracts, max(4, int(mb / 6)))):
        with gzip.open(out / "pubmed" / f"part_{k:04d}.jsonl.gz", "wt") as f:
            f.writelines(json.dumps(a) + "\n" for a in part)
    lengths["pubmed_neuro"] = [len(a["text"]) for a in abstracts]

    med = fill(0.35 * rest, lambda i: {"doc_id": f"med-{i}", "text": words.text(length(6000, 1.2, 300, 1_500_000))})
    for k, n in enumerate([2_000_000, 4_000_000, 4_800_000, 6_000_000]):  # the last over max_doc_chars: quarantined
        med.insert(len(med) * (k + 1) // 5, {"doc_id": f"med-huge-{k}", "text": words.text(n)})
    med += [{"doc_id": f"med-copy-{j}", "text": t} for j, t in enumerate(copies[::3])]
    copies += [m["text"] for m in med[::200]]
    (out / "med").mkdir()
    for k, part in enumerate(shards(med, max(4, int(mb / 8)))):
        pq.write_table(pa.Table.from_pylist(part), out / "med" / f"part_{k:04d}.parquet")
    lengths["general_medical"] = [len(m["text"]) for m in med]

    web = fill(0.25 * rest, lambda i: {"text": words.text(length(3000, 1.0, 200, 300000))})
    for t in copies:  # an exact copy and a near copy (one word in 200 changed) of some medical documents
        near = t.split(" ")
        for _ in range(max(1, len(near) // 200)):
            near[int(rng.integers(len(near)))] = "modified"
        web += [{"text": t}, {"text": " ".join(near)}]
    prng.shuffle(web)
    (out / "en").mkdir()
    for k, part in enumerate(shards(web, max(4, int(mb / 5)))):
        data = "".join(json.dumps(w) + "\n" for w in part).encode()
        (out / "en" / f"part_{k:04d}.jsonl").write_bytes(data + (b'{"text": "bad \xff bytes"}\n{"text": 12}\nnot json\n' if k == 0 else b""))
    lengths["english"] = [len(w["text"]) for w in web]

    (out / "benchmarks").mkdir()
    (out / "benchmarks" / "medqa_sample.jsonl").write_text("".join(json.dumps(b) + "\n" for b in demo.BENCHMARK))
    recipe = (Path(__file__).resolve().parents[1] / "data" / "demo" / "recipe.yaml").read_text()
    for old, new in [("output_dir: ../../out/demo/mix", "output_dir: out"), ('"arxiv/**/*.tex"', '"arxiv/**/main.tex"'),
                     ("tokenizer: tokenizer", f"tokenizer: {Path(tokenizer).resolve()}"), ("seq_length: 512", "seq_length: 4096"),
                     ("token_budget: 150000   # what the demo CPT run consumes, roughly", "token_budget: 600000000"), ("heldout_fraction: 0.05", "heldout_fraction: 0.01")]:
        recipe = recipe.replace(old, new)
    (out / "recipe.yaml").write_text(recipe)
    return lengths


def disk(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass  # removed while walking
    return total


def run_build(recipe: Path, out: Path, workers: int) -> dict:
    """build_mix in a subprocess, sampled (see the module's docstring)."""
    import psutil

    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "preprocessing.build_mix", "--config", str(recipe), "--workers",
                             str(workers), "--keep-work"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    main, cpu, trace, last_disk = psutil.Process(proc.pid), {}, [], 0.0
    peak = dict.fromkeys(("main", "worker", "sum", "work", "out"), 0)
    while proc.poll() is None:
        try:
            kids = main.children(recursive=True)
            rss = {q.pid: q.memory_info().rss for q in [main, *kids]}
            for q in [main, *kids]:
                c = q.cpu_times()
                cpu[q.pid] = c.user + c.system  # an ended worker keeps its last figure
        except psutil.Error:  # a worker ended while sampled
            time.sleep(0.1)
            continue
        main_rss = rss.pop(proc.pid, 0)
        peak["main"], peak["sum"] = max(peak["main"], main_rss), max(peak["sum"], main_rss + sum(rss.values()))
        peak["worker"] = max([peak["worker"], *rss.values()])
        trace.append((time.time(), sum(cpu.values())))
        if time.time() - last_disk > 3:
            last_disk = time.time()
            peak["work"], peak["out"] = max(peak["work"], disk(out / "work")), max(peak["out"], disk(out))
        time.sleep(0.5)
    end = time.time()
    if proc.returncode:
        raise SystemExit(f"build_mix failed ({proc.returncode}); see {out / 'build_mix.log'}")
    log = (out / "build_mix.log").read_text()
    starts = [(m.group(2) or "merge + report", dt.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp())
              for m in re.finditer(r"^(\S+ \S+) INFO \S+: (?:stage (\w+):|merging)", log, re.M)]
    marks = [("start-up", t0), *starts, ("end", end)]

    def cpu_at(t):
        return max([c for tt, c in trace if tt <= t], default=0.0)

    stages = [(name, t1 - t, cpu_at(t1) - cpu_at(t)) for (name, t), (_, t1) in zip(marks, marks[1:])]
    return {"stages": stages, "wall": end - t0, "peak": peak}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=float, default=200, help="characters of text in all, in millions")
    p.add_argument("--ehr-mb", type=float, default=15, help="of which EHR notes (through the PHI guard)")
    p.add_argument("--ehr-files", type=int, default=24)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--tokenizer", default="data/demo/tokenizer")
    p.add_argument("--keep", help="build in this folder and keep it (default: a temporary one, removed)")
    args = p.parse_args(argv)
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_build_mix_"))
    try:
        lengths = make_corpus(root / "corpus", args.mb, args.ehr_mb, args.ehr_files, args.tokenizer)
        text_mb = sum(map(sum, lengths.values())) / 1e6
        input_mb = disk(root / "corpus") / 1e6
        out = root / "corpus" / "out"
        r = run_build(root / "corpus" / "recipe.yaml", out, args.workers)
        print(f"\n### build_mix ({dt.date.today()}, {platform.machine()}, {os.cpu_count()} cores, {args.workers} workers)\n")
        print("| source | documents | MB of text | p50 chars | p90 | p99 | max |\n|---|---|---|---|---|---|---|")
        for s, ls in lengths.items():
            a = np.array(ls)
            print(f"| {s} | {len(a):,} | {a.sum() / 1e6:.1f} | " + " | ".join(f"{int(np.percentile(a, q)):,}" for q in (50, 90, 99))
                  + f" | {a.max():,} |")
        print(f"\n{text_mb:.0f} MB of text, {input_mb:.0f} MB on disk; EHR in {args.ehr_files} files.\n")
        print("| stage | wall s | CPU s | MB of text / wall s |\n|---|---|---|---|")
        for name, wall, cpu in r["stages"]:
            rate = f"{text_mb / wall:.2f}" if name not in ("start-up", "merge + report") and wall > 0.05 else ""
            print(f"| {name} | {wall:.1f} | {cpu:.1f} | {rate} |")
        pk = {k: v / 1e6 for k, v in r["peak"].items()}
        print(f"| **all** | {r['wall']:.1f} | {sum(c for _, _, c in r['stages']):.1f} | {text_mb / r['wall']:.2f} |\n")
        print(f"Peak RSS MB: main {pk['main']:.0f}, one worker {pk['worker']:.0f}, all {pk['sum']:.0f}. Disk MB: input "
              f"{input_mb:.0f}, work/ at its peak {pk['work']:.0f}, output_dir at its peak {pk['out']:.0f}, final mix "
              f"{(disk(out) - disk(out / 'work')) / 1e6:.0f}.")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
