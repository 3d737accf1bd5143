"""The TE spec with Transformer Engine's real modules, where TE imports: a GPU node, or a CPU machine with the
binding built by tools/build_te_binding.sh (TE's modules build and checkpoint on the CPU; only their kernels
need CUDA). Their parameter and checkpoint names, in order, are te_spec_names.txt's, which the local spec is held
to on every machine (tests/test_te_spec.py), and checkpoints cross between the two specs. CI has no TE: skipped."""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("transformer_engine.pytorch", reason="Transformer Engine is not installed")

from megatron_ext import build_model, model as model_module  # noqa: E402
from megatron_ext.checkpoint import load_weights, save_model  # noqa: E402
from test_te_spec import TINY, _checkpoint_entries, _same_weights, _te_names, te_parameter_order  # noqa: E402


@pytest.fixture
def te_model(monkeypatch):
    """Builds TINY under the TE spec on the CPU. TE's modules assert that CUDA is available when they are made,
    and the backend choice refuses TE without it (their kernels need it): both are told yes, for building."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(model_module, "resolve_backend", lambda requested: "te")
    return lambda: build_model(TINY, "te", device="cpu")


def test_te_names_in_order_are_the_recorded_ones(te_model):
    model = te_model()
    te = _te_names()
    assert [n for n, _ in model.named_parameters()] == te_parameter_order()
    assert _checkpoint_entries(model) == (te["param"], te["object"])
    assert set(model.state_dict()) - te["param"] - te["object"] == te["state"]


def test_attention_kernel_te_is_te_attention_with_its_state(te_model):  # te_model: its patches, to build on the CPU
    """By request only, the core attention is TE's (spec.core_attention): one state entry more, nothing else."""
    from megatron.core.extensions.transformer_engine import TEDotProductAttention

    model = build_model(TINY, "te", device="cpu", attention_kernel="te")
    assert isinstance(model.decoder.layers[1].self_attention.core_attention, TEDotProductAttention)
    te = _te_names()
    assert [n for n, _ in model.named_parameters()] == te_parameter_order()
    assert set(model.state_dict()) - te["param"] - te["object"] == te["state"] | {
        "decoder.layers.1.self_attention.core_attention._extra_state"}


def test_checkpoints_cross_between_the_local_spec_and_te(te_model, tmp_path):
    local = build_model(TINY, "local", device="cpu")
    save_model(local, tmp_path / "local")  # as convert_from_hf writes on a CPU node: no TE extra state
    te = te_model()
    assert not _same_weights(local, te)  # a different random init, so the load has work to do
    load_weights(te, tmp_path / "local")
    assert _same_weights(local, te)
    save_model(te, tmp_path / "te")
    back = build_model(TINY, "local", device="cpu")
    load_weights(back, tmp_path / "te")  # TE's extra state stays in the checkpoint
    assert _same_weights(local, back)
    again = te_model()
    load_weights(again, tmp_path / "te")
    assert _same_weights(local, again)


@pytest.mark.parametrize("recipe", ["delayed", "tensorwise", "blockwise", "mxfp8"])
def test_fp8_recipes_build_te_modules(te_model, recipe):  # te_model: its patches, to build on the CPU
    """Each ``fp8_recipe`` the config accepts builds under TE. The GDN's input projection is 2 x 64 + 2 x 256 +
    2 x 16 = 672 wide here: megatron asserts FP8 GEMM alignment (16; 32 for mxfp8), which TINY's 200 misses
    and Qwen3.5-2B's 8,224 meets."""
    config = dataclasses.replace(TINY, linear_num_key_heads=4, linear_num_value_heads=16)
    model = build_model(config, "te", device="cpu", params_dtype=torch.bfloat16, fp8="hybrid", fp8_recipe=recipe)
    assert (model.config.fp8, model.config.fp8_recipe) == ("hybrid", recipe)


def test_te_attention_part_stand_in_has_te_signature():
    """tests/test_gpu_check.py runs the te_attention part on CPU through a stand-in with TE's forward signature:
    held to the real one here."""
    import inspect

    from megatron.core.extensions.transformer_engine import TEDotProductAttention
    from test_gpu_check import TESignatureAttention

    def shape(fn):
        return [(p.name, p.default is inspect.Parameter.empty) for p in inspect.signature(fn).parameters.values()]

    assert shape(TESignatureAttention.forward) == shape(TEDotProductAttention.forward)
