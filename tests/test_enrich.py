"""LLM enrichment against a real OpenAI-protocol server on 127.0.0.1 (tools/openai_stub_server.py), through the
real openai client and the real datatrove executor: answers, malformed output, off-schema output, HTTP 500,
timeouts, failure policies, provenance, synthetic expansions, LaTeX clean-up, the cache on rerun, a server
killed mid-run and restarted, build_mix accounting with enrichment, and an API key that is written nowhere."""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from preprocessing import build_mix, enrich_data, pipeline
from preprocessing.llm import LLMConfig, LLMError, VLLMBackend
from preprocessing.recipe import MixRecipe
from preprocessing.report import balance, collect_ledger
from tools.openai_stub_server import StubServer, spawn

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "data" / "demo"
KEY = "sk-enrich-SECRET-4c3b2a1f0e"
KEY_ENV = "NEUROCPT_TEST_LLM_KEY"
NO_FILTERS = {"min_chars": 1, "gopher_quality": None, "gopher_repetition": None}
EXPAND_BELOW = 90
NON_MEDICAL = ("Knead the dough for ten minutes until it is smooth and elastic, then leave it to rise in a warm kitchen "
               "for an hour. Shape the loaves, score the tops with a sharp knife and bake them at two hundred degrees "
               "until the crust sounds hollow when tapped. Cool them on a rack before slicing.")
PAPER = r"""\documentclass{article}
\begin{document}
\title{%(title)s}
\maketitle
\section{Introduction}
%(first)s, as \autoref{fig:main} shows. %(second)s~\cite{ref1}.
\includegraphics[width=0.5\textwidth]{main.pdf}
\section{Methods}
%(methods)s \cite{ref2}.
\end{document}
"""
PAPERS = [
    {"title": "Thalamic gating of cortical seizures",
     "first": "Seizures in patients with epilepsy spread from the thalamus to the cortex",
     "second": "Cortical neurons fire in bursts before seizure onset in most intracranial EEG recordings",
     "methods": "We recorded 24 patients with intracranial EEG and fitted a rate model of thalamocortical dynamics to each "
                "seizure; gating by the reticular nucleus predicted termination in 71 percent of events"},
    {"title": "Hippocampal replay during slow-wave sleep",
     "first": "Hippocampal place cells replay waking trajectories during sleep spindles",
     "second": "Replay strength measured with simultaneous fMRI and scalp EEG predicted next-day memory",
     "methods": "Thirty healthy volunteers slept in the scanner for two nights while a decoder trained on awake runs "
                "scored compressed sequences of spikes and blood oxygen signals"},
    {"title": "Beta oscillations under deep brain stimulation",
     "first": "Subthalamic beta bursts shorten when patients with Parkinson disease receive adaptive stimulation",
     "second": "OFF-SCHEMA marks this paper, whose local field potentials came from externalised leads",
     "methods": "Eleven patients performed reaching tasks with stimulation on and off while motor symptoms were rated "
                "by blinded neurologists"},
]


def _abstracts(n: int, seed: int) -> list[dict]:
    from preprocessing.demo_corpus import abstract

    rng = random.Random(seed)
    return [abstract(rng) for _ in range(n)]


