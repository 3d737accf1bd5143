"""LLM enrichment of the mix's sources, switched on per source by an ``enrich:`` block in the recipe, with the
model in an ``llm:`` block (``data/demo/recipe_enrich.yaml`` is a complete example):

    python -m preprocessing.enrich_data --config recipe.yaml [--workers N] [--executor local|slurm|ray]

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
``enrich_report.{md,json}``. Every enriched document records its provenance in ``metadata.enrich``: model,
and per task the prompt version and the answer.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

from preprocessing.llm import LLMError, Request, Result, StructuredLLM, cache_key, text_hash
from preprocessing.recipe import MixRecipe

PROMPTS = Path(__file__).with_name("prompts")
VERSIONS = {"classify": "classify-v1", "expand": "expand-v1", "arxiv": "arxiv-v1"}
USAGE_STATS = {"calls": "llm_calls", "cached": "llm_cached", "malformed": "llm_malformed", "failed": "llm_failed_requests",
               "prompt_tokens": "llm_tokens_in", "completion_tokens": "llm_tokens_out"}
_WORDS_ONLY = re.compile(r"[\w\s]*")


@dataclass(frozen=True)
class Task:
    """One enrichment task: its versioned prompt (``prompts/<version>.txt``) and answer schema
    (``prompts/<version>.schema.json``)."""

    name: str
    version: str
    template: str
    schema: dict

    @classmethod
    def load(cls, name: str) -> "Task":
        version = VERSIONS[name]
        return cls(name, version, (PROMPTS / f"{version}.txt").read_text(),
                   json.loads((PROMPTS / f"{version}.schema.json").read_text()))

    def request(self, text: str, model: str, ref: str) -> Request:
        doc_hash = text_hash(text)
        subfields = ", ".join(self.schema["properties"].get("subfield", {}).get("enum", []))
        return Request(cache_key(self.name, self.version, model, doc_hash), self.template.format(text=text, subfields=subfields),
                       self.schema, self.name, ref, {"task": self.name, "prompt": self.version, "model": model, "doc_sha256": doc_hash})


def apply_edits(text: str, edits: list[dict]) -> tuple[str, int, int]:
    """(text with every occurrence of each edit's ``find`` replaced, edits applied, edits ignored)."""
    from preprocessing.steps import normalize_text

    applied = ignored = 0
    for edit in edits:
        find = edit["find"]
        if not find or _WORDS_ONLY.fullmatch(find) or find not in text:
            ignored += 1
            continue
        text = text.replace(find, edit["replace"])
        applied += 1
    return (normalize_text(text) if applied else text), applied, ignored


class LLMEnrich(PipelineStep):
    """The enrichment as a datatrove step. Documents of sources with an ``enrich`` block go to the LLM in
    batches of ``llm.batch_size`` (a batch's requests run ``llm.concurrency`` at a time); others pass through.
    Counts: ``enrich/<source>/<event>``, drops ``dropped/<source>/<reason>``, extra documents
    ``synthetic/<source>``, and ``llm_*`` for calls, cache hits, malformed answers, failed requests, tokens and
    seconds."""

    name = "🤖 LLM enrich"
    type = "✨ - ENRICH"

    def __init__(self, recipe: MixRecipe, exclusion_writer=None):
        super().__init__()
        self.sources = {s.name: s.enrich for s in recipe.sources if s.enrich is not None}
        self.config, self.cache_dir = recipe.llm, str(recipe.llm_cache)
        self.errors_dir = str(recipe.out / "errors")
        self.exclusion_writer = exclusion_writer
        self.tasks = {name: Task.load(name) for name in VERSIONS}

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        from datatrove.utils.batching import batched
        from datatrove.utils.logging import logger
        from tqdm import tqdm

        from preprocessing.llm import JsonlCache
        from preprocessing.steps import Quarantine

        llm = StructuredLLM(self.config, JsonlCache.directory(self.cache_dir))  # built here, in the worker: the key stays in its env
        failures = Quarantine(self.errors_dir, "enrich", rank)
        bar = tqdm(desc=f"enrich task {rank}", unit="doc", mininterval=1.0, file=sys.stderr)
        start, done = time.perf_counter(), 0
        try:
            with self.exclusion_writer if self.exclusion_writer else contextlib.nullcontext() as dropped:
                for batch in batched(data, self.config.batch_size):
                    before = dict(llm.usage)
                    with self.track_time(unit="batch"):
                        out = self._batch(llm, batch, failures, dropped, rank)
                    for key, stat in USAGE_STATS.items():
                        if llm.usage[key] > before[key]:
                            self.stat_update(stat, value=llm.usage[key] - before[key])
                    done += len(batch)
                    bar.update(len(batch))
                    bar.set_postfix(calls=llm.usage["calls"], cached=llm.usage["cached"],
                                    tok_in=llm.usage["prompt_tokens"], tok_out=llm.usage["completion_tokens"])
                    yield from out
        finally:
            bar.close()
            failures.close()
            seconds = time.perf_counter() - start
            self.stat_update("llm_seconds", value=round(seconds))
            u = llm.usage
            logger.info(f"enrich task {rank}: {done} documents in {seconds:.1f} s ({done / max(seconds, 1e-9):.2f} docs/s); "
                        f"{u['calls']} calls, {u['cached']} cached, {u['malformed']} malformed, {u['failed']} failed requests; "
                        f"tokens in {u['prompt_tokens']}, out {u['completion_tokens']} "
                        f"({(u['prompt_tokens'] + u['completion_tokens']) / max(seconds, 1e-9):.0f} tokens/s)")

    def _ask(self, llm: StructuredLLM, asked: list[tuple[str, Document]]) -> list[Result]:
        limit, model = self.config.max_input_chars, self.config.model
        return llm.run([self.tasks[task].request(doc.text[:limit], model, f"{doc.id} ({task})") for task, doc in asked])

    def _batch(self, llm: StructuredLLM, batch: list[Document], failures, dropped, rank: int) -> list[Document]:
        todo = [d for d in batch if d.metadata["source"] in self.sources]
        for d in todo:
            d.metadata["enrich"] = {"model": self.config.model}
        removed: dict[int, str] = {}  # id(document) -> drop reason
        extra: dict[int, Document] = {}  # id(parent) -> its expansion

        asked = [("classify", d) for d in todo if self.sources[d.metadata["source"]].classify]
        for (task, d), result in zip(asked, self._ask(llm, asked)):
            if self._record(d, task, result, failures):
                self.stat_update(f"enrich/{d.metadata['source']}/classify_{result.output['decision']}")
                if result.output["decision"] == "drop":
                    removed[id(d)] = "llm_classifier"
            elif self.sources[d.metadata["source"]].on_failure == "drop":
                removed[id(d)] = "llm_failed:classify"

        kept = [d for d in todo if id(d) not in removed]
        asked = [("expand", d) for d in kept if self.sources[d.metadata["source"]].expand
                 and len(d.text.split()) < self.sources[d.metadata["source"]].expand_below_words]
        asked += [("arxiv", d) for d in kept if self.sources[d.metadata["source"]].arxiv]
        for (task, d), result in zip(asked, self._ask(llm, asked)):
            source = d.metadata["source"]
            if not self._record(d, task, result, failures):
                if task == "arxiv" and self.sources[source].on_failure == "drop":
                    removed[id(d)] = "llm_failed:arxiv"
            elif task == "expand":
                extra[id(d)] = self._expansion(d, result.output["paragraphs"])
            else:
                d.text, applied, ignored = apply_edits(d.text, result.output["edits"])
                d.metadata["enrich"]["arxiv"].update(edits_applied=applied, edits_ignored=ignored)
                self.stat_update(f"enrich/{source}/subfield:{result.output['subfield']}")
                for event, n in (("arxiv_cleaned", int(applied > 0)), ("arxiv_edits", applied), ("arxiv_edits_ignored", ignored)):
                    if n:
                        self.stat_update(f"enrich/{source}/{event}", value=n)

        out = []
        for d in batch:
            source = d.metadata["source"]
            if id(d) in removed:
                d.metadata["enrich"]["dropped"] = removed[id(d)]
                self.stat_update(f"dropped/{source}/{removed[id(d)]}")
                if dropped is not None:
                    dropped.write(d, rank)
                continue
            out.append(d)
            if id(d) in extra:
                out.append(extra[id(d)])
                self.stat_update(f"synthetic/{source}", f"enrich/{source}/expanded")
        return out

    def _record(self, doc: Document, task: str, result: Result, failures) -> bool:
        """Provenance of one answer in ``metadata.enrich.<task>``; a failure is also counted and listed."""
        entry = {"prompt": self.tasks[task].version}
        if result.output is not None:
            if task == "classify":
                entry.update(result.output, reason=result.output["reason"][:300])
            elif task == "arxiv":
                entry["subfield"] = result.output["subfield"]
            doc.metadata["enrich"][task] = entry
            return True
        entry.update(error=result.error, raw=result.raw)
        doc.metadata["enrich"][task] = entry
        self.stat_update(f"enrich/{doc.metadata['source']}/{task}_failed")
        failures.write(doc.metadata.get("file", ""), doc.metadata.get("line"), f"llm_failed:{task}", f"{doc.id}: {result.error}")
        return False

    def _expansion(self, parent: Document, paragraphs: list[str]) -> Document:
        text = "\n\n".join(p.strip() for p in paragraphs if p.strip())
        parent.metadata["enrich"]["expand"]["synthetic_id"] = f"{parent.id}#expand"
        return Document(text=text, id=f"{parent.id}#expand", metadata={
            "source": parent.metadata["source"], "file": parent.metadata.get("file"), "line": parent.metadata.get("line"),
            "synthetic": True, "parent_id": parent.id,
            "enrich": {"model": self.config.model, "expand": {"prompt": self.tasks["expand"].version}}})


def enrich_steps(recipe: MixRecipe) -> list:
    """The enrichment stage's steps after the documents are read: enrich, count, write per source."""
    from datatrove.pipeline.writers import JsonlWriter

    from preprocessing.steps import CountBySource

    out = recipe.out
    return [LLMEnrich(recipe, JsonlWriter(str(out / "enrich_dropped"), output_filename="${source}/${rank}.jsonl.gz")),
            CountBySource("enriched"),
            JsonlWriter(str(out / "enriched"), output_filename="${source}/${rank}.jsonl.gz")]


# ---------------------------------------------------------------------------------------------- report


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
    from preprocessing.build_mix import write_json_atomic

    s = summary(recipe)
    write_json_atomic(recipe.out / "enrich_report.json", s)
    text = to_markdown(s)
    (recipe.out / "enrich_report.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> None:
    from preprocessing.build_mix import add_executor_args, run_stages

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="recipe YAML with an llm: block and enrich: blocks")
    add_executor_args(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    for name in ("httpx", "httpx2", "openai"):  # request lines are noise (headers are never logged)
        logging.getLogger(name).setLevel(logging.WARNING)
    recipe = MixRecipe.load(args.config)
    if not recipe.enriched_sources:
        raise SystemExit(f"{args.config}: no source has an enrich: block, nothing to do")
    try:
        done = run_stages(recipe, args.workers, args.executor, until="enrich", partition=args.partition, time=args.time)
    except LLMError as err:
        raise SystemExit(f"enrichment stopped: {err}. Finished documents are cached; rerun the same command to resume.") from None
    if done:
        print(write_report(recipe))


if __name__ == "__main__":
    main()
