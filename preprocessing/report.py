"""The mix report: documents and tokens in and out of every stage, per source, as markdown + PNG.

Counts come from the datatrove stats each task of each stage saved (``logs/<stage>/stats/<rank>.json``),
keyed ``<event>/<source>/<reason>`` by the steps in :mod:`preprocessing.steps`.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from preprocessing.atomic import write_atomic
from preprocessing.errors import NoDocuments


def _stat_total(value) -> float:
    return value["total"] if isinstance(value, dict) else value


def stat_totals(logs_dir: Path, stages: list[str] | None = None) -> dict[str, float]:
    """Every stat key of every stage under ``logs_dir`` (or of ``stages``), summed over the steps and ranks that
    counted it. Read per rank: datatrove's merged ``stats.json`` holds only the ranks of the last run of a resumed
    stage, and on Slurm it is written by a separate job the next stage does not wait for."""
    raw: dict[str, float] = defaultdict(float)
    for stats in sorted(logs_dir.glob("*/stats/*.json")):
        if stages is not None and stats.parent.parent.name not in stages:
            continue
        for step in json.loads(stats.read_text()):
            for key, value in step.get("stats", {}).items():
                raw[key] += _stat_total(value)
    return dict(raw)


def collect_ledger(logs_dir: Path, sources: list[str], stages: list[str] | None = None) -> dict[str, dict]:
    """Per source, from the stats of every stage (or of ``stages``): ``read``, ``quarantined`` {reason: n}, ``dropped`` {reason: n} (filters, PHI, benchmark
    overlap, exact and near duplicates, LLM drops), ``phi`` {type: n}, ``heldout``, ``kept``, ``chunks``, ``tokens``,
    ``synthetic`` (documents the LLM enrichment added) and ``enrich`` {event: n}."""
    raw = {k: v for k, v in stat_totals(logs_dir, stages).items() if "/" in k}
    ledger = {}
    for s in sources:
        entry = {"read": int(raw.get(f"read/{s}", 0)), "quarantined": {}, "dropped": {}, "phi": {}, "enrich": {}}
        for key, n in raw.items():
            event, source, *rest = key.split("/", 2)
            if source != s or not rest:
                continue
            if event in ("quarantined", "dropped", "phi", "enrich"):
                entry[event][rest[0]] = int(n)
        exact = raw.get(f"before_exact/{s}", 0) - raw.get(f"after_exact/{s}", 0)
        near = raw.get(f"before_near/{s}", 0) - raw.get(f"after_near/{s}", 0)
        if exact:
            entry["dropped"]["exact_duplicate"] = int(exact)
        if near:
            entry["dropped"]["near_duplicate"] = int(near)
        for event in ("heldout", "kept", "chunks", "tokens", "synthetic"):
            entry[event] = int(raw.get(f"{event}/{s}", 0))
        ledger[s] = entry
    return ledger


def stage_of(kind: str, reason: str) -> str:
    """The pipeline stage that removes documents for ``reason`` (a ledger key of ``quarantined`` or ``dropped``)."""
    if kind == "quarantined":
        return "read"
    if reason == "phi":
        return "PHI guard"
    if reason == "benchmark_overlap":
        return "decontamination"
    if reason == "too_short" or reason.startswith(("gopher_quality:", "gopher_repetition:")):
        return "quality filters"
    if reason in ("exact_duplicate", "near_duplicate"):
        return reason.replace("_duplicate", " dedup")
    if reason == "synthetic_of_heldout":
        return "held-out split"
    if reason.startswith("select:"):
        return "selection"
    return "LLM enrichment"  # llm_classifier, llm_failed:<task>


def losses(entry: dict) -> list[tuple[str, str, int]]:
    """(stage, reason, documents) for every way a source lost documents, the largest first; documents moved
    to the held-out split count as a loss to training."""
    found = [(stage_of(kind, reason), reason, n) for kind in ("quarantined", "dropped") for reason, n in entry[kind].items()]
    if entry["heldout"]:
        found.append(("held-out split", "heldout", entry["heldout"]))
    return sorted(found, key=lambda x: (-x[2], x[0], x[1]))


def survivors(entry: dict) -> int:
    """Documents of a source still in the training split after the stages its ledger counts."""
    return (entry["read"] + entry["synthetic"] - sum(entry["quarantined"].values()) - sum(entry["dropped"].values())
            - entry["heldout"])


def no_survivors(source: str, entry: dict) -> str:
    """Why a source has no document left: what was read and every stage and reason that removed some."""
    found = losses(entry)
    if not found:
        return f"source {source}: no documents were read"
    return f"source {source}: {entry['read']} read, removed by " + ", ".join(f"{stage} ({reason}: {n})" for stage, reason, n in found)


def balance(entry: dict) -> int:
    """read + synthetic - (quarantined + dropped + heldout + kept): zero when nothing was lost without a reason."""
    return survivors(entry) - entry["kept"]


def write_report(recipe, ledger: dict, mix: dict | None, out: Path, stopped_after: str = "final") -> None:
    """``report.md`` and its charts. ``mix`` is None when the build stopped (a source lost every document in
    stage ``stopped_after``): the document counts so far are then all there is to see, and the report says so."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sources = list(ledger)
    lines = ["# Mix report", "", f"Output: `{out}`; seq_length {recipe.seq_length}; token budget {recipe.token_budget:,}.", "",
             "## Documents per stage", "",
             "| source | read | quarantined | dropped | + synthetic | held out | kept | kept % | unaccounted |",
             "|---|---|---|---|---|---|---|---|---|"]
    for s in sources:
        e = ledger[s]
        q, d = sum(e["quarantined"].values()), sum(e["dropped"].values())
        pct = 100 * e["kept"] / e["read"] if e["read"] else 0.0
        lines.append(f"| {s} | {e['read']} | {q} | {d} | {e['synthetic']} | {e['heldout']} | {e['kept']} | {pct:.1f} | {balance(e)} |")
    lines += ["", "## Reasons", "", "| source | stage | kind | reason | documents |", "|---|---|---|---|---|"]
    for s in sources:
        for kind in ("quarantined", "dropped"):
            for reason, n in sorted(ledger[s][kind].items()):
                lines.append(f"| {s} | {stage_of(kind, reason)} | {kind} | {reason} | {n} |")
    if any(ledger[s]["enrich"] for s in sources):
        lines += ["", "## LLM enrichment (see enrich_report.md)", "", "| source | event | documents |", "|---|---|---|"]
        lines += [f"| {s} | {event} | {n} |" for s in sources for event, n in sorted(ledger[s]["enrich"].items())]
    lines += ["", "## PHI found (redacted or dropped per source policy)", "", "| source | type | occurrences |", "|---|---|---|"]
    for s in sources:
        for kind, n in sorted(ledger[s]["phi"].items()):
            lines.append(f"| {s} | {kind} | {n} |")
    if mix is None:
        empty = [s for s in sources if not survivors(ledger[s])]
        lines += ["", "## Build stopped", "", f"No document of {', '.join(empty)} survived stage {stopped_after}, so no mix "
                  "was written. The reasons above say which stage removed them; relax that source's filters and rerun with --clean."
                  + ("" if stopped_after == "final" else " The later stages did not run: documents of other sources still "
                     "in the pipeline show as unaccounted."), "",
                  "![documents](report_documents.png)", ""]
    else:
        lines += ["", "## Tokens and blend", "", "| source | sequences | tokens | target share | weight | epochs for budget |",
                  "|---|---|---|---|---|---|"]
        for s, m in mix["sources"].items():
            lines.append(f"| {s} | {m['documents']} | {m['tokens']:,} | {m['share']:.3f} | {m['weight']:.3f} | {m['epochs']:.2f} |")
        lines += ["", "![documents](report_documents.png)", "", "![tokens](report_tokens.png)", ""]
    write_atomic(out / "report.md", "\n".join(lines))  # a failed rewrite keeps the last whole report

    fig, ax = plt.subplots(figsize=(8, 4))
    stages = ["read", "after quarantine", "after filters/dedup", "kept (train)"]
    width = 0.8 / len(sources)
    for i, s in enumerate(sources):
        e = ledger[s]
        after_q = e["read"] - sum(e["quarantined"].values())
        values = [e["read"], after_q, after_q - sum(e["dropped"].values()), e["kept"]]
        ax.bar([x + i * width for x in range(len(stages))], values, width, label=s)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(stages))], stages)
    ax.set_ylabel("documents")
    ax.set_title("Documents through the pipeline")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=len(sources), fontsize="small")
    fig.tight_layout()
    fig.savefig(out / "report_documents.png", dpi=100)
    plt.close(fig)
    if mix is None:
        return

    fig, ax = plt.subplots(figsize=(8, 4))
    total = sum(m["tokens"] for m in mix["sources"].values()) or 1
    xs = range(len(sources))
    ax.bar([x - 0.2 for x in xs], [mix["sources"][s]["tokens"] / total for s in sources], 0.4, label="share of unique tokens")
    ax.bar([x + 0.2 for x in xs], [mix["sources"][s]["share"] for s in sources], 0.4, label="target share (blend weight)")
    ax.set_xticks(list(xs), sources)
    ax.set_ylabel("fraction")
    ax.set_title("Tokens per source")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "report_tokens.png", dpi=100)
    plt.close(fig)


def check_survivors(recipe, done: list[str], report: bool = True) -> None:
    """Stop when a source has no document left after the stages ``done`` (the last one named), writing the
    report so far unless not ``report``."""
    ledger = collect_ledger(recipe.out / "logs", [s.name for s in recipe.sources], done)
    empty = [name for name, entry in ledger.items() if not survivors(entry)]
    if not empty:
        return
    if report:
        write_report(recipe, ledger, None, recipe.out, stopped_after=done[-1])
    raise NoDocuments(f"no document survived stage {done[-1]}: " + "; ".join(no_survivors(s, ledger[s]) for s in empty)
                      + f". Counts in {recipe.out / 'report.md'}; relax the recipe and rerun with --clean (a changed "
                      "recipe does not resume)")
