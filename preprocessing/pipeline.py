"""The mix build's datatrove stages and the runner that runs or resumes them, shared by the commands built
on them (``build_mix``, ``enrich_data``; ``build_sft`` uses the executor and completion markers).

Stages (datatrove executors; each keeps completion markers under ``output_dir/logs/<stage>``, so a
killed run restarted with the same command redoes only unfinished work):

1. clean       read all sources (quarantining bad records), PHI guard, decontamination, quality filters
2-4. exact     datatrove exact dedup across sources (signatures, find, filter)
5-7. minhash   datatrove MinHash near-dedup across sources (signatures, buckets, cluster)
8. final       MinHash filter, held-out split, tokenise + chunk + EOS into megatron indexed datasets

When a source has an ``enrich`` block, stage 8 is split in two: ``enrich`` (MinHash filter, then the LLM
enrichment of :mod:`preprocessing.enrich`, writing ``output_dir/enriched/``) and ``final`` (held-out
split and tokenisation of the enriched documents). Intermediate files live under ``output_dir/work/``.

After each stage that can remove every document of a source (``FILTERING``), the build stops if one has none
left, naming the stage and the reasons, with the report so far: a later stage would only fail to find input.
On Slurm the stages run as chained jobs, so the stage after each runs the same check first, in its job.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import traceback
from contextlib import ExitStack, contextmanager
from dataclasses import asdict
from pathlib import Path

import yaml

from preprocessing import logs
from preprocessing.atomic import DirectoryInUse, clear_directory, hold_directory, write_json_atomic
from preprocessing.cli import about, positive_int
from preprocessing.errors import BuildError
from preprocessing.llm import LLMError
from preprocessing.recipe import MixRecipe
from preprocessing.report import check_survivors

log = logging.getLogger(__name__)
FILTERING = ("clean", "enrich", "final")  # the stages after which a source can have no document left


def _text(doc) -> str:
    return doc.text


def stages(recipe: MixRecipe, tasks: int, files: list) -> list[tuple[str, list, int]]:
    """(name, datatrove pipeline, tasks) for every stage, in order; ``files``: the sources' files
    (:func:`check_recipe`'s)."""
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
    for _ in steps.benchmark_texts(decont):  # read once here: a bad file stops the build before any worker starts
        pass
    clean = [
        steps.MixReader(files, str(out / "errors"), recipe.max_doc_chars, recipe.phi_model_spec),
        steps.PHIGuard(recipe.sources, recipe.phi_model_spec),
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
        from preprocessing.enrich import enrich_steps

        last = [("enrich", near + enrich_steps(recipe), tasks),
                ("final", [JsonlReader(str(out / "enriched"), glob_pattern="*/*.jsonl.gz"), *tokens], tasks)]
    else:
        last = [("final", near + tokens, tasks)]
    todo = [
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
    for i in range(1, len(todo)):  # in the job, for Slurm: the driver checks before it submits none
        if todo[i - 1][0] in FILTERING:
            todo[i][1].insert(0, steps.CheckSurvivors(recipe, [name for name, _, _ in todo[:i]]))
    return todo


def make_executor(kind: str, pipeline: list, tasks: int, workers: int, logging_dir: Path, depends=None,
                  gpus_per_task: int = 0, **cluster):
    """datatrove's executors: local processes, a Slurm job array, or Ray tasks (``gpus_per_task`` each: a local
    build's workers share the node's)."""
    if kind == "local":
        from preprocessing.local_executor import LocalExecutor

        return LocalExecutor(pipeline=pipeline, tasks=tasks, workers=min(workers, tasks), logging_dir=str(logging_dir),
                             start_method="fork")
    if kind == "slurm":
        from datatrove.executor import SlurmPipelineExecutor

        return SlurmPipelineExecutor(pipeline=pipeline, tasks=tasks, workers=workers, logging_dir=str(logging_dir),
                                     depends=depends, job_name=f"build_mix_{logging_dir.name}", gpus_per_task=gpus_per_task,
                                     time=cluster.get("time", "24:00:00"), partition=cluster.get("partition"))
    if kind == "ray":
        from datatrove.executor import RayPipelineExecutor

        return RayPipelineExecutor(pipeline=pipeline, tasks=tasks, workers=workers, logging_dir=str(logging_dir),
                                   depends=depends, gpus_per_task=gpus_per_task, mem_per_cpu_gb=cluster.get("mem_per_cpu_gb", 2))
    raise ValueError(f"unknown executor {kind!r}; choose local, slurm or ray")


def stage_gpus(recipe: MixRecipe, stage: str) -> int:
    """GPUs a cluster's task of ``stage`` asks for: one for the clean stage's PHI model unless it runs on the CPU
    (``phi_model.device: cpu``); none otherwise, so that the other stages hold none."""
    return int(stage == "clean" and recipe.phi_model is not None and recipe.phi_model.device != "cpu")


def completed(logging_dir: Path, tasks: int) -> bool:
    done = logging_dir / "completions"
    return done.is_dir() and len(list(done.iterdir())) >= tasks


def started_tasks(logging_dir: Path, tasks: int) -> int:
    """The task count a build started with: outputs, completion markers and the duplicates found in dedup
    signatures are per rank, so a resumed build keeps it whatever ``--workers`` says now (that sets only how
    many tasks run at once)."""
    executor = logging_dir / "executor.json"
    return json.loads(executor.read_text())["world_size"] if executor.is_file() else tasks


def input_files(paths: list[str]) -> dict[str, list[int]]:
    """Each input file's size and modification time, for :func:`check_settings`: files are split over the tasks by
    their place in the list, so a file added, removed or rewritten between a killed run and its resumption would
    leave some unread and others read twice."""
    return {str(Path(p).resolve()): [st.st_size, st.st_mtime_ns] for p in paths for st in (Path(p).stat(),)}


def _changed(key: str, before, now) -> str:
    """``key``, and for a mapping (such as the input files) its first entries added, removed or changed."""
    if not (isinstance(before, dict) and isinstance(now, dict)):
        return key
    diff = {"added": now.keys() - before.keys(), "removed": before.keys() - now.keys(),
            "changed": {k for k in now.keys() & before.keys() if now[k] != before[k]}}
    parts = [f"{what} {', '.join(sorted(names)[:3])}" + (f" and {len(names) - 3} more" if len(names) > 3 else "")
             for what, names in diff.items() if names]
    return f"{key} ({'; '.join(parts)})"


def check_settings(path: Path, settings: dict) -> None:
    """Resuming reuses finished work, so it must be the same work: refuse outputs made with other settings or
    input files, then record these in ``path``."""
    settings = json.loads(json.dumps(settings))  # as the file holds them (lists, not tuples)
    if path.is_file():
        before = json.loads(path.read_text())
        changed = [_changed(k, before.get(k), settings.get(k))
                   for k in sorted(set(before) | set(settings)) if before.get(k) != settings.get(k)]
        if changed:
            raise BuildError(f"{path.parent} was built with other settings or inputs ({', '.join(changed)} changed); "
                             "rerun with --clean (or another output_dir)")
    write_json_atomic(path, settings)


# how the enrichment reaches its model, not what it asks it: a resumed build may change them
LLM_CONNECTION = ("base_url", "api_key_env", "concurrency", "timeout", "retries", "cache_dir", "batch_size",
                  "tensor_parallel", "gpu_memory_utilization")


def check_recipe(recipe: MixRecipe) -> list:
    """A rerun resumes (or returns) the build its output_dir holds: a changed source, filter, split or input file
    would apply to none or part of the data, so it stops instead. Recorded in ``recipe.resolved.json``.
    Returns the sources' files it recorded, (source, path) pairs: the build reads these, not the folders again
    (a file created in between would be read but not recorded). A csv file without the source's text column
    stops it too: every row would be quarantined."""
    from preprocessing.phi import redact_phi
    from preprocessing.steps import MixReader, csv_header

    files = recipe.source_files()
    for source, path in files:  # a wrong text_key is the recipe's error, not every row's
        if source.format == "csv" and (header := csv_header(path)) is not None and source.text_key not in header:
            # a guarded file without a header row would show a note's fields here and in the log: redacted (in a
            # window long enough that no name is cut before it is found, as for the quarantine's excerpts)
            named = ", ".join((redact_phi(name[:1000]) if source.phi_guard else name)[:40] for name in header[:30])
            raise BuildError(f"source {source.name}: {path} has no column {source.text_key!r} (its header: {named}): "
                             "set the source's text_key, or add a header row naming the columns")
    settings = {**asdict(recipe), "base_dir": str(Path(recipe.base_dir).resolve()),  # the config by any path
                "input_files": input_files([path for _, path in files]), "read_sharding": MixReader.SHARDING}
    if recipe.llm:
        settings["llm"] = {k: v for k, v in settings["llm"].items() if k not in LLM_CONNECTION}
    if recipe.phi_model_spec:  # another model in the same folder would guard part of the notes
        settings["phi_model_files"] = input_files([str(p) for p in sorted(Path(recipe.phi_model_spec.path).rglob("*"))
                                                   if p.is_file()])
    check_settings(recipe.out / "recipe.resolved.json", settings)
    return files


def built(out: Path, result: str) -> dict | None:
    """``out/result`` of a finished build (its ``work/`` removed after the merge), or None: the build is to run or
    resume. A removal of ``work/`` that was killed half-way is finished first (see :func:`remove_work`)."""
    shutil.rmtree(out / "work.removing", ignore_errors=True)
    if (out / result).is_file() and not (out / "work").exists():
        log.info("%s is built (its work/ was removed after the merge); --clean rebuilds it", out)
        return json.loads((out / result).read_text())
    return None


def remove_work(out: Path) -> None:
    """Remove ``work/``, the per-worker copies of every token, once the merged outputs are written. Renamed first:
    a removal killed half-way must not leave a ``work/`` that a rerun would merge again."""
    os.replace(out / "work", out / "work.removing")
    shutil.rmtree(out / "work.removing")


SLURM_JOBS = "slurm_jobs.json"  # under output_dir/logs: the stage jobs the last submission queued


def _stop_if_jobs_still_queued(out: Path) -> None:
    """The command that submits the Slurm jobs ends at once, and its hold on ``out`` with it: a rerun before they end
    (to see whether they have) submitted the unfinished stages again, a second chain writing the same files as the
    first. Stop instead while a job of the last submission is queued or running (``squeue``)."""
    import subprocess

    path = out / "logs" / SLURM_JOBS
    if not path.is_file():
        return
    jobs = json.loads(path.read_text())
    if not jobs:
        return
    try:
        listed = subprocess.run(["squeue", "--noheader", "--format=%i %r", f"--jobs={','.join(jobs)}"],
                                capture_output=True, text=True, timeout=60).stdout.splitlines()
    except (OSError, subprocess.TimeoutExpired) as err:
        log.warning("cannot ask Slurm whether the jobs %s submitted for %s still run (%s): if they do, stop them "
                    "(scancel) or this build and theirs write the same files", ", ".join(jobs), out, err)
        return
    # a job after one that failed waits for ever (DependencyNeverSatisfied) where Slurm does not cancel it: it will not run
    live = [entry.split()[0].split("_")[0] for entry in listed if entry.strip() and "DependencyNeverSatisfied" not in entry]
    queued = [job for job in jobs if job in live]
    if queued:
        raise BuildError(f"{out}: its Slurm jobs {', '.join(queued)} (submitted by the last run) are still queued or "
                         "running; rerun the same command when they have finished (or scancel them first)")


def run_stages(recipe: MixRecipe, workers: int = 1, executor: str = "local", until: str | None = None, **cluster) -> bool:
    """Run (or resume) the stages in order, through ``until`` (default: all). True when they are all complete;
    False when Slurm jobs were submitted and are still to finish (rerun the same command then)."""
    out = recipe.out
    out.mkdir(parents=True, exist_ok=True)
    files = check_recipe(recipe)
    tasks = started_tasks(out / "logs" / "clean", max(1, workers))
    todo = stages(recipe, tasks, files)
    if until is not None:
        names = [name for name, _, _ in todo]
        if until not in names:
            raise ValueError(f"no stage {until!r} in {names}")
        todo = todo[: names.index(until) + 1]
    if recipe.llm and recipe.llm.backend == "openai" and any(
            name == "enrich" and not completed(out / "logs" / name, n) for name, _, n in todo):
        recipe.llm.api_key()  # no key: stop now, naming the variable, not after hours of dedup
    _stop_if_jobs_still_queued(out)
    previous, chain = None, []
    for i, (name, pipeline, n) in enumerate(todo):
        logging_dir = out / "logs" / name
        if completed(logging_dir, n):
            log.info("stage %s: already complete", name)
        else:
            log.info("stage %s: %d tasks", name, n)
            previous = make_executor(executor, pipeline, n, workers, logging_dir, depends=previous,
                                     gpus_per_task=stage_gpus(recipe, name), **cluster)
            if executor == "slurm":  # jobs are chained; the next stage's job checks this one's survivors
                chain.append(previous)
                continue
            previous.run()  # local and Ray run a stage to the end here
            previous = None
            if not completed(logging_dir, n):
                raise BuildError(f"stage {name} did not complete; see {logging_dir}/logs (rerun to resume)")
        if name in FILTERING:
            check_survivors(recipe, [x for x, _, _ in todo[: i + 1]])
    if executor == "slurm" and not all(completed(out / "logs" / n, t) for n, _, t in todo):
        if previous is not None:
            previous.run()  # submits the chain of jobs
            write_json_atomic(out / "logs" / SLURM_JOBS, [str(e.job_id) for e in chain if e.job_id not in (None, -1)])
        print("cluster jobs submitted; rerun the same command when they have finished to merge and report")
        return False
    (out / "logs" / SLURM_JOBS).unlink(missing_ok=True)  # all done: no job of this build to ask Slurm about again
    return True


def add_executor_args(p: argparse.ArgumentParser) -> None:
    """The command-line options that choose how stages run (shared by the commands built on these stages)."""
    p.add_argument("--workers", type=positive_int, default=1, help="parallel tasks per stage (a resumed build keeps the task count it started with)")
    p.add_argument("--executor", default="local", choices=["local", "slurm", "ray"])
    p.add_argument("--partition", help="Slurm partition")
    p.add_argument("--time", default="24:00:00", help="Slurm time limit per task")


def load_recipe(load, path: str, **overrides):
    """``load(path)``, a bad or missing recipe ending the command with one line (there is no log file yet)."""
    try:
        return load(path, **overrides)
    except (OSError, ValueError, TypeError, yaml.YAMLError) as err:
        raise SystemExit(about(path, err)) from None


@contextmanager
def build_command(out: Path, name: str, verbose: bool, clean: bool = False):
    """What a build command runs in: ``out`` held by it alone (another build into it stops at once, naming the
    first: ``enrich_data`` and ``build_mix`` share one), emptied first with ``clean``, its log ``out/<name>.log``,
    errors of the user's input as one line (:func:`one_line_errors`)."""
    with ExitStack() as stack:
        try:
            stack.enter_context(hold_directory(out, "build"))
        except DirectoryInUse as err:
            raise SystemExit(f"error: {err}") from None
        if clean:
            try:  # jobs still queued would write the old build's files and completion markers into the new one
                _stop_if_jobs_still_queued(out)
            except BuildError as err:
                raise SystemExit(f"error: {err}") from None
            clear_directory(out)
        stack.enter_context(one_line_errors(logs.setup(out / f"{name}.log", verbose, fallbacks=False)))
        yield


@contextmanager
def one_line_errors(log_file: Path):
    """Errors of the user's input (a stopped build, changed settings, a missing file, no API key) end the
    command with one line; their traceback goes to ``log_file`` only. Any other error keeps its traceback."""
    try:
        yield
    except (BuildError, FileNotFoundError, LLMError) as err:
        with open(log_file, "a") as f:
            traceback.print_exc(file=f)
        raise SystemExit(f"error: {err}") from None
