"""Real lm-evaluation-harness runs, offline, on a tiny local model and local copies of a multiple-choice
task (mmlu_anatomy) and a yes/no/maybe task (pubmedqa) in the hub datasets' own format."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from evaluation.eval_qwen import local_task_config, to_markdown
from conftest import live_processes_of_session, own_session, processes_left_by_sigterm, tiny_hf_dir


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmeval")
    for name, seed in (("base", 0), ("cpt", 1)):  # cpt in the small releases' layout: tied, multimodal config
        tiny_hf_dir(root / name, seed, release=name == "cpt")
    rng = random.Random(0)
    (root / "bench" / "pubmedqa").mkdir(parents=True)
    (root / "bench" / "mmlu_anatomy").mkdir(parents=True)
    for split, n in (("test", 12), ("train", 3)):  # bigbio/pubmed_qa fields; train feeds the few-shot examples
        with open(root / "bench" / "pubmedqa" / f"{split}.jsonl", "w") as f:
            for i in range(n):
                f.write(json.dumps({"QUESTION": f"Does treatment {i} reduce stroke recurrence?",
                                    "CONTEXTS": [f"In {rng.randint(50, 900)} patients treatment {i} was studied.",
                                                 "Outcomes were recorded at 90 days."],
                                    "LABELS": ["BACKGROUND", "RESULTS"], "MESHES": [], "YEAR": "2019",
                                    "reasoning_required_pred": "yes", "reasoning_free_pred": "yes",
                                    "final_decision": rng.choice(["yes", "no", "maybe"]), "LONG_ANSWER": "..."}) + "\n")
    for split, n in (("test", 10), ("dev", 5)):  # cais/mmlu fields
        with open(root / "bench" / "mmlu_anatomy" / f"{split}.jsonl", "w") as f:
            for i in range(n):
                f.write(json.dumps({"question": f"Which nerve innervates muscle {i}?", "subject": "anatomy",
                                    "choices": ["Median", "Ulnar", "Radial", "Axillary"],
                                    "answer": rng.randint(0, 3)}) + "\n")
    return root


def test_lm_eval_runs_offline_and_writes_the_card_table(setup, tmp_path):
    """First run: 'cpt_sft' cannot be loaded; it is named, base_sft is still evaluated and kept. The rerun, with
    the checkpoint back, evaluates only cpt_sft (base_sft gets no process) and writes the table."""
    broken = tmp_path / "cpt"
    shutil.copytree(setup / "cpt", broken)
    (broken / "config.json").rename(broken / "config.json.bak")
    cmd = [sys.executable, "-m", "evaluation.eval_qwen", "--model", f"base_sft={setup / 'base'}",
           "--model", f"cpt_sft={broken}", "--tasks", "pubmedqa,mmlu_anatomy", "--num-fewshot", "1",
           "--data-dir", str(setup / "bench"), "--delta", "cpt_sft-base_sft", "--device", "cpu",
           "--out", str(tmp_path / "lm_eval")]
    run = subprocess.run(cmd, capture_output=True, text=True)
    assert run.returncode == 1 and f"lm-eval of model cpt_sft ({broken}) failed" in run.stderr, run.stderr[-3000:]
    assert "rerun the same command" in run.stderr and not (tmp_path / "lm_eval.json").exists()
    assert len(json.loads((tmp_path / "lm_eval.units.json").read_text())) == 2  # base_sft on both tasks
    (broken / "config.json.bak").rename(broken / "config.json")
    run = subprocess.run(cmd, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("base_sft: all 2 tasks finished before, kept (the model is not loaded)") == 1, run.stdout
    assert run.stdout.count("tasks finished before") == 1  # cpt_sft had none
    assert run.stdout.count("| Benchmark |") == 1, run.stdout  # the merged table only, not each model process's own
    report = json.loads((tmp_path / "lm_eval.json").read_text())
    for task, n in (("pubmedqa", 12), ("mmlu_anatomy", 10)):
        for model in ("base_sft", "cpt_sft"):
            r = report["results"][task][model]
            assert 0.0 <= r["acc"] <= 1.0 and r["acc_stderr"] > 0 and r["samples"] == n
    assert report["results"]["pubmedqa"]["base_sft"]["acc"] != report["results"]["pubmedqa"]["cpt_sft"]["acc"] or \
        report["results"]["mmlu_anatomy"]["base_sft"]["acc"] != report["results"]["mmlu_anatomy"]["cpt_sft"]["acc"]
    table = (tmp_path / "lm_eval.md").read_text()
    assert table.splitlines()[0] == "| Benchmark | base_sft | cpt_sft | Δ cpt_sft − base_sft |"
    assert "| **Medical Average** |" in table


def test_a_changed_checkpoint_data_file_or_setting_is_evaluated_again(setup, tmp_path, monkeypatch):
    """Finished (model, task) results are reused only for the same checkpoint, data files and settings."""
    import lm_eval

    from evaluation import eval_qwen
    from evaluation.common import FinishedUnits

    evaluated, loaded = [], []

    def simple_evaluate(model, tasks, num_fewshot, limit, task_manager):
        evaluated.append(tasks[0]["task"])
        return {"results": {tasks[0]["task"]: {"acc,none": 0.5}}, "n-samples": {tasks[0]["task"]: {"effective": limit}}}

    monkeypatch.setattr(eval_qwen, "hf_lm", lambda model_dir, *args: loaded.append(model_dir))
    monkeypatch.setattr(lm_eval, "simple_evaluate", simple_evaluate)
    bench, model = tmp_path / "bench", tmp_path / "model"
    shutil.copytree(setup / "bench", bench)
    shutil.copytree(setup / "base", model)
    units = FinishedUnits(tmp_path / "units.json")

    def run(tasks=("pubmedqa",), limit=3):
        evaluated.clear(), loaded.clear()
        return eval_qwen.run({"m": str(model)}, list(tasks), bench, limit=limit, device="cpu", units=units)

    assert run()["results"]["pubmedqa"]["m"]["samples"] == 3 and evaluated == ["pubmedqa"]
    run()
    assert evaluated == [] and loaded == []  # nothing left: the model is not even loaded
    run(tasks=("pubmedqa", "mmlu_anatomy"))
    assert evaluated == ["mmlu_anatomy"]
    run(limit=4)
    assert evaluated == ["pubmedqa"]
    with open(bench / "pubmedqa" / "test.jsonl", "a") as f:
        f.write((bench / "pubmedqa" / "test.jsonl").read_text().splitlines()[0] + "\n")
    run(tasks=("pubmedqa", "mmlu_anatomy"))
    assert evaluated == ["pubmedqa"]
    (model / "model.safetensors").write_bytes((model / "model.safetensors").read_bytes())
    run(tasks=("pubmedqa", "mmlu_anatomy"))
    assert evaluated == ["pubmedqa", "mmlu_anatomy"]


def test_a_tied_release_is_scored_with_its_own_head(setup):
    """lm-eval's log-likelihoods of a release in the small Qwen3.5 releases' layout (tied by the config's top-level
    flag) equal its own model's, in float64. lm-eval's own loading (AutoModelForCausalLM) reads text_config's untied
    default and draws lm_head at random: its scores are noise, and change from run to run."""
    import torch
    from lm_eval.api.instance import Instance
    from transformers import AutoTokenizer, Qwen3_5ForConditionalGeneration

    from evaluation.eval_qwen import hf_lm

    release = setup / "cpt"
    pairs = [("Does treatment 3 reduce stroke recurrence? Answer:", " yes"), ("The patient presented with", " sudden focal weakness"),
             ("Outcomes were recorded at", " 90 days.")]
    lm = hf_lm(release, "cpu", torch.float64, 2)
    got = [ll for ll, _ in lm.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)])]
    model = Qwen3_5ForConditionalGeneration.from_pretrained(release, dtype=torch.float64)
    tok = AutoTokenizer.from_pretrained(release)
    for (context, continuation), ll in zip(pairs, got):
        n, ids = len(tok(context).input_ids), tok(context + continuation).input_ids
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, n - 1:-1], dim=-1)
        assert ll == pytest.approx(logp.gather(1, torch.tensor(ids[n:])[:, None]).sum().item(), abs=1e-9)


def test_missing_local_split_is_named(setup):
    with pytest.raises(FileNotFoundError, match="mmlu_anatomy/test.jsonl"):
        local_task_config("mmlu_anatomy", setup / "nowhere", 0)
    with pytest.raises(KeyError, match="no task"):
        local_task_config("not_a_task", setup / "bench", 0)


def test_unknown_tasks_and_missing_local_copies_are_all_named_before_any_model_runs(setup, monkeypatch):
    """--suite all on a --data-dir holding one benchmark: one line naming every missing file, where each model's
    process printed its traceback for the first one and the command then said the other models' results were kept."""
    from evaluation import eval_qwen

    monkeypatch.setattr(eval_qwen.subprocess, "run", lambda *a, **k: pytest.fail("a model's process was started"))
    monkeypatch.setattr(eval_qwen, "run", lambda *a, **k: pytest.fail("a model was evaluated"))
    models = ["--model", f"a={setup / 'base'}", "--model", f"b={setup / 'cpt'}"]
    with pytest.raises(SystemExit) as stopped:
        eval_qwen.main([*models, "--suite", "all", "--data-dir", str(setup / "bench")])
    says = str(stopped.value.code)
    assert says.startswith(f"--data-dir {setup / 'bench'} lacks the local copies mmlu_clinical_knowledge/test.jsonl, ")
    assert "boolq/validation.jsonl" in says and "pubmedqa" not in says and "mmlu_anatomy" not in says
    with pytest.raises(SystemExit, match="lm-eval has no task 'pubmedq'$"):
        eval_qwen.main([*models[:2], "--tasks", "pubmedq,pubmedqa", "--data-dir", str(setup / "bench")])


