"""``compile_elementwise``: the layers' elementwise chains compiled by torch.compile (inductor's C++ backend on
CPU, Triton on GPU) compute what the eager model and transformers' reference compute, in float64, with no
graph break."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch._dynamo as dynamo
from conftest import float64, megatron_twin

from tools.parity import rel_err
from tools.tiny_qwen35 import causal_lm, text_config

from megatron_ext import fusions, layers

L, F = "linear_attention", "full_attention"


@contextlib.contextmanager
def dynamo_on():
    """torch.compile active (megatron_ext.cpu_patches turns it off on CPU), with empty caches either side so
    that what compiles here is counted here and nothing compiled here outlives the test."""
    with dynamo.config.patch(disable=False):
        dynamo.reset()
        dynamo.utils.counters.clear()
        try:
            yield dynamo.utils.counters
        finally:
            dynamo.reset()


def _logits_and_grads(model, ids, upstream):
    out = model(ids)
    (out * upstream).sum().backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("recompute", [
    {}, dict(recompute_granularity="selective", recompute_modules=["mlp"]),
    dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
], ids=["no-recompute", "selective-mlp", "full"])
def test_compiled_elementwise_model_matches_eager_and_transformers_in_float64(recompute, monkeypatch):
    """Logits against transformers; gradients against the eager model under the same recomputation. The
    float64 harness cannot reach a recomputation that runs inside the backward (autograd runs no torch
    function modes there): megatron's own fp32 upcasts (attention softmax, RoPE) then stay fp32 on both
    sides, and an fp64 difference of 1e-16 flips an fp32 rounding now and then (8.8e-10 seen). So under full
    recomputation gradients are held to 1e-6 (about eight fp32 ulps), far below what a wrong chain gives."""
    gen = torch.Generator().manual_seed(0)
    with float64():
        hf = causal_lm(text_config(layer_types=[L, F, L]), seed=3)
        ids = torch.randint(0, hf.config.vocab_size, (2, 70), generator=gen)
        reference = hf(ids).logits.detach()
        upstream = torch.randn(reference.shape, generator=gen)
        eager_logits, eager_grads = _logits_and_grads(megatron_twin(hf, **recompute), ids, upstream)
        compiled = megatron_twin(hf, compile_elementwise=True, **recompute)
        assert compiled.config.compile_elementwise and compiled.config.bias_activation_fusion  # megatron's SwiGLU too
        ran = []  # each chain's compiled twin itself: one left eager would match the eager model trivially
        for chain in (layers.rms_norm, layers.gated_rms_norm, layers.gdn_gates):
            monkeypatch.setattr(chain, "compiled", lambda *a, name=chain.__name__, twin=chain.compiled, **kw:
                                ran.append(name) or twin(*a, **kw))
        with dynamo_on() as counters:
            logits, grads = _logits_and_grads(compiled, ids, upstream)
    assert dict(counters["graph_break"]) == {}, "a graph break splits a chain back into eager kernels"
    assert set(ran) == {"rms_norm", "gated_rms_norm", "gdn_gates"}
    assert counters["stats"]["unique_graphs"] >= 4  # rms_norm, gdn_gates, gated_rms_norm, SwiGLU (at least)
    assert logits.dtype == torch.float64 and rel_err(logits, reference) <= 1e-10
    assert rel_err(logits, eager_logits) <= 1e-12
    limit = 1e-6 if recompute.get("recompute_granularity") == "full" else 1e-10
    for name, grad in grads.items():
        assert grad.dtype == torch.float64 and rel_err(grad, eager_grads[name]) <= limit, name


def test_the_switch_defaults_off_and_picks_the_compiled_twin():
    from megatron_ext import Qwen35Config

    config = Qwen35Config.from_hf(text_config().to_dict())
    assert not config.to_transformer_config().compile_elementwise
    assert not config.to_transformer_config().bias_activation_fusion
    with dynamo.config.patch(recompile_limit=8):  # dynamo's default: an RMSNorm alone needed more (fusions.py)
        on = config.to_transformer_config(compile_elementwise=True)
        assert layers.rms_norm.on(on) is layers.rms_norm.compiled
        assert dynamo.config.recompile_limit == fusions.RECOMPILE_LIMIT
    assert layers.rms_norm.on(config.to_transformer_config()) is layers.rms_norm.eager
    assert layers.gdn_gates.on(object()) is layers.gdn_gates.eager  # a config without the switch: eager


def test_eager_chains_keep_bf16_where_transformers_does():
    """dtypes of the chains in bf16: the norms return the input's dtype, the GDN decay stays fp32 and beta
    bf16 (fla takes g in fp32), as transformers' Qwen3.5 computes them."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 8, generator=gen).bfloat16()
    w = torch.randn(8, generator=gen).bfloat16()
    assert layers.rms_norm(x, w, 1e-6, True).dtype == torch.bfloat16
    assert layers.gated_rms_norm(x, x, w, 1e-6, torch.nn.functional.silu).dtype == torch.bfloat16
    g, beta = layers.gdn_gates(x[:, :4], x[:, 4:], w[:4], w[4:])
    assert g.dtype == torch.float32 and beta.dtype == torch.bfloat16


def test_the_loss_is_megatrons_unfused_cross_entropy_and_the_fused_one_agrees_where_asked():
    """The compiled bf16 model runs megatron's unfused cross entropy: the fused one held one more fp32 copy of the
    logits on an H200 for no speed (megatron_ext/config.py). Asked for (a bench row does), the fused one gives the
    same loss and gradients, bit for bit where dynamo is off."""
    from unittest import mock

    from megatron.core.models.common.language_module import language_module

    gen = torch.Generator().manual_seed(0)
    hf = causal_lm(text_config(layer_types=[L, F]), seed=3)
    ids = torch.randint(0, hf.config.vocab_size, (2, 33), generator=gen)

    def loss_and_grads(**kwargs):
        model = megatron_twin(hf, params_dtype=torch.bfloat16, compile_elementwise=True, **kwargs)
        loss = model(ids, labels=ids)
        loss.float().mean().backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters()}

    fused_ce = mock.Mock(wraps=language_module.fused_vocab_parallel_cross_entropy)
    with mock.patch.object(language_module, "fused_vocab_parallel_cross_entropy", fused_ce):
        loss, grads = loss_and_grads()
        assert fused_ce.call_count == 0
        fused_loss, fused_grads = loss_and_grads(cross_entropy_loss_fusion=True)
        assert fused_ce.call_count == 1
    assert fused_loss.dtype == torch.float32 and torch.equal(fused_loss, loss)
    for name, grad in fused_grads.items():
        assert torch.equal(grad, grads[name]), name
