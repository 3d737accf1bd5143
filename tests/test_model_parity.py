"""The megatron-core Qwen3.5 equals transformers' reference: logits and gradients, several shapes.

Both sides run in float64 throughout (``conftest.float64``), where they agree to ~1e-13: a 1e-10 tolerance
then says the maths is the same, with no rounding noise to pass or fail by chance. One float32 run is held
to the rounding bound of its longest reduction. Random inputs come from local seeded generators."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from conftest import float64, megatron_twin

from tools.parity import gradient_pairs, rel_err
from tools.tiny_qwen35 import causal_lm, text_config

import megatron_ext

L, F = "linear_attention", "full_attention"
RELEASE_CONFIG = Path(__file__).parent / "qwen35_0.8b_release_config.json"

SHAPES = {
    "gva_untied": dict(),  # 2 key heads serve 4 value heads in GDN, GQA 4/2, untied head
    "tied_odd_pattern": dict(tie_word_embeddings=True, layer_types=[F, L, L], num_key_value_heads=1,
                             linear_num_key_heads=3, linear_num_value_heads=3),
    "deep_linear_run": dict(layer_types=[L, L, L, F, L], hidden_size=48, head_dim=12, num_attention_heads=2,
                            num_key_value_heads=2, linear_key_head_dim=16, linear_value_head_dim=8,
                            linear_num_key_heads=1, linear_num_value_heads=4, intermediate_size=40),
}
SEQ = 77  # > one 64-token GDN chunk, not a multiple of it


def _reference(shape: dict, seed: int = 0):
    """transformers' model in float64, its logits for random ids, and its gradients of a random projection."""
    gen = torch.Generator().manual_seed(seed)
    with float64():
        hf = causal_lm(text_config(**shape), seed=1)
        ids = torch.randint(0, hf.config.vocab_size, (2, SEQ), generator=gen)
        logits = hf(ids).logits
        weights = torch.randn(logits.shape, generator=gen)
        (logits * weights).sum().backward()
    return hf, ids, logits.detach(), weights


@pytest.mark.parametrize("shape", SHAPES)
def test_logits_and_gradients_match_transformers_in_float64(shape):
    hf, ids, ref, weights = _reference(SHAPES[shape])
    with float64():
        ours = megatron_twin(hf)
        out = ours(ids)
        (out * weights).sum().backward()
    assert out.dtype == torch.float64 and out.shape == ref.shape
    assert rel_err(out, ref) <= 1e-10
    for name, grad, hf_grad in gradient_pairs(ours, hf):
        assert grad.dtype == torch.float64 and rel_err(grad, hf_grad) <= 1e-10, name


def test_float32_error_is_within_the_rounding_bound_of_its_longest_reduction():
    """float32 megatron against the float64 reference. A length-n float32 reduction errs by at most about
    n * eps relative to its terms; n is the longest one here (hidden, MLP width, or the sequence that attention
    and the GDN recurrence sum over). Gradients are measured at the scale of the largest gradient: a small
    gradient that is a sum with cancellation (dt_bias) has no meaningful float32 relative error of its own."""
    hf, ids, ref, weights = _reference(SHAPES["gva_untied"])
    ours = megatron_twin(hf)  # float32 parameters, the float64 weights rounded
    out = ours(ids)
    (out * weights.float()).sum().backward()
    assert out.dtype == torch.float32
    n = max(hf.config.hidden_size, hf.config.intermediate_size, SEQ)
    tol = n * torch.finfo(torch.float32).eps
    assert rel_err(out.double(), ref) <= tol
    pairs = gradient_pairs(ours, hf)
    scale = max(hf_grad.abs().max() for _, _, hf_grad in pairs)
    worst = max((grad.double() - hf_grad).abs().max() for _, grad, hf_grad in pairs)
    assert worst / scale <= tol


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


