"""Per-domain perplexity equals a direct computation with transformers over the tokenizer's ids (the
checkpoint's padded embedding rows are never counted); the sliding window scores every token once with the
documented context."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import pytest
import torch

from evaluation.common import FinishedUnits, ModelFailed, load_hf_model
from evaluation.perplexity import document_nll, evaluate, main, read_documents
from conftest import DEMO, compressed, tiny_hf_dir


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("ppl")
    for name, seed in (("base", 0), ("other", 1)):
        tiny_hf_dir(root / name, seed)
    texts = {"notes": [json.loads(x)["text"] for x in (DEMO / "ehr" / "notes_0.jsonl").read_text().splitlines()[:6]],
             "web": [json.loads(x)["text"] for x in (DEMO / "en" / "web.jsonl").read_text().splitlines()[:6]]}
    for domain, docs in texts.items():
        (root / f"{domain}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    return root, texts


def test_equals_direct_transformers_computation(models):
    root, texts = models
    report = evaluate({"base": str(root / "base"), "other": str(root / "other")},
                      {d: str(root / f"{d}.jsonl") for d in texts}, max_length=4096, stride=2048, device="cpu")
    model, tok = load_hf_model(root / "base", "cpu")
    assert len(tok) < model.config.vocab_size  # the demo checkpoints pad their embedding, as releases do
    for domain, docs in texts.items():
        nll = n = 0
        with torch.no_grad():
            for text in docs:
                ids = torch.tensor([tok(text, add_special_tokens=False).input_ids])
                logits = model(input_ids=ids).logits[0, :-1, : len(tok)]
                nll += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
                n += ids.shape[1] - 1
        got = report["results"][domain]
        assert got["base"]["ppl"] == pytest.approx(math.exp(nll / n), rel=1e-6)
        assert got["base"]["nll"] == pytest.approx(nll / n, rel=1e-6)  # mean nats per token
        assert got["base"]["tokens"] == n and got["base"]["documents"] == len(docs)
        assert got["other"]["improvement_vs_base"] == pytest.approx(1 - got["other"]["ppl"] / got["base"]["ppl"])


def test_sliding_window_context(models):
    root, _ = models
    model, tok = load_hf_model(root / "base", "cpu")
    ids = list(range(100, 110))
    total, count = document_nll(model, ids, max_length=6, stride=3, device="cpu", vocab=len(tok))
    # windows [0,6) score 1..5, [3,9) score 6..8 with context from 3, [6,10) scores 9 with context from 6
    contexts = {p: 0 for p in range(1, 6)} | {p: 3 for p in range(6, 9)} | {9: 6}
    expected = 0.0
    with torch.no_grad():
        for p, start in contexts.items():
            logits = model(input_ids=torch.tensor([ids[start:p]])).logits[0, -1, : len(tok)]
            expected += torch.nn.functional.cross_entropy(logits[None], torch.tensor([ids[p]])).item()
    assert count == 9
    assert total == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="stride"):
        document_nll(model, ids, max_length=6, stride=6, device="cpu", vocab=len(tok))


def test_cli_writes_json_and_markdown(models, tmp_path):
    root, texts = models
    cmd = [sys.executable, "-m", "evaluation.perplexity", "--model", f"base={root / 'base'}", "--model",
           f"other={root / 'other'}", "--data", f"Patient EHR={root / 'notes.jsonl'}", "--max-length", "64",
           "--stride", "32", "--out", str(tmp_path / "ppl"), "--device", "cpu"]
    run = subprocess.run(cmd, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    table = (tmp_path / "ppl.md").read_text()
    assert table.splitlines()[0] == "| Domain | base PPL | other PPL | other vs base |"
    assert "| Patient EHR |" in table
    assert json.loads((tmp_path / "ppl.json").read_text())["stride"] == 32


@pytest.mark.parametrize("bad", ['{"text": "x"', "[1, 2]", '{"text": null}', '{"body": "x"}', '{"text": 3}'])
def test_a_bad_record_is_named_by_file_and_line(tmp_path, bad):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "fine"}\n\n' + bad + "\n")
    with pytest.raises(ValueError, match=r"d\.jsonl:3: not a jsonl record with a 'text'"):
        read_documents(path, None)


BAD_FILES = {"a wrong field type": (b'{"text": "fine"}\n{"text": 3}\n', r"d\.jsonl:2: not a jsonl record with a 'text'"),
             "a Latin-1 byte": (b'{"text": "fine"}\n{"text": "caf\xe9"}\n', r"d\.jsonl:2: not UTF-8 text"),
             "no file": (None, r"No such file or directory: '.*d\.jsonl'")}


@pytest.mark.parametrize("case", BAD_FILES)
def test_the_command_names_a_bad_data_file_in_one_line(case, tmp_path):
    """A bad data file stops the command before any model loads, with one line naming the file (and line), not a
    traceback; nothing is written."""
    data, needle = BAD_FILES[case]
    if data is not None:
        (tmp_path / "d.jsonl").write_bytes(data)
    with pytest.raises(SystemExit) as err:
        main(["--model", f"base={tmp_path / 'no-model'}", "--data", f"d={tmp_path / 'd.jsonl'}",
              "--out", str(tmp_path / "ppl"), "--device", "cpu"])
    assert re.fullmatch("perplexity: .*" + needle + ".*", str(err.value))
    assert sorted(p.name for p in tmp_path.iterdir()) == (["d.jsonl"] if data else [])


def test_a_domain_without_a_scorable_token_is_named(models, tmp_path):
    root, _ = models
    (tmp_path / "short.jsonl").write_text('{"text": ""}\n{"text": "a"}\n')  # no token has a token before it
    with pytest.raises(ModelFailed, match=r"model base .*short\.jsonl \(domain 'tiny'\): no document has two tokens"):
        evaluate({"base": str(root / "base")}, {"tiny": str(tmp_path / "short.jsonl")}, device="cpu")


def test_resumes_per_model_and_domain(models, tmp_path, monkeypatch, capsys):
    """A failing model stops the run with its name and keeps what finished before it; the rerun computes only what
    is left, and a changed checkpoint, data file or setting is computed again, not taken for finished."""
    from evaluation import perplexity

    root, _ = models
    data = {d: str(tmp_path / f"{d}.jsonl") for d in ("notes", "web")}
    for d in data:
        (tmp_path / f"{d}.jsonl").write_text((root / f"{d}.jsonl").read_text())
    ckpt = tmp_path / "other"
    tiny_hf_dir(ckpt, 1)
    argv = ["--model", f"base={root / 'base'}", "--model", f"other={ckpt}", "--data", f"notes={data['notes']}",
            "--data", f"web={data['web']}", "--max-length", "64", "--stride", "32", "--device", "cpu",
            "--out", str(tmp_path / "ppl")]
    (ckpt / "config.json").rename(ckpt / "config.json.bak")  # 'other' cannot be loaded
    for suffix in (".json", ".md"):  # an earlier run's results: not this command's, so not left for evaluation.report
        (tmp_path / f"ppl{suffix}").write_text(f"earlier{suffix}")
    with pytest.raises(SystemExit, match=r"model other \(.*other\)") as stop:
        main(argv)
    assert "rerun the same command" in str(stop.value) and not (tmp_path / "ppl.json").exists()
    assert not (tmp_path / "ppl.md").exists() and "renamed ppl.earlier.json, ppl.earlier.md" in str(stop.value)
    assert [(tmp_path / f"ppl.earlier{x}").read_text() for x in (".json", ".md")] == ["earlier.json", "earlier.md"]
    assert len(FinishedUnits(tmp_path / "ppl.units.json").entries) == 2  # base on both domains
    (ckpt / "config.json.bak").rename(ckpt / "config.json")
    scored = []
    real = perplexity.domain_perplexity
    monkeypatch.setattr(perplexity, "domain_perplexity", lambda *a: scored.append(a[-1]) or real(*a))

    def rerun(*extra):
        scored.clear()
        main(argv + list(extra))
        return json.loads((tmp_path / "ppl.json").read_text())["results"]

    first = rerun()
    assert scored == ["other / notes", "other / web"]  # base was not scored again
    assert "base: 2 of 2 domains finished before, kept" in capsys.readouterr().out
    assert rerun() == first and scored == []
    with open(data["web"], "a") as f:  # the data file changed: its domain is scored again, for every model
        f.write(json.dumps({"text": "An additional held-out note about a patient."}) + "\n")
    rerun()
    assert scored == ["base / web", "other / web"]
    rerun("--stride", "16")
    assert len(scored) == 4
    (ckpt / "model.safetensors").write_bytes((ckpt / "model.safetensors").read_bytes())  # the checkpoint written again
    rerun()
    assert scored == ["other / notes", "other / web"]


def test_two_runs_into_one_out_keep_each_others_finished_results(models, tmp_path, monkeypatch, capsys):
    """One model per GPU, both with the same --out (or a command started twice): each run rewrote OUT.units.json from
    what it alone held, dropping the results the other had finished, so the combined rerun computed them again."""
    from evaluation import perplexity

    root, _ = models
    common = ["--data", f"notes={root / 'notes.jsonl'}", "--max-length", "64", "--stride", "32", "--device", "cpu",
              "--out", str(tmp_path / "ppl")]
    units = tmp_path / "ppl.units.json"
    other_run = FinishedUnits(units)  # the other run, started before this one finished anything
    main(["--model", f"base={root / 'base'}", *common])
    main(["--model", f"other={root / 'other'}", *common])
    other_run.put("a unit the other run finished", {"nll": 1.0})
    assert len(json.loads(units.read_text())) == 3
    scored = []
    real = perplexity.domain_perplexity
    monkeypatch.setattr(perplexity, "domain_perplexity", lambda *a: scored.append(a[-1]) or real(*a))
    capsys.readouterr()
    main(["--model", f"base={root / 'base'}", "--model", f"other={root / 'other'}", *common])
    assert scored == [] and "other: 1 of 1 domains finished before, kept" in capsys.readouterr().out


@pytest.mark.parametrize("argv, why", [(["--max-docs", "0"], "--max-docs: must be at least 1"),
                                       (["--stride", "64"], "--stride must be between 1 and --max-length - 1 \\(63\\)"),
                                       (["--stride", "0"], "--stride must be between")])
def test_bad_limits_are_refused_at_the_command_line(argv, why, capsys):
    with pytest.raises(SystemExit):
        main(["--model", "a=x", "--data", "d=y.jsonl", "--max-length", "64"] + argv)
    assert re.search(why, capsys.readouterr().err)


def test_a_max_length_given_alone_gets_a_stride_of_half_of_it(monkeypatch):
    """--max-length 1024 alone was refused: the stride's fixed default (2048) was not below it."""
    from evaluation import perplexity

    seen = []
    monkeypatch.setattr(perplexity, "run_models_on_domains", lambda tool, args, *a: seen.append((args.max_length, args.stride)))
    for argv in (["--max-length", "1024"], [], ["--max-length", "64", "--stride", "16"]):
        main(["--model", "a=x", "--data", "d=y.jsonl", *argv])
    assert seen == [(1024, 512), (4096, 2048), (64, 16)]


