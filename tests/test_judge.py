"""The reasoning judge against a real local OpenAI-protocol server through the real openai client: both
orders, seeded positions, malformed output retried then counted, HTTP 500 and timeouts, caching, and an
API key that never reaches an output file or log."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from conftest import tiny_hf_dir

from evaluation.eval_reasoning_judge import CRITERIA, bootstrap_ci, combine, sample, summarize, to_markdown, was_cut
from tools.openai_stub_server import StubServer
KEY = "sk-test-SECRET-9f8e7d"
CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("judge")
    for name, seed in (("base", 0), ("cpt", 1)):
        tiny_hf_dir(root / name, seed, chat_template=CHAT_TEMPLATE)
    med = [{"id": f"m{i}", "question": f"A 60-year-old with sudden aphasia case {i}{' MALFORMED-ALWAYS' if i == 0 else ''}",
            "opa": "Stroke", "opb": "Migraine", "opc": "Seizure", "opd": "Tumor", "cop": 0, "exp": "Sudden focal deficit."}
           for i in range(3)]
    pub = [{"pubid": f"p{i}", "QUESTION": f"Does early mobilisation help {i}?{' MALFORMED-ONCE' if i == 0 else ''}",
            "CONTEXTS": ["A trial of 300 patients."], "LONG_ANSWER": "It improved outcomes.", "final_decision": "yes"}
           for i in range(3)]
    mqa = [{"id": f"q{i}", "question": f"Best first-line drug for absence seizures {i}?{' SLOW' if i == 0 else ''}",
            "options": {"A": "Ethosuximide", "B": "Phenytoin"}, "answer": "Ethosuximide", "answer_idx": "A"} for i in range(3)]
    for name, rows in (("medmcqa", med), ("pubmedqa", pub), ("medqa", mqa)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _run(setup, server, out, seed=3, url=None, returncode=0):
    cmd = [sys.executable, "-m", "evaluation.eval_reasoning_judge", "--model", f"base={setup / 'base'}",
           "--model", f"cpt={setup / 'cpt'}", "--medmcqa", str(setup / "medmcqa.jsonl"), "--pubmedqa",
           str(setup / "pubmedqa.jsonl"), "--medqa", str(setup / "medqa.jsonl"), "--n", "9", "--seed", str(seed),
           "--judge-model", "judge-test", "--base-url", url or server.url, "--max-new-tokens", "6", "--retries", "2",
           "--timeout", "1", "--concurrency", "4", "--price-in", "2.5", "--price-out", "10", "--device", "cpu", "--out", str(out),
           "--chat-template-kwargs", '{"enable_thinking": false}']
    run = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OPENAI_API_KEY": KEY})
    assert run.returncode == returncode, run.stderr[-3000:]
    return run


class CountingServer(StubServer):
    """The stub, counting the most requests it was answering at once (SLOW ones aside: the client gives up on
    them and sends them again while the server still sleeps, which overlaps one request with itself)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.in_flight = self.most_in_flight = 0

    def respond(self, body, first_ever):
        if "SLOW" in body["messages"][-1]["content"]:
            return super().respond(body, first_ever)
        with self.lock:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            return super().respond(body, first_ever)
        finally:
            with self.lock:
                self.in_flight -= 1


