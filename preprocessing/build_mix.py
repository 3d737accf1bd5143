"""Raw per-source corpora -> the weighted CPT mix the trainer reads.

    python -m preprocessing.build_mix --config recipe.yaml [--workers N] [--executor local|slurm|ray]

Stages (datatrove executors; each keeps completion markers under ``output_dir/logs/<stage>``, so a
killed run restarted with the same command redoes only unfinished work):

1. clean       read all sources (quarantining bad records), PHI guard, decontamination, quality filters
2-4. exact     datatrove exact dedup across sources (signatures, find, filter)
5-7. minhash   datatrove MinHash near-dedup across sources (signatures, buckets, cluster)
8. final       MinHash filter, held-out split, tokenise + chunk + EOS into megatron indexed datasets

When a source has an ``enrich`` block, stage 8 is split in two: ``enrich`` (MinHash filter, then the LLM
enrichment of ``preprocessing/enrich_data.py``, writing ``output_dir/enriched/``) and ``final`` (held-out
split and tokenisation of the enriched documents).

then, in this process: merge the per-rank binaries per source, write ``mix.json`` and the report.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
from dataclasses import asdict
from pathlib import Path

from preprocessing.recipe import MixRecipe

log = logging.getLogger(__name__)
EPOCH_WARNING = 4.0


def _text(doc) -> str:
    return doc.text


def stages(recipe: MixRecipe, tasks: int) -> list[tuple[str, list, int]]:
    """(name, datatrove pipeline, tasks) for every stage, in order."""
    from datatrove.pipeline.dedup import MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter, MinhashDedupSignature
    from datatrove.pipeline.dedup.exact_dedup import ExactDedupConfig, ExactDedupFilter, ExactDedupSignature, ExactFindDedups
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    from preprocessing import steps

    out, work = recipe.out, recipe.out / "work"
    minhash = MinhashConfig(**recipe.minhash)
    exact = ExactDedupConfig(content_getter=_text)
    decont = [str(p) for pattern in recipe.decontaminate for p in recipe.expand(pattern)]
    if recipe.decontaminate and not decont:
        raise FileNotFoundError(f"decontaminate: no benchmark files match {recipe.decontaminate}")
    clean = [
        steps.MixReader(recipe.source_files(), str(out / "errors"), recipe.max_doc_chars),
        steps.PHIGuard(recipe.sources),
        *([steps.Decontaminate(decont, recipe.decontaminate_ngram)] if decont else []),
        steps.SourceFilters(recipe.sources),
        JsonlWriter(str(work / "clean"), output_filename="${rank}.jsonl.gz"),
    ]

    def reader(folder: str):
        return JsonlReader(str(work / folder), glob_pattern="*.jsonl.gz")

    near = [reader("exact"), steps.CountBySource("before_near"), MinhashDedupFilter(str(work / "minhash_remove")),
            steps.CountBySource("after_near")]
    tokens = [steps.HeldoutSplit(str(work / "heldout"), recipe.heldout_fraction, recipe.seed),
              steps.MegatronTokenWriter(str(work / "tokens"), str(recipe.resolve(recipe.tokenizer)), recipe.seq_length,
                                        {s.name: s.chunk_overlap for s in recipe.sources})]
    if recipe.enriched_sources:
        from preprocessing.enrich_data import enrich_steps

        last = [("enrich", near + enrich_steps(recipe), tasks),
                ("final", [JsonlReader(str(out / "enriched"), glob_pattern="*/*.jsonl.gz"), *tokens], tasks)]
    else:
        last = [("final", near + tokens, tasks)]
    return [
        ("clean", clean, tasks),
        ("exact_signatures", [reader("clean"), ExactDedupSignature(str(work / "exact_sigs"), exact)], tasks),
        ("exact_find", [ExactFindDedups(str(work / "exact_sigs"), str(work / "exact_dups"), exact)], 1),
        ("exact_filter", [reader("clean"), steps.CountBySource("before_exact"),
                          ExactDedupFilter(str(work / "exact_dups"), exact), steps.CountBySource("after_exact"),
                          JsonlWriter(str(work / "exact"), output_filename="${rank}.jsonl.gz")], tasks),
        ("minhash_signatures", [reader("exact"), MinhashDedupSignature(str(work / "minhash_sigs"), minhash, language=steps.WhitespaceWordTokenizer())], tasks),
        ("minhash_buckets", [MinhashDedupBuckets(str(work / "minhash_sigs"), str(work / "minhash_buckets"), config=minhash)],
         minhash.num_buckets),
        ("minhash_cluster", [MinhashDedupCluster(str(work / "minhash_buckets"), str(work / "minhash_remove"), config=minhash)], 1),
        *last,
    ]


def make_executor(kind: str, pipeline: list, tasks: int, workers: int, logging_dir: Path, depends=None, **cluster):
    """datatrove's executors: local processes, a Slurm job array, or Ray tasks."""
    if kind == "local":
        from datatrove.executor import LocalPipelineExecutor

        return LocalPipelineExecutor(pipeline=pipeline, tasks=tasks, workers=min(workers, tasks),
                                     logging_dir=str(logging_dir), start_method="fork")
    if kind == "slurm":
        from datatrove.executor import SlurmPipelineExecutor

        return SlurmPipelineExecutor(pipeline=pipeline, tasks=tasks, workers=workers, logging_dir=str(logging_dir),
                                     depends=depends, job_name=f"build_mix_{logging_dir.name}",
                                     time=cluster.get("time", "24:00:00"), partition=cluster.get("partition"))
    if kind == "ray":
        from datatrove.executor import RayPipelineExecutor

        return RayPipelineExecutor(pipeline=pipeline, tasks=tasks, workers=workers, logging_dir=str(logging_dir),
                                   depends=depends, mem_per_cpu_gb=cluster.get("mem_per_cpu_gb", 2))
    raise ValueError(f"unknown executor {kind!r}; choose local, slurm or ray")