def test_a_name_given_twice_is_refused():
    from evaluation.common import named_paths

    assert named_paths(["a=x", "b=y=z"], "model") == {"a": "x", "b": "y=z"}
    with pytest.raises(SystemExit, match="'cpt' is given twice"):
        named_paths(["cpt=ckpt/iter_1000", "cpt=ckpt/iter_2000"], "model")


def test_a_checkpoint_is_loaded_as_its_config_names_it(tmp_path):
    """The evaluation tools build the class of the config's ``architectures``: a Qwen3.5-MoE release (multimodal
    layout like the dense ones) was built as the dense Qwen3_5ForConditionalGeneration, its experts drawn at random."""
    from transformers import Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration

    from tools.tiny_qwen35 import text_config

    dense = text_config(vocab_size=2048).to_dict()
    text = {k: dense[k] for k in ("vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                                  "linear_conv_kernel_dim", "linear_key_head_dim", "linear_value_head_dim",
                                  "linear_num_key_heads", "linear_num_value_heads", "layer_types", "num_hidden_layers",
                                  "rope_parameters")}
    config = Qwen3_5MoeConfig(tie_word_embeddings=True, vision_config=dict(depth=1, hidden_size=32, intermediate_size=64,
                              num_heads=2, out_hidden_size=64, patch_size=4, num_position_embeddings=16),
                              text_config=dict(text, moe_intermediate_size=32, shared_expert_intermediate_size=32,
                                               num_experts=4, num_experts_per_tok=2))
    torch.manual_seed(0)
    Qwen3_5MoeForConditionalGeneration(config).save_pretrained(tmp_path / "moe")
    for f in (DEMO / "tokenizer").iterdir():
        (tmp_path / "moe" / f.name).write_bytes(f.read_bytes())
    tiny_hf_dir(tmp_path / "release", 0, release=True)
    model, _ = load_hf_model(tmp_path / "moe", "cpu")
    assert type(model) is Qwen3_5MoeForConditionalGeneration
    model, _ = load_hf_model(tmp_path / "release", "cpu")  # tied by the top-level flag: no lm_head.weight stored
    assert model.lm_head.weight is model.get_input_embeddings().weight


