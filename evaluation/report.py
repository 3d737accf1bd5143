"""One markdown report from the three evaluations, with PNG plots.

    python -m evaluation.report [--results results/] [--out results/report.md]

Reads whichever of ``perplexity.json`` (evaluation.perplexity), ``lm_eval.json`` (evaluation.eval_qwen)
and ``judge.json`` (evaluation.eval_reasoning_judge) exist in ``--results`` and writes their tables and
plots side by side; a missing one is named in the report.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _plot_bars(path: Path, groups: list[str], series: dict[str, list[float]], ylabel: str, title: str,
               errors: dict[str, list[float]] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(groups)), 4))
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        xs = [x + i * width for x in range(len(groups))]
        ax.bar(xs, values, width, label=name, yerr=(errors or {}).get(name), capsize=3)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(groups))], groups, rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def build(results: Path, out: Path) -> str:
    from evaluation import eval_qwen, eval_reasoning_judge, perplexity

    out.parent.mkdir(parents=True, exist_ok=True)
    lines = ["# Evaluation report", ""]
    ppl_file, lm_file, judge_file = (results / f for f in ("perplexity.json", "lm_eval.json", "judge.json"))

    lines += ["## Domain perplexity", ""]
    if ppl_file.is_file():
        report = json.loads(ppl_file.read_text())
        lines += [perplexity.to_markdown(report), "![perplexity](report_perplexity.png)", ""]
        domains = list(report["results"])
        _plot_bars(out.parent / "report_perplexity.png", domains,
                   {m: [report["results"][d][m]["ppl"] for d in domains] for m in report["models"]},
                   "perplexity (lower is better)", "Domain perplexity")
    else:
        lines += [f"(no {ppl_file.name})", ""]

    lines += ["## Benchmarks (lm-evaluation-harness, accuracy %)", ""]
    if lm_file.is_file():
        report = json.loads(lm_file.read_text())
        delta = tuple(report["delta"]) if report.get("delta") else None
        lines += [eval_qwen.to_markdown(report, delta), "![benchmarks](report_benchmarks.png)", ""]
        tasks = list(report["results"])
        _plot_bars(out.parent / "report_benchmarks.png", tasks,
                   {m: [100 * report["results"][t][m]["acc"] for t in tasks] for m in report["models"]},
                   "accuracy %", "Benchmarks",
                   {m: [100 * (report["results"][t][m]["acc_stderr"] or 0) for t in tasks] for m in report["models"]})
    else:
        lines += [f"(no {lm_file.name})", ""]

    lines += ["## Blind pairwise reasoning judge", ""]
    if judge_file.is_file():
        report = json.loads(judge_file.read_text())
        first, second = list(report["models"])
        lines += [f"Judge: {report['judge_model']} (prompt {report['prompt_version']}, seed {report['seed']}).", "",
                  eval_reasoning_judge.to_markdown(report, first, second), "![judge](report_judge.png)", ""]
        criteria = [c for c, v in report["score_difference"].items() if v]
        means = [report["score_difference"][c][0] for c in criteria]
        err = [[m - report["score_difference"][c][1] for c, m in zip(criteria, means)],
               [report["score_difference"][c][2] - m for c, m in zip(criteria, means)]]
        _plot_bars(out.parent / "report_judge.png", criteria, {f"{second} − {first}": means},
                   "score difference (1-5 scale)", "Judge scores, 95% CI", {f"{second} − {first}": err})
    else:
        lines += [f"(no {judge_file.name})", ""]
    text = "\n".join(lines)
    out.write_text(text)
    return text


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, default=Path("results"))
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    print(build(args.results, args.out or args.results / "report.md"))


if __name__ == "__main__":
    main()