def test_judge_end_to_end(setup, tmp_path):
    server = CountingServer(slow_seconds=3.0, fail_first=True, delay=0.2)
    try:
        run = _run(setup, server, tmp_path / "judge")
        calls_first = len(server.requests)
        first_summary = json.loads((tmp_path / "judge.json").read_text())
        rerun = _run(setup, server, tmp_path / "judge")
        calls_second = len(server.requests) - calls_first
    finally:
        server.close()
    rows = [json.loads(x) for x in (tmp_path / "judge.jsonl").read_text().splitlines()]
    summary = json.loads((tmp_path / "judge.json").read_text())
    assert len(rows) == 9 and {r["source"] for r in rows} == {"medmcqa", "pubmedqa", "medqa"}
    # both orders were requested: for every judged question, two prompts with A and B swapped
    prompts = [r["body"]["messages"][-1]["content"] for r in server.requests[1:calls_first]]
    needles = {"medmcqa": "aphasia case {}", "pubmedqa": "mobilisation help {}?", "medqa": "seizures {}?"}
    for row in rows:
        if row["orders_valid"] == 2:
            needle = needles[row["source"]].format(row["id"][-1])
            sides = {(p.split("Response A:\n")[1].split("\n\nResponse B:")[0], p.split("Response B:\n")[1].split("\n\nScore")[0])
                     for p in prompts if needle in p}
            assert len(sides) == 2 and {(b, a) for a, b in sides} == sides, row["id"]
    assert {r["first_order_A"] for r in rows} == {"base", "cpt"} and all(r["seed"] == 3 for r in rows)
    # failures: the always-malformed question and the one slower than the timeout are counted, not judged
    failed = {r["id"] for r in rows if r["verdict"] is None}
    assert failed == {"medmcqa/m0", "medqa/q0"}
    assert any("malformed judge output after 2 attempt" in e for r in rows if r["id"] == "medmcqa/m0" for e in r["errors"])
    assert any("request failed" in e for r in rows if r["id"] == "medqa/q0" for e in r["errors"])
    once = next(r for r in rows if r["id"] == "pubmedqa/p0")
    assert once["verdict"] is not None  # malformed once, then retried successfully
    assert summary["failed"] == 2 and summary["judged"] == 7
    assert first_summary["usage"]["malformed"] == 2 * 2 + 2  # always: 2 orders x 2 attempts; once: 1 per order
    assert first_summary["cost_usd"] > 0 and first_summary["usage"]["prompt_tokens"] > 0
    assert summary["usage"]["cached"] > 0 and summary["cpt_win_rate"] == first_summary["cpt_win_rate"]
    # the rerun made no successful call, yet reports what the judgements it used cost: the first run's calls
    assert summary["usage"]["calls"] == 0 and summary["cost_usd_this_run"] == 0
    assert summary["cost_usd"] == pytest.approx(first_summary["cost_usd"])
    assert summary["usage"]["cached_prompt_tokens"] == first_summary["usage"]["prompt_tokens"]
    assert summary["usage"]["cached_calls"] == first_summary["usage"]["calls"]  # malformed attempts included
    lo_hi = summary["cpt_win_rate"]
    assert lo_hi[1] <= lo_hi[0] <= lo_hi[2]
    for c, diff in summary["score_difference"].items():  # each arm's mean (1-5) over the same questions as the difference
        base, cpt = summary["scores"]["base"][c], summary["scores"]["cpt"][c]
        assert 1 <= base[1] <= base[0] <= base[2] <= 5 and 1 <= cpt[1] <= cpt[0] <= cpt[2] <= 5
        assert diff[0] == pytest.approx(cpt[0] - base[0])
    # the rerun judged nothing new except the timed-out question (transport failures are not cached)
    assert calls_second > 0
    assert all("SLOW" in r["body"]["messages"][-1]["content"] for r in server.requests[calls_first:])
    # the chat template's arguments reached the server with every request (a Qwen3 judge behind vllm serve)
    assert all(r["body"]["chat_template_kwargs"] == {"enable_thinking": False} for r in server.requests)
    # the key was sent to the server, and is nowhere in outputs or logs
    assert all(r["auth"] == f"Bearer {KEY}" for r in server.requests)
    for f in tmp_path.iterdir():
        assert KEY not in f.read_text(), f
    assert KEY not in run.stdout + run.stderr + rerun.stdout + rerun.stderr
    assert "| win rate (ties half) |" in (tmp_path / "judge.md").read_text()
    # the orders were judged concurrently, with progress and throughput logged and no line per HTTP request
    assert "judged 18/18 orders (0 from the cache)" in run.stderr and "calls/s" in run.stderr
    assert "judged 18/18 orders (16 from the cache)" in rerun.stderr
    assert "HTTP Request" not in run.stderr + rerun.stderr
    assert server.most_in_flight > 1
    assert "| mean score (1-5) [95% CI] | base | cpt | Δ cpt − base |" in (tmp_path / "judge.md").read_text()
    # answers stopped at --max-new-tokens (6 tokens of a random model: most of them) are flagged per question,
    # counted in the summary and the table, and warned about
    answers = [json.loads(x) for x in (tmp_path / "judge.answers.jsonl").read_text().splitlines()]
    for model in ("base", "cpt"):
        cut = {a["id"] for a in answers if a["model"] == model and a["cut"]}
        assert cut and cut == {r["id"] for r in rows if model in r["cut_at_max_new_tokens"]}
        assert summary["cut_answers"][model] == len(cut)
        assert f"base: {summary['cut_answers']['base']} of 9 answers stopped at --max-new-tokens 6" in run.stderr
    assert (f"| answers cut at --max-new-tokens, base / cpt | {summary['cut_answers']['base']} / "
            f"{summary['cut_answers']['cpt']} | |") in (tmp_path / "judge.md").read_text()