def _corpus(root: Path) -> None:
    """pubmed: generated abstracts plus a non-medical text and the failure markers; arxiv: LaTeX papers with
    leftovers the rule-based converter misses (one carrying OFF-SCHEMA); web: passes through unenriched."""
    rows = _abstracts(11, seed=7)
    slow = rows.pop()["text"] + " SLOW."
    long_tail = " Follow-up visits, imaging and neurological examinations were scheduled every three months."
    rows += [{"pmid": "p-nonmed", "text": NON_MEDICAL},
             {"pmid": "p-once", "text": "MALFORMED-ONCE. In 300 patients with acute stroke, care on a stroke unit lowered "
                                        "mortality at one year. The hospitals were not randomised, so the clinical benefit "
                                        "may be overstated."},
             {"pmid": "p-always", "text": "MALFORMED-ALWAYS. In a clinical trial of 120 patients with migraine, early triptan "
                                          "treatment reduced headache days. The trial was small and unblinded, so the effect "
                                          "on disability remains uncertain."},
             {"pmid": "p-slow", "text": slow + long_tail * 4}]
    (root / "pubmed").mkdir(parents=True)
    (root / "pubmed" / "abstracts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "arxiv").mkdir()
    for i, paper in enumerate(PAPERS):
        (root / "arxiv" / f"paper_{i}.tex").write_text(PAPER % paper)
    (root / "web").mkdir()
    (root / "web" / "web.jsonl").write_text("".join(json.dumps({"id": f"w{i}", "text": t}) + "\n" for i, t in enumerate(
        ["The harbour festival returns this summer with boats, music and food stalls along the quay for everyone.",
         "Our village library now lends garden tools as well as books, and volunteers repair them on Saturdays."])))


def _recipe(tmp: Path, corpus: Path, base_url: str, **llm) -> Path:
    raw = {
        "tokenizer": str(DEMO / "tokenizer"), "output_dir": str(tmp / "out"), "seq_length": 256, "token_budget": 20000,
        "heldout_fraction": 0.25, "seed": 11,
        "llm": {"model": "stub-model", "base_url": base_url, "api_key_env": KEY_ENV, "concurrency": 4, "timeout": 4.0,
                "retries": 2, "batch_size": 6, "cache_dir": str(tmp / "cache"), **llm},
        "sources": [
            {"name": "pubmed", "paths": [str(corpus / "pubmed" / "*.jsonl")], "id_key": "pmid", "share": 0.5, "filters": NO_FILTERS,
             "enrich": {"classify": True, "expand": True, "expand_below_words": EXPAND_BELOW, "on_failure": "keep"}},
            {"name": "arxiv", "paths": [str(corpus / "arxiv" / "*.tex")], "format": "latex", "share": 0.3, "filters": NO_FILTERS,
             "enrich": {"classify": True, "arxiv": True, "on_failure": "drop"}},
            {"name": "web", "paths": [str(corpus / "web" / "*.jsonl")], "share": 0.2, "filters": NO_FILTERS},
        ],
    }
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _cli(recipe: Path, *args: str, check: bool = True, **popen) -> subprocess.CompletedProcess | subprocess.Popen:
    cmd = [sys.executable, "-m", "preprocessing.enrich_data", "--config", str(recipe), *args]
    env = {**os.environ, KEY_ENV: KEY}
    if popen:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, text=True, **popen)
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert not check or run.returncode == 0, run.stderr[-4000:]
    return run


def _jsonl_gz(folder: Path) -> list[dict]:
    return [json.loads(line) for f in sorted(folder.glob("**/*.jsonl.gz")) for line in gzip.open(f, "rt")]


def _prompt(request: dict) -> str:
    return request["body"]["messages"][-1]["content"]


@pytest.fixture(scope="module")
def enriched(tmp_path_factory):
    """The CLI run twice against one server: once from scratch (two workers), once more after the enrichment
    stage's completion markers were deleted (so every document goes through the cache)."""
    tmp = tmp_path_factory.mktemp("enrich")
    _corpus(tmp / "corpus")
    server = StubServer(slow_seconds=10.0, fail_first=True)  # a SLOW prompt times out; no other may on a loaded machine
    recipe = _recipe(tmp, tmp / "corpus", server.url)
    first = _cli(recipe, "--workers", "2")
    calls_first = len(server.requests)
    summary_first = json.loads((tmp / "out" / "enrich_report.json").read_text())
    docs_first = _jsonl_gz(tmp / "out" / "enriched")
    shutil.rmtree(tmp / "out" / "logs" / "enrich")
    second = _cli(recipe, "--workers", "2")
    clean = {d["id"]: d["text"] for d in _jsonl_gz(tmp / "out" / "work" / "clean")}  # build_mix removes work/ later
    yield {"tmp": tmp, "out": tmp / "out", "recipe": recipe, "server": server, "runs": [first, second], "clean": clean,
           "calls_first": calls_first, "summary_first": summary_first, "docs_first": docs_first,
           "summary": json.loads((tmp / "out" / "enrich_report.json").read_text()), "docs": _jsonl_gz(tmp / "out" / "enriched")}
    server.close()


def _by_id(docs: list[dict]) -> dict[str, dict]:
    return {d["id"]: d for d in docs}


