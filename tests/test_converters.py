"""HF <-> megatron converters: bit-exact round trips (text-only, multimodal with MTP, TP=1 and TP=2),
exports that transformers loads, verify_conversion, and bad input that never leaves a partial output."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

from megatron_ext.parallel import free_port
from safetensors.torch import load_file, save_file

from tools.tiny_qwen35 import causal_lm, multimodal, text_config, write_tokenizer
from tools import convert_from_hf, convert_to_hf
from tools.hf_checkpoint import CheckpointError, HFCheckpoint
from tools.verify_conversion import compare


def _all_tensors(directory) -> dict[str, torch.Tensor]:
    ckpt = HFCheckpoint(directory)
    return {k: ckpt.get(k) for k in ckpt.keys()}


def _assert_bit_exact(a_dir, b_dir):
    a, b = _all_tensors(a_dir), _all_tensors(b_dir)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), name


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("text") / "hf"
    causal_lm(text_config(), seed=5).save_pretrained(d)
    write_tokenizer(d)
    return d


@pytest.fixture(scope="module")
def multimodal_dir(tmp_path_factory):
    """Sharded multimodal checkpoint with a vision tower and an extra MTP shard, as the release has."""
    d = tmp_path_factory.mktemp("mm") / "hf"
    multimodal(seed=6, tie_word_embeddings=False).save_pretrained(d, max_shard_size="30KB")
    write_tokenizer(d)
    mtp = {"mtp.fc.weight": torch.randn(64, 128), "mtp.norm.weight": torch.randn(64)}
    save_file(mtp, str(d / "model-mtp.safetensors"), metadata={"format": "pt"})
    index = json.loads((d / "model.safetensors.index.json").read_text())
    index["weight_map"].update({k: "model-mtp.safetensors" for k in mtp})
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    return d


def test_text_round_trip_is_bit_exact_and_loads(text_dir, tmp_path):
    ckpt = convert_from_hf.convert(text_dir, tmp_path / "ckpt")
    out = convert_to_hf.convert(ckpt, tmp_path / "export")  # no template: text-only Qwen3_5ForCausalLM
    _assert_bit_exact(text_dir, out)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["Qwen3_5ForCausalLM"]
    assert (out / "tokenizer.json").read_text() == (text_dir / "tokenizer.json").read_text()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert AutoTokenizer.from_pretrained(out)("acute stroke").input_ids
    assert type(AutoModelForCausalLM.from_pretrained(out)).__name__ == "Qwen3_5ForCausalLM"
    result = compare(out, ckpt, seq_len=70)
    assert result["max_rel_err"] <= 1e-5 and result["argmax_agreement"] == 1.0


def test_multimodal_round_trip_keeps_vision_and_mtp(multimodal_dir, tmp_path):
    ckpt = convert_from_hf.convert(multimodal_dir, tmp_path / "ckpt")
    out = convert_to_hf.convert(ckpt, tmp_path / "export", hf_template=multimodal_dir, max_shard_size="40KB")
    _assert_bit_exact(multimodal_dir, out)
    assert len(list(out.glob("model-*.safetensors"))) > 1  # sharded, with an index
    from transformers import Qwen3_5ForConditionalGeneration

    assert type(Qwen3_5ForConditionalGeneration.from_pretrained(out)).__name__ == "Qwen3_5ForConditionalGeneration"
    assert compare(out, ckpt, seq_len=40)["max_rel_err"] <= 1e-5


@pytest.mark.parametrize("source", ["text_dir", "multimodal_dir"])
def test_export_from_tp2_checkpoint_is_bit_exact(source, request, tmp_path):
    """The trainer saves from TP=2; the export reads that layout back exactly."""
    src = request.getfixturevalue(source)
    ckpt = convert_from_hf.convert(src, tmp_path / "ckpt")
    mp.start_processes(__import__("tp_worker").resave, args=(2, free_port(), str(ckpt), str(tmp_path / "tp2")),
                       nprocs=2, start_method="spawn", join=True)
    template = src if source == "multimodal_dir" else None
    _assert_bit_exact(src, convert_to_hf.convert(tmp_path / "tp2", tmp_path / "export", hf_template=template))


def test_mixed_dtypes_round_trip(tmp_path):
    """bf16 weights with an fp32 A_log (as released checkpoints store it) come back tensor for tensor."""
    src = tmp_path / "hf"
    causal_lm(text_config(), seed=7).to(torch.bfloat16).save_pretrained(src)
    tensors = load_file(str(src / "model.safetensors"))
    tensors = {k: (v.float() if k.endswith("A_log") else v) for k, v in tensors.items()}
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    ckpt = convert_from_hf.convert(src, tmp_path / "ckpt")  # auto -> fp32 because dtypes are mixed
    _assert_bit_exact(src, convert_to_hf.convert(ckpt, tmp_path / "export", hf_template=src))


def test_verify_conversion_cli_prints_errors(text_dir, tmp_path):
    ckpt = convert_from_hf.convert(text_dir, tmp_path / "ckpt")
    run = subprocess.run([sys.executable, "-m", "tools.verify_conversion", "--hf-dir", str(text_dir),
                          "--ckpt", str(ckpt), "--seq-len", "33"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "max_abs_err" in run.stdout and "max_rel_err" in run.stdout and "OK" in run.stdout


# ----------------------------------------------------------------------------------------- bad input

def _edit(src, dst, tensors=None, config=None):
    """Copy a single-file checkpoint, editing its tensors/config."""
    import shutil

    shutil.copytree(src, dst)
    if tensors is not None:
        t = load_file(str(dst / "model.safetensors"))
        save_file(tensors(t), str(dst / "model.safetensors"), metadata={"format": "pt"})
    if config is not None:
        c = json.loads((dst / "config.json").read_text())
        config(c)
        (dst / "config.json").write_text(json.dumps(c))
    return dst


def _drop(t):
    del t["model.layers.1.self_attn.k_proj.weight"]
    return t


def _extra(t):
    t["model.layers.0.linear_attn.surprise.weight"] = torch.zeros(3)
    return t


def _reshape(t):
    t["model.layers.2.linear_attn.in_proj_z.weight"] = torch.zeros(7, 64)
    return t


BAD = {
    "missing tensor": (dict(tensors=_drop), "model.layers.1.self_attn.k_proj.weight"),
    "unexpected tensor": (dict(tensors=_extra), "model.layers.0.linear_attn.surprise.weight"),
    "shape mismatch": (dict(tensors=_reshape), "in_proj_z.weight"),
    "wrong architecture": (dict(config=lambda c: c.update(architectures=["LlamaForCausalLM"])), "LlamaForCausalLM"),
}


@pytest.mark.parametrize("case", [*BAD, "truncated shard"])
def test_bad_input_names_the_problem_and_keeps_the_old_output(case, text_dir, tmp_path):
    out = convert_from_hf.convert(text_dir, tmp_path / "ckpt")  # a good output already in place
    before = sorted(p.name for p in out.iterdir())
    if case == "truncated shard":
        bad = _edit(text_dir, tmp_path / "bad")
        data = (bad / "model.safetensors").read_bytes()
        (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
        needle = "model.safetensors"
    else:
        kwargs, needle = BAD[case]
        bad = _edit(text_dir, tmp_path / "bad", **kwargs)
    with pytest.raises(CheckpointError, match=needle.replace(".", r"\.")) as err:
        convert_from_hf.convert(bad, out)
    if case != "wrong architecture":
        assert "model.safetensors" in str(err.value)  # the file is named too
    assert sorted(p.name for p in out.iterdir()) == before
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]
    assert compare(text_dir, out, seq_len=8)["max_rel_err"] <= 1e-5  # still the good checkpoint


def test_export_rejects_a_template_of_another_architecture(text_dir, tmp_path):
    ckpt = convert_from_hf.convert(text_dir, tmp_path / "ckpt")
    other = tmp_path / "other"
    causal_lm(text_config(intermediate_size=48), seed=1).save_pretrained(other)
    with pytest.raises(CheckpointError, match="intermediate_size"):
        convert_to_hf.convert(ckpt, tmp_path / "export", hf_template=other)
    assert not (tmp_path / "export").exists()


def test_relative_checkpoint_paths(text_dir, monkeypatch):
    monkeypatch.chdir(text_dir.parent)
    ckpt = HFCheckpoint(text_dir.name)
    assert torch.equal(ckpt.get("model.embed_tokens.weight"), HFCheckpoint(text_dir).get("model.embed_tokens.weight"))
