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
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from evaluation.common import named_paths, write_report

MEDICAL = ["pubmedqa", "mmlu_clinical_knowledge", "mmlu_anatomy", "mmlu_college_medicine", "mmlu_professional_medicine",
           "mmlu_medical_genetics", "mmlu_college_biology", "mmlu_virology", "mmlu_nutrition"]
GENERAL = ["hellaswag", "arc_challenge", "winogrande", "boolq"]
SUITES = {"medical": MEDICAL, "general": GENERAL, "all": MEDICAL + GENERAL}
SPLIT_KEYS = ("training_split", "validation_split", "test_split", "fewshot_split")


def local_task_config(task: str, data_dir: Path, num_fewshot: int) -> dict:
    """The task's own lm-eval config with its dataset replaced by ``data_dir/<task>/<split>.jsonl``."""
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = TaskManager().task_index.get(task)
    if entry is None or entry.yaml_path is None:
        raise KeyError(f"lm-eval has no task {task!r}")
    cfg = load_yaml(entry.yaml_path, resolve_func=True)
    cfg.pop("include", None)
    eval_split = cfg.get("test_split") or cfg.get("validation_split")
    needed = {eval_split}
    if num_fewshot:
        needed.add(cfg.get("fewshot_split") or cfg.get("training_split") or cfg.get("validation_split"))
    files = {}
    for split in sorted(s for s in needed if s):
        path = data_dir / task / f"{split}.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing local copy of {task}'s {split} split (see --help for the layout)")
        files[split] = str(path)
    for key in SPLIT_KEYS:  # splits without a local file are not used
        if cfg.get(key) and cfg[key] not in files:
            cfg[key] = None
    cfg.update(task=task, dataset_path="json", dataset_name=None, dataset_kwargs={"data_files": files})
    return cfg


def run(models: dict[str, str], tasks: list[str], data_dir: str | Path, backend: str = "hf", num_fewshot: int = 0,
        limit: int | None = None, batch_size: int | str = 8, device: str | None = None) -> dict:
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    import lm_eval
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    configs = [local_task_config(t, Path(data_dir), num_fewshot) for t in tasks]
    results: dict[str, dict[str, dict]] = {}
    for name, model_dir in models.items():
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
        out = lm_eval.simple_evaluate(
            model=backend, model_args=f"pretrained={model_dir},dtype={dtype}", tasks=[dict(c) for c in configs],
            num_fewshot=num_fewshot, limit=limit, batch_size=batch_size, device=device if backend == "hf" else None,
        )
        for task in tasks:
            r = out["results"][task]
            results.setdefault(task, {})[name] = {
                "acc": r["acc,none"], "acc_stderr": r.get("acc_stderr,none"),
                "acc_norm": r.get("acc_norm,none"), "acc_norm_stderr": r.get("acc_norm_stderr,none"),
                "samples": out["n-samples"][task]["effective"],
            }
    return {"models": models, "tasks": tasks, "num_fewshot": num_fewshot, "limit": limit, "results": results}


def run_each_in_own_process(models: dict[str, str], tasks: list[str], args: argparse.Namespace) -> dict:
    """:func:`run` for every model in a child process of this command, the reports merged in model order."""
    merged = {"models": models, "tasks": tasks, "num_fewshot": args.num_fewshot, "limit": args.limit, "results": {}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=Path(args.out).parent, prefix=".eval_qwen-") as tmp:
        for i, (name, model_dir) in enumerate(models.items()):
            out = Path(tmp) / str(i)
            cmd = [sys.executable, "-m", "evaluation.eval_qwen", "--model", f"{name}={model_dir}", "--tasks", ",".join(tasks),
                   "--data-dir", str(args.data_dir), "--backend", args.backend, "--num-fewshot", str(args.num_fewshot),
                   "--batch-size", args.batch_size, "--out", str(out)]
            if args.limit is not None:
                cmd += ["--limit", str(args.limit)]
            if args.device:
                cmd += ["--device", args.device]
            if subprocess.run(cmd).returncode:
                raise SystemExit(f"lm-eval of model {name} ({model_dir}) failed; its output is above")
            for task, per_model in json.loads(out.with_suffix(".json").read_text())["results"].items():
                merged["results"].setdefault(task, {}).update(per_model)
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
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", required=True, help="name=HF directory")
    p.add_argument("--suite", choices=list(SUITES), default="all")
    p.add_argument("--tasks", help="comma-separated lm-eval task names instead of a suite")
    p.add_argument("--data-dir", required=True, help="local benchmark copies: DATA_DIR/<task>/<split>.jsonl")
    p.add_argument("--backend", choices=["hf", "vllm"], default="hf")
    p.add_argument("--num-fewshot", type=int, default=0)
    p.add_argument("--limit", type=int)
    p.add_argument("--batch-size", default="8")
    p.add_argument("--device")
    p.add_argument("--delta", help="NAME_A-NAME_B: add a column A minus B")
    p.add_argument("--out", default="results/lm_eval")
    args = p.parse_args(argv)
    models = named_paths(args.model, "model")
    delta = None
    if args.delta:  # names may hold '-' themselves (base-sft-cpt-sft): the split where both halves are models
        splits = [(args.delta[:i], args.delta[i + 1:]) for i, c in enumerate(args.delta) if c == "-"]
        delta = next((d for d in splits if set(d) <= set(models)), None)
        if delta is None:
            raise SystemExit(f"--delta {args.delta}: expected NAME_A-NAME_B, both among --model {list(models)}")
    tasks = args.tasks.split(",") if args.tasks else SUITES[args.suite]
    batch = int(args.batch_size) if args.batch_size.isdigit() else args.batch_size
    if len(models) > 1:
        report = run_each_in_own_process(models, tasks, args)
    else:
        report = run(models, tasks, args.data_dir, args.backend, args.num_fewshot, args.limit, batch, args.device)
    report["delta"] = delta
    write_report(args.out, report, to_markdown(report, delta))


if __name__ == "__main__":
    main()
