"""evaluation.report puts the three evaluations' tables and plots into one markdown file."""

from __future__ import annotations

import json

import pytest

from evaluation.report import bar_chart, build


def test_report_from_the_three_result_files(tmp_path, monkeypatch):
    from evaluation import report

    charts = []
    monkeypatch.setattr(report, "bar_chart", lambda *a, **k: charts.append((a, k)) or bar_chart(*a, **k))
    crit = ["diagnostic_reasoning", "clinical_knowledge", "management_quality", "reasoning_chain", "overall"]
    (tmp_path / "perplexity.json").write_text(json.dumps({"models": {"base": "a", "cpt": "b"}, "results": {
        "Patient EHR": {"base": {"ppl": 10.0, "improvement_vs_base": 0.0}, "cpt": {"ppl": 8.0, "improvement_vs_base": 0.2}}}}))
    (tmp_path / "lm_eval.json").write_text(json.dumps({"models": {"base": "a", "cpt": "b"}, "delta": ["cpt", "base"], "results": {
        "pubmedqa": {"base": {"acc": 0.6, "acc_stderr": 0.02}, "cpt": {"acc": 0.65, "acc_stderr": 0.02}},
        "medqa_4options": {"base": {"acc": 1.0, "acc_stderr": 0.0}, "cpt": {"acc": 1.0, "acc_stderr": 0.0}}}}))
    (tmp_path / "judge.json").write_text(json.dumps({
        "models": {"base": "a", "cpt": "b"}, "judge_model": "j", "prompt_version": "judge-v1", "seed": 0,
        "cpt_win_rate": [0.6, 0.5, 0.7], "cpt_wins": 6, "base_wins": 3, "ties": 1, "judged": 10, "failed": 0,
        "inconsistent_orders": 1, "usage": {"calls": 20, "cached": 0, "prompt_tokens": 100, "completion_tokens": 50},
        "cost_usd": 0.01, "scores": {"base": {c: [3.1, 2.8, 3.4] for c in crit}, "cpt": {c: [3.4, 3.2, 3.7] for c in crit}},
        "score_difference": {c: [0.3, 0.1, 0.5] for c in crit}}))
    text = build(tmp_path, tmp_path / "report.md")
    assert "| Patient EHR | 10.000 | 8.000 | +20.0% |" in text
    assert "| pubmedqa | 60.0 ± 2.0 | 65.0 ± 2.0 | +5.0 |" in text
    assert "| medqa_4options | 100.0 ± 0.0 | 100.0 ± 0.0 | +0.0 |" in text  # a zero stderr is printed, not dropped
    assert "| win rate (ties half) | 0.600 | [0.500, 0.700] |" in text and "| wins / ties / losses | 6 / 1 / 3 | |" in text
    # each arm's mean score with its CI, then the difference
    assert "| mean score (1-5) [95% CI] | base | cpt | Δ cpt − base |" in text
    assert "| diagnostic reasoning | 3.10 [2.80, 3.40] | 3.40 [3.20, 3.70] | +0.30 [+0.10, +0.50] |" in text
    (groups, series, *_), kwargs = charts[0]  # the perplexity chart: the report's numbers, on a log axis
    assert groups == ["Patient EHR"] and series == {"base": [10.0], "cpt": [8.0]} and kwargs.get("log") is True
    assert charts[1][0][1] == {"base": [60.0, 100.0], "cpt": [65.0, 100.0]}  # benchmarks, in %
    for png in ("report_perplexity.png", "report_benchmarks.png", "report_judge.png"):
        assert (tmp_path / png).stat().st_size > 3000


def test_perplexity_chart_has_a_log_axis_with_every_value_written():
    """Base 2,110 beside CPT 2.1: on a linear axis the CPT bars vanish; on a log axis both show, with values."""
    fig = bar_chart(["Patient EHR", "English"], {"base": [2110.4, 95.0], "cpt": [2.1, 60.25]}, "perplexity", "t", log=True)
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    assert sorted(t.get_text() for t in ax.texts) == sorted(["2,110.4", "95.0", "2.1", "60.2"])
    bottom, top = ax.get_ylim()
    assert bottom < 2.1 and top > 2110.4
    heights = sorted(p.get_height() for p in ax.patches)
    assert heights == pytest.approx([2.1, 60.25, 95.0, 2110.4])
    assert ax.transData.transform((0, 2.1))[1] - ax.transData.transform((0, bottom))[1] > 20  # the short bar is visible (px)
    assert bar_chart(["a"], {"m": [1.0]}, "y", "t").axes[0].get_yscale() == "linear"


def test_missing_results_are_named(tmp_path):
    text = build(tmp_path, tmp_path / "report.md")
    assert "(no perplexity.json)" in text and "(no lm_eval.json)" in text and "(no judge.json)" in text


def test_a_failed_write_keeps_the_old_result_whole(tmp_path):
    """A write that dies halfway (here: text the encoder refuses at its end) leaves the previous result, not a
    truncated file, and no temporary file beside it."""
    from evaluation.common import write_report
    from preprocessing.atomic import write_atomic

    out = tmp_path / "judge"
    write_report(out, {"win_rate": 0.6}, "| table |\n")
    with pytest.raises(UnicodeEncodeError):
        write_report(out, {"win_rate": 0.7}, "| new table |\n" + "x" * 100_000 + "\ud800")
    assert (tmp_path / "judge.md").read_text() == "| table |\n"
    assert json.loads((tmp_path / "judge.json").read_text()) == {"win_rate": 0.6}  # not a new JSON beside the old table
    with pytest.raises(UnicodeEncodeError):
        write_atomic(tmp_path / "judge.jsonl", '{"id": 1}\n' + "\ud800")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["judge.json", "judge.md"]


def test_a_mistyped_results_directory_is_refused_not_reported_empty(tmp_path, capsys):
    from evaluation import report

    with pytest.raises(SystemExit):
        report.main(["--results", str(tmp_path / "reslts")])
    assert "no such directory" in capsys.readouterr().err
    assert not (tmp_path / "reslts").exists()
    with pytest.raises(SystemExit):  # a directory with none of the evaluations' files
        report.main(["--results", str(tmp_path)])
    assert "holds none of perplexity.json" in capsys.readouterr().err
    assert not (tmp_path / "report.md").exists()
