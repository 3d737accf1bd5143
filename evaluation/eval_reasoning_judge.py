"""Blind pairwise LLM-judge comparison of two models' clinical reasoning.

    OPENAI_API_KEY=... python -m evaluation.eval_reasoning_judge --model base_sft=DIR --model cpt_sft=DIR \\
        --medmcqa medmcqa.jsonl --pubmedqa pubmedqa.jsonl --medqa medqa.jsonl --n 200 \\
        [--judge-model gpt-4o] [--base-url URL] [--chat-template-kwargs JSON] [--answer-template-kwargs JSON] \\
        [--seed 0] [--out results/judge]

The judge is a server: the OpenAI API, or any OpenAI-compatible one given by ``--base-url`` (a local model:
``vllm serve Qwen/Qwen3-32B --port 8000``, then ``--base-url http://127.0.0.1:8000/v1``). This command does
not start vLLM itself: the answers are generated here with transformers, the judgements come from the server.

1. Sample ``--n`` questions, seeded and stratified by source, from local MedMCQA (question, opa..opd, cop
   (0-3 or 1-4: see --medmcqa-cop), exp), PubMedQA (QUESTION, CONTEXTS, LONG_ANSWER, final_decision) and MedQA (question, options,
   answer) jsonl files.
2. Generate each model's full answer (reasoning included) with its tokenizer's chat template, given the SFT
   data's ``chat_template_kwargs`` (an SFT run's export records them in ``neurocpt_sft_chat.json``;
   ``--answer-template-kwargs`` overrides them), so the answers are prompted as the models were trained
   (Qwen3.5-0.8B and -2B's template closes the think block unless ``enable_thinking`` is true: a model trained on
   reasoning with it would otherwise answer without). A chat template other than the one the SFT data was
   rendered with is warned about.
3. Judge every question twice through the ``openai`` client, once in each presentation order; which model
   is "Response A" in the first call is drawn per question from ``--seed`` (recorded). The judge returns
   JSON (schema below): a verdict A/B/tie and 1-5 scores on Diagnostic Reasoning, Clinical Knowledge,
   Management Quality, Reasoning Chain and Overall. Malformed output is retried, then counted as failed.
4. Verdict rule: when both orders name the same model, it wins; when they disagree (position bias) or
   both say tie, the question is a tie; a question with a failed order counts only its valid order.
   Scores are averaged over the valid orders.
5. Report win/tie/loss, win rate (ties count half), each model's mean score per criterion and the mean
   differences (over the questions both were scored on), all with bootstrap 95% CIs, judge tokens and cost;
   per-question results in ``<out>.jsonl``.

Judgements are cached by everything sent to the judge (the full prompt: question, reference answer, both responses
in their order; judge model, sampling settings, chat template arguments, schema) in ``<out>.cache.jsonl``,
answers by (checkpoint: its path and the names, sizes and modification times of its files, so a checkpoint written
again under the same path is answered again; ``--max-new-tokens``, prompt) in ``<out>.answers.jsonl``, each as it
settles: a rerun, or a run killed and started again, costs no new calls or generation for what is done. Each cached judgement
keeps its calls and tokens, so the reported cost covers every judgement used, from this run or an earlier one. The API key is read from the environment only and is never written anywhere.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import random
import time
from pathlib import Path
from typing import Iterator

from evaluation.common import device_and_dtype, fingerprint, named_paths, stopped, text_lines, write_report
from preprocessing.atomic import write_atomic
from preprocessing.chat import SFT_CHAT_FILE, template_sha
from preprocessing.cli import positive_int
from preprocessing.llm import JsonlCache, LLMConfig, LLMError, Request, StructuredLLM, cache_key

log = logging.getLogger("neurocpt.judge")

CRITERIA = ["diagnostic_reasoning", "clinical_knowledge", "management_quality", "reasoning_chain", "overall"]
PROMPT_VERSION = "judge-v1"
PROMPT_FILE = Path(__file__).with_name("prompts") / f"{PROMPT_VERSION}.txt"
KEYED_BY = "full prompt"  # marks cache entries keyed by :meth:`StructuredLLM.prompt_key`; older ones left out the reference
# marks answers keyed by the checkpoint's :func:`fingerprint` and the dtype; older ones by the path, then without the dtype
ANSWERS_KEYED_BY = "checkpoint fingerprint, dtype"
SCORE = {"type": "integer", "minimum": 1, "maximum": 5}
SCHEMA = {
    "type": "object",
    "properties": {
        "verdict": {"type": "string", "enum": ["A", "B", "tie"]},
        "scores": {"type": "object", "properties": {
            side: {"type": "object", "properties": {c: SCORE for c in CRITERIA}, "required": CRITERIA,
                   "additionalProperties": False} for side in ("A", "B")},
            "required": ["A", "B"], "additionalProperties": False},
        "rationale": {"type": "string"},
    },
    "required": ["verdict", "scores", "rationale"],
    "additionalProperties": False,
}


# ------------------------------------------------------------------------------------------ questions


def medmcqa_cop_base(path: str | Path, given: str = "auto") -> int:
    """What MedMCQA's answer index ``cop`` counts from in this file: 0 (the hub dataset, 0-3) or 1 (the original
    release, 1-4). ``auto`` reads it from the file: a 4 and no 0 means 1, a 0 and no 4 means 0; a file with both, or
    with neither (only 1-3, right in either numbering), is refused unless ``given``."""
    if given != "auto":
        return int(given)
    values = set()
    for _, line in text_lines(path):
        try:
            values.add(int(json.loads(line)["cop"]))
        except (ValueError, KeyError, TypeError):
            continue  # a malformed record is named by line when the questions are read
    if (0 in values) != (4 in values):
        return 0 if 0 in values else 1
    if not values:
        return 0
    why = "both 0 and 4" if 0 in values else f"only {sorted(values)}, which either numbering allows"
    raise ValueError(f"{path}: cannot tell whether MedMCQA's 'cop' counts from 0 or 1: it has {why}. Give "
                     "--medmcqa-cop 0 (0-3, the hub dataset's) or --medmcqa-cop 1 (1-4, the original release's)")


def _medmcqa(r: dict, i: int, base: int = 0) -> dict:
    answer = int(r["cop"]) - base
    if not 0 <= answer < 4:
        raise ValueError(f"cop {r['cop']} is no option (the file's numbering is {base}-{base + 3})")
    return {"id": f"medmcqa/{r.get('id', i)}", "source": "medmcqa",
            "prompt": f"{r['question']}\nA. {r['opa']}\nB. {r['opb']}\nC. {r['opc']}\nD. {r['opd']}\n"
                      "Explain your reasoning step by step, then give the answer.",
            "reference": f"Answer: {'ABCD'[answer]}. {r.get('exp') or ''}".strip()}


def _pubmedqa(r: dict, i: int) -> dict:
    return {"id": f"pubmedqa/{r.get('pubid', i)}", "source": "pubmedqa",
            "prompt": "Abstract: " + " ".join(r["CONTEXTS"]) + f"\nQuestion: {r['QUESTION']}\n"
                      "Reason about the evidence, then answer yes, no or maybe.",
            "reference": f"{r['final_decision']}. {r['LONG_ANSWER']}"}


def _medqa(r: dict, i: int) -> dict:
    return {"id": f"medqa/{r.get('id', i)}", "source": "medqa",
            "prompt": r["question"] + "\n" + "\n".join(f"{k}. {v}" for k, v in sorted(r["options"].items()))
                      + "\nExplain your reasoning step by step, then give the answer.",
            "reference": f"Answer: {r.get('answer_idx', '')} {r['answer']}".strip()}


def _read_questions(path: str | Path, source: str, build) -> list[dict]:
    """``build(record, index)`` for every record of a jsonl file; a malformed line, a record without the
    source's fields or an id seen before is named by file and line."""
    rows, seen = [], set()
    for i, line in text_lines(path):
        try:
            q = build(json.loads(line), len(rows))
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
            raise ValueError(f"{path}:{i}: not a {source} record ({type(err).__name__}: {err})") from err
        if q["id"] in seen:
            raise ValueError(f"{path}:{i}: question id {q['id']!r} again (ids key the answers and judgements)")
        seen.add(q["id"])
        rows.append(q)
    return rows