def test_a_published_release_config_reads_as_its_model():
    """Qwen/Qwen3.5-0.8B's config.json as published (tests/qwen35_0.8b_release_config.json): keys of its own
    (``mlp_only_layers``, ``mamba_ssm_dtype``, interleaved M-RoPE), both tie flags true, the eos in text_config.
    The fixtures elsewhere are tiny models; this is the one file a user's run starts from."""
    c = megatron_ext.Qwen35Config.from_hf(RELEASE_CONFIG)
    assert c.layer_types == [L, L, L, F] * 6
    assert (c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (
        1024, 3584, 8, 2, 256)
    assert (c.linear_num_key_heads, c.linear_num_value_heads, c.linear_key_head_dim) == (16, 16, 128)
    assert (c.rope_theta, c.partial_rotary_factor, c.mrope_section) == (1e7, 0.25, [11, 11, 10])
    assert c.tie_word_embeddings and c.eos_token_id == 248044 and c.vocab_size == 248320


def test_config_keys_a_file_leaves_out_are_read_as_transformers_reads_them():
    """A hand-written or third-party config.json need not list every key: what it leaves out is transformers'
    default, as the reference model builds it (the layers from full_attention_interval, not every 4th; RoPE's
    theta of 10000, not the release's 1e7)."""
    from transformers import Qwen3_5TextConfig

    for raw in ({"num_hidden_layers": 8, "full_attention_interval": 2},
                {"rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.5}},
                {"model_type": "qwen3_5_text", "rope_theta": 5e5, "num_hidden_layers": 4}):
        ours, hf = megatron_ext.Qwen35Config.from_hf(dict(raw)), Qwen3_5TextConfig(**raw)
        assert ours.layer_types == hf.layer_types, raw
        assert (ours.rope_theta, ours.partial_rotary_factor) == (hf.rope_parameters["rope_theta"],
                                                                 hf.rope_parameters["partial_rotary_factor"]), raw
        assert (ours.hidden_size, ours.max_position_embeddings) == (hf.hidden_size, hf.max_position_embeddings), raw
    assert megatron_ext.Qwen35Config.from_hf({"num_hidden_layers": 8, "full_attention_interval": 2}).layer_types[:2] == [
        "linear_attention", "full_attention"]


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_loss_in_chunks_equals_the_whole_and_keeps_no_logits_for_the_backward(tied):
    """``loss_chunk``: the output layer and loss in pieces (here 16 tokens, the last one short), each
    piece's logits recomputed in the backward. Same per-token loss and gradients in float64; what the
    autograd graph keeps outside the pieces holds nothing of vocabulary size per token."""
    gen = torch.Generator().manual_seed(3)
    with float64():
        hf = causal_lm(text_config(tie_word_embeddings=tied, vocab_size=1000), seed=1)  # padded to 1024
        whole, chunked = megatron_twin(hf), megatron_twin(hf)
    chunked.loss_chunk = 16
    head = chunked._head_loss

    def head_in_float64(*args):  # recomputed in the backward, where autograd runs without the caller's function modes
        with float64():
            return head(*args)

    chunked._head_loss = head_in_float64
    vocab, padded = hf.config.vocab_size, whole.qwen35_config.padded_vocab_size
    ids, labels = (torch.randint(0, vocab, (2, SEQ), generator=gen) for _ in range(2))
    positions = torch.cat([torch.arange(30), torch.arange(SEQ - 30)]).expand(2, SEQ)  # two documents a row
    weights = torch.randn(2, SEQ, generator=gen, dtype=torch.float64)
    results = []
    for model in (whole, chunked):
        saved = []
        with float64():  # the backward too: it recomputes the pieces
            with torch.autograd.graph.saved_tensors_hooks(  # saved tensors of vocabulary width: logits, softmax
                    lambda t: saved.append(t.numel() if t.shape[-1:] == (padded,) else 0) or t, lambda t: t):
                loss = model(ids, positions, labels=labels)
            (loss * weights).sum().backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}, max(saved)))
    (loss, grads, biggest), (loss_c, grads_c, biggest_c) = results
    assert loss.dtype == torch.float64 and rel_err(loss_c, loss) <= 1e-12
    assert grads.keys() == grads_c.keys()
    for name in grads:
        assert rel_err(grads_c[name], grads[name]) <= 1e-12, name
    assert biggest >= 2 * SEQ * padded  # the whole sequence's logits, kept for the backward
    assert biggest_c == 0  # only inside the pieces, recomputed there


def test_one_row_of_positions_serves_the_whole_batch_and_a_wrong_shape_is_named():
    """transformers takes ``position_ids`` of [s] or [1, s] for a [b, s] batch; so does ours, with the
    logits of the same positions given per row. Any other shape is refused with both shapes named."""
    gen = torch.Generator().manual_seed(5)
    with float64():
        hf = causal_lm(text_config(), seed=1)
        ours = megatron_twin(hf)
        ids = torch.randint(0, hf.config.vocab_size, (3, SEQ), generator=gen)
        row = torch.cat([torch.arange(40), torch.arange(SEQ - 40)])  # two documents
        with torch.no_grad():
            per_row = ours(ids, row.expand(3, SEQ))
            assert rel_err(per_row[:, :40], ours(ids[:, :40])) <= 1e-12  # the second document is not seen
            for one_row in (row, row[None]):
                assert torch.equal(ours(ids, one_row), per_row)
            for wrong in (row.expand(2, SEQ), row[:-1]):
                message = f"position_ids of shape {list(wrong.shape)} do not fit input_ids of shape [3, {SEQ}]"
                with pytest.raises(ValueError, match=re.escape(message)):
                    ours(ids, wrong)