def completed(logging_dir: Path, tasks: int) -> bool:
    done = logging_dir / "completions"
    return done.is_dir() and len(list(done.iterdir())) >= tasks


# ------------------------------------------------------------------------------------------- merging


def merge_tokens(recipe: MixRecipe) -> dict[str, str]:
    """One megatron indexed dataset per source from the per-rank ones; returns source -> prefix."""
    from preprocessing.steps import merge_indexed
    from preprocessing.tokenizer import load_tokenizer, token_dtype

    dtype = token_dtype(load_tokenizer(str(recipe.resolve(recipe.tokenizer))).get_vocab_size())
    prefixes = {}
    for source in recipe.sources:
        parts = sorted((recipe.out / "work" / "tokens" / source.name).glob("*.idx"))
        if not parts:
            raise RuntimeError(f"source {source.name}: no documents survived the pipeline (see the report)")
        name = f"{source.name}_text_document"
        merge_indexed(parts, recipe.out / name, dtype)
        prefixes[source.name] = name
    return prefixes


def merge_heldout(recipe: MixRecipe) -> dict[str, str]:
    out = recipe.out / "heldout"
    out.mkdir(exist_ok=True)
    files = {}
    for source in recipe.sources:
        target = out / f"{source.name}.jsonl"
        with open(f"{target}.tmp", "w") as f:
            for part in sorted((recipe.out / "work" / "heldout" / source.name).glob("*.jsonl")):
                f.write(part.read_text())
        os.replace(f"{target}.tmp", target)
        files[source.name] = str(target.relative_to(recipe.out))
    return files


def mix_json(recipe: MixRecipe, prefixes: dict[str, str], heldout: dict[str, str], ledger: dict) -> dict:
    """Blend weights: every sample the trainer draws is ``seq_length`` tokens whatever its source, so the
    token share of a source equals its sample share, i.e. its blend weight is its target share."""
    from preprocessing.tokenizer import bundle_tokenizer

    sources = {}
    for s in recipe.sources:
        tokens = ledger[s.name].get("tokens", 0)
        epochs = s.share * recipe.token_budget / tokens if tokens else float("inf")
        if epochs > EPOCH_WARNING:
            log.warning("source %s: %.1f epochs to reach its %.0f%% of %d tokens (> %g): consider more data or a "
                        "smaller share", s.name, epochs, 100 * s.share, recipe.token_budget, EPOCH_WARNING)
        sources[s.name] = {"prefix": prefixes[s.name], "documents": ledger[s.name].get("chunks", 0), "tokens": tokens,
                           "share": s.share, "weight": s.share, "epochs": round(epochs, 3), "heldout": heldout[s.name]}
    return {
        "seq_length": recipe.seq_length,
        "token_budget": recipe.token_budget,
        "tokenizer": bundle_tokenizer(recipe.resolve(recipe.tokenizer), recipe.out),  # relative: the mix can move
        "sources": sources,
        # megatron's data_path form: weight prefix weight prefix ...
        "data_path": [x for s in sources.values() for x in (s["weight"], s["prefix"])],
    }