def load_questions(medmcqa=None, pubmedqa=None, medqa=None, medmcqa_cop: str = "auto") -> dict[str, list[dict]]:
    """Normalised {id, source, prompt, reference} per source."""
    medmcqa_build = functools.partial(_medmcqa, base=medmcqa_cop_base(medmcqa, medmcqa_cop)) if medmcqa else None
    files = {"medmcqa": (medmcqa, medmcqa_build), "pubmedqa": (pubmedqa, _pubmedqa), "medqa": (medqa, _medqa)}
    return {source: _read_questions(path, source, build) for source, (path, build) in files.items() if path}


def quotas(sizes: dict[str, int], n: int) -> dict[str, int]:
    """``n`` split as evenly as possible over the sources (the remainder to the first by name); what a source lacks of
    its share goes to the others, evenly again."""
    total = sum(sizes.values())
    if n > total:
        have = ", ".join(f"{s} {k}" for s, k in sorted(sizes.items()))
        raise ValueError(f"{n} questions requested, the question files have {total} ({have})")
    quota, left, open_sources = dict.fromkeys(sizes, 0), n, sorted(sizes)
    while left:
        share = {s: left // len(open_sources) + (i < left % len(open_sources)) for i, s in enumerate(open_sources)}
        for s in open_sources:
            take = min(share[s], sizes[s] - quota[s])
            quota[s], left = quota[s] + take, left - take
        open_sources = [s for s in open_sources if quota[s] < sizes[s]]
    return quota


def sample(questions: dict[str, list[dict]], n: int, seed: int) -> list[dict]:
    """``n`` questions, as evenly as possible over the sources (:func:`quotas`), drawn with ``seed``."""
    rng = random.Random(seed)
    quota = quotas({s: len(pool) for s, pool in questions.items()}, n)
    return [q for s in sorted(questions) for q in rng.sample(questions[s], quota[s])]


# ----------------------------------------------------------------------------------------- generation


def was_cut(new_tokens: list[int], max_new_tokens: int, eos: int | list[int] | None) -> bool:
    """Whether generation stopped at ``max_new_tokens`` rather than at an end-of-sequence token: such an answer
    may end before its conclusion (a template that opens a think block spends the budget there)."""
    eos_ids = {eos} if isinstance(eos, int) else set(eos or ())
    return len(new_tokens) >= max_new_tokens and (not new_tokens or new_tokens[-1] not in eos_ids)


def sft_chat(model_dir: str) -> dict:
    """How the model's SFT data was rendered, as its export recorded it (``chat_template_kwargs``,
    ``chat_template_sha256``); empty for a model exported without one (not trained here, or before it was kept)."""
    path = Path(model_dir) / SFT_CHAT_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def generate(model_dir: str, prompts: list[str], max_new_tokens: int, device: str, dtype,
             template_kwargs: dict | None = None, trained_template: str | None = None) -> Iterator[tuple[str, bool]]:
    """Greedy answers with the model's own chat template (given ``template_kwargs``, e.g. ``enable_thinking``), one
    at a time (the caller keeps each as it comes), each with whether it was cut at ``max_new_tokens`` (:func:`was_cut`).
    A template other than ``trained_template`` (the sha256 its SFT data recorded) is warned about."""
    import torch
    from tqdm import tqdm

    from evaluation.common import load_hf_model

    model, tok = load_hf_model(model_dir, device, dtype)
    if not tok.chat_template:
        raise ValueError(f"{model_dir}: the tokenizer has no chat template (needed for the judged answers)")
    if trained_template and (sha := template_sha(tok.chat_template)) != trained_template:
        log.warning("%s: its chat template (sha256 %s) is not the one its SFT data was rendered with (%s): its answers "
                    "are prompted otherwise than it was trained", model_dir, sha, trained_template)
    for prompt in tqdm(prompts, desc=f"answers of {model_dir}", unit="question"):
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True, **(template_kwargs or {}))["input_ids"].to(device)
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
        new = out[0, ids.shape[1]:]
        yield (tok.decode(new, skip_special_tokens=True).strip(),
               was_cut(new.tolist(), max_new_tokens, model.generation_config.eos_token_id))


