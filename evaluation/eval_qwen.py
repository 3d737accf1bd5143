"""lm-evaluation-harness on the card's benchmarks, offline, with the card's table.

    python -m evaluation.eval_qwen --model base_sft=DIR --model cpt_sft=DIR --suite medical|general|all \\
        --data-dir benchmarks/ [--delta cpt_sft-base_sft] [--backend hf|vllm] [--num-fewshot 0] [--limit N]

Runs ``lm_eval.simple_evaluate`` with each task's own lm-eval configuration (prompt, choices, metric),
except that its dataset is read from local files instead of the Hugging Face hub:

    DATA_DIR/<task name>/<split>.jsonl     e.g. benchmarks/pubmedqa/test.jsonl, benchmarks/mmlu_anatomy/dev.jsonl

one JSON object per line, with the fields of the hub dataset the task names (``bigbio/pubmed_qa``
``pubmed_qa_labeled_fold0_source`` for pubmedqa, ``cais/mmlu`` for the mmlu_* tasks, ``Rowan/hellaswag``,
``allenai/ai2_arc`` ARC-Challenge, ``winogrande`` winogrande_xl, ``super_glue`` boolq); the splits are the
ones the task uses (its test or validation split, and the few-shot split when ``--num-fewshot`` > 0).
Hub access is switched off (HF_HUB_OFFLINE, HF_DATASETS_OFFLINE). Writes ``<out>.json`` and ``<out>.md``.
With several models, each is evaluated in its own process (this command with one ``--model``) and the
results are merged: a vLLM engine keeps its GPU memory until its process ends.

Resumable: each (model, task) result is kept in ``--units`` (default ``<out>.units.json``) as it finishes, keyed by
the checkpoint's and the task's data files' paths, sizes and modification times, the task, ``--num-fewshot``,
``--limit``, backend, dtype and lm-eval's version. A rerun skips what is finished (a model with nothing left is not
loaded). A model that fails is named; the other models are still evaluated, and their results are kept.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

from evaluation.common import (FinishedUnits, ModelFailed, device_and_dtype, fingerprint, load_hf_model, named_paths,
                               stopped, write_report)
from preprocessing.atomic import die_with
from preprocessing.cli import positive_int
from preprocessing.llm import cache_key

MEDICAL = ["pubmedqa", "mmlu_clinical_knowledge", "mmlu_anatomy", "mmlu_college_medicine", "mmlu_professional_medicine",
           "mmlu_medical_genetics", "mmlu_college_biology", "mmlu_virology", "mmlu_nutrition"]
GENERAL = ["hellaswag", "arc_challenge", "winogrande", "boolq"]
SUITES = {"medical": MEDICAL, "general": GENERAL, "all": MEDICAL + GENERAL}
SPLIT_KEYS = ("training_split", "validation_split", "test_split", "fewshot_split")


TASK_YAMLS = "NEUROCPT_EVAL_QWEN_TASK_YAMLS"  # the tasks' files, handed by run_each_in_own_process to each process


@functools.cache
def task_yamls() -> dict[str, str]:
    """Each lm-eval task's YAML file, from lm-eval's index of its task files, built once per command (a per-model
    process is handed its parent's): indexing those 14,000 files took 9-19 s each time on a 2-core machine."""
    if TASK_YAMLS in os.environ:
        return json.loads(os.environ[TASK_YAMLS])
    from lm_eval.tasks import TaskManager

    return {name: str(entry.yaml_path) for name, entry in TaskManager().task_index.items() if entry.yaml_path}


def local_task_config(task: str, data_dir: Path, num_fewshot: int) -> dict:
    """The task's own lm-eval config with its dataset replaced by ``data_dir/<task>/<split>.jsonl``."""
    from lm_eval.tasks._yaml_loader import load_yaml

    if task not in task_yamls():
        raise KeyError(f"lm-eval has no task {task!r}")
    cfg = load_yaml(task_yamls()[task], resolve_func=True)
    cfg.pop("include", None)
    eval_split = cfg.get("test_split") or cfg.get("validation_split")
    needed = {eval_split}
    if num_fewshot:
        needed.add(cfg.get("fewshot_split") or cfg.get("training_split") or cfg.get("validation_split"))
    files = {}
    for split in sorted(s for s in needed if s):
        path = data_dir / task / f"{split}.jsonl"
        if not path.is_file():
            missing = FileNotFoundError(f"{path}: missing local copy of {task}'s {split} split (see --help for the layout)")
            missing.filename = str(path)
            raise missing
        files[split] = str(path)
    for key in SPLIT_KEYS:  # splits without a local file are not used
        if cfg.get(key) and cfg[key] not in files:
            cfg[key] = None
    cfg.update(task=task, dataset_path="json", dataset_name=None, dataset_kwargs={"data_files": files})
    return cfg


def task_result(out: dict, task: str) -> dict:
    """The table's numbers of one task from ``lm_eval.simple_evaluate``'s output."""
    r = out["results"][task]
    return {"acc": r["acc,none"], "acc_stderr": r.get("acc_stderr,none"), "acc_norm": r.get("acc_norm,none"),
            "acc_norm_stderr": r.get("acc_norm_stderr,none"), "samples": out["n-samples"][task]["effective"]}


def hf_lm(model_dir: str | Path, device: str, dtype, batch_size: int | str):
    """lm-eval's HF model around the checkpoint loaded as its config names it (:func:`load_hf_model`). lm-eval's own
    loading takes ``AutoModelForCausalLM``, which builds a multimodal Qwen3.5 checkpoint as ``Qwen3_5ForCausalLM``
    from ``text_config`` alone: a config tied by its top-level flag only (transformers' multimodal class needs no
    more; the releases set both) gets ``text_config``'s untied default, its ``lm_head`` missing from the checkpoint
    and initialised at random, so every score is noise that changes from run to run."""
    from lm_eval.models.huggingface import HFLM

    model, tok = load_hf_model(model_dir, device, dtype)
    return HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size)


