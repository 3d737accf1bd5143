"""HF <-> megatron converters: bit-exact round trips (text-only, multimodal with MTP, tied embeddings in
both layouts, a vocabulary that TP does not divide; TP=1 and TP=2), exports that transformers loads with
equal logits, the padded vocabulary never predicted, the frozen MTP head carried over and declared,
verify_conversion, and bad input that never leaves a partial output."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import tp_worker
from conftest import hold_in_another_process

from safetensors.torch import load_file, save_file

from tools.tiny_qwen35 import add_mtp, causal_lm, multimodal, release_dtypes, text_config, write_tokenizer
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


def _assert_same_files(a_dir, b_dir, but=()):
    """Every non-weight file of ``a_dir`` (configs, tokenizer, chat template) is in ``b_dir``, byte for byte."""
    files = [f for f in a_dir.iterdir() if f.suffix != ".safetensors" and f.name != "model.safetensors.index.json"]
    assert len(files) >= 5
    for f in files:
        if f.name not in but:
            assert f.read_bytes() == (b_dir / f.name).read_bytes(), f.name


def _text_layout(d, seed: int, **config):
    causal_lm(text_config(**config), seed=seed).save_pretrained(d)
    write_tokenizer(d)
    return d


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    return _text_layout(tmp_path_factory.mktemp("text") / "hf", seed=5)


def _release_layout(d, seed: int, tied: bool):
    """Sharded multimodal checkpoint with a vision tower and an MTP shard, as the releases are."""
    multimodal(seed=seed, tie_word_embeddings=tied).save_pretrained(d, max_shard_size="30KB")
    write_tokenizer(d)
    add_mtp(d, seed=seed)
    return d


@pytest.fixture(scope="module")
def multimodal_dir(tmp_path_factory):
    return _release_layout(tmp_path_factory.mktemp("mm") / "hf", seed=6, tied=False)


@pytest.fixture(scope="module")
def tied_text_dir(tmp_path_factory):
    """Text-only and tied, as the small releases are: the safetensors hold no lm_head.weight."""
    return _text_layout(tmp_path_factory.mktemp("tied_text") / "hf", seed=8, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def tied_multimodal_dir(tmp_path_factory):
    """The small releases' layout, tied (the safetensors hold no lm_head.weight), by the top-level flag only: the
    releases set text_config's too; left at its untied default here, it shows which flag a converter reads."""
    return _release_layout(tmp_path_factory.mktemp("tied_mm") / "hf", seed=9, tied=True)


@pytest.fixture(scope="module")
def odd_vocab_dir(tmp_path_factory):
    """A vocabulary of 517 (a tokenizer extended by a few tokens): TP=2 does not divide it."""
    return _text_layout(tmp_path_factory.mktemp("odd") / "hf", seed=10, vocab_size=517)


def test_text_round_trip_is_bit_exact_and_loads(text_dir, tmp_path):
    ckpt = convert_from_hf.convert(text_dir, tmp_path / "ckpt")
    out = convert_to_hf.convert(ckpt, tmp_path / "export")  # no template: text-only Qwen3_5ForCausalLM
    _assert_bit_exact(text_dir, out)
    _assert_same_files(text_dir, out)  # config.json included: the source's, not one rebuilt from ours

    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert AutoTokenizer.from_pretrained(out)("acute stroke").input_ids
    assert type(AutoModelForCausalLM.from_pretrained(out)).__name__ == "Qwen3_5ForCausalLM"
    result = compare(out, ckpt, seq_len=70)
    assert result["max_rel_err"] <= 1e-5 and result["argmax_agreement"] == 1.0


def test_multimodal_round_trip_keeps_vision_and_mtp(multimodal_dir, tmp_path):
    ckpt = convert_from_hf.convert(multimodal_dir, tmp_path / "ckpt")
    out = convert_to_hf.convert(ckpt, tmp_path / "export", hf_template=multimodal_dir, max_shard_size="40KB")
    _assert_bit_exact(multimodal_dir, out)
    _assert_same_files(multimodal_dir, out, but=["README.md"])  # the README gains the MTP note
    assert len(list(out.glob("model-*.safetensors"))) > 1  # sharded, with an index
    from transformers import Qwen3_5ForConditionalGeneration

    assert type(Qwen3_5ForConditionalGeneration.from_pretrained(out)).__name__ == "Qwen3_5ForConditionalGeneration"
    assert compare(out, ckpt, seq_len=40)["max_rel_err"] <= 1e-5