# ------------------------------------------------------------------------------------------ judging


class Judge:
    """The judge model behind :class:`preprocessing.llm.StructuredLLM`: schema-validated JSON, malformed output
    retried, a persistent cache, usage counted."""

    def __init__(self, model: str, base_url: str | None, api_key_env: str, cache: Path, retries: int = 3,
                 timeout: float = 60.0, chat_template_kwargs: dict | None = None, concurrency: int = 8):
        config = LLMConfig(model=model, backend="openai", base_url=base_url, api_key_env=api_key_env, retries=retries,
                           timeout=timeout, chat_template_kwargs=chat_template_kwargs, concurrency=concurrency)
        store = JsonlCache(cache)
        old = sum(entry.get("keyed_by") != KEYED_BY for entry in store.entries.values())
        if old:
            log.warning("%s: %d judgement(s) cached in an older format (keyed without the reference answer) are ignored; "
                        "those orders are judged again", cache, old)
        try:
            self.llm = StructuredLLM(config, store, what="judge")
        except LLMError as err:
            raise SystemExit(str(err)) from None
        self.model = model
        self.template = PROMPT_FILE.read_text()

    @property
    def usage(self) -> dict:
        return self.llm.usage

    def __call__(self, orders: list[tuple[dict, str, str]]) -> list[dict]:
        """{"judgement": dict | None, "error": str | None} for each (question, response A, response B). They go to
        the server in chunks, each chunk's requests concurrently (one at a time, 400 judge calls of seconds each
        took most of an hour); progress and throughput are logged after each chunk."""
        requests = []
        for question, a, b in orders:
            prompt = self.template.format(question=question["prompt"], reference=question["reference"], a=a, b=b)
            requests.append(Request(self.llm.prompt_key(prompt, SCHEMA), prompt, SCHEMA, "judgement", ref=f"question {question['id']}",
                                    meta={"id": question["id"], "keyed_by": KEYED_BY}))
        results, start, chunk = [], time.monotonic(), 4 * self.llm.config.concurrency
        for i in range(0, len(requests), chunk):
            results += self.llm.run(requests[i:i + chunk])
            log.info("judged %d/%d orders (%d from the cache), %.2f calls/s", len(results), len(requests),
                     self.usage["cached"], self.usage["calls"] / (time.monotonic() - start))
        return [{"judgement": r.output, "error": r.error} for r in results]