def test_a_run_stopped_by_an_unreachable_judge_sets_an_earlier_runs_results_aside(setup, tmp_path):
    """evaluation.report reads judge.json whatever run wrote it: left in place after this run stopped, an earlier run's
    results (other checkpoints, perhaps, under the same names) would pass for this one's."""
    earlier = {f"judge{x}": f"earlier run {x}\n" for x in (".json", ".md", ".jsonl")}
    for name, text in earlier.items():
        (tmp_path / name).write_text(text)
    server = StubServer()
    url = server.url
    server.close()  # nothing listens there any more: the judge is unreachable
    run = _run(setup, None, tmp_path / "judge", url=url, returncode=1)
    assert "judge stopped" in run.stderr and "cannot connect" in run.stderr
    assert "renamed judge.earlier.json, judge.earlier.md, judge.earlier.jsonl" in run.stderr
    assert not any((tmp_path / name).exists() for name in earlier)
    assert {name: (tmp_path / name.replace("judge.", "judge.earlier.")).read_text() for name in earlier} == earlier


def test_verdict_rule_and_stratified_sampling():
    def scored(verdict, a=3, b=3):  # a judgement: every criterion of answer A scored a, of B b
        return {"verdict": verdict, "scores": {"A": dict.fromkeys(CRITERIA, a), "B": dict.fromkeys(CRITERIA, b)},
                "rationale": ""}

    assert combine("x", "y", [("x", scored("A")), ("y", scored("B"))])["verdict"] == "x"  # both orders pick x
    assert combine("x", "y", [("x", scored("A")), ("y", scored("A"))])["verdict"] == "tie"  # position bias -> tie
    assert combine("x", "y", [("x", scored("B")), ("y", None)])["verdict"] == "y"  # one valid order counts
    assert combine("x", "y", [("x", None), ("y", None)])["verdict"] is None
    # x shown as A (scored 5 against 2), then as B (4 against 3): each model's mean, not A's and B's
    r = combine("x", "y", [("x", scored("A", 5, 2)), ("y", scored("B", 3, 4))])
    assert r["scores"]["x"]["overall"] == 4.5 and r["scores"]["y"]["overall"] == 2.5
    rows = [combine("x", "y", orders)
            for orders in ([("x", scored("A")), ("y", scored("B"))], [("x", scored("B")), ("y", None)])]
    summary = summarize(rows, "x", "y", seed=0, usage={"calls": 3, "prompt_tokens": 0, "completion_tokens": 0,
                                                         "cached": 0}, prices=(0.0, 0.0))
    assert summary["one_order"] == 1  # judged on one order: its position bias is not cancelled, and the table says so
    assert "| judged (of them on one order only) / failed / inconsistent orders | 2 (1) / 0 / 0 | |" in \
        to_markdown(summary, "x", "y")
    assert "| answers cut at --max-new-tokens, x / y | 0 / 0 | |" in to_markdown(summary, "x", "y")
    del summary["cut_answers"]  # a judge.json from before the count: unknown, not 0
    assert "| answers cut at --max-new-tokens, x / y | ? / ? | |" in to_markdown(summary, "x", "y")
    skew = summarize([{"verdict": v, "consistent": True, "orders_valid": 2, "scores": {"x": None, "y": None}}
                      for v in ("y", "y", "tie", "x")], "x", "y", 0, {"calls": 0, "prompt_tokens": 0,
                      "completion_tokens": 0, "cached": 0}, (0.0, 0.0))
    assert skew["y_win_rate"][0] == pytest.approx(0.625) and skew["y_wins"] == 2 and skew["x_wins"] == 1  # (2 + 0.5) / 4
    qs = {s: [{"id": f"{s}/{i}", "source": s} for i in range(10)] for s in ("a", "b", "c")}
    picked = sample(qs, 7, seed=1)
    assert [q["source"] for q in picked].count("a") == 3 and len(picked) == 7
    assert picked == sample(qs, 7, seed=1) and picked != sample(qs, 7, seed=2)