def test_an_export_without_template_names_the_source_tensors_it_lacks(tmp_path, caplog):
    """A text-only checkpoint with an MTP head: the conversion records the head's tensors (it does not train them);
    an export without --hf-template lacks them and says so, naming the flag; with the source as template it has them."""
    source = _text_layout(tmp_path / "hf", seed=12)
    add_mtp(source, seed=12)
    mtp = {k for k in _all_tensors(source) if k.startswith("mtp.")}
    with caplog.at_level(logging.INFO):
        ckpt = convert_from_hf.convert(source, tmp_path / "ckpt")
        bare = convert_to_hf.convert(ckpt, tmp_path / "bare")
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert f"{len(mtp)} tensors outside the language model are not trained (mtp.*: {len(mtp)})" in messages
    assert f"has {len(mtp)} tensors outside the language model (mtp.*: {len(mtp)}) that this export" in messages
    assert "pass --hf-template" in messages and not mtp & set(_all_tensors(bare))
    _assert_bit_exact(source, convert_to_hf.convert(ckpt, tmp_path / "full", hf_template=source))


@pytest.mark.parametrize("source", ["text_dir", "multimodal_dir"])
def test_export_from_tp2_checkpoint_is_bit_exact(source, request, tmp_path):
    """The trainer saves from TP=2; the export reads that layout back exactly."""
    src = request.getfixturevalue(source)
    ckpt = convert_from_hf.convert(src, tmp_path / "ckpt")
    tp_worker.spawn(tp_worker.resave, str(ckpt), str(tmp_path / "tp2"))
    template = src if source == "multimodal_dir" else None
    _assert_bit_exact(src, convert_to_hf.convert(tmp_path / "tp2", tmp_path / "export", hf_template=template))


def test_a_bf16_release_with_fp32_gdn_tensors_round_trips_without_a_template(tmp_path):
    """The model is bf16 (the dtype most parameters have), the fp32 tensors stay fp32 in the checkpoint, and
    the export without a template writes every tensor in its source dtype and keeps the config as it was."""
    from megatron.core import dist_checkpointing

    from megatron_ext.checkpoint import saved_dtype

    src = release_dtypes(_text_layout(tmp_path / "hf", seed=7))
    fp32 = [k for k in HFCheckpoint(src).keys() if HFCheckpoint(src).dtype_of(k) == torch.float32]
    assert len(fp32) == 4  # 2 GDN layers x (A_log, norm)
    ckpt = convert_from_hf.convert(src, tmp_path / "ckpt")
    assert saved_dtype(ckpt) == torch.bfloat16
    saved = dist_checkpointing.load_tensors_metadata(str(ckpt))
    assert saved["decoder.layers.0.self_attention.A_log"].dtype == torch.float32
    assert saved["decoder.layers.2.self_attention.out_norm.weight"].dtype == torch.float32
    assert saved["decoder.layers.0.self_attention.dt_bias"].dtype == torch.bfloat16
    out = convert_to_hf.convert(ckpt, tmp_path / "export")
    _assert_bit_exact(src, out)
    _assert_same_files(src, out)  # config.json still says bfloat16, byte for byte
    assert compare(out, ckpt, seq_len=40)["max_rel_err"] <= 1e-9  # both in float64 from the same weights
    _assert_bit_exact(src, convert_to_hf.convert(ckpt, tmp_path / "templated", hf_template=src))


def test_a_fused_weight_stored_wider_loads_unrounded(tmp_path):
    """A source that stores a weight megatron saves in parts (GDN conv1d: query, key, value) wider than the rest is
    loaded at that width too: the check compared the whole weight's key, which a split weight's parts do not have,
    so load_model (and the trainer) rounded it to bf16 and the export wrote the rounded values back as fp32."""
    from megatron_ext.checkpoint import load_model

    src = release_dtypes(_text_layout(tmp_path / "hf", seed=13))
    tensors = load_file(src / "model.safetensors")
    conv = "model.layers.0.linear_attn.conv1d.weight"
    tensors[conv] = torch.randn(tensors[conv].shape, generator=torch.Generator().manual_seed(0)) * 0.3  # fp32
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    model = load_model(convert_from_hf.convert(src, tmp_path / "ckpt"))
    weight = model.decoder.layers[0].self_attention.conv1d.weight
    assert weight.dtype == torch.float32 and torch.equal(weight.reshape(-1), tensors[conv].reshape(-1))
    assert model.decoder.layers[0].self_attention.in_proj.weight.dtype == torch.bfloat16


