"""`make demo`: the project's chain on CPU, end to end, on locally made data.

The five-source demo corpus (``data/demo``) -> ``build_mix`` (clean, PHI guard, decontaminate, dedup,
tokenise, mix.json, report); a tiny random Qwen3.5 *base* checkpoint in the 2B release's layout (multimodal,
tied embeddings, sharded, vision tower, MTP head, the demo tokenizer) -> megatron checkpoint -> verified logits -> packed-document
check -> tiny CPT run (``launch/configs/demo_cpu.yaml``) -> HF release of the trained model -> verified
again -> generation through transformers -> per-domain perplexity and MTP next-next-token accuracy of
base vs CPT on the held-out splits and the evaluation report -> the SFT comparison's two arms, Base+SFT and CPT+SFT, through
``make sft-arms`` (``data/demo/sft_recipe.yaml``, ``launch/configs/demo_sft_cpu.yaml``) -> a chat answer
from the CPT+SFT release through its chat template -> lm-eval (local PubMedQA copy) and the judge (against
the OpenAI-protocol stub server, ``tools/openai_stub_server.py``) on both arms, in the evaluation report.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "data" / "demo"
CONFIG = ROOT / "launch" / "configs" / "demo_cpu.yaml"
SFT_CONFIG = ROOT / "launch" / "configs" / "demo_sft_cpu.yaml"


def generate(release: Path, messages: list[dict] | None = None, text: str = "", max_new_tokens: int = 8) -> str:
    """Greedy continuation of ``text``, or the answer to ``messages`` through the release's chat template."""
    from transformers import AutoTokenizer, Qwen3_5ForConditionalGeneration

    tok = AutoTokenizer.from_pretrained(release)
    model = Qwen3_5ForConditionalGeneration.from_pretrained(release).eval()
    if messages is None:
        ids = tok(text, return_tensors="pt").input_ids
    else:
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    new = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)[0, ids.shape[1]:]
    return tok.decode(new)


def sh(cmd: list, log: Path | None, **kwargs) -> None:
    """Run one command of the chain, its output appended to the demo's ``log`` (None: on the terminal)."""
    if log is None:
        subprocess.run(cmd, check=True, **kwargs)
        return
    with open(log, "a") as f:
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, **kwargs).returncode
    if code:
        raise SystemExit(f"[demo] failed (exit {code}): {' '.join(map(str, cmd))}\nits output is at the end of {log}")


def one_node_env(**more: str) -> dict[str, str]:
    """This environment for launch/*.sh on this machine alone: a MASTER_ADDR, MASTER_PORT or NNODES inherited
    from a scheduler's job would make the launcher meet at a fixed port instead of binding a free one."""
    inherited = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "NNODES", "NODE_RANK")}
    return {**inherited, **more}