def unit_keys(model_dir: str | Path, configs: dict[str, dict], backend: str, dtype, num_fewshot: int,
              limit: int | None) -> dict[str, str]:
    """Each task's key among the finished units: everything its result depends on."""
    import lm_eval

    model_id = fingerprint(model_dir)
    # "own class": results of lm-eval's own loading (random head for a tied release, see hf_lm) are not reused
    return {t: cache_key("lm-eval", "own class", lm_eval.__version__, t,
                         [fingerprint(f) for f in c["dataset_kwargs"]["data_files"].values()], model_id, backend,
                         str(dtype), num_fewshot, limit) for t, c in configs.items()}


def left_to_do(keys: dict[str, str], units: FinishedUnits) -> list[str]:
    return [task for task, key in keys.items() if units.get(key) is None]


def run(models: dict[str, str], tasks: list[str], data_dir: str | Path, backend: str = "hf", num_fewshot: int = 0,
        limit: int | None = None, batch_size: int | str = 8, device: str | None = None,
        units: FinishedUnits | None = None) -> dict:
    """The report; each (model, task) result is taken from ``units`` when finished before, else computed (the model
    loaded once for all its tasks) and put there as it finishes. Raises :class:`ModelFailed` naming the model."""
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    import lm_eval
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager

    device, dtype = device_and_dtype(device)
    units = units or FinishedUnits(None)
    configs = {t: local_task_config(t, Path(data_dir), num_fewshot) for t in tasks}
    # the configs are whole: simple_evaluate needs no index of lm-eval's task files (it would build one each call)
    no_index = TaskManager(include_defaults=False)
    results: dict[str, dict[str, dict]] = {}
    for name, model_dir in models.items():
        keys = unit_keys(model_dir, configs, backend, dtype, num_fewshot, limit)
        todo = left_to_do(keys, units)
        if len(todo) < len(tasks):
            print(f"{name}: {len(tasks) - len(todo)} of {len(tasks)} tasks finished before, kept")
        if todo:
            try:
                if backend == "hf":
                    lm = hf_lm(model_dir, device, dtype, batch_size)
                else:  # vLLM builds the model its config's architectures name
                    lm = get_model(backend).create_from_arg_string(
                        f"pretrained={model_dir},dtype={str(dtype).removeprefix('torch.')}", {"batch_size": batch_size})
                for task in todo:
                    out = lm_eval.simple_evaluate(model=lm, tasks=[dict(configs[task])], num_fewshot=num_fewshot,
                                                  limit=limit, task_manager=no_index)
                    units.put(keys[task], task_result(out, task))
            except Exception as err:
                raise ModelFailed(f"model {name} ({model_dir}): {type(err).__name__}: {err}") from err
        for task in tasks:
            results.setdefault(task, {})[name] = units.get(keys[task])
    return {"models": models, "tasks": tasks, "num_fewshot": num_fewshot, "limit": limit, "results": results}