def test_classification_provenance_and_report(enriched):
    docs, summary = _by_id(enriched["docs"]), enriched["summary"]
    dropped = _by_id(_jsonl_gz(enriched["out"] / "enrich_dropped"))
    assert "pubmed/p-nonmed" not in docs
    assert dropped["pubmed/p-nonmed"]["metadata"]["enrich"]["classify"]["decision"] == "drop"
    assert dropped["pubmed/p-nonmed"]["metadata"]["enrich"]["dropped"] == "llm_classifier"
    for doc in docs.values():
        meta = doc["metadata"]
        if meta["source"] == "web":
            assert "enrich" not in meta  # not enriched: passed through untouched
            continue
        assert meta["enrich"]["model"] == "stub-model"
        if not meta.get("synthetic"):
            c = meta["enrich"]["classify"]
            assert c["prompt"] == "classify-v1" and (c.get("decision") == "keep" or "error" in c), doc["id"]
    assert docs["pubmed/p-once"]["metadata"]["enrich"]["classify"]["decision"] == "keep"  # malformed once, then fine
    for name, entry in summary["sources"].items():
        assert entry["unaccounted"] == 0, (name, entry)
        assert entry["in"] > 0
    assert summary["sources"]["web"]["out"] == summary["sources"]["web"]["in"] == 2
    assert summary["sources"]["pubmed"]["classified"]["drop"] == 1
    report = (enriched["out"] / "enrich_report.md").read_text()
    assert "| pubmed | classify, expand |" in report and "| web | passed through |" in report
    first = enriched["summary_first"]["usage"]
    assert first["llm_calls"] > 0 and first["llm_tokens_in"] > 0 and first["llm_tokens_out"] > 0
    log = (enriched["out"] / "enrich_data.log").read_text()  # a task's throughput line is datatrove INFO: log file only
    assert "docs/s" in log and "tokens in" in log and "docs/s per task" in enriched["runs"][0].stdout


def test_failures_recorded_with_raw_text_and_counted_per_policy(enriched):
    docs, summary = _by_id(enriched["docs"]), enriched["summary"]
    dropped = _by_id(_jsonl_gz(enriched["out"] / "enrich_dropped"))
    # pubmed (on_failure: keep): the always-malformed and the too-slow documents stay, with the failure recorded
    always = docs["pubmed/p-always"]["metadata"]["enrich"]
    assert always["classify"]["raw"] == "I would rather answer in prose."
    assert "malformed model output after 2 attempt(s)" in always["classify"]["error"]
    assert always["expand"]["error"].startswith("malformed") and "pubmed/p-always#expand" not in docs
    slow = docs["pubmed/p-slow"]["metadata"]["enrich"]["classify"]
    assert slow["error"] == "request failed: APITimeoutError" and slow["raw"] is None
    assert summary["sources"]["pubmed"]["failures"] == {"classify": 2, "expand": 1}
    assert summary["sources"]["pubmed"]["dropped"] == {"llm_classifier": 1}
    # arxiv (on_failure: drop): valid JSON off the schema is a failure too, and drops the paper
    assert "arxiv/paper_2" not in docs
    bad = dropped["arxiv/paper_2"]["metadata"]["enrich"]
    assert bad["dropped"] == "llm_failed:classify" and json.loads(bad["classify"]["raw"]) == {"decision": "maybe"}
    assert summary["sources"]["arxiv"]["dropped"] == {"llm_failed:classify": 1}
    assert summary["sources"]["arxiv"]["failures"] == {"classify": 1}
    errors = [json.loads(x) for f in (enriched["out"] / "errors").glob("enrich_*.jsonl") for x in f.read_text().splitlines()]
    assert sorted(e["excerpt"].split(":")[0] for e in errors) == ["arxiv/paper_2", "pubmed/p-always", "pubmed/p-always", "pubmed/p-slow"]
    usage = enriched["summary_first"]["usage"]
    assert usage["llm_failed_requests"] == 1
    assert usage["llm_malformed"] == 2 * 2 + 2 + 2  # always: classify and expand, 2 attempts each; off-schema: 2; once: 2 tasks


def test_http_500_is_retried_by_the_client(enriched):
    requests = enriched["server"].requests
    assert requests[0]["status"] == 500
    retried = [r for r in requests[1:] if _prompt(r) == _prompt(requests[0])]
    assert retried and retried[0]["status"] == 200  # the same request again, answered