def test_a_multimodal_release_with_fp32_gdn_tensors_round_trips(tmp_path):
    src = release_dtypes(_release_layout(tmp_path / "hf", seed=6, tied=False))
    ckpt = convert_from_hf.convert(src, tmp_path / "ckpt")
    _assert_bit_exact(src, convert_to_hf.convert(ckpt, tmp_path / "export", hf_template=src))
    text = HFCheckpoint(convert_to_hf.convert(ckpt, tmp_path / "text"))  # text-only, its tensors' dtypes kept
    release = HFCheckpoint(src)
    for name in text.keys():
        source = name if name == "lm_head.weight" else name.replace("model.", "model.language_model.", 1)
        assert text.dtype_of(name) == release.dtype_of(source), name
        assert torch.equal(text.get(name), release.get(source)), name


def _add_tensor(d, name, tensor):
    """Add a tensor to a checkpoint directory, in a shard of its own when it has an index."""
    index = d / "model.safetensors.index.json"
    if not index.is_file():
        save_file({**load_file(str(d / "model.safetensors")), name: tensor}, str(d / "model.safetensors"),
                  metadata={"format": "pt"})
        return
    save_file({name: tensor}, str(d / "model-extra.safetensors"), metadata={"format": "pt"})
    data = json.loads(index.read_text())
    data["weight_map"][name] = "model-extra.safetensors"
    index.write_text(json.dumps(data, indent=2))


@pytest.mark.parametrize("layout", ["text", "multimodal"])
def test_a_tied_source_that_stores_lm_head_gets_it_back(layout, tmp_path):
    """Some tied checkpoints store lm_head.weight anyway (a copy of the embedding): the export keeps it."""
    if layout == "text":
        src = _text_layout(tmp_path / "hf", seed=8, tie_word_embeddings=True)
    else:
        src = _release_layout(tmp_path / "hf", seed=9, tied=True)
    prefix = "model." if layout == "text" else "model.language_model."
    _add_tensor(src, "lm_head.weight", HFCheckpoint(src).get(prefix + "embed_tokens.weight").clone())
    ckpt = convert_from_hf.convert(src, tmp_path / "ckpt")
    out = convert_to_hf.convert(ckpt, tmp_path / "export", hf_template=src if layout == "multimodal" else None)
    _assert_bit_exact(src, out)
    assert compare(out, ckpt, seq_len=40)["max_rel_err"] <= 1e-9