PARENT = "NEUROCPT_EVAL_QWEN_PARENT"  # the pid a per-model process ends with (preprocessing.atomic.die_with)


def run_each_in_own_process(models: dict[str, str], tasks: list[str], args: argparse.Namespace) -> dict:
    """:func:`run` for every model with tasks left in a child process of this command, the reports merged in model
    order. The children share ``args.units``; a failing child is named after the others have run."""
    configs = {t: local_task_config(t, Path(args.data_dir), args.num_fewshot) for t in tasks}
    dtype = device_and_dtype(args.device)[1]
    finished = FinishedUnits(args.units)
    env = {**os.environ, PARENT: str(os.getpid()), TASK_YAMLS: json.dumps({t: task_yamls()[t] for t in tasks})}
    merged = {"models": models, "tasks": tasks, "num_fewshot": args.num_fewshot, "limit": args.limit, "results": {}}
    failed = []
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=Path(args.out).parent, prefix=".eval_qwen-") as tmp:
        for i, (name, model_dir) in enumerate(models.items()):
            keys = unit_keys(model_dir, configs, args.backend, dtype, args.num_fewshot, args.limit)
            if not left_to_do(keys, finished):  # no process: it would only start, import and read these
                print(f"{name}: all {len(tasks)} tasks finished before, kept (the model is not loaded)")
                for task in tasks:
                    merged["results"].setdefault(task, {})[name] = finished.get(keys[task])
                continue
            out = Path(tmp) / str(i)
            cmd = [sys.executable, "-m", "evaluation.eval_qwen", "--model", f"{name}={model_dir}", "--tasks", ",".join(tasks),
                   "--data-dir", str(args.data_dir), "--backend", args.backend, "--num-fewshot", str(args.num_fewshot),
                   "--batch-size", args.batch_size, "--units", str(args.units), "--out", str(out)]
            if args.limit is not None:
                cmd += ["--limit", str(args.limit)]
            if args.device:
                cmd += ["--device", args.device]
            if subprocess.run(cmd, env=env).returncode:  # ends with this process
                failed.append(f"{name} ({model_dir})")
                continue
            for task, per_model in json.loads(out.with_suffix(".json").read_text())["results"].items():
                merged["results"].setdefault(task, {}).update(per_model)
    if failed:
        raise stopped(args.out, f"lm-eval of model {', '.join(failed)} failed (its output is above). The other models' "
                      f"results are kept in {args.units}; rerun the same command to evaluate only what is left.")
    return merged