def test_bootstrap_ci_is_the_95_percent_interval_of_resampled_means():
    """Against what a 95% interval of a mean is: for 400 draws, close to mean +- 1.96 standard errors (the
    percentile bootstrap of a mean at this n is near normal), and the same for the same seed."""
    import numpy as np

    rng = np.random.default_rng(11)
    for values in (rng.integers(0, 2, 400).astype(float), rng.integers(1, 6, 400).astype(float)):  # win rate, scores
        mean, lo, hi = bootstrap_ci(list(values), seed=5)
        half = 1.96 * values.std() / len(values) ** 0.5
        assert mean == values.mean()
        assert (mean - lo, hi - mean) == pytest.approx((half, half), rel=0.15)
        assert bootstrap_ci(list(values), seed=5) == (mean, lo, hi)
    assert bootstrap_ci([3.0], seed=5) == (3.0, 3.0, 3.0)


def test_an_answer_is_cut_when_it_reached_max_new_tokens_without_an_end_token():
    assert was_cut([5, 6, 7], 3, eos=2) and was_cut([5, 6, 7], 3, eos=None)
    assert not was_cut([5, 6, 2], 3, eos=2) and not was_cut([5, 6, 9], 3, eos=[2, 9])  # ended by an end token
    assert not was_cut([5, 2], 3, eos=2)  # stopped early


def test_help_says_the_judge_is_a_server(capsys):
    """No offline vLLM engine here: --help tells how to put a local judge model behind a server."""
    from evaluation.eval_reasoning_judge import main

    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "The judge is a server" in text and "vllm serve" in text and "--base-url http://127.0.0.1:8000/v1" in text


def test_bad_question_records_are_named_by_file_and_line(tmp_path):
    from evaluation.eval_reasoning_judge import load_questions

    good = {"id": "q1", "question": "Drug?", "options": {"A": "x", "B": "y"}, "answer": "x", "answer_idx": "A"}
    for bad, why in (('{"id": "q2", "question": "Drug?"}', "KeyError: 'options'"), ("[1]", "AttributeError"),
                     ('{"id": "q2"', "JSONDecodeError"), (json.dumps(good), "question id 'medqa/q1' again")):
        (tmp_path / "medqa.jsonl").write_text(json.dumps(good) + "\n\n" + bad + "\n")
        with pytest.raises(ValueError, match=rf"medqa\.jsonl:3: .*{why}"):
            load_questions(medqa=tmp_path / "medqa.jsonl")


