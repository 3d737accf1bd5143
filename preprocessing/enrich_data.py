"""LLM enrichment of the mix's sources, switched on per source by an ``enrich:`` block in the recipe, with the
model in an ``llm:`` block (``data/demo/recipe_enrich.yaml`` is a complete example):

    python -m preprocessing.enrich_data --config recipe.yaml [--workers N] [--executor local|slurm|ray] [--verbose]

This runs the mix build's stages up to and including ``enrich`` (``build_mix`` runs the same stage between
near-dedup and tokenisation, and continues from here), so the model only sees text that passed the PHI guard,
decontamination, the quality filters and both deduplications. Per enriched source:

* ``classify``: keep/drop for medical relevance and quality, with 1-5 scores and a one-sentence reason;
* ``expand``: a document under ``expand_below_words`` words (an abstract) gets a 3-6 paragraph explanation as
  an extra document (id ``<id>#expand``, ``metadata.synthetic``, ``metadata.parent_id``); the original stays;
* ``arxiv``: the subfield, and the residual LaTeX the rule-based converter missed, as exact find/replace edits
  applied to the whole document. The model never rewrites the text: an edit must target markup (a ``find``
  of letters, digits and spaces only is rejected) and must occur in the text, else it is counted and ignored.

Classification runs first; only kept documents are expanded or cleaned. Prompts and their answer schemas are
versioned files in ``preprocessing/prompts/``. An answer still malformed after ``llm.retries`` attempts, or a
request that failed (timeout, HTTP error), is a failure: recorded with the raw text (``metadata.enrich`` and
``errors/enrich_*.jsonl``) and counted; the source's ``on_failure`` keeps or drops the document (a failed
expansion only means no extra document). An unreachable server stops the stage; rerunning the command resumes,
and finished documents cost no new call (the cache in ``llm.cache_dir`` is keyed by task, prompt version,
model and document hash).

Outputs in ``output_dir``: ``enriched/<source>/*.jsonl.gz`` (every source, enriched or passed through: what
``build_mix`` tokenises), ``enrich_dropped/<source>/`` (dropped documents with their reason) and
``enrich_report.{md,json}``; the full log in ``enrich_data.log`` (a bad input ends the command with one line, its
traceback there). Every enriched document records its provenance in ``metadata.enrich``: model,
and per task the prompt version and the answer.
"""

from __future__ import annotations

import argparse
import json
import logging

from preprocessing.atomic import write_all_atomic
from preprocessing.enrich import USAGE_STATS, VERSIONS
from preprocessing.llm import LLMError
from preprocessing.pipeline import add_executor_args, build_command, load_recipe, run_stages
from preprocessing.recipe import MixRecipe


def summary(recipe: MixRecipe) -> dict:
    """Per source: documents in and out of the enrichment stage and what happened between; LLM usage."""
    from preprocessing.report import stat_totals

    raw = stat_totals(recipe.out / "logs")  # the keys read here are all counted in the enrich stage
    sources = {}
    for s in recipe.sources:
        n = lambda key: int(raw.get(key, 0))  # noqa: E731
        events = {k.split("/", 2)[2]: int(v) for k, v in raw.items() if k.startswith(f"enrich/{s.name}/")}
        drops = {k.split("/", 2)[2]: int(v) for k, v in raw.items() if k.startswith(f"dropped/{s.name}/llm_")}
        entry = {"tasks": [t for t in VERSIONS if s.enrich and getattr(s.enrich, t)], "in": n(f"after_near/{s.name}"),
                 "dropped": drops, "failures": {k[: -len("_failed")]: v for k, v in events.items() if k.endswith("_failed")},
                 "synthetic": n(f"synthetic/{s.name}"), "arxiv_cleaned": events.get("arxiv_cleaned", 0),
                 "arxiv_edits": events.get("arxiv_edits", 0), "arxiv_edits_ignored": events.get("arxiv_edits_ignored", 0),
                 "subfields": {k.split(":", 1)[1]: v for k, v in events.items() if k.startswith("subfield:")},
                 "classified": {d: events.get(f"classify_{d}", 0) for d in ("keep", "drop")}, "out": n(f"enriched/{s.name}")}
        entry["unaccounted"] = entry["in"] + entry["synthetic"] - sum(drops.values()) - entry["out"]
        sources[s.name] = entry
    usage = {stat: int(raw.get(stat, 0)) for stat in [*USAGE_STATS.values(), "llm_seconds"]}
    docs = sum(e["in"] for e in sources.values())
    usage["docs_per_second_per_task"] = round(docs / usage["llm_seconds"], 2) if usage["llm_seconds"] else None
    return {"model": recipe.llm.model, "backend": recipe.llm.backend, "base_url": recipe.llm.base_url,
            "prompts": list(VERSIONS.values()), "cache_dir": str(recipe.llm_cache), "sources": sources, "usage": usage}