def test_expansions_are_extra_synthetic_documents(enriched):
    docs = _by_id(enriched["docs"])
    originals = [d for d in docs.values() if d["metadata"]["source"] == "pubmed" and not d["metadata"].get("synthetic")]
    synthetic = [d for d in docs.values() if d["metadata"].get("synthetic")]
    assert synthetic and enriched["summary"]["sources"]["pubmed"]["synthetic"] == len(synthetic)
    for doc in originals:
        short = len(doc["text"].split()) < EXPAND_BELOW
        child = docs.get(f"{doc['id']}#expand")
        if doc["id"] in ("pubmed/p-always", "pubmed/p-slow"):
            assert child is None
            continue
        assert (child is not None) == short, doc["id"]
        if child:
            assert child["metadata"]["parent_id"] == doc["id"] and child["metadata"]["synthetic"] is True
            assert child["metadata"]["enrich"]["expand"]["prompt"] == "expand-v1"
            assert len(child["text"].split("\n\n")) >= 3 and child["text"] != doc["text"]
            assert doc["metadata"]["enrich"]["expand"]["synthetic_id"] == child["id"]
    assert any(len(d["text"].split()) >= EXPAND_BELOW for d in originals if d["id"] != "pubmed/p-slow")  # both sides tested
    # the originals are kept as they were read
    assert all(doc["text"] == enriched["clean"][doc["id"]] for doc in originals)


def test_residual_latex_removed_from_arxiv(enriched):
    docs, clean = _by_id(enriched["docs"]), enriched["clean"]
    leftovers = ["§", "<ref>", "< g r a p h i c s >", " ."]
    for i in (0, 1):
        before, after = clean[f"arxiv/paper_{i}"], docs[f"arxiv/paper_{i}"]
        assert all(x in before for x in leftovers)  # the rule-based converter left them
        assert not any(x in after["text"] for x in leftovers), after["text"]
        assert PAPERS[i]["first"] in after["text"] and PAPERS[i]["methods"][:60] in after["text"]
        arxiv = after["metadata"]["enrich"]["arxiv"]
        assert arxiv["prompt"] == "arxiv-v1" and arxiv["subfield"] == "neuroimaging" and arxiv["edits_applied"] >= 4
    assert enriched["summary"]["sources"]["arxiv"]["subfields"] == {"neuroimaging": 2}


def test_rerun_makes_calls_only_for_unfinished_documents(enriched):
    new = enriched["server"].requests[enriched["calls_first"]:]
    # everything settled in the first run came from the cache; only the timed-out request (never cached) was asked
    # again, with the client's own retries (2): three attempts
    assert len(new) == 3 and all("SLOW" in _prompt(r) for r in new)
    usage = enriched["summary"]["usage"]
    cache = {json.loads(x)["key"] for f in (enriched["tmp"] / "cache").glob("*.jsonl") for x in f.read_text().splitlines()}
    assert usage["llm_calls"] == 0 and usage["llm_failed_requests"] == 1 and usage["llm_cached"] == len(cache) > 20
    strip = lambda docs: sorted((d["id"], d["text"], json.dumps(d["metadata"].get("enrich"), sort_keys=True)) for d in docs)  # noqa: E731
    assert strip(enriched["docs"]) == strip(enriched["docs_first"])