@pytest.mark.parametrize("source", ["medqa", "medmcqa", "pubmedqa"])
@pytest.mark.parametrize("case", ["Latin-1 byte", "no file"])
def test_the_command_names_an_unreadable_question_file_in_one_line(source, case, tmp_path):
    """A question file with a non-UTF-8 byte, or none at the path, stops the command with one line naming the file
    (and the line), not a traceback or a bare codec error."""
    from evaluation.eval_reasoning_judge import main

    path = tmp_path / f"{source}.jsonl"
    if case == "Latin-1 byte":
        path.write_bytes(b'\n{"id": "q2", "question": "caf\xe9"}\n')  # line 2, after a blank one
    with pytest.raises(SystemExit) as err:
        main(["--model", "a=x", "--model", "b=y", f"--{source}", str(path), "--n", "1", "--out", str(tmp_path / "j")])
    needle = rf"{path}:2: not UTF-8 text \(.*\)" if case == "Latin-1 byte" else rf".*No such file or directory: '{path}'"
    assert re.fullmatch(needle, str(err.value))


def _medmcqa_file(path, cops):
    path.write_text("".join(json.dumps({"id": i, "question": "q", "opa": "w", "opb": "x", "opc": "y", "opd": "z", "cop": c})
                            + "\n" for i, c in enumerate(cops)))
    return path


def _letters(questions):
    return "".join(q["reference"][len("Answer: ")] for q in questions["medmcqa"])


@pytest.mark.parametrize("cops", [[0, 3, 1], [1, 4, 2]])  # the hub dataset's numbering (0-3), the original release's (1-4)
def test_medmcqa_answer_numbering_is_read_from_the_file(tmp_path, cops):
    from evaluation.eval_reasoning_judge import load_questions

    assert _letters(load_questions(medmcqa=_medmcqa_file(tmp_path / "medmcqa.jsonl", cops))) == "ADB"


def test_medmcqa_file_of_unclear_numbering_is_refused_unless_given(tmp_path):
    from evaluation.eval_reasoning_judge import load_questions

    both, unclear = _medmcqa_file(tmp_path / "both.jsonl", [0, 4]), _medmcqa_file(tmp_path / "unclear.jsonl", [1, 2, 3])
    for path, why in ((both, "both 0 and 4"), (unclear, r"only \[1, 2, 3\], which either numbering allows")):
        with pytest.raises(ValueError, match=rf"{path.name}: cannot tell whether MedMCQA's 'cop' counts from 0 or 1: "
                                             rf"it has {why}\. Give --medmcqa-cop 0"):
            load_questions(medmcqa=path)
    assert _letters(load_questions(medmcqa=unclear, medmcqa_cop="1")) == "ABC"
    assert _letters(load_questions(medmcqa=unclear, medmcqa_cop="0")) == "BCD"
    with pytest.raises(ValueError, match=r"both\.jsonl:1: .*cop 0 is no option \(the file's numbering is 1-4\)"):
        load_questions(medmcqa=both, medmcqa_cop="1")


def test_a_short_source_gives_its_share_to_the_others():
    from evaluation.eval_reasoning_judge import quotas

    assert quotas({"medqa": 10, "pubmedqa": 20}, 30) == {"medqa": 10, "pubmedqa": 20}
    assert quotas({"a": 5, "b": 20, "c": 20}, 25) == {"a": 5, "b": 10, "c": 10}
    assert quotas({"a": 50, "b": 50, "c": 50}, 7) == {"a": 3, "b": 2, "c": 2}  # as before: the remainder to the first
    qs = {s: [{"id": f"{s}/{i}", "source": s} for i in range(k)] for s, k in (("medqa", 10), ("pubmedqa", 20))}
    assert len({q["id"] for q in sample(qs, 30, seed=0)}) == 30
    with pytest.raises(ValueError, match=r"31 questions requested, the question files have 30 \(medqa 10, pubmedqa 20\)"):
        sample(qs, 31, seed=0)


