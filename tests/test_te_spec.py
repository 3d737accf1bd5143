"""The Transformer Engine path without TE: backend selection and its errors, FP8 settings checked at config load,
the transformer config built for TE, TE's parameter and checkpoint names (recorded in te_spec_names.txt, checked
against TE's modules by test_te_modules.py where TE imports) against the local spec's, and checkpoints crossing
between the two."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest
import torch
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.enums import Fp8Recipe
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_ext import Qwen35Config, build_model, spec
from megatron_ext.checkpoint import load_weights, save_model
from megatron_ext.config import FP8_FORMATS, FP8_RECIPES
from megatron_ext.layers import RMSNorm
from megatron_ext.train_config import TrainConfig

L, F = "linear_attention", "full_attention"
TINY = Qwen35Config(  # the model te_spec_names.txt describes
    vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, layer_types=[L, F],
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, linear_key_head_dim=16, linear_value_head_dim=16,
    linear_num_key_heads=2, linear_num_value_heads=4, tie_word_embeddings=True,
)
NO_TE = "ImportError: No module named 'transformer_engine'"


def _te_entries() -> list[tuple[str, str]]:
    """(kind, name) of each te_spec_names.txt line, in the file's order."""
    lines = (Path(__file__).parent / "te_spec_names.txt").read_text().splitlines()
    return [tuple(line.split()[:2]) for line in lines if line.strip() and not line.startswith("#")]


def _te_names() -> dict[str, set[str]]:
    names: dict[str, set[str]] = {"param": set(), "object": set(), "state": set()}
    for kind, name in _te_entries():
        names[kind].add(name)
    return names


def te_parameter_order() -> list[str]:
    return [name for kind, name in _te_entries() if kind == "param"]


# ------------------------------------------------------------------------------------- backend choice


@pytest.mark.parametrize("te_error, cuda", [(NO_TE, True), (None, False), (NO_TE, False)])
def test_auto_picks_local_unless_te_and_cuda(monkeypatch, te_error, cuda):
    monkeypatch.setattr(spec, "transformer_engine_error", lambda: te_error)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert spec.resolve_backend("auto") == "local"