def test_build_mix_continues_and_accounts_for_drops_and_synthetic_documents(enriched, capfd, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    recipe = MixRecipe.load(enriched["recipe"])
    mix = build_mix.build(recipe)
    ledger = collect_ledger(recipe.out / "logs", ["pubmed", "arxiv", "web"])
    for source, entry in ledger.items():
        assert balance(entry) == 0, (source, entry)
    pubmed = ledger["pubmed"]
    assert pubmed["synthetic"] == enriched["summary"]["sources"]["pubmed"]["synthetic"]
    assert pubmed["dropped"]["llm_classifier"] == 1 and ledger["arxiv"]["dropped"]["llm_failed:classify"] == 1
    # an expansion whose parent was held out is dropped: nothing derived from held-out text is trained on
    heldout = [json.loads(x) for x in (recipe.out / "heldout" / "pubmed.jsonl").read_text().splitlines()]
    expanded_parents = {d["metadata"]["parent_id"] for d in enriched["docs"] if d["metadata"].get("synthetic")}
    held_parents = {d["id"] for d in heldout} & expanded_parents
    assert held_parents and pubmed["dropped"]["synthetic_of_heldout"] == len(held_parents)
    assert not any(d["id"].endswith("#expand") for d in heldout)
    assert mix["sources"]["pubmed"]["tokens"] > 0
    report = (recipe.out / "report.md").read_text()
    assert "| pubmed |" in report and "synthetic_of_heldout" in report and "llm_classifier" in report
    assert KEY not in "".join(capfd.readouterr())


def test_api_key_is_sent_and_written_nowhere(enriched):
    assert all(r["auth"] == f"Bearer {KEY}" for r in enriched["server"].requests)
    files = [p for p in enriched["tmp"].rglob("*") if p.is_file()]
    assert len(files) > 20
    for path in files:
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        assert KEY.encode() not in data, path
    assert all(KEY not in run.stdout + run.stderr for run in enriched["runs"])


# --------------------------------------------------------------------------------- kill -9 and resume


def _serve(log: Path, port: int = 0) -> tuple[subprocess.Popen, str]:
    return spawn("--delay", "0.1", "--request-log", str(log), port=port, stderr=subprocess.STDOUT)


def _log(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []


def test_server_killed_mid_run_then_restarted_resumes_without_redoing_cached_work(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "pubmed").mkdir(parents=True)
    (corpus / "pubmed" / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _abstracts(16, seed=3)))
    server, url = _serve(tmp_path / "requests1.jsonl")
    recipe = _recipe(tmp_path, corpus, url, concurrency=2, batch_size=4, timeout=10)
    raw = yaml.safe_load(recipe.read_text())
    raw["sources"] = [{**raw["sources"][0], "share": 1.0, "enrich": {"classify": True, "expand": True, "expand_below_words": 1000}}]
    recipe.write_text(yaml.safe_dump(raw))

    run = _cli(recipe, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while len(_log(tmp_path / "requests1.jsonl")) < 8 and time.time() < deadline and run.poll() is None:
            time.sleep(0.05)
        server.send_signal(signal.SIGKILL)
        server.wait()
        stdout, stderr = run.communicate(timeout=120)
    finally:
        server.kill()
        run.kill()
    assert run.returncode != 0
    assert "enrichment stopped" in stderr and "rerun the same command to resume" in stderr, stderr[-3000:]
    assert KEY not in stdout + stderr
    cache = [json.loads(x) for f in (tmp_path / "cache").glob("*.jsonl") for x in f.read_text().splitlines()]
    cached = {(e["task"], e["doc_sha256"]) for e in cache if e["output"] is not None}
    assert 0 < len(cached) < 32 and len(cache) == len(cached)

    server, _ = _serve(tmp_path / "requests2.jsonl", port=urlsplit(url).port)  # the recipe's URL
    try:
        _cli(recipe)
    finally:
        server.kill()
    asked = [(r["task"], r["doc_sha256"]) for r in _log(tmp_path / "requests2.jsonl")]
    summary = json.loads((tmp_path / "out" / "enrich_report.json").read_text())
    documents = summary["sources"]["pubmed"]["in"]
    assert documents >= 14 and summary["sources"]["pubmed"]["synthetic"] == documents
    assert not set(asked) & cached  # nothing finished before the kill was asked again
    assert len(asked) == len(set(asked)) == 2 * documents - len(cached)  # and everything else exactly once
    assert summary["usage"]["llm_cached"] == len(cached) and summary["usage"]["llm_calls"] == len(asked)


# ----------------------------------------------------------------------------------------- bad input


def test_bad_recipes_and_setup_give_clear_errors(tmp_path, monkeypatch):
    _corpus(tmp_path / "corpus")
    path = _recipe(tmp_path, tmp_path / "corpus", "http://127.0.0.1:9/v1")
    raw = yaml.safe_load(path.read_text())

    def load(**changes):
        variant = {**raw, **changes}
        path.write_text(yaml.safe_dump(variant))
        return MixRecipe.load(path)

    source = raw["sources"][0]
    with pytest.raises(ValueError, match="no llm: block"):
        load(llm=None)
    with pytest.raises(ValueError, match=r"enrich: unknown keys \['clasify'\]"):
        load(sources=[{**source, "enrich": {"clasify": True}}, *raw["sources"][1:]])
    with pytest.raises(ValueError, match="on_failure must be keep or drop"):
        load(sources=[{**source, "enrich": {"classify": True, "on_failure": "skip"}}, *raw["sources"][1:]])
    with pytest.raises(ValueError, match="at least one of classify, expand, arxiv"):
        load(sources=[{**source, "enrich": {"on_failure": "drop"}}, *raw["sources"][1:]])
    with pytest.raises(ValueError, match=r"llm: unknown keys \['base-url'\]"):
        load(llm={**raw["llm"], "base-url": "x"})
    with pytest.raises(ValueError, match="backend 'tgi'"):
        load(llm={**raw["llm"], "backend": "tgi"})
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(LLMError, match=KEY_ENV):  # before any stage runs
        pipeline.run_stages(load(), until="enrich")
    assert not (tmp_path / "out" / "logs").exists()
    with pytest.raises(SystemExit, match="no source has an enrich"):
        enrich_data.main(["--config", str(DEMO / "recipe.yaml")])
    if importlib.util.find_spec("vllm") is None:  # this machine: no GPU, no vLLM
        with pytest.raises(LLMError, match=r"pip install -e '\.\[gpu\]'"):
            VLLMBackend(LLMConfig(model="m", backend="vllm"))


def test_an_expansion_of_blank_paragraphs_is_a_recorded_failure(tmp_path, monkeypatch):
    """An empty expansion would be written as an empty document, which the next stage's reader skips with only a
    warning: it must be an expand failure, listed and counted like the others, and no document at all."""
    import tools.openai_stub_server as stub

    expand = stub.ANSWERS["expand"]
    monkeypatch.setitem(stub.ANSWERS, "expand", lambda prompt: {"paragraphs": [" ", "", "\n\t"]} if "BLANK" in prompt else expand(prompt))
    rows = _abstracts(4, seed=5)
    rows[0]["text"] = "BLANK. " + rows[0]["text"]
    (tmp_path / "corpus" / "pubmed").mkdir(parents=True)
    (tmp_path / "corpus" / "pubmed" / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    server = StubServer()
    try:
        recipe = _recipe(tmp_path, tmp_path / "corpus", server.url)
        raw = yaml.safe_load(recipe.read_text())
        raw["sources"] = [{**raw["sources"][0], "share": 1.0, "enrich": {"expand": True, "expand_below_words": 1000}}]
        recipe.write_text(yaml.safe_dump(raw))
        _cli(recipe)
    finally:
        server.close()
    docs = _by_id(_jsonl_gz(tmp_path / "out" / "enriched"))
    blank = f"pubmed/{rows[0]['pmid']}"
    assert f"{blank}#expand" not in docs and all(d["text"] for d in docs.values())
    assert docs[blank]["metadata"]["enrich"]["expand"]["error"] == "blank expansion: every paragraph is empty"
    assert json.loads(docs[blank]["metadata"]["enrich"]["expand"]["raw"]) == {"paragraphs": [" ", "", "\n\t"]}
    assert all(f"{d['id']}#expand" in docs for d in docs.values() if d["id"] != blank and not d["metadata"].get("synthetic"))
    errors = [json.loads(x) for f in (tmp_path / "out" / "errors").glob("enrich_*.jsonl") for x in f.read_text().splitlines()]
    assert [(e["reason"], e["excerpt"].split(":")[0]) for e in errors] == [("llm_failed:expand", blank)]
    pubmed = json.loads((tmp_path / "out" / "enrich_report.json").read_text())["sources"]["pubmed"]
    assert pubmed["failures"] == {"expand": 1} and pubmed["synthetic"] == pubmed["in"] - 1 == 3
    assert pubmed["unaccounted"] == 0 and pubmed["out"] == 7


def test_input_errors_end_the_command_with_one_line_and_a_log_file(tmp_path):
    """As build_mix: a source glob matching nothing is one line on the console, its traceback in enrich_data.log."""
    _corpus(tmp_path / "corpus")
    path = _recipe(tmp_path, tmp_path / "corpus", "http://127.0.0.1:9/v1")
    raw = yaml.safe_load(path.read_text())
    raw["sources"][0]["paths"] = ["missing/*.jsonl"]
    path.write_text(yaml.safe_dump(raw))
    run = _cli(path, check=False)
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert run.stderr.strip().splitlines()[-1] == f"error: source pubmed: no files match ['missing/*.jsonl'] (relative to {tmp_path})"
    log = (tmp_path / "out" / "enrich_data.log").read_text()
    assert "Traceback" in log and "FileNotFoundError: source pubmed: no files match" in log


def test_an_unreachable_server_is_one_line_per_failed_task_on_the_console(tmp_path):
    """A task that fails is logged by datatrove with its traceback and every variable's value (about 100 lines a
    task): on the console its first line, the traceback in enrich_data.log only; the command ends with one line."""
    _corpus(tmp_path / "corpus")
    run = _cli(_recipe(tmp_path, tmp_path / "corpus", "http://127.0.0.1:9/v1"), check=False)
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr[-3000:]
    failed = [x for x in run.stderr.splitlines() if "| ERROR " in x]
    assert failed and all(x.endswith(f"is the server running? (traceback in {tmp_path / 'out' / 'enrich_data.log'})")
                          for x in failed), run.stderr[-3000:]
    assert run.stderr.strip().splitlines()[-1].startswith("error: enrichment stopped: LLM server http://127.0.0.1:9/v1")
    log = (tmp_path / "out" / "enrich_data.log").read_text()
    assert "Traceback" in log and "LLMUnavailable" in log


def test_a_report_rewrite_that_fails_keeps_the_last_json_and_table(tmp_path, monkeypatch):
    """enrich_report.json and .md are one report: a failure writing the table must not leave a new JSON beside
    the last run's table, nor half a table."""
    _corpus(tmp_path / "corpus")
    recipe = MixRecipe.load(_recipe(tmp_path, tmp_path / "corpus", "http://127.0.0.1:9/v1"))
    recipe.out.mkdir()
    old = {"enrich_report.json": '{"run": "last"}', "enrich_report.md": "# Enrichment report of the last run\n"}
    for name, text in old.items():
        (recipe.out / name).write_text(text)
    write_text = Path.write_text

    def disk_full_on_the_table(self, text, *args, **kwargs):
        if "enrich_report.md" not in self.name:
            return write_text(self, text, *args, **kwargs)
        write_text(self, text[: len(text) // 2], *args, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", disk_full_on_the_table)
    with pytest.raises(OSError, match="No space left"):
        enrich_data.write_report(recipe)
    assert {p.name: p.read_text() for p in recipe.out.iterdir()} == old
    monkeypatch.undo()
    assert enrich_data.write_report(recipe).startswith("# Enrichment report")
    assert json.loads((recipe.out / "enrich_report.json").read_text())["model"] == "stub-model"


def test_demo_recipe_enriches_end_to_end_as_the_readme_runs_it(tmp_path):
    """data/demo/recipe_enrich.yaml through the README's two commands, against a stub server: every enriched
    source accounted for, arXiv papers cleaned, abstracts expanded, and build_mix finishing the mix."""
    server = StubServer()
    try:
        raw = yaml.safe_load((DEMO / "recipe_enrich.yaml").read_text())
        raw.update(base_dir=str(DEMO), output_dir=str(tmp_path / "out"))
        raw["llm"].update(base_url=server.url, api_key_env=KEY_ENV)
        recipe = tmp_path / "recipe_enrich.yaml"
        recipe.write_text(yaml.safe_dump(raw))
        _cli(recipe, "--workers", "2")
        env = {**os.environ, KEY_ENV: KEY}
        run = subprocess.run([sys.executable, "-m", "preprocessing.build_mix", "--config", str(recipe), "--workers", "2"],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-4000:]
    finally:
        server.close()
    summary = json.loads((tmp_path / "out" / "enrich_report.json").read_text())
    assert all(e["unaccounted"] == 0 for e in summary["sources"].values())
    assert summary["sources"]["arxiv_neuro"]["arxiv_cleaned"] == summary["sources"]["arxiv_neuro"]["in"] > 0
    assert summary["sources"]["pubmed_neuro"]["synthetic"] > 0 and summary["usage"]["llm_calls"] > 0
    assert not summary["sources"]["ehr"]["tasks"]  # clinical notes are never sent to the server
    ledger = collect_ledger(tmp_path / "out" / "logs", list(summary["sources"]))
    assert all(balance(entry) == 0 for entry in ledger.values())
    assert (tmp_path / "out" / "mix.json").is_file()