def test_no_question_file_is_refused(capsys):
    from evaluation.eval_reasoning_judge import main

    with pytest.raises(SystemExit):
        main(["--model", "a=x", "--model", "b=y", "--n", "4"])
    assert "give at least one question file" in capsys.readouterr().err


def test_answers_belong_to_the_checkpoint_not_the_name(setup, tmp_path, monkeypatch):
    """Rerunning into the same --out with the name 'cpt' now on the base checkpoint compares base with itself
    (all ties: the stub prefers the longer answer), instead of reusing the old checkpoint's answers."""
    from evaluation.eval_reasoning_judge import main

    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    questions = tmp_path / "medqa.jsonl"
    questions.write_text("".join(json.dumps({"id": f"q{i}", "question": f"First-line drug for absence seizures {i}?",
                                             "options": {"A": "Ethosuximide", "B": "Phenytoin"}, "answer": "Ethosuximide"})
                                 + "\n" for i in range(4)))
    server = StubServer()
    try:
        for cpt in ("cpt", "base"):
            main(["--model", f"base={setup / 'base'}", "--model", f"cpt={setup / cpt}", "--medqa", str(questions),
                  "--n", "4", "--judge-model", "judge-test", "--base-url", server.url, "--max-new-tokens", "6",
                  "--device", "cpu", "--out", str(tmp_path / "judge")])
            summary = json.loads((tmp_path / "judge.json").read_text())
            if cpt == "cpt":
                assert summary["ties"] < 4  # the two random models answer differently
                # the stub prefers the longer answer (4 vs 2): each verdict and score belongs to the right model
                answers = {(a["model"], a["id"]): a["answer"] for a in
                           map(json.loads, (tmp_path / "judge.answers.jsonl").read_text().splitlines())}
                rows = [json.loads(x) for x in (tmp_path / "judge.jsonl").read_text().splitlines()]
                for row in rows:
                    lb, lc = len(answers["base", row["id"]]), len(answers["cpt", row["id"]])
                    assert row["verdict"] == ("cpt" if lc > lb else "base" if lb > lc else "tie"), row
                    if lb != lc:
                        loser = "base" if row["verdict"] == "cpt" else "cpt"
                        assert row["scores"][row["verdict"]]["overall"] == 4 and row["scores"][loser]["overall"] == 2
                win = [{"cpt": 1.0, "tie": 0.5, "base": 0.0}[r["verdict"]] for r in rows]
                assert summary["cpt_win_rate"][0] == pytest.approx(sum(win) / len(win))
    finally:
        server.close()
    assert summary["ties"] == 4 and summary["judged"] == 4
    answers = [json.loads(x) for x in (tmp_path / "judge.answers.jsonl").read_text().splitlines()]
    assert len(answers) == 8  # base's answers were reused on the rerun, cpt's kept for its checkpoint


def test_judgements_are_keyed_by_the_full_prompt(setup, tmp_path, monkeypatch, caplog):
    """An edited reference answer is judged again (it is part of the prompt); a cache in the older format, keyed
    without the reference, is ignored with a warning, not reused and not a crash."""
    from evaluation.eval_reasoning_judge import main

    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    questions, out = tmp_path / "medqa.jsonl", tmp_path / "judge"

    def write(answer):
        questions.write_text("".join(json.dumps({"id": f"q{i}", "question": f"First-line drug for absence seizures {i}?",
                                                 "options": {"A": "Ethosuximide", "B": "Phenytoin"}, "answer": answer})
                                     + "\n" for i in range(2)))

    old = {"key": "0" * 64, "output": None, "error": "judged before the reference was in the key", "raw": None}
    out.with_suffix(".cache.jsonl").write_text(json.dumps(old) + "\n")
    server, sent = StubServer(), []
    try:
        for answer in ("Ethosuximide", "Ethosuximide", "Valproate"):
            write(answer)
            before = len(server.requests)
            main(["--model", f"base={setup / 'base'}", "--model", f"cpt={setup / 'cpt'}", "--medqa", str(questions),
                  "--n", "2", "--judge-model", "judge-test", "--base-url", server.url, "--max-new-tokens", "4",
                  "--device", "cpu", "--out", str(out)])
            sent.append(len(server.requests) - before)
    finally:
        server.close()
    assert sent == [4, 0, 4]  # both orders of both questions; nothing on the rerun; all again for the new reference
    warnings = [r.getMessage() for r in caplog.records if "older format" in r.getMessage()]
    assert len(warnings) == 3 and "1 judgement(s) cached in an older format (keyed without the reference answer) are " \
        "ignored" in warnings[0]