def run(out: Path, log: Path | None = None) -> list[tuple[str, str, float]]:
    """The chain; subprocesses' output goes to ``log`` (None: to the terminal)."""
    from megatron_ext.checkpoint import load_model
    from tools import convert_from_hf, convert_to_hf, tiny_qwen35
    from tools.verify_conversion import compare

    rows: list[tuple[str, str, float]] = []

    def stage(name: str, fn):
        t = time.perf_counter()
        result = fn()
        rows.append((name, str(result), time.perf_counter() - t))
        print(f"[demo] {name}: {rows[-1][1]} ({rows[-1][2]:.1f}s)", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    base, ckpt, release = out / "base_hf", out / "base_megatron", out / "release_hf"

    def mix():
        from preprocessing.build_mix import build
        from preprocessing.recipe import MixRecipe

        result = build(MixRecipe.load(DEMO / "recipe.yaml", output_dir=str((out / "mix").resolve())))
        tokens = sum(s["tokens"] for s in result["sources"].values())
        return f"{tokens:,} tokens in {len(result['sources'])} sources; report: {out / 'mix' / 'report.md'}"

    stage("build the data mix (datatrove)", mix)

    def make_base():
        tokenizer = DEMO / "tokenizer"
        tokens = len(json.loads((tokenizer / "tokenizer.json").read_text())["model"]["vocab"])
        vocab = -(-tokens // 128) * 128  # padded like released checkpoints' embeddings
        pattern = ["linear_attention"] * 3 + ["full_attention"]
        model = tiny_qwen35.multimodal(seed=0, tie_word_embeddings=True, both_flags=True, vocab_size=vocab,
                                       hidden_size=128, intermediate_size=256, layer_types=pattern * 2)
        model.save_pretrained(base, max_shard_size="500KB")
        tiny_qwen35.add_mtp(base, seed=0)
        for f in tokenizer.iterdir():
            shutil.copy2(f, base / f.name)
        return (f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, tied embeddings, "
                f"{len(list(base.glob('*.safetensors')))} shards")

    stage("make tiny Qwen3.5 base checkpoint", make_base)
    stage("convert HF -> megatron", lambda: convert_from_hf.convert(base, ckpt, overwrite=True))
    stage("verify HF vs megatron logits",
          lambda: "max rel err {max_rel_err:.1e}, argmax agreement {argmax_agreement:.0%}".format(**compare(base, ckpt, seq_len=128)))

    def packed_check():
        import torch

        model = load_model(ckpt)
        vocab = model.qwen35_config.vocab_size
        a, b = torch.randint(0, vocab, (1, 50)), torch.randint(0, vocab, (1, 70))
        pos = torch.cat([torch.arange(50), torch.arange(70)]).unsqueeze(0)
        with torch.no_grad():
            err = (model(torch.cat([a, b], 1), pos)[:, 50:] - model(b)).abs().max().item()
        return f"doc 2 packed vs alone: max abs diff {err:.1e}"

    stage("packed documents stay independent", packed_check)

    run_dir = out / "cpt"

    def cpt():
        cmd = [sys.executable, "-m", "megatron_ext.train", "--config", str(CONFIG), f"run_dir={run_dir}",
               f"init_from={ckpt}", f"mix={out / 'mix' / 'mix.json'}"]
        sh(cmd, log)
        records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        vals = {k: round(v, 2) for k, v in records[-1].items() if k.startswith("val/")}
        return (f"{len(records)} steps, loss {records[0]['loss']:.2f} -> {records[-1]['loss']:.2f}; "
                f"held-out {vals}; curve: {run_dir / 'loss_curve.png'}")

    stage("continued pre-training (megatron-core, CPU)", cpt)
    stage("export trained model -> HF release (template: base)",
          lambda: convert_to_hf.convert(run_dir / "checkpoints", release, hf_template=base, overwrite=True))
    stage("verify release vs trained checkpoint logits",
          lambda: "max rel err {max_rel_err:.1e}".format(**compare(release, run_dir / "checkpoints", seq_len=128)))

    stage("generate from the release with transformers", lambda: repr(generate(release, text="The patient presented with")))

    def ppl():
        from evaluation import mtp, perplexity, report

        names = {"ehr": "Patient EHR", "pubmed_neuro": "PubMed Neurology", "arxiv_neuro": "arXiv Neuroscience",
                 "general_medical": "General medical", "english": "English"}
        data = {names[s]: str(out / "mix" / "heldout" / f"{s}.jsonl") for s in names}
        result = perplexity.evaluate({"base": str(base), "cpt": str(release)}, data, max_length=256, stride=128)
        (out / "results").mkdir(exist_ok=True)
        (out / "results" / "perplexity.json").write_text(json.dumps(result, indent=2))
        heads = mtp.evaluate({"base": str(base), "cpt": str(release)}, data, max_length=256, max_docs=20)
        (out / "results" / "mtp.json").write_text(json.dumps(heads, indent=2))
        report.build(out / "results", out / "results" / "report.md")
        ehr, ehr_mtp = result["results"]["Patient EHR"], heads["results"]["Patient EHR"]
        return (f"Patient EHR perplexity {ehr['base']['ppl']:.1f} -> {ehr['cpt']['ppl']:.1f}, frozen MTP head's "
                f"accuracy {ehr_mtp['base']['mtp_acc']:.1%} -> {ehr_mtp['cpt']['mtp_acc']:.1%}; "
                f"report: {out / 'results' / 'report.md'}")

    stage("domain perplexity and MTP accuracy, base vs CPT (held-out splits)", ppl)

    arms = out / "sft"

    def sft_arms():
        variables = {"PY": sys.executable, "SFT_DATA_RECIPE": DEMO / "sft_recipe.yaml", "SFT_DATA_DIR": out / "sft_data",
                     "SFT_CONFIG": SFT_CONFIG, "BASE_CKPT": ckpt, "CPT_CKPT": run_dir / "checkpoints",
                     "HF_TEMPLATE": base, "ARMS_DIR": arms}
        env = one_node_env(GPUS_PER_NODE="1")
        sh(["make", "--no-print-directory", "-C", str(ROOT), "sft-arms",
            *(f"{k}={Path(v).resolve() if k != 'PY' else v}" for k, v in variables.items())], log, env=env)
        data = json.loads((out / "sft_data" / "sft.json").read_text())
        finals = {arm: [json.loads(x) for x in (arms / arm / "metrics.jsonl").read_text().splitlines()][-1]
                  for arm in ("base_sft", "cpt_sft")}
        return (f"{data['train']['samples']} samples ({data['train']['loss_tokens']:,} loss tokens), "
                f"{sum(data['conversations']['quarantined'].values())} conversations quarantined; held-out SFT loss "
                + ", ".join(f"{arm} {m['val/sft']:.2f}" for arm, m in finals.items())
                + f"; report: {out / 'sft_data' / 'report.md'}")

    stage("SFT arms: Base+SFT and CPT+SFT (make sft-arms)", sft_arms)
    question = "A patient has sudden focal weakness with a last known well under 4.5 hours. What is the most likely diagnosis and the first step?"
    stage("chat with the CPT+SFT release (its chat template)",
          lambda: repr(generate(arms / "cpt_sft" / "hf", [{"role": "user", "content": question}], max_new_tokens=60)))

    def evaluate_arms():
        """lm-eval on a local PubMedQA copy, and the judge against the stub server (a stand-in for a real judge
        model: it prefers the longer answer), as a user runs them on the two arms; then the report."""
        from evaluation import report
        from tools import openai_stub_server

        models = ["--model", f"base_sft={arms / 'base_sft' / 'hf'}", "--model", f"cpt_sft={arms / 'cpt_sft' / 'hf'}"]
        results = out / "results"
        sh([sys.executable, "-m", "evaluation.eval_qwen", *models, "--tasks", "pubmedqa", "--data-dir",
            str(DEMO / "eval"), "--delta", "cpt_sft-base_sft", "--device", "cpu", "--out", str(results / "lm_eval")], log)
        server, url = openai_stub_server.spawn(stderr=subprocess.DEVNULL)
        try:
            sh([sys.executable, "-m", "evaluation.eval_reasoning_judge", *models, "--medqa", str(DEMO / "eval" / "medqa.jsonl"),
                "--n", "6", "--judge-model", "stub", "--base-url", url,
                "--max-new-tokens", "48", "--device", "cpu", "--out", str(results / "judge")],
               log, env={**os.environ, "OPENAI_API_KEY": "EMPTY"})
        finally:
            server.kill()
        report.build(results, results / "report.md")
        acc = json.loads((results / "lm_eval.json").read_text())["results"]["pubmedqa"]
        judged = json.loads((results / "judge.json").read_text())
        return (f"PubMedQA acc base_sft {acc['base_sft']['acc']:.2f} vs cpt_sft {acc['cpt_sft']['acc']:.2f}; stub judge (rules "
                f"that prefer the longer answer, not a model): "
                f"cpt_sft {judged['cpt_sft_wins']} wins / {judged['ties']} ties / {judged['base_sft_wins']} losses; "
                f"report: {results / 'report.md'}")

    stage("evaluate both arms: lm-eval + judge (stub server)", evaluate_arms)
    (out / "summary.md").write_text(
        "| stage | result | seconds |\n|---|---|---|\n" + "".join(f"| {n} | {r} | {s:.1f} |\n" for n, r, s in rows)
    )
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out/demo", type=Path)
    p.add_argument("--verbose", action="store_true", help="every tool's and library's output on the terminal "
                                                          "(always in OUT/demo.log)")
    args = p.parse_args(argv)
    if not args.verbose:  # before tqdm is imported: each stage prints one line instead of progress bars
        os.environ.setdefault("TQDM_DISABLE", "1")
    from preprocessing import logs

    log = logs.setup(args.out / "demo.log", args.verbose, console_level=logging.WARNING)
    run(args.out, None if args.verbose else log)
    print((args.out / "summary.md").read_text())
    print(f"full log: {log}")


if __name__ == "__main__":
    main()