def to_markdown(s: dict) -> str:
    lines = ["# Enrichment report", "",
             f"Model `{s['model']}` ({s['backend']}{', ' + s['base_url'] if s['base_url'] else ''}); prompts "
             f"{', '.join(s['prompts'])}; cache `{s['cache_dir']}`.", "",
             "| source | tasks | in | kept / dropped by model | failures | dropped on failure | synthetic added | "
             "arXiv cleaned (edits, ignored) | out | unaccounted |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, e in s["sources"].items():
        if not e["tasks"]:
            lines.append(f"| {name} | passed through | {e['in']} | | | | | | {e['out']} | {e['unaccounted']} |")
            continue
        failed = ", ".join(f"{t} {n}" for t, n in sorted(e["failures"].items())) or "0"
        on_failure = sum(n for r, n in e["dropped"].items() if r.startswith("llm_failed"))
        classified = f"{e['classified']['keep']} / {e['classified']['drop']}" if "classify" in e["tasks"] else "-"
        synthetic = e["synthetic"] if "expand" in e["tasks"] else "-"
        arxiv = f"{e['arxiv_cleaned']} ({e['arxiv_edits']}, {e['arxiv_edits_ignored']})" if "arxiv" in e["tasks"] else "-"
        lines.append(f"| {name} | {', '.join(e['tasks'])} | {e['in']} | {classified} | {failed} | {on_failure} | {synthetic} | "
                     f"{arxiv} | {e['out']} | {e['unaccounted']} |")
    subfields = [(name, k, v) for name, e in s["sources"].items() for k, v in sorted(e["subfields"].items())]
    if subfields:
        lines += ["", "| source | arXiv subfield | documents |", "|---|---|---|", *(f"| {a} | {b} | {c} |" for a, b, c in subfields)]
    u = s["usage"]
    lines += ["", f"LLM: {u['llm_calls']} calls, {u['llm_cached']} answered from the cache, {u['llm_malformed']} malformed "
                  f"answers, {u['llm_failed_requests']} failed requests; tokens in {u['llm_tokens_in']:,}, out "
                  f"{u['llm_tokens_out']:,}; {u['llm_seconds']} s of task time"
                  + (f" ({u['docs_per_second_per_task']} docs/s per task)." if u["docs_per_second_per_task"] else "."), ""]
    return "\n".join(lines)


def write_report(recipe: MixRecipe) -> str:
    """``enrich_report.{json,md}``, replaced together: a failure leaves the old pair, never a table beside
    another run's JSON."""
    s = summary(recipe)
    text = to_markdown(s)
    write_all_atomic({recipe.out / "enrich_report.json": json.dumps(s, indent=2), recipe.out / "enrich_report.md": text})
    return text


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="recipe YAML with an llm: block and enrich: blocks")
    add_executor_args(p)
    p.add_argument("--verbose", action="store_true", help="every library's log on the console (always in output_dir/enrich_data.log)")
    args = p.parse_args(argv)
    for name in ("httpx", "httpx2", "openai"):  # request lines are noise (headers are never logged)
        logging.getLogger(name).setLevel(logging.WARNING)
    recipe = load_recipe(MixRecipe.load, args.config)
    if not recipe.enriched_sources:
        raise SystemExit(f"{args.config}: no source has an enrich: block, nothing to do")
    with build_command(recipe.out, "enrich_data", args.verbose):
        try:
            done = run_stages(recipe, args.workers, args.executor, until="enrich", partition=args.partition, time=args.time)
        except LLMError as err:
            raise LLMError(f"enrichment stopped: {err}. Finished documents are cached; rerun the same command to resume.") from err
    if done:
        print(write_report(recipe))


if __name__ == "__main__":
    main()