def test_answers_are_keyed_by_the_checkpoint_contents_not_only_its_path(setup, tmp_path, monkeypatch, caplog):
    """A checkpoint retrained under the same path is answered again; an unchanged one is not; answers cached in the
    older formats (keyed by the path only; by the checkpoint's contents without the dtype) are ignored with one
    warning, not reused and not a crash."""
    from evaluation import eval_reasoning_judge as judge
    from evaluation.common import fingerprint
    from preprocessing.llm import cache_key

    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    questions, out, ckpt = tmp_path / "medqa.jsonl", tmp_path / "judge", tmp_path / "cpt"
    questions.write_text("".join(json.dumps({"id": f"q{i}", "question": f"First-line drug for absence seizures {i}?",
                                             "options": {"A": "Ethosuximide", "B": "Phenytoin"}, "answer": "Ethosuximide"})
                                 + "\n" for i in range(2)))
    tiny_hf_dir(ckpt, 1, chat_template=CHAT_TEMPLATE)
    prompts = [q["prompt"] for q in judge.load_questions(medqa=questions)["medqa"]]
    stale = [{"key": cache_key(str(ckpt.resolve()), 6, p), "model": "cpt", "model_dir": str(ckpt), "id": f"medqa/q{i}",
              "answer": "STALE ANSWER"} for i, p in enumerate(prompts)]  # what the path-keyed cache held
    stale += [{"key": cache_key(fingerprint(ckpt), 6, p), "keyed_by": "checkpoint fingerprint", "model": "cpt",
               "model_dir": str(ckpt), "id": f"medqa/q{i}", "answer": "STALE ANSWER"}  # and the one without the dtype
              for i, p in enumerate(prompts)]
    out.with_suffix(".answers.jsonl").write_text("".join(json.dumps(e) + "\n" for e in stale))
    generated = []
    real = judge.generate
    monkeypatch.setattr(judge, "generate", lambda model_dir, prompts, *a: generated.append((model_dir, len(prompts)))
                        or real(model_dir, prompts, *a))
    server = StubServer()

    def run():
        generated.clear()
        judge.main(["--model", f"base={setup / 'base'}", "--model", f"cpt={ckpt}", "--medqa", str(questions), "--n", "2",
                    "--judge-model", "judge-test", "--base-url", server.url, "--max-new-tokens", "6", "--device", "cpu",
                    "--out", str(out)])
        entries = [json.loads(x) for x in out.with_suffix(".answers.jsonl").read_text().splitlines()]
        return {e["answer"] for e in entries if e.get("keyed_by") == judge.ANSWERS_KEYED_BY and e["model_dir"] == str(ckpt)}

    try:
        first = run()
        assert generated == [(str(setup / "base"), 2), (str(ckpt), 2)]  # the stale answers were not reused
        assert "STALE ANSWER" not in first
        warnings = [r.getMessage() for r in caplog.records if "older format" in r.getMessage() and "answer" in r.getMessage()]
        assert len(warnings) == 1 and "4 answer(s) cached in an older format (keyed by the checkpoint's path, or without " \
            "the dtype) are ignored" in warnings[0]
        assert run() == first and generated == []  # unchanged checkpoint: every answer reused
        tiny_hf_dir(ckpt, 2, chat_template=CHAT_TEMPLATE)  # retrained: other weights under the same path
        second = run()
    finally:
        server.close()
    assert generated == [(str(ckpt), 2)]  # base is unchanged and reused; the new cpt is answered again
    assert second != first  # the cache holds the new checkpoint's answers beside the old ones