def test_auto_picks_te_with_te_and_cuda(monkeypatch):
    monkeypatch.setattr(spec, "transformer_engine_error", lambda: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert spec.resolve_backend("auto") == "te" and spec.resolve_backend("local") == "local"


def test_te_without_transformer_engine_says_why_and_what_to_do(monkeypatch):
    monkeypatch.setattr(spec, "transformer_engine_error", lambda: NO_TE)
    with pytest.raises(RuntimeError, match=r"needs Transformer Engine, which does not import here \(ImportError: "
                                           r".*README's 'Transformer Engine' section.*backend 'local'"):
        spec.resolve_backend("te")


def test_te_without_cuda_says_so(monkeypatch):
    monkeypatch.setattr(spec, "transformer_engine_error", lambda: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="needs a CUDA device and torch sees none; on a CPU machine use backend 'local'"):
        spec.resolve_backend("te")


def test_build_model_refuses_te_without_it(monkeypatch):
    monkeypatch.setattr(spec, "transformer_engine_error", lambda: NO_TE)
    with pytest.raises(RuntimeError, match="backend 'te' needs Transformer Engine"):
        build_model(TINY, "te", device="cpu")
    with pytest.raises(ValueError, match="unknown backend 'tee'"):
        spec.resolve_backend("tee")


# ------------------------------------------------------------------------------------------ FP8 settings


def test_fp8_names_are_megatrons():
    fp8_field = TransformerConfig.__dataclass_fields__["fp8"].type  # Optional[Literal['e4m3', 'hybrid']]
    assert set(FP8_FORMATS) == set(typing.get_args(typing.get_args(fp8_field)[0]))
    assert set(FP8_RECIPES) == {r.value for r in Fp8Recipe} - {"custom"}


@pytest.mark.parametrize("overrides, error", [
    (["fp8=e5m2", "backend=te"], "fp8 must be null, hybrid or e4m3; got 'e5m2'"),
    (["fp8=hybrid", "backend=te", "fp8_recipe=current"],
     "fp8_recipe must be one of delayed (delayed scaling), tensorwise (current scaling, per tensor), "),
    (["fp8=hybrid"], "fp8 runs on Transformer Engine's GEMMs: set backend: te (got backend: auto)"),
    (["fp8=e4m3", "backend=local"], "set backend: te (got backend: local)"),
    (["fp8=hybrid", "backend=te", "precision=fp32"], "fp8 needs precision: bf16"),
    (["fp8_recipe=delayd"], "fp8_recipe must be one of"),  # a typo fails even with fp8 off
])
def test_fp8_settings_fail_at_config_load_in_one_line(overrides, error):
    with pytest.raises(ValueError) as e:
        TrainConfig.load(None, overrides)
    assert error in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("recipe", ["delayed", "tensorwise"])
def test_fp8_settings_that_load(recipe):
    cfg = TrainConfig.load(None, ["fp8=hybrid", "backend=te", f"fp8_recipe={recipe}"])
    assert (cfg.fp8, cfg.fp8_recipe, cfg.backend, cfg.precision) == ("hybrid", recipe, "te", "bf16")


# ------------------------------------------------------------------------ the transformer config for TE


def test_te_config_has_the_fused_kernels_fp8_and_no_selective_recompute():
    tcfg = TINY.to_transformer_config(backend="te", params_dtype=torch.bfloat16, fp8="hybrid", fp8_recipe="tensorwise",
                                      recompute_granularity="selective")
    assert tcfg.transformer_impl == "transformer_engine"
    assert tcfg.apply_rope_fusion and tcfg.bias_activation_fusion  # TE's fused RoPE (thd, partial), fused SwiGLU
    assert tcfg.recompute_granularity is None
    assert (tcfg.fp8, tcfg.fp8_recipe) == ("hybrid", "tensorwise")
    full = TINY.to_transformer_config(backend="te", recompute_granularity="full", recompute_method="uniform",
                                      recompute_num_layers=1)
    assert full.recompute_granularity == "full"  # full recomputation is kept: it saves the GDN/MLP activations


def test_local_config_keeps_its_settings():
    tcfg = TINY.to_transformer_config(backend="local", recompute_granularity="selective")
    assert tcfg.transformer_impl == "local" and not tcfg.bias_activation_fusion and tcfg.fp8 is None
    assert tcfg.apply_rope_fusion  # megatron_ext.rope's sync-free packed RoPE fills the slot without TE
    assert tcfg.recompute_granularity == "selective"  # the local attention materialises its scores: worth it
    with pytest.raises(ValueError, match="set backend: te"):
        TINY.to_transformer_config(backend="local", params_dtype=torch.bfloat16, fp8="hybrid")


# --------------------------------------------------------------------- names and checkpoints across specs


class TEStyleRMSNorm(RMSNorm):
    """Stands in for TE's RMSNorm (TENorm): the same weight plus an ``_extra_state``, where TE keeps FP8
    scaling metadata (an empty uint8 tensor while there is none)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.extra = torch.empty(0, dtype=torch.uint8)

    def get_extra_state(self):
        return self.extra

    def set_extra_state(self, state):
        self.extra = state


def _build(monkeypatch, te_style: bool = False, config: Qwen35Config = TINY):
    """The local-spec model, with TE-style norms in place of the local RMSNorm if asked."""
    with monkeypatch.context() as m:
        if te_style:
            m.setattr(spec.LocalQwen35SpecProvider, "layer_norm", lambda self, rms_norm=False, for_qk=False: TEStyleRMSNorm)
        return build_model(config, "local", device="cpu")


def _checkpoint_entries(model) -> tuple[set[str], set[str]]:
    """(tensor keys, ShardedObject keys) of the model's dist-checkpoint state."""
    sharded = model.sharded_state_dict()
    return {k for k, v in sharded.items() if not isinstance(v, ShardedObject)}, \
        {k for k, v in sharded.items() if isinstance(v, ShardedObject)}


def test_local_spec_has_te_parameter_names(monkeypatch):
    te = _te_names()
    model = _build(monkeypatch)
    assert [n for n, _ in model.named_parameters()] == te_parameter_order()  # the optimizer's buffer order too
    tensors, objects = _checkpoint_entries(model)
    assert tensors == te["param"]
    # what a checkpoint saved under the local spec lacks under TE: the extra state of TE's norms, nothing else
    assert te["object"] - objects == {"decoder.layers.1.self_attention.q_layernorm._extra_state",
                                      "decoder.layers.1.self_attention.k_layernorm._extra_state",
                                      "decoder.final_layernorm._extra_state"}
    assert objects <= te["object"]
    assert not te["state"] & (objects | tensors)


def test_local_norm_linears_register_their_norm_first_as_te_does(monkeypatch):
    """TE's LayerNormLinear registers ``layer_norm_weight`` before ``weight`` (te_spec_names.txt [lnl]); the
    distributed optimizer keeps its checkpointed state in gradient-buffer order, which follows this order."""
    names = [n for n, _ in _build(monkeypatch).named_parameters()]
    norms = [i for i, n in enumerate(names) if n.endswith(".layer_norm_weight")]
    assert len(norms) == 4 and all(names[i + 1] == names[i].replace("layer_norm_weight", "weight") for i in norms)


def test_te_style_model_has_te_checkpoint_names(monkeypatch):
    te = _te_names()
    assert _checkpoint_entries(_build(monkeypatch, te_style=True)) == (te["param"], te["object"])  # checkpoints as TE's


def _same_weights(a, b) -> bool:
    b_params = dict(b.named_parameters())
    return all(torch.equal(p, b_params[n]) for n, p in a.named_parameters())


def test_checkpoint_crosses_between_local_and_te_style_modules(tmp_path, monkeypatch):
    local = _build(monkeypatch)
    save_model(local, tmp_path / "local")  # as convert_from_hf writes on a CPU node: no norm extra state
    te_style = _build(monkeypatch, te_style=True)
    assert not _same_weights(local, te_style)  # a different random init, so the load below has work to do
    load_weights(te_style, tmp_path / "local")
    assert _same_weights(local, te_style)

    norms = [m for m in te_style.modules() if isinstance(m, TEStyleRMSNorm)]
    for i, norm in enumerate(norms):
        norm.extra = torch.tensor([i, 7], dtype=torch.uint8)  # FP8 metadata, as a model trained under TE has
    save_model(te_style, tmp_path / "te")
    back = _build(monkeypatch)
    load_weights(back, tmp_path / "te")  # under the local spec the norms' extra state stays in the checkpoint
    assert _same_weights(local, back)
    again = _build(monkeypatch, te_style=True)
    load_weights(again, tmp_path / "te")
    assert _same_weights(local, again)
    assert [m.extra.tolist() for m in again.modules() if isinstance(m, TEStyleRMSNorm)] == [[i, 7] for i in range(len(norms))]


def test_a_checkpoint_missing_a_weight_still_fails(tmp_path, monkeypatch):
    save_model(_build(monkeypatch), tmp_path / "ckpt")
    other = _build(monkeypatch, config=dataclasses.replace(TINY, layer_types=[F, L]))
    with pytest.raises(BaseException, match="decoder.layers.0.self_attention.linear_proj.weight from model not in state dict"):
        load_weights(other, tmp_path / "ckpt")  # torch's CheckpointException is a BaseException