def test_markdown_delta_and_medical_average():
    report = {"models": {"a": "x", "b": "y"}, "results": {
        "pubmedqa": {"a": {"acc": 0.5, "acc_stderr": 0.05}, "b": {"acc": 0.6, "acc_stderr": 0.05}},
        "mmlu_anatomy": {"a": {"acc": 0.3, "acc_stderr": 0.04}, "b": {"acc": 0.2, "acc_stderr": 0.04}},
        "boolq": {"a": {"acc": 0.7, "acc_stderr": 0.01}, "b": {"acc": 0.7, "acc_stderr": 0.01}}}}
    table = to_markdown(report, ("b", "a"))
    assert "| pubmedqa | 50.0 ± 5.0 | 60.0 ± 5.0 | +10.0 |" in table
    assert "| **Medical Average** | 40.0 | 40.0 | +0.0 |" in table  # boolq is general, not medical


@pytest.fixture(scope="module")
def empty_copies(tmp_path_factory):
    """A --data-dir holding (empty) local copies of pubmedqa's and boolq's splits, with and without few-shot: what the
    command checks before it starts a model's process (the children here are stand-ins that read nothing)."""
    root = tmp_path_factory.mktemp("empty_copies")
    for task in ("pubmedqa", "boolq"):
        for fewshot in (0, 3):
            while True:
                try:
                    local_task_config(task, root, fewshot)
                    break
                except FileNotFoundError as err:
                    Path(err.filename).parent.mkdir(parents=True, exist_ok=True)
                    Path(err.filename).touch()
    return str(root)