def test_answers_are_prompted_with_the_sft_datas_template_arguments(setup, tmp_path, monkeypatch, caplog):
    """Qwen3.5-0.8B and -2B's template closes the think block unless enable_thinking is true, so SFT data of
    reasoning is built with it true (sft.json records it): the judged answers were prompted without it, the model
    trained to reason answering from a closed think block. --answer-template-kwargs reaches the template and keys the
    answers (an answer cached without it is not reused); without it, the arguments an SFT run's export recorded are
    used, and a template other than the recorded one is warned about."""
    import shutil
    from pathlib import Path
    from types import SimpleNamespace

    import torch

    from evaluation import common
    from evaluation import eval_reasoning_judge as judge
    from preprocessing.chat import SFT_CHAT_FILE, template_sha

    ckpt = shutil.copytree(setup / "base", tmp_path / "small")
    small = Path(__file__).parent / "chat_templates" / "qwen3.5-small.jinja"
    config = json.loads((ckpt / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (ckpt / "tokenizer_config.json").write_text(json.dumps(config))
    (ckpt / "chat_template.jinja").write_text(small.read_text())
    prompts = []
    real_load = common.load_hf_model

    def load(model_dir, device, dtype):  # the real tokenizer, a model that records its prompt and answers one token
        _, tok = real_load(model_dir, device, dtype)

        def answer(ids, **kwargs):
            prompts.append(tok.decode(ids[0]))
            return torch.cat([ids, ids[:, -1:]], dim=1)
        return SimpleNamespace(generate=answer, generation_config=SimpleNamespace(eos_token_id=None)), tok

    monkeypatch.setattr(common, "load_hf_model", load)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    questions = tmp_path / "medqa.jsonl"
    questions.write_text(json.dumps({"id": "q0", "question": "First-line drug for absence seizures?",
                                     "options": {"A": "Ethosuximide", "B": "Phenytoin"}, "answer": "Ethosuximide"}) + "\n")
    server = StubServer()
    record = ckpt / SFT_CHAT_FILE

    def run(*extra):
        judge.main(["--model", f"a={ckpt}", "--model", f"b={ckpt}", "--medqa", str(questions), "--n", "1",
                    "--judge-model", "judge-test", "--base-url", server.url, "--max-new-tokens", "1",
                    "--device", "cpu", "--out", str(tmp_path / "judge"), *extra])
        return json.loads((tmp_path / "judge.json").read_text())["answer_template_kwargs"]

    thinking = {"enable_thinking": True}
    try:
        assert run() == {"a": {}, "b": {}}
        assert run("--answer-template-kwargs", json.dumps(thinking)) == {"a": thinking, "b": thinking}
        record.write_text(json.dumps({"chat_template_kwargs": thinking, "chat_template_sha256": template_sha(small.read_text())}))
        assert run() == {"a": thinking, "b": thinking}  # an SFT export's record, no option needed
        assert "is not the one its SFT data was rendered with" not in caplog.text
        record.write_text(json.dumps({"chat_template_kwargs": thinking, "chat_template_sha256": "0123456789abcdef"}))
        assert run("--answer-template-kwargs", "{}") == {"a": {}, "b": {}}  # the option overrides the record
        assert "is not the one its SFT data was rendered with (0123456789abcdef)" in caplog.text
    finally:
        server.close()
    assert len(prompts) == 4  # no run reused another's answer: the arguments and the checkpoint's files key them
    assert prompts[0].endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")  # the template's default
    assert prompts[1].endswith("<|im_start|>assistant\n<think>\n")  # as the SFT data was built
    assert prompts[2].endswith("<|im_start|>assistant\n<think>\n")
    assert prompts[3].endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