def test_verify_conversion_cli_prints_errors(text_dir, tmp_path):
    ckpt = convert_from_hf.convert(text_dir, tmp_path / "ckpt")
    run = subprocess.run([sys.executable, "-m", "tools.verify_conversion", "--hf-dir", str(text_dir),
                          "--ckpt", str(ckpt), "--seq-len", "33"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "max_abs_err" in run.stdout and "max_rel_err" in run.stdout and "OK" in run.stdout
    assert "| precision | float64 |" in run.stdout and "| 0-2 |" in run.stdout and "| 30-32 |" in run.stdout


def test_verify_conversion_names_a_missing_or_swapped_directory_in_one_line(text_dir, tmp_path):
    ckpt = convert_from_hf.convert(text_dir, tmp_path / "ckpt")
    for hf_dir, megatron, says in ((text_dir, tmp_path / "none", f"{tmp_path / 'none'} is not a neurocpt model checkpoint"),
                                   (ckpt, text_dir, f"{ckpt / 'config.json'}: missing"),  # the two swapped
                                   (tmp_path / "none", ckpt, "no such checkpoint directory")):
        run = subprocess.run([sys.executable, "-m", "tools.verify_conversion", "--hf-dir", str(hf_dir), "--ckpt",
                              str(megatron)], capture_output=True, text=True)
        assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr[-2000:]
        assert says in run.stderr.strip().splitlines()[-1], run.stderr[-2000:]


def test_verify_conversion_compares_in_float64_per_position(text_dir, tmp_path, monkeypatch):
    """A small model is compared in float64, where the two implementations agree far below float32
    rounding, so a tolerance of 1e-9 separates a mapping error from noise; larger ones fall back to float32."""
    from tools import verify_conversion

    ckpt = convert_from_hf.convert(text_dir, tmp_path / "ckpt")
    exact = compare(text_dir, ckpt, seq_len=70)
    assert exact["precision"] == "float64" and exact["max_rel_err"] <= 1e-12
    assert len(exact["max_abs_err_by_position"]) == 70
    assert max(exact["max_abs_err_by_position"]) == exact["max_abs_err"]
    monkeypatch.setattr(verify_conversion, "FLOAT64_MAX_PARAMS", 10**3)
    rounded = compare(text_dir, ckpt, seq_len=70)
    assert rounded["precision"] == "float32" and 1e-9 < rounded["max_rel_err"] <= 1e-5


def _resave_tp2(ckpt, out):
    """Load a checkpoint with TP=2 and save it from that layout, as the trainer does."""
    tp_worker.spawn(tp_worker.resave, str(ckpt), str(out))
    return out


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("source", ["tied_text_dir", "tied_multimodal_dir"])
def test_tied_round_trip_is_bit_exact_with_transformers_logits(source, tp, request, tmp_path):
    src = request.getfixturevalue(source)
    assert "lm_head.weight" not in HFCheckpoint(src).keys()
    ckpt = convert_from_hf.convert(src, tmp_path / "ckpt", tp=tp)
    assert compare(src, ckpt, seq_len=40)["max_rel_err"] <= 1e-5  # transformers vs megatron after import
    if tp == 2:
        ckpt = _resave_tp2(ckpt, tmp_path / "tp2")
    template = src if source == "tied_multimodal_dir" else None
    out = convert_to_hf.convert(ckpt, tmp_path / "export", hf_template=template)
    _assert_bit_exact(src, out)
    assert compare(out, ckpt, seq_len=40)["max_rel_err"] <= 1e-5
    if template is not None and tp == 1:
        # the template ties by its top-level flag only (a config the releases do not have, a third party's may);
        # vLLM's Qwen3.5 reads text_config's, as AutoModelForCausalLM does: the export says it there too, so their
        # head is the embedding (with the template's untied default, vLLM refuses the export and
        # AutoModelForCausalLM draws a random head)
        config = json.loads((out / "config.json").read_text())
        assert json.loads((src / "config.json").read_text())["text_config"]["tie_word_embeddings"] is False
        assert config["tie_word_embeddings"] is config["text_config"]["tie_word_embeddings"] is True
        from transformers import AutoModelForCausalLM

        lm = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        assert lm.get_output_embeddings().weight is lm.get_input_embeddings().weight
        # without the template: a text-only model, tied by its own flag
        text = convert_to_hf.convert(ckpt, tmp_path / "text")
        config = json.loads((text / "config.json").read_text())
        assert config["architectures"] == ["Qwen3_5ForCausalLM"] and config["tie_word_embeddings"] is True
        assert compare(text, ckpt, seq_len=40)["max_rel_err"] <= 1e-5


def test_a_published_release_config_gains_only_the_export_dtype(tmp_path):
    """A published release (Qwen3.5-0.8B's config.json) already ties at both levels: the export's config is the
    release's with the dtype written at the top level too (the release names it in text_config only)."""
    release = json.loads((Path(__file__).parent / "qwen35_0.8b_release_config.json").read_text())
    path = tmp_path / "config.json"
    path.write_text(json.dumps(release))
    convert_to_hf._match_config(path, torch.bfloat16, tied=True)
    assert json.loads(path.read_text()) == {**release, "dtype": "bfloat16"}


def test_layouts_are_checked_and_a_pipeline_layout_converts(text_dir, tmp_path):
    """--tp/--pp name the layout the run will use: one that divides converts, one that does not is refused."""
    ckpt = convert_from_hf.convert(text_dir, tmp_path / "ckpt", pp=2)
    assert compare(text_dir, ckpt, seq_len=8)["max_rel_err"] <= 1e-5
    with pytest.raises(CheckpointError, match="4 layers do not split into 3 pipeline stages"):
        convert_from_hf.convert(text_dir, tmp_path / "pp3", pp=3)
    with pytest.raises(CheckpointError, match="--tp 3 --pp 1: num_key_value_heads=2 is not divisible"):
        convert_from_hf.convert(text_dir, tmp_path / "tp3", tp=3)


def test_odd_vocabulary_is_padded_for_tp2_and_round_trips(odd_vocab_dir, tmp_path):
    ckpt = convert_from_hf.convert(odd_vocab_dir, tmp_path / "ckpt", tp=2)
    saved = json.loads((ckpt / "qwen35_config.json").read_text())
    assert (saved["vocab_size"], saved["padded_vocab_size"]) == (517, 768)  # 128 x TP, as megatron pads
    assert compare(odd_vocab_dir, ckpt, seq_len=40)["max_rel_err"] <= 1e-5
    tp2 = _resave_tp2(ckpt, tmp_path / "tp2")
    _assert_bit_exact(odd_vocab_dir, convert_to_hf.convert(tp2, tmp_path / "export"))

    # logits over the real ids under TP=2 (each rank holds 384 rows, the second one 251 padded) match
    # transformers; both sides in float64, as tp_worker computes
    from conftest import float64
    from megatron_ext.checkpoint import save_model

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 517, (2, 30), generator=gen)
    positions = torch.arange(30).expand(2, 30).contiguous()
    weights = torch.randn(2, 30, 517, generator=gen, dtype=torch.float64)
    torch.save({"ids": ids, "positions": positions, "weights": weights}, tmp_path / "inputs.pt")
    with float64():
        hf = causal_lm(text_config(vocab_size=517), seed=10)
        save_model(_padded_twin(hf, 128 * 2), tmp_path / "fp64")
        with torch.no_grad():
            ref = hf(input_ids=ids).logits
    tp_worker.spawn(tp_worker.run, str(tmp_path / "fp64"), str(tmp_path / "inputs.pt"), str(tmp_path))
    for rank in range(2):
        torch.testing.assert_close(torch.load(tmp_path / f"rank{rank}.pt")["logits"], ref, atol=1e-10, rtol=1e-10)
    from megatron_ext import Qwen35Config

    with pytest.raises(ValueError, match="not divisible by tensor_parallel=3; convert again with --tp 3"):
        Qwen35Config(vocab_size=517).padded_to(128).to_transformer_config(tensor_parallel=3)


def _padded_twin(hf, multiple: int):
    """The megatron model of a HF text model, its vocabulary padded to ``multiple`` as convert_from_hf does."""
    from megatron_ext import Qwen35Config, build_model, hf_mapping

    config = Qwen35Config.from_hf(hf.config.to_dict()).padded_to(multiple)
    model = build_model(config, backend="local", device="cpu", params_dtype=next(hf.parameters()).dtype)
    hf_mapping.copy_hf_into(model, config, hf.state_dict().__getitem__, "model.")
    return model


def test_padded_ids_are_never_predicted_nor_learned():
    """The loss is the cross entropy over the real ids only, and the padded rows get no gradient, so
    training never moves probability onto them."""
    hf = causal_lm(text_config(vocab_size=517), seed=10).double()
    model = _padded_twin(hf, 128)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 517, (2, 24), generator=gen)
    labels = torch.randint(0, 517, (2, 24), generator=gen)
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
    loss = model(ids, labels=labels)
    expected = torch.nn.functional.cross_entropy(ref.reshape(-1, 517), labels.reshape(-1), reduction="none")
    # megatron's vocab-parallel cross entropy works in fp32 whatever the weights' dtype
    torch.testing.assert_close(loss.reshape(-1).double(), expected, atol=1e-6, rtol=1e-6)
    loss.sum().backward()
    grad = model.output_layer.weight.grad
    assert grad[517:].abs().max() == 0 and grad[:517].abs().max() > 0
    sharded = model(ids, runtime_gather_output=False)  # vocab-parallel logits keep the padded ids, at -inf
    assert sharded.shape[-1] == 640 and torch.isneginf(sharded[..., 517:]).all()
    assert model(ids).shape[-1] == 517  # what users get: the tokenizer's ids only


