"""evaluation.report puts the three evaluations' tables and plots into one markdown file."""

from __future__ import annotations

import json

from evaluation.report import build


def test_report_from_the_three_result_files(tmp_path):
    crit = ["diagnostic_reasoning", "clinical_knowledge", "management_quality", "reasoning_chain", "overall"]
    (tmp_path / "perplexity.json").write_text(json.dumps({"models": {"base": "a", "cpt": "b"}, "results": {
        "Patient EHR": {"base": {"ppl": 10.0, "improvement_vs_base": 0.0}, "cpt": {"ppl": 8.0, "improvement_vs_base": 0.2}}}}))
    (tmp_path / "lm_eval.json").write_text(json.dumps({"models": {"base": "a", "cpt": "b"}, "delta": ["cpt", "base"], "results": {
        "pubmedqa": {"base": {"acc": 0.6, "acc_stderr": 0.02}, "cpt": {"acc": 0.65, "acc_stderr": 0.02}}}}))
    (tmp_path / "judge.json").write_text(json.dumps({
        "models": {"base": "a", "cpt": "b"}, "judge_model": "j", "prompt_version": "judge-v1", "seed": 0,
        "cpt_win_rate": [0.6, 0.5, 0.7], "cpt_wins": 6, "base_wins": 3, "ties": 1, "judged": 10, "failed": 0,
        "inconsistent_orders": 1, "usage": {"calls": 20, "cached": 0, "prompt_tokens": 100, "completion_tokens": 50},
        "cost_usd": 0.01, "score_difference": {c: [0.3, 0.1, 0.5] for c in crit}}))
    text = build(tmp_path, tmp_path / "report.md")
    assert "| Patient EHR | 10.000 | 8.000 | +20.0% |" in text
    assert "| pubmedqa | 60.0 ± 2.0 | 65.0 ± 2.0 | +5.0 |" in text
    assert "| win rate (ties half) | 0.600 | [0.500, 0.700] |" in text
    for png in ("report_perplexity.png", "report_benchmarks.png", "report_judge.png"):
        assert (tmp_path / png).stat().st_size > 3000


def test_missing_results_are_named(tmp_path):
    text = build(tmp_path, tmp_path / "report.md")
    assert "(no perplexity.json)" in text and "(no lm_eval.json)" in text and "(no judge.json)" in text