def to_markdown(report: dict, delta: tuple[str, str] | None = None) -> str:
    """The card's layout: one row per benchmark, accuracy ± stderr per model, a Medical Average row, and
    a delta column (first minus second of ``delta``)."""
    names = list(report["models"])
    head = "| Benchmark | " + " | ".join(names) + (f" | Δ {delta[0]} − {delta[1]} |" if delta else " |")
    lines = [head, "|---" * (len(names) + 1 + bool(delta)) + "|"]

    def row(label: str, values: dict[str, float], errs: dict[str, float | None]) -> str:
        cells = [f"{100 * values[n]:.1f}" + (f" ± {100 * errs[n]:.1f}" if errs.get(n) is not None else "") for n in names]
        if delta:
            cells.append(f"{100 * (values[delta[0]] - values[delta[1]]):+.1f}")
        return f"| {label} | " + " | ".join(cells) + " |"

    for task, per_model in report["results"].items():
        lines.append(row(task, {n: per_model[n]["acc"] for n in names}, {n: per_model[n]["acc_stderr"] for n in names}))
    medical = [t for t in report["results"] if t in MEDICAL]
    if medical:
        avg = {n: sum(report["results"][t][n]["acc"] for t in medical) / len(medical) for n in names}
        lines.append(row("**Medical Average**", avg, {}))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    child = bool(os.environ.get(PARENT))
    if child:  # a per-model process of run_each_in_own_process: it ends with the command
        die_with(int(os.environ.pop(PARENT)))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", required=True, help="name=HF directory")
    p.add_argument("--suite", choices=list(SUITES), default="all")
    p.add_argument("--tasks", help="comma-separated lm-eval task names instead of a suite")
    p.add_argument("--data-dir", required=True, help="local benchmark copies: DATA_DIR/<task>/<split>.jsonl")
    p.add_argument("--backend", choices=["hf", "vllm"], default="hf")
    p.add_argument("--num-fewshot", type=int, default=0)
    p.add_argument("--limit", type=positive_int, help="at most this many examples per task (default: all)")
    p.add_argument("--batch-size", default="8")
    p.add_argument("--device")
    p.add_argument("--delta", help="NAME_A-NAME_B: add a column A minus B")
    p.add_argument("--out", default="results/lm_eval", help="writes OUT.json and OUT.md")
    p.add_argument("--units", help="finished (model, task) results, kept for a rerun to skip (default: OUT.units.json)")
    args = p.parse_args(argv)
    args.units = args.units or str(Path(args.out).with_suffix(".units.json"))
    models = named_paths(args.model, "model")
    delta = None
    if args.delta:  # names may hold '-' themselves (base-sft-cpt-sft): the split where both halves are models
        splits = [(args.delta[:i], args.delta[i + 1:]) for i, c in enumerate(args.delta) if c == "-"]
        delta = next((d for d in splits if set(d) <= set(models)), None)
        if delta is None:
            raise SystemExit(f"--delta {args.delta}: expected NAME_A-NAME_B, both among --model {list(models)}")
    tasks = args.tasks.split(",") if args.tasks else SUITES[args.suite]
    unknown, missing = [], []  # all at once, before any model is loaded or process started
    for task in tasks:
        try:
            local_task_config(task, Path(args.data_dir), args.num_fewshot)
        except KeyError:
            unknown.append(task)
        except FileNotFoundError as err:
            missing.append(str(Path(err.filename).relative_to(args.data_dir)))
    if unknown:
        raise SystemExit(f"lm-eval has no task {', '.join(map(repr, unknown))}")
    if missing:
        raise SystemExit(f"--data-dir {args.data_dir} lacks the local copies {', '.join(missing)} (see --help for the layout)")
    batch = int(args.batch_size) if args.batch_size.isdigit() else args.batch_size
    if len(models) > 1:
        report = run_each_in_own_process(models, tasks, args)
    else:
        try:
            report = run(models, tasks, args.data_dir, args.backend, args.num_fewshot, args.limit, batch, args.device,
                         FinishedUnits(args.units))
        except ModelFailed as err:
            traceback.print_exc()
            raise stopped(args.out, f"lm-eval stopped: {err}\nFinished tasks are kept in {args.units}; rerun to resume.") from None
    report["delta"] = delta
    write_report(args.out, report, to_markdown(report, delta), echo=not child)  # a child's one-model table: not shown


if __name__ == "__main__":
    main()