def test_several_models_run_one_process_each_and_merge(tmp_path, monkeypatch, empty_copies):
    """--backend vllm with two models: two child processes of the same command, one --model each (a vLLM engine
    frees its GPU memory only when its process ends), their reports merged as one in-process run would give."""
    from evaluation import eval_qwen

    children = []

    def child(cmd, **kwargs):  # stands in for the child process: records its command, writes the report it would write
        children.append(cmd)
        name = cmd[cmd.index("--model") + 1].split("=")[0]
        report = {"results": {t: {name: {"acc": len(children) / 10, "acc_stderr": 0.01}} for t in ("pubmedqa", "boolq")}}
        Path(cmd[cmd.index("--out") + 1]).with_suffix(".json").write_text(json.dumps(report))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(eval_qwen.subprocess, "run", child)
    eval_qwen.main(["--model", "base=/m/base", "--model", "cpt=/m/cpt", "--tasks", "pubmedqa,boolq", "--data-dir", empty_copies,
                    "--backend", "vllm", "--limit", "5", "--num-fewshot", "3", "--delta", "cpt-base",
                    "--out", str(tmp_path / "lm_eval")])
    assert [c[c.index("--model") + 1] for c in children] == ["base=/m/base", "cpt=/m/cpt"]
    for c in children:
        assert c[:3] == [sys.executable, "-m", "evaluation.eval_qwen"] and c.count("--model") == 1
        assert c[c.index("--backend") + 1] == "vllm" and c[c.index("--tasks") + 1] == "pubmedqa,boolq"
        assert c[c.index("--limit") + 1] == "5" and "--device" not in c
        assert c[c.index("--num-fewshot") + 1] == "3"
    report = json.loads((tmp_path / "lm_eval.json").read_text())
    assert report["results"] == {t: {"base": {"acc": 0.1, "acc_stderr": 0.01}, "cpt": {"acc": 0.2, "acc_stderr": 0.01}}
                                 for t in ("pubmedqa", "boolq")}
    assert report["models"] == {"base": "/m/base", "cpt": "/m/cpt"} and report["limit"] == 5
    assert "| pubmedqa | 10.0 ± 1.0 | 20.0 ± 1.0 | +10.0 |" in (tmp_path / "lm_eval.md").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lm_eval.json", "lm_eval.md"]  # children's files removed