def combine(first: str, second: str, orders: list[tuple[str, dict | None]]) -> dict:
    """Per question: the verdict by the rule in the module docstring and the mean scores per model.
    ``orders``: (name of the model shown as A, judgement or None) for both presentation orders."""
    winners, scores = [], {first: [], second: []}
    for a_name, judgement in orders:
        if judgement is None:
            continue
        b_name = second if a_name == first else first
        winners.append({"A": a_name, "B": b_name, "tie": "tie"}[judgement["verdict"]])
        scores[a_name].append(judgement["scores"]["A"])
        scores[b_name].append(judgement["scores"]["B"])
    if not winners:
        verdict = None
    elif len(winners) == 1 or winners[0] == winners[1]:
        verdict = winners[0]
    else:
        verdict = "tie"
    mean = {m: {c: sum(s[c] for s in v) / len(v) for c in CRITERIA} if v else None for m, v in scores.items()}
    return {"verdict": verdict, "orders_valid": len(winners), "consistent": len(set(winners)) <= 1, "scores": mean}


def bootstrap_ci(values: list[float], seed: int, n: int = 2000) -> tuple[float, float, float]:
    import numpy as np

    arr = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    means = arr[rng.integers(0, len(arr), size=(n, len(arr)))].mean(axis=1)
    return float(arr.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def total_usage(usage: dict) -> dict:
    """Calls and tokens of every judgement used: this run's calls plus what the cached ones cost when made (a
    judge.json written before the cache kept token counts has only this run's)."""
    return {k: usage[k] + usage.get("cached_" + k, 0) for k in ("calls", "prompt_tokens", "completion_tokens")}


def cost(usage: dict, prices: tuple[float, float]) -> float:
    return usage["prompt_tokens"] / 1e6 * prices[0] + usage["completion_tokens"] / 1e6 * prices[1]


def summarize(rows: list[dict], first: str, second: str, seed: int, usage: dict, prices: tuple[float, float]) -> dict:
    judged = [r for r in rows if r["verdict"] is not None]
    win = [1.0 if r["verdict"] == second else 0.5 if r["verdict"] == "tie" else 0.0 for r in judged]
    summary = {
        "questions": len(rows), "judged": len(judged), "failed": len(rows) - len(judged),
        "inconsistent_orders": sum(not r["consistent"] for r in judged),
        "one_order": sum(r["orders_valid"] == 1 for r in judged),  # the other failed: position bias not cancelled
        "cut_answers": {m: sum(m in r.get("cut_at_max_new_tokens", ()) for r in rows) for m in (first, second)},
        f"{second}_wins": sum(r["verdict"] == second for r in judged),
        f"{first}_wins": sum(r["verdict"] == first for r in judged), "ties": sum(r["verdict"] == "tie" for r in judged),
        f"{second}_win_rate": bootstrap_ci(win, seed) if win else None,
        "scores": {first: {}, second: {}}, "score_difference": {}, "usage": usage,
        "cost_usd": cost(total_usage(usage), prices), "cost_usd_this_run": cost(usage, prices),
    }
    both = [r for r in judged if r["scores"][first] and r["scores"][second]]  # means and differences: same questions
    for c in CRITERIA:
        for m in (first, second):
            summary["scores"][m][c] = bootstrap_ci([r["scores"][m][c] for r in both], seed) if both else None
        diffs = [r["scores"][second][c] - r["scores"][first][c] for r in both]
        summary["score_difference"][c] = bootstrap_ci(diffs, seed) if diffs else None
    return summary


def _with_ci(v: list[float] | None, sign: str = "") -> str:
    return f"{v[0]:{sign}.2f} [{v[1]:{sign}.2f}, {v[2]:{sign}.2f}]" if v else "-"


def to_markdown(summary: dict, first: str, second: str) -> str:
    lines = [f"| {second} vs {first} | value | 95% CI |", "|---|---|---|"]
    rate = summary[f"{second}_win_rate"]
    if rate:
        lines.append(f"| win rate (ties half) | {rate[0]:.3f} | [{rate[1]:.3f}, {rate[2]:.3f}] |")
    lines.append(f"| wins / ties / losses | {summary[f'{second}_wins']} / {summary['ties']} / {summary[f'{first}_wins']} | |")
    u, total = summary["usage"], total_usage(summary["usage"])
    # ? where the summary predates the one-order count (the report renders judge.json files of earlier runs)
    lines.append(f"| judged (of them on one order only) / failed / inconsistent orders | {summary['judged']} "
                 f"({summary.get('one_order', '?')}) / {summary['failed']} / {summary['inconsistent_orders']} | |")
    cut = summary.get("cut_answers", {})  # ? where the summary predates the count
    lines.append(f"| answers cut at --max-new-tokens, {first} / {second} | {cut.get(first, '?')} / {cut.get(second, '?')} | |")
    lines.append(f"| judge calls / tokens in / out / cost, all runs | {total['calls']} / {total['prompt_tokens']} / "
                 f"{total['completion_tokens']} / ${summary['cost_usd']:.4f} | |")
    lines.append(f"| of which this run (orders from the cache) | {u['calls']} / {u['prompt_tokens']} / {u['completion_tokens']} / "
                 f"${summary.get('cost_usd_this_run', summary['cost_usd']):.4f} ({u['cached']}) | |")
    lines += ["", f"| mean score (1-5) [95% CI] | {first} | {second} | Δ {second} − {first} |", "|---|---|---|---|"]
    for c, diff in summary["score_difference"].items():
        lines.append(f"| {c.replace('_', ' ')} | {_with_ci(summary['scores'][first][c])} | "
                     f"{_with_ci(summary['scores'][second][c])} | {_with_ci(diff, '+')} |")
    return "\n".join(lines) + "\n"


def run(models: dict[str, str], questions: list[dict], judge: Judge, seed: int, max_new_tokens: int, device: str | None,
        out: Path, prices: tuple[float, float] = (0.0, 0.0), template_kwargs: dict | None = None) -> dict:
    first, second = list(models)
    device, dtype = device_and_dtype(device)
    cache = JsonlCache(out.with_suffix(".answers.jsonl"))  # answers are cached too, each as it comes: generating is slow
    old = sum(entry.get("keyed_by") != ANSWERS_KEYED_BY for entry in cache.entries.values())
    if old:
        log.warning("%s: %d answer(s) cached in an older format (keyed by the checkpoint's path, or without the dtype) "
                    "are ignored; those answers are generated again", cache.path, old)
    answers, cut_at, used_kwargs = {}, {}, {}
    for name, model_dir in models.items():
        # the SFT data's template arguments, as its export recorded them, unless --answer-template-kwargs says otherwise
        trained = sft_chat(model_dir)
        kwargs = trained.get("chat_template_kwargs") if template_kwargs is None else template_kwargs
        used_kwargs[name] = kwargs or {}
        log.info("%s: answers prompted with chat template arguments %s (%s)", name, json.dumps(used_kwargs[name]),
                 "--answer-template-kwargs" if template_kwargs is not None else
                 f"its {SFT_CHAT_FILE}" if trained else f"none: no --answer-template-kwargs, no {SFT_CHAT_FILE}")
        # keyed by checkpoint, not by name: a name reused for another checkpoint must not get the old one's answers;
        # and by its contents (the fingerprint: path, names, sizes and mtimes of its files), not only its path: a
        # checkpoint retrained or replaced under the same path must not get the old one's answers either
        model_id = fingerprint(model_dir)
        # the template's arguments only when given: answers cached without them keep their keys
        extra = [kwargs] if kwargs else []
        keys = {q["id"]: cache_key(model_id, max_new_tokens, q["prompt"], str(dtype), *extra) for q in questions}
        todo = [q for q in questions if cache.get(keys[q["id"]]) is None]
        if todo:  # only then is the model loaded
            new = generate(model_dir, [q["prompt"] for q in todo], max_new_tokens, device, dtype, kwargs,
                           trained.get("chat_template_sha256"))
            for q, (answer, cut) in zip(todo, new, strict=True):  # strict: the generator runs to its end, its progress bar too
                cache.put({"key": keys[q["id"]], "keyed_by": ANSWERS_KEYED_BY, "model": name, "model_dir": model_dir,
                           "id": q["id"], "answer": answer, "cut": cut})
        entries = {q["id"]: cache.get(keys[q["id"]]) for q in questions}
        answers[name] = {qid: e["answer"] for qid, e in entries.items()}
        cut_at[name] = {qid: e.get("cut") for qid, e in entries.items()}  # None: cached before it was recorded
        if any(cut_at[name].values()):
            log.warning("%s: %d of %d answers stopped at --max-new-tokens %d, maybe before their conclusion: the judge "
                        "sees them cut (give more tokens to judge whole answers)", name,
                        sum(map(bool, cut_at[name].values())), len(questions), max_new_tokens)
    orders = []  # (question, model shown as A, model shown as B): both orders of every question
    for q in questions:
        rng = random.Random(f"{seed}:{q['id']}")
        a_first = first if rng.random() < 0.5 else second  # blind: which model is shown as A first
        b_first = second if a_first == first else first
        orders += [(q, a_first, b_first), (q, b_first, a_first)]
    results = judge([(q, answers[a][q["id"]], answers[b][q["id"]]) for q, a, b in orders])
    rows = []
    for k, q in enumerate(questions):
        pair = [(orders[i][1], results[i]) for i in (2 * k, 2 * k + 1)]
        rows.append({"id": q["id"], "source": q["source"], "seed": seed, "first_order_A": pair[0][0],
                     **combine(first, second, [(a, r["judgement"]) for a, r in pair]),
                     "errors": [r["error"] for _, r in pair if r["error"]],
                     "cut_at_max_new_tokens": [m for m in models if cut_at[m][q["id"]]]})
    write_atomic(out.with_suffix(".jsonl"), "".join(json.dumps(r) + "\n" for r in rows))
    summary = summarize(rows, first, second, seed, judge.usage, prices)
    write_report(out, {"models": models, "answer_template_kwargs": used_kwargs, "judge_model": judge.model,
                       "prompt_version": PROMPT_VERSION, "seed": seed, **summary}, to_markdown(summary, first, second))
    return summary


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", required=True, help="name=HF directory (exactly two)")
    p.add_argument("--medmcqa")
    p.add_argument("--medmcqa-cop", choices=["auto", "0", "1"], default="auto",
                   help="what MedMCQA's answer index 'cop' counts from: 0 (0-3, the hub dataset), 1 (1-4, the original "
                        "release); auto (default): 1 when the file has a 4 and no 0, 0 when it has a 0 and no 4, else "
                        "the file is refused and this option is needed")
    p.add_argument("--pubmedqa")
    p.add_argument("--medqa")
    p.add_argument("--n", type=positive_int, default=200, help="questions to judge, spread evenly over the sources; "
                   "a source with fewer than its share gives the rest to the others")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--judge-model", default="gpt-4o")
    p.add_argument("--base-url", help="the judge's OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1 for "
                                      "vllm serve (default: the OpenAI API)")
    p.add_argument("--chat-template-kwargs", type=json.loads, metavar="JSON",
                   help='sent to the server for the judge\'s chat template, e.g. \'{"enable_thinking": false}\' for a '
                        "Qwen3 judge behind vllm serve (the OpenAI API refuses it)")
    p.add_argument("--answer-template-kwargs", type=json.loads, metavar="JSON",
                   help="sent to each model's own chat template for its answers (default: the SFT data's "
                        f"chat_template_kwargs, which an SFT run's export records in {SFT_CHAT_FILE}; none without it), "
                        "e.g. '{\"enable_thinking\": true}' for Qwen3.5-0.8B/2B, whose template otherwise closes the "
                        "think block: the answers are prompted as training was")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--retries", type=int, default=3)
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--concurrency", type=int, default=8, help="judge requests in flight at once")
    p.add_argument("--price-in", type=float, default=0.0, help="USD per 1M prompt tokens")
    p.add_argument("--price-out", type=float, default=0.0, help="USD per 1M completion tokens")
    p.add_argument("--device")
    p.add_argument("--out", default="results/judge")
    args = p.parse_args(argv)
    # this project's progress at INFO, libraries' at WARNING: the HTTP client's one line per request is noise
    # (and its logger's name changes with the client's version)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    logging.getLogger("neurocpt").setLevel(logging.INFO)
    models = named_paths(args.model, "model")
    if len(models) != 2:
        raise SystemExit("give exactly two --model name=DIR")
    if not (args.medmcqa or args.pubmedqa or args.medqa):
        p.error("give at least one question file: --medmcqa, --pubmedqa or --medqa")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        questions = sample(load_questions(args.medmcqa, args.pubmedqa, args.medqa, args.medmcqa_cop), args.n, args.seed)
    except (ValueError, OSError) as err:  # OSError: a question file that is missing or unreadable (named)
        raise SystemExit(str(err)) from None
    judge = Judge(args.judge_model, args.base_url, args.api_key_env, out.with_suffix(".cache.jsonl"), args.retries, args.timeout,
                  args.chat_template_kwargs, args.concurrency)
    try:
        run(models, questions, judge, args.seed, args.max_new_tokens, args.device, out, (args.price_in, args.price_out),
            args.answer_template_kwargs)
    except LLMError as err:
        raise stopped(out, f"judge stopped: {err}. Judgements so far are cached; rerun the same command to resume.",
                      (".json", ".md", ".jsonl")) from None


if __name__ == "__main__":
    main()
