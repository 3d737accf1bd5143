"""The LLM enrichment step of the mix build (``enrich:`` blocks in the recipe; the CLI and its report are
:mod:`preprocessing.enrich_data`): classify, expand and arXiv clean-up as one datatrove step.

Prompts and their answer schemas are versioned files in ``preprocessing/prompts/``. Every enriched document
records its provenance in ``metadata.enrich``: model, and per task the prompt version and the answer.
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

from preprocessing.llm import Request, Result, StructuredLLM, cache_key, text_hash
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
            if task == "expand" and result.output is not None and not any(p.strip() for p in result.output["paragraphs"]):
                # as an empty document it would be skipped by the next stage's reader with only a warning
                result = Result(None, "blank expansion: every paragraph is empty", json.dumps(result.output))
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