def test_a_failing_model_process_is_named_after_the_others_ran(tmp_path, monkeypatch, empty_copies):
    from evaluation import eval_qwen

    children = []

    def child(cmd, **kwargs):  # the first model's process fails, the second's succeeds
        children.append(cmd)
        if len(children) == 1:
            return subprocess.CompletedProcess(cmd, 1)
        Path(cmd[cmd.index("--out") + 1]).with_suffix(".json").write_text(json.dumps({"results": {}}))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(eval_qwen.subprocess, "run", child)
    (tmp_path / "lm_eval.json").write_text("{}")  # an earlier run's: set aside, or evaluation.report would show it
    with pytest.raises(SystemExit, match=r"model base \(/m/base\) failed .* kept in .*lm_eval\.units\.json; rerun"
                                         r"(.|\n)*renamed lm_eval\.earlier\.json"):
        eval_qwen.main(["--model", "base=/m/base", "--model", "cpt=/m/cpt", "--tasks", "pubmedqa", "--data-dir", empty_copies,
                        "--backend", "vllm", "--out", str(tmp_path / "lm_eval")])
    assert not (tmp_path / "lm_eval.json").exists() and (tmp_path / "lm_eval.earlier.json").read_text() == "{}"
    assert len(children) == 2  # cpt was still evaluated, into the same kept results
    assert {c[c.index("--units") + 1] for c in children} == {str(tmp_path / "lm_eval.units.json")}


def test_delta_between_names_with_hyphens(tmp_path, monkeypatch, empty_copies):
    from evaluation import eval_qwen

    def child(cmd, **kwargs):
        name = cmd[cmd.index("--model") + 1].split("=")[0]
        report = {"results": {"pubmedqa": {name: {"acc": 0.4 if name == "base-sft" else 0.5, "acc_stderr": 0.01}}}}
        Path(cmd[cmd.index("--out") + 1]).with_suffix(".json").write_text(json.dumps(report))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(eval_qwen.subprocess, "run", child)
    args = ["--model", "base-sft=/m/a", "--model", "cpt-sft=/m/b", "--tasks", "pubmedqa", "--data-dir", empty_copies,
            "--out", str(tmp_path / "lm_eval")]
    eval_qwen.main(args + ["--delta", "cpt-sft-base-sft"])
    assert "| pubmedqa | 40.0 ± 1.0 | 50.0 ± 1.0 | +10.0 |" in (tmp_path / "lm_eval.md").read_text()
    with pytest.raises(SystemExit, match="expected NAME_A-NAME_B"):
        eval_qwen.main(args + ["--delta", "cpt-sft-base"])


def test_few_shot_examples_come_from_their_own_split_not_the_test_split(setup):
    """lm-eval falls back to the test split for few-shot examples when the task has no other split: leakage."""
    cfg = local_task_config("mmlu_anatomy", setup / "bench", 1)
    assert cfg["fewshot_split"] == "dev" and set(cfg["dataset_kwargs"]["data_files"]) == {"test", "dev"}
    cfg = local_task_config("pubmedqa", setup / "bench", 1)
    assert cfg["training_split"] == "train" and set(cfg["dataset_kwargs"]["data_files"]) == {"test", "train"}
    assert set(local_task_config("mmlu_anatomy", setup / "bench", 0)["dataset_kwargs"]["data_files"]) == {"test"}


def test_a_sigterm_to_the_command_ends_its_per_model_process_too(setup, tmp_path):
    """``kill PID`` or ``timeout`` signals the command alone: the model's process it had started went on as an orphan,
    rewriting the units file and holding its GPU, beside the rerun's process for the same model (which then ran out
    of GPU memory). It ends with the command now."""
    cmd = [sys.executable, "-m", "evaluation.eval_qwen", "--model", f"base={setup / 'base'}", "--model",
           f"cpt={setup / 'cpt'}", "--tasks", "pubmedqa", "--data-dir", str(setup / "bench"), "--device", "cpu",
           "--out", str(tmp_path / "lm_eval")]
    with own_session(cmd) as proc:
        deadline = time.time() + 120
        while len(live_processes_of_session(proc.pid)) < 2 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)  # until the first model's process runs
        assert proc.poll() is None and len(live_processes_of_session(proc.pid)) == 2
        alive = processes_left_by_sigterm(proc)
        assert not alive, f"the model's process outlived the command: {alive}"