def test_release_keeps_the_frozen_mtp_head_and_says_so(multimodal_dir, tmp_path):
    """The MTP head is not trained (README: frozen); the release must carry the base's bytes and say so."""
    from megatron_ext.checkpoint import load_model, save_model

    ckpt = convert_from_hf.convert(multimodal_dir, tmp_path / "ckpt")
    model = load_model(ckpt)
    with torch.no_grad():
        model.decoder.final_layernorm.weight.add_(0.5)  # "training" changed the trunk
    save_model(model, tmp_path / "trained")
    out = convert_to_hf.convert(tmp_path / "trained", tmp_path / "export", hf_template=multimodal_dir)
    base, release = HFCheckpoint(multimodal_dir), HFCheckpoint(out)
    mtp = [k for k in base.keys() if k.startswith("mtp.")]
    assert len(mtp) > 10 and sorted(mtp) == sorted(k for k in release.keys() if k.startswith("mtp."))
    for name in mtp:
        a, b = base.get(name), release.get(name)
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8)), name
    assert not torch.equal(base.get("model.language_model.norm.weight"), release.get("model.language_model.norm.weight"))
    note = (out / "README.md").read_text()
    assert "MTP" in note and "frozen" in note and "evaluation.mtp" in note


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


@pytest.mark.parametrize("case", [*BAD, "truncated shard", "truncated config"])
def test_bad_input_names_the_problem_and_keeps_the_old_output(case, text_dir, tmp_path):
    out = convert_from_hf.convert(text_dir, tmp_path / "ckpt")  # a good output already in place
    before = sorted(p.name for p in out.iterdir())
    if case == "truncated shard":
        bad = _edit(text_dir, tmp_path / "bad")
        data = (bad / "model.safetensors").read_bytes()
        (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
        needle = "model.safetensors"
    elif case == "truncated config":
        bad = _edit(text_dir, tmp_path / "bad")
        (bad / "config.json").write_text((bad / "config.json").read_text()[:100])
        needle = "config.json: not valid JSON"
    else:
        kwargs, needle = BAD[case]
        bad = _edit(text_dir, tmp_path / "bad", **kwargs)
    with pytest.raises(CheckpointError, match=needle.replace(".", r"\.")) as err:
        convert_from_hf.convert(bad, out, overwrite=True)
    if case not in ("wrong architecture", "truncated config"):
        assert "model.safetensors" in str(err.value)  # the file is named too
    assert sorted(p.name for p in out.iterdir()) == before
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]
    assert compare(text_dir, out, seq_len=8)["max_rel_err"] <= 1e-5  # still the good checkpoint


