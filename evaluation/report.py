"""One markdown report from the three evaluations, with PNG plots.

    python -m evaluation.report [--results results/] [--out results/report.md]

Reads whichever of ``perplexity.json`` (evaluation.perplexity), ``mtp.json`` (evaluation.mtp),
``lm_eval.json`` (evaluation.eval_qwen) and ``judge.json`` (evaluation.eval_reasoning_judge) exist in ``--results`` and writes their tables and
plots side by side; a missing one is named in the report.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def bar_chart(groups: list[str], series: dict[str, list[float]], ylabel: str, title: str,
              errors: dict[str, list[float]] | None = None, log: bool = False):
    """Grouped bars. ``log``: a log axis with each bar's value written on it, for quantities that differ by
    orders of magnitude between models (a base perplexity of 2,000 beside 2 after CPT)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(groups)), 4))
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        xs = [x + i * width for x in range(len(groups))]
        bars = ax.bar(xs, values, width, label=name, yerr=(errors or {}).get(name), capsize=3)
        if log:
            ax.bar_label(bars, fmt="{:,.1f}", fontsize="small")
    if log:
        ax.set_yscale("log")
        ax.set_ylim(min(min(v) for v in series.values()) / 2, max(max(v) for v in series.values()) * 3)  # room for labels
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(groups))], groups, rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize="small")
    fig.tight_layout()
    plt.close(fig)
    return fig


RESULT_FILES = ("perplexity.json", "mtp.json", "lm_eval.json", "judge.json")


def build(results: Path, out: Path) -> str:
    from evaluation import eval_qwen, eval_reasoning_judge, mtp, perplexity
    from preprocessing.atomic import write_atomic

    out.parent.mkdir(parents=True, exist_ok=True)
    lines = ["# Evaluation report", ""]
    ppl_file, lm_file, judge_file = (results / f for f in ("perplexity.json", "lm_eval.json", "judge.json"))

    lines += ["## Domain perplexity", ""]
    if ppl_file.is_file():
        report = json.loads(ppl_file.read_text())
        lines += [perplexity.to_markdown(report), "![perplexity](report_perplexity.png)", ""]
        domains = list(report["results"])
        bar_chart(domains, {m: [report["results"][d][m]["ppl"] for d in domains] for m in report["models"]},
                  "perplexity (log scale, lower is better)", "Domain perplexity", log=True
                  ).savefig(out.parent / "report_perplexity.png", dpi=100)
    else:
        lines += [f"(no {ppl_file.name})", ""]

    mtp_file = results / "mtp.json"
    lines += ["## MTP head: next-next-token accuracy", ""]
    if mtp_file.is_file():
        lines += ["Top-1 accuracy of the MTP head (what speculative decoding drafts) on held-out text; the head is "
                  "not trained by CPT (frozen, copied from the base), so a drop measures how far the trunk moved.", "",
                  mtp.to_markdown(json.loads(mtp_file.read_text())), ""]
    else:
        lines += [f"(no {mtp_file.name})", ""]

    lines += ["## Benchmarks (lm-evaluation-harness, accuracy %)", ""]
    if lm_file.is_file():
        report = json.loads(lm_file.read_text())
        delta = tuple(report["delta"]) if report.get("delta") else None
        lines += [eval_qwen.to_markdown(report, delta), "![benchmarks](report_benchmarks.png)", ""]
        tasks = list(report["results"])
        bar_chart(tasks, {m: [100 * report["results"][t][m]["acc"] for t in tasks] for m in report["models"]},
                  "accuracy %", "Benchmarks",
                  {m: [100 * (report["results"][t][m]["acc_stderr"] or 0) for t in tasks] for m in report["models"]}
                  ).savefig(out.parent / "report_benchmarks.png", dpi=100)
    else:
        lines += [f"(no {lm_file.name})", ""]

    lines += ["## Blind pairwise reasoning judge", ""]
    if judge_file.is_file():
        report = json.loads(judge_file.read_text())
        first, second = list(report["models"])
        lines += [f"Judge: {report['judge_model']} (prompt {report['prompt_version']}, seed {report['seed']}).", "",
                  eval_reasoning_judge.to_markdown(report, first, second), "![judge](report_judge.png)", ""]
        scores = report["scores"]
        criteria = [c for c in scores[first] if scores[first][c]]
        bar_chart(criteria, {m: [scores[m][c][0] for c in criteria] for m in (first, second)}, "mean score (1-5)",
                  "Judge scores, 95% CI", {m: [[scores[m][c][0] - scores[m][c][1] for c in criteria],
                                               [scores[m][c][2] - scores[m][c][0] for c in criteria]] for m in (first, second)}
                  ).savefig(out.parent / "report_judge.png", dpi=100)
    else:
        lines += [f"(no {judge_file.name})", ""]
    text = "\n".join(lines)
    write_atomic(out, text)
    return text


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, default=Path("results"))
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if not args.results.is_dir():  # a mistyped path would otherwise get an empty report, created there
        p.error(f"--results {args.results}: no such directory")
    if not any((args.results / f).is_file() for f in RESULT_FILES):
        p.error(f"--results {args.results}: holds none of {', '.join(RESULT_FILES)}")
    print(build(args.results, args.out or args.results / "report.md"))


if __name__ == "__main__":
    main()