def test_a_tensor_missing_from_the_checkpoint_is_named_not_drawn(tmp_path):
    from safetensors.torch import load_file, save_file

    tiny_hf_dir(tmp_path / "ckpt", 0, release=True)
    path = tmp_path / "ckpt" / "model.safetensors"
    tensors = load_file(path)
    name = next(k for k in tensors if k.endswith("layers.0.mlp.up_proj.weight"))
    save_file({k: v for k, v in tensors.items() if k != name}, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"Qwen3_5ForConditionalGeneration needs 1 tensors the checkpoint lacks, e\.g\. "
                                         r"model\.language_model\.layers\.0\.mlp\.up_proj\.weight; they would be random"):
        load_hf_model(tmp_path / "ckpt", "cpu")


def test_evaluation_dtype_is_bf16_on_any_cuda_device():
    from evaluation.common import device_and_dtype

    assert [device_and_dtype(d)[1] for d in ("cuda", "cuda:1", "cpu")] == [torch.bfloat16, torch.bfloat16, torch.float32]


def test_special_token_strings_in_a_document_are_scored_as_text(models):
    """As the mix tokenises documents: a literal '<|endoftext|>' is its characters, not the end-of-text token."""
    from evaluation.perplexity import domain_perplexity
    from preprocessing.tokenizer import text_tokenizer

    root, _ = models
    model, tok = load_hf_model(root / "base", "cpu")
    text = "The page said <|endoftext|> and went on."
    trained = text_tokenizer(str(root / "base")).encode(text, add_special_tokens=False).ids
    assert tok.eos_token_id not in trained
    got = domain_perplexity(model, tok, [text], max_length=64, stride=32, device="cpu", desc="doc")
    assert got["tokens"] == len(trained) - 1


@pytest.mark.parametrize("suffix", [".jsonl.gz", ".jsonl.bz2", ".jsonl.xz", ".jsonl.zst"])
def test_a_compressed_held_out_set_reads_as_the_plain_one(tmp_path, suffix):
    """Held-out sets ship as the corpora do (.jsonl.zst and the like): read by suffix, not as compressed bytes,
    and a bad record is still named by file and line."""
    body = "".join(json.dumps({"text": f"doc {i} \u00e9"}) + "\n" for i in range(3)).encode()
    path = tmp_path / f"d{suffix}"
    path.write_bytes(compressed(body, suffix))
    assert read_documents(path, None) == [f"doc {i} \u00e9" for i in range(3)]
    path.write_bytes(compressed(body + b'{"text": 3}\n', suffix))
    with pytest.raises(ValueError, match=re.escape(f"d{suffix}:4: not a jsonl record")):
        read_documents(path, None)


def test_max_docs_reads_the_first_documents_only(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(5)))
    assert read_documents(path, 2) == ["doc 0", "doc 1"] and read_documents(path, 1) == ["doc 0"]
    assert len(read_documents(path, None)) == 5 and len(read_documents(path, 9)) == 5