def test_a_truncated_megatron_shard_is_named_in_one_line_and_the_old_export_kept(text_dir, tmp_path):
    """torch reports a truncated .distcp shard as a bare EOFError inside a CheckpointException (a BaseException);
    the export names the checkpoint and the layer it could not read, in one line, and replaces nothing."""
    import shutil

    ckpt = convert_from_hf.convert(text_dir, tmp_path / "ckpt")
    export = convert_to_hf.convert(ckpt, tmp_path / "export")
    before = {p.name: p.read_bytes() for p in export.iterdir()}
    bad = shutil.copytree(ckpt, tmp_path / "bad")
    for shard in bad.glob("*.distcp"):
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(SystemExit) as err:
        convert_to_hf.main(["--ckpt", str(bad), "--out", str(export), "--overwrite"])
    assert re.fullmatch(rf"convert_to_hf: {bad}: cannot read \S+: a shard is truncated or missing \(.*\)", str(err.value))
    assert {p.name: p.read_bytes() for p in export.iterdir()} == before
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_the_converters_name_a_missing_input_in_one_line(tmp_path):
    with pytest.raises(SystemExit, match=rf"^convert_from_hf: {tmp_path / 'none'}: no such checkpoint directory$"):
        convert_from_hf.main(["--hf-dir", str(tmp_path / "none"), "--out", str(tmp_path / "ckpt")])
    with pytest.raises(SystemExit, match=rf"^convert_to_hf: {tmp_path / 'none'} is not a neurocpt model checkpoint"):
        convert_to_hf.main(["--ckpt", str(tmp_path / "none"), "--out", str(tmp_path / "export")])
    assert not list(tmp_path.iterdir())


def test_a_conversion_into_an_output_another_one_writes_stops_naming_it(text_dir, tmp_path):
    """Two conversions into one folder (a command started twice): the second stops at once, naming the first,
    where it would publish one's half-written files as the other's. The lock is beside the folder, not in it (a
    release folder is uploaded whole), and goes with the conversion."""
    ckpt = convert_from_hf.convert(text_dir, tmp_path / "ckpt")
    for main, args, out in ((convert_from_hf.main, ["--hf-dir", str(text_dir)], tmp_path / "ckpt2"),
                            (convert_to_hf.main, ["--ckpt", str(ckpt)], tmp_path / "export")):
        holder = hold_in_another_process(out, "hold_output")
        try:
            with pytest.raises(SystemExit, match=rf"{out} is in use by another conversion \(pid {holder.pid} on "):
                main([*args, "--out", str(out)])
        finally:
            holder.kill()
            holder.wait()
        main([*args, "--out", str(out)])
        assert not list(out.glob(".*lock")) and not list(tmp_path.glob(".*lock"))


