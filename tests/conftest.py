"""Shared fixtures: one single-process megatron world per test session and tiny random Qwen3.5 models."""

from __future__ import annotations

import pytest
import torch

import megatron_ext
from megatron_ext import hf_mapping, parallel


@pytest.fixture(scope="session", autouse=True)
def megatron_world():
    parallel.initialize(tensor_parallel=1, pipeline_parallel=1, seed=1234)
    yield


def tiny_hf_config(**overrides):
    """A random-sized Qwen3.5 text config small enough for CPU tests."""
    from transformers import Qwen3_5TextConfig

    kw = dict(
        vocab_size=96, hidden_size=64, intermediate_size=80, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        linear_conv_kernel_dim=4, linear_key_head_dim=8, linear_value_head_dim=12,
        linear_num_key_heads=2, linear_num_value_heads=4, tie_word_embeddings=False,
        layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25,
                         "mrope_section": [1, 1, 0], "mrope_interleaved": True},
    )
    kw.update(overrides)
    kw["num_hidden_layers"] = len(kw["layer_types"])
    return Qwen3_5TextConfig(**kw)


def random_hf_model(hf_config, seed: int = 0):
    """Qwen3_5ForCausalLM in fp32 with every norm weight perturbed, so a wrong norm convention shows."""
    from transformers import Qwen3_5ForCausalLM

    torch.manual_seed(seed)
    model = Qwen3_5ForCausalLM(hf_config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("linear_attn.norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif "norm" in name:
                p.copy_(0.2 * torch.randn_like(p))
    return model


def megatron_twin(hf_model, **build_kwargs):
    """The megatron model with the HF model's weights, copied through the converters' mapping."""
    config = megatron_ext.Qwen35Config.from_hf(hf_model.config.to_dict())
    model = megatron_ext.build_model(config, backend="local", device="cpu", **build_kwargs)
    state = hf_model.state_dict()
    hf_mapping.copy_hf_into(model, config, state.__getitem__, hf_mapping.lm_prefix(state))
    return model


def write_tiny_tokenizer(directory, vocab_size: int = 96) -> None:
    """A real (BPE, fast) tokenizer trained locally on a few sentences, saved the HF way."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    text = ["The patient presented with acute ischemic stroke and left hemiparesis.",
            "MRI showed a lesion in the right middle cerebral artery territory.",
            "Neurons in the hippocampus encode place and time."] * 20
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<|endoftext|>"]))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", unk_token="<unk>",
                            pad_token="<|endoftext|>").save_pretrained(directory)


def tiny_multimodal_model(seed: int = 0, **text_overrides):
    """Qwen3_5ForConditionalGeneration with a one-block vision tower around the tiny text model."""
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    torch.manual_seed(seed)
    config = Qwen3_5Config(
        text_config=tiny_hf_config(**text_overrides).to_dict(),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           patch_size=4, num_position_embeddings=16),
    )
    model = Qwen3_5ForConditionalGeneration(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and "language_model" in name:
                p.copy_((1 if name.endswith("linear_attn.norm.weight") else 0) + 0.2 * torch.randn_like(p))
    return model