def write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


# -------------------------------------------------------------------------------------------- driver


def run_stages(recipe: MixRecipe, workers: int = 1, executor: str = "local", until: str | None = None, **cluster) -> bool:
    """Run (or resume) the stages in order, through ``until`` (default: all). True when they are all complete;
    False when Slurm jobs were submitted and are still to finish (rerun the same command then)."""
    out = recipe.out
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "recipe.resolved.json", asdict(recipe))
    tasks = max(1, workers)
    todo = stages(recipe, tasks)
    if until is not None:
        names = [name for name, _, _ in todo]
        if until not in names:
            raise ValueError(f"no stage {until!r} in {names}")
        todo = todo[: names.index(until) + 1]
    if recipe.llm and recipe.llm.backend == "openai" and any(
            name == "enrich" and not completed(out / "logs" / name, n) for name, _, n in todo):
        recipe.llm.api_key()  # no key: stop now, naming the variable, not after hours of dedup
    previous = None
    for name, pipeline, n in todo:
        logging_dir = out / "logs" / name
        if completed(logging_dir, n):
            log.info("stage %s: already complete", name)
            continue
        log.info("stage %s: %d tasks", name, n)
        previous = make_executor(executor, pipeline, n, workers, logging_dir, depends=previous, **cluster)
        if executor != "slurm":  # local and Ray run a stage to the end here; Slurm jobs are chained
            previous.run()
            previous = None
            if not completed(logging_dir, n):
                raise RuntimeError(f"stage {name} did not complete; see {logging_dir}/logs (rerun to resume)")
    if executor == "slurm" and not all(completed(out / "logs" / n, t) for n, _, t in todo):
        if previous is not None:
            previous.run()  # submits the chain of jobs
        print("cluster jobs submitted; rerun the same command when they have finished to merge and report")
        return False
    return True


def build(recipe: MixRecipe, workers: int = 1, executor: str = "local", **cluster) -> dict | None:
    """Run (or resume) every stage, then merge, mix.json and report. Returns mix.json's content, or
    None when cluster jobs were submitted and are still to finish (rerun the same command then)."""
    from preprocessing.report import collect_ledger, write_report

    if not run_stages(recipe, workers, executor, **cluster):
        return None
    out = recipe.out
    ledger = collect_ledger(out / "logs", [s.name for s in recipe.sources])
    mix = mix_json(recipe, merge_tokens(recipe), merge_heldout(recipe), ledger)
    write_json_atomic(out / "mix.json", mix)
    write_report(recipe, ledger, mix, out)
    return mix


def add_executor_args(p: argparse.ArgumentParser) -> None:
    """The command-line options that choose how stages run (shared by the commands built on these stages)."""
    p.add_argument("--workers", type=int, default=1, help="parallel tasks per stage")
    p.add_argument("--executor", default="local", choices=["local", "slurm", "ray"])
    p.add_argument("--partition", help="Slurm partition")
    p.add_argument("--time", default="24:00:00", help="Slurm time limit per task")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="recipe YAML")
    add_executor_args(p)
    p.add_argument("--clean", action="store_true", help="delete output_dir first instead of resuming")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    recipe = MixRecipe.load(args.config)
    if args.clean:
        shutil.rmtree(recipe.out, ignore_errors=True)
    mix = build(recipe, args.workers, args.executor, partition=args.partition, time=args.time)
    if mix is not None:
        print((recipe.out / "report.md").read_text())


if __name__ == "__main__":
    main()
