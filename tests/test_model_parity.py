"""The megatron-core Qwen3.5 equals transformers' reference: logits and gradients, several shapes."""

from __future__ import annotations

import pytest
import torch
from conftest import megatron_twin

from tools.tiny_qwen35 import causal_lm, text_config

import megatron_ext
from megatron_ext import hf_mapping

L, F = "linear_attention", "full_attention"

SHAPES = {
    "gva_untied": dict(),  # 2 key heads serve 4 value heads in GDN, GQA 4/2, untied head
    "tied_odd_pattern": dict(tie_word_embeddings=True, layer_types=[F, L, L], num_key_value_heads=1,
                             linear_num_key_heads=3, linear_num_value_heads=3),
    "deep_linear_run": dict(layer_types=[L, L, L, F, L], hidden_size=48, head_dim=12, num_attention_heads=2,
                            num_key_value_heads=2, linear_key_head_dim=16, linear_value_head_dim=8,
                            linear_num_key_heads=1, linear_num_value_heads=4, intermediate_size=40),
}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


@pytest.mark.parametrize("shape", SHAPES)
def test_logits_and_gradients_match_transformers(shape):
    hf = causal_lm(text_config(**SHAPES[shape]), seed=1)
    ours = megatron_twin(hf)
    ids = torch.randint(0, hf.config.vocab_size, (2, 77))  # > one 64-token GDN chunk, not a multiple of it

    ref = hf(ids).logits
    out = ours(ids)
    assert out.shape == ref.shape
    assert _rel(out, ref) <= 1e-4

    weights = torch.randn_like(ref)
    (ref * weights).sum().backward()
    (out * weights).sum().backward()
    config = ours.qwen35_config
    ours_grads = {n: p.grad for n, p in ours.named_parameters()}
    hf_grads = {n: p.grad for n, p in hf.named_parameters()}
    prefix = hf_mapping.lm_prefix(hf_grads)
    checked = 0
    for name, grad in hf_mapping.megatron_to_hf(config, ours_grads.__getitem__, prefix):
        assert _rel(grad, hf_grads[name]) <= 1e-3, name
        checked += 1
    assert checked == len(hf_grads)  # every HF parameter (a tied head is one parameter)


def test_config_reads_multimodal_and_text_checkpoints():
    from transformers import Qwen3_5Config

    text = text_config(tie_word_embeddings=False)
    multimodal = Qwen3_5Config(text_config=text.to_dict(), tie_word_embeddings=True).to_dict()
    a = megatron_ext.Qwen35Config.from_hf(text.to_dict())
    b = megatron_ext.Qwen35Config.from_hf(multimodal)
    assert a.layer_types == b.layer_types == text.layer_types
    assert (a.linear_num_key_heads, a.linear_num_value_heads, a.head_dim) == (2, 4, 16)
    assert a.partial_rotary_factor == 0.25 and a.rope_theta == 10000.0
    assert not a.tie_word_embeddings and b.tie_word_embeddings  # multimodal ties by its top-level flag
    with pytest.raises(ValueError, match="not a Qwen3.5"):
        megatron_ext.Qwen35Config.from_hf({"model_type": "llama"})