def test_a_shard_of_another_checkpoint_is_refused(multimodal_dir, tmp_path):
    """A shard replaced by a shard of another checkpoint, sharded otherwise (it holds the tensors the index
    lists in it, and more), is named, not mixed in."""
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(multimodal_dir, bad)
    shards = sorted(bad.glob("model-0*.safetensors"))
    other = {k: torch.zeros_like(v) for f in shards[1:3] for k, v in load_file(str(f)).items()}
    save_file(other, str(shards[1]), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=f"{shards[1].name}: holds tensor"):
        convert_from_hf.convert(bad, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_an_existing_output_or_an_input_is_never_replaced(text_dir, tmp_path):
    """A mistyped --out (the user's own directory, the HF source, the template) loses nothing; --overwrite
    replaces an earlier output, never an input."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    with pytest.raises(CheckpointError, match="exists: pass --overwrite"):
        convert_from_hf.convert(text_dir, mine)
    ckpt = convert_from_hf.convert(text_dir, tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="exists: pass --overwrite"):
        convert_to_hf.convert(ckpt, mine)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    hf = sorted(p.name for p in text_dir.iterdir())
    with pytest.raises(CheckpointError, match="would replace the input"):
        convert_from_hf.convert(text_dir, text_dir, overwrite=True)
    with pytest.raises(CheckpointError, match="would replace the input"):
        convert_to_hf.convert(ckpt, text_dir.parent, hf_template=text_dir, overwrite=True)
    with pytest.raises(CheckpointError, match="would replace the input"):
        convert_to_hf.convert(ckpt, ckpt, overwrite=True)
    assert sorted(p.name for p in text_dir.iterdir()) == hf and (ckpt / "qwen35_config.json").is_file()
    convert_to_hf.convert(ckpt, mine, overwrite=True)
    assert (mine / "config.json").is_file() and not (mine / "notes.txt").exists()


def test_a_killed_exports_leftovers_are_removed_by_the_next_run(text_dir, tmp_path):
    """kill -9 leaves the hidden temporary directory (a whole model's size); the rerun removes it, and
    leaves a live run's alone."""
    import os
    import socket

    ckpt = convert_from_hf.convert(text_dir, tmp_path / "ckpt")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    killed, live = (tmp_path / f".export.tmp-{host}-{int(dead.stdout)}", tmp_path / f".export.tmp-{host}-{os.getppid()}")
    for d in (killed, live):
        d.mkdir()
        (d / "model-00001-of-00002.safetensors").write_bytes(b"partial")
    convert_to_hf.convert(ckpt, tmp_path / "export")
    assert not killed.exists() and live.exists()


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


def test_a_save_starts_no_interpreter_that_imports_the_main_module_again(tmp_path):
    """megatron's checkpoint writer starts a *spawned* multiprocessing Manager at a process's first save,
    which imports the main module again (seconds per process; 23 s seen on a GPU node). A main script
    without a ``__main__`` guard shows it: imported again, it would save again inside the spawned child."""
    import os
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    script = tmp_path / "save_once.py"
    script.write_text(
        "from pathlib import Path\n"
        "from megatron_ext import build_model, checkpoint\n"
        "from megatron_ext.config import Qwen35Config\n"
        "from tools.tiny_qwen35 import text_config\n"
        f"with open({str(tmp_path / 'runs')!r}, 'a') as f: f.write('x')\n"
        f"checkpoint.save_model(build_model(Qwen35Config.from_hf(text_config().to_dict()), 'local'), {str(tmp_path / 'ckpt')!r})\n"
    )
    env = {**os.environ, "PYTHONPATH": str(root)}
    run = subprocess.run([sys.executable, str(script)], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert (tmp_path / "runs").read_text() == "x"  # the main module ran once
    assert (tmp_path / "ckpt" / "qwen35_config.json").is_file()


class _Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs, no handler cleans up."""


def _kill_between_renames(monkeypatch, out):
    """Make the replace of ``out`` die after moving the old output aside, before the new one is in place."""
    import os

    real = os.replace

    def replace(src, dst):
        if str(dst) == str(out):
            raise _Killed
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)


@pytest.mark.parametrize("converter", ["from_hf", "to_hf"])
def test_a_replace_killed_between_its_renames_loses_nothing(converter, text_dir, tmp_path, monkeypatch):
    """A run killed between replace_dir's two renames leaves the previous output moved aside; the next run
    restores it first, so a next run that fails keeps it too, and one that succeeds replaces it."""
    ckpt = convert_from_hf.convert(text_dir, tmp_path / "ckpt")
    if converter == "from_hf":
        out, good, bad = ckpt, text_dir, tmp_path / "missing"
        run = lambda src: convert_from_hf.convert(src, ckpt, overwrite=True)  # noqa: E731
    else:
        out = convert_to_hf.convert(ckpt, tmp_path / "export")
        good, bad = None, tmp_path / "other"
        causal_lm(text_config(intermediate_size=48), seed=1).save_pretrained(bad)
        run = lambda template: convert_to_hf.convert(ckpt, out, hf_template=template, overwrite=True)  # noqa: E731
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with monkeypatch.context() as m:
        _kill_between_renames(m, out)
        with pytest.raises(_Killed):
            run(good)
    assert not out.exists() and (out.parent / f".{out.name}.old").is_dir()  # the kill point
    with pytest.raises(CheckpointError):
        run(bad)  # a rerun that fails
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert not (out.parent / f".{out.name}.old").exists()
    (out.parent / f".{out.name}.old").mkdir()  # killed after the replace, before the old copy was removed
    run(good)
    assert out.is_dir() and not [p for p in tmp_path.iterdir() if p.name.startswith(f".{out.name}.")]


def test_everything_published_is_fsynced_first(text_dir, tmp_path, monkeypatch):
    """The index, configs and tokenizer files reach the disk before their directory is renamed into place,
    as the shards do (a crash would otherwise publish empty files)."""
    import os

    synced, published = set(), {}
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.add(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd))[1])

    def replace(src, dst):
        published[str(dst)] = {p for p in synced if p.startswith(str(src) + os.sep)}
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    ckpt = convert_from_hf.convert(text_dir, tmp_path / "ckpt")
    out = convert_to_hf.convert(ckpt, tmp_path / "export")
    for directory in (ckpt, out):
        names = {p.rsplit(os.sep, 1)[1] for p in published[str(directory)]}
        expected = {p.name for p in directory.rglob("*")}
        assert expected <= names, sorted(expected - names)
    assert {"model.safetensors.index.json", "config.json", "qwen35_config.json"} <= {
        p.rsplit(os.sep, 1)[1] for d in published.values() for p in d}


def test_bad_sizes_and_divisors_are_refused_by_the_command_line_naming_the_flag(tmp_path, capsys):
    """--tp/--pp/--vocab-divisor 0 ended convert_from_hf in a ZeroDivisionError; a --max-shard-size typo ended
    convert_to_hf, after the whole export, in int()'s message naming no flag."""
    for main, args, says in (
            (convert_from_hf.main, ["--tp", "0"], "argument --tp: must be at least 1, got 0"),
            (convert_from_hf.main, ["--vocab-divisor", "0"], "argument --vocab-divisor: must be at least 1, got 0"),
            (convert_to_hf.main, ["--max-shard-size", "5XB"], "argument --max-shard-size: '5XB' is not a size")):
        source = ["--hf-dir", str(tmp_path)] if main is convert_from_hf.main else ["--ckpt", str(tmp_path)]
        with pytest.raises(SystemExit) as stopped:
            main([*source, "--out", str(tmp_path / "out"), *args])
        assert stopped.value.code == 2 and says in capsys.readouterr().err
    from tools.hf_checkpoint import parse_size

    assert [parse_size(s) for s in ("5GB", "500MB", "2GiB", "10kb", "1000")] == [5 * 10**9, 5 * 10**8, 2 * 2**30, 10**4, 1000]


def test_stop_tokens_join_the_eos_ids_and_an_unknown_one_is_refused_before_the_export(multimodal_dir, tmp_path):
    """An SFT export stops at '<|im_end|>' too; a mistyped token is named with the tokenizer it is not in (the template's
    or the checkpoint's, not the export's temporary directory), before the export is written."""
    from transformers import AutoTokenizer

    ckpt = convert_from_hf.convert(multimodal_dir, tmp_path / "ckpt")
    im_end = AutoTokenizer.from_pretrained(multimodal_dir).convert_tokens_to_ids("<|im_end|>")
    for template in (multimodal_dir, None):
        out = convert_to_hf.convert(ckpt, tmp_path / f"export_{template is None}", hf_template=template, stop_tokens=["<|im_end|>"])
        assert json.loads((out / "generation_config.json").read_text())["eos_token_id"][0] == im_end
        source = str(multimodal_dir) if template else f"{ckpt} (kept from its conversion)"
        with pytest.raises(ValueError, match=re.escape(f"--stop-tokens: '<|im_endd|>' is not a token of the tokenizer of {source}")):
            convert_to_hf.convert(ckpt, tmp_path / "bad", hf_template=template, stop_tokens=["<|im_end|>", "<|im_endd|>"])
        assert not any(p.name.startswith(("bad", ".bad")) for p in tmp_path.iterdir())
