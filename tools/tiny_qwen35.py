"""Tiny random Qwen3.5 checkpoints and a locally trained tokenizer, for the demo, tests and benchmarks
(nothing is downloaded)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

L, F = "linear_attention", "full_attention"

DEMO_TEXT = [
    "The patient presented with acute ischemic stroke and left hemiparesis.",
    "MRI showed a lesion in the right middle cerebral artery territory.",
    "Neurons in the hippocampus encode place and time.",
]


# A ChatML template with Qwen3.5's reasoning convention, written for the tests and the demo: an assistant
# turn's ``<think>`` block is shown only for turns after the last user message; earlier turns keep just
# their answer. That makes it not prefix-stable (turn k renders differently once a later user turn
# follows), which the SFT preprocessing must handle, as it must for the released Qwen3.5 template.
CHAT_TEMPLATE = """{%- set ns = namespace(last_user=-1) -%}
{%- for m in messages -%}{%- if m.role == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}{%- endfor -%}
{%- for m in messages -%}
{%- if m.role == 'assistant' -%}
{%- set answer = m.content.split('</think>')[-1].lstrip('\\n') -%}
{%- set reasoning = m.content.split('</think>')[0].split('<think>')[-1].strip('\\n') if '</think>' in m.content else '' -%}
{%- if loop.index0 > ns.last_user -%}
{{- '<|im_start|>assistant\\n<think>\\n' + reasoning + '\\n</think>\\n\\n' + answer + '<|im_end|>\\n' -}}
{%- else -%}
{{- '<|im_start|>assistant\\n' + answer + '<|im_end|>\\n' -}}
{%- endif -%}
{%- else -%}
{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n<think>\\n' -}}{%- endif -%}"""


def text_config(**overrides):
    """A Qwen3.5 text config small enough for CPU: GVA in the GDN layers, GQA, untied, partial mRoPE."""
    from transformers import Qwen3_5TextConfig

    kw = dict(
        vocab_size=96, hidden_size=64, intermediate_size=80,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        linear_conv_kernel_dim=4, linear_key_head_dim=8, linear_value_head_dim=12,
        linear_num_key_heads=2, linear_num_value_heads=4, tie_word_embeddings=False,
        layer_types=[L, F, L, F],
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25,
                         "mrope_section": [1, 1, 0], "mrope_interleaved": True},
    )
    kw.update(overrides)
    kw["num_hidden_layers"] = len(kw["layer_types"])
    return Qwen3_5TextConfig(**kw)


def _perturb_norms(model: torch.nn.Module) -> None:
    """Random norm weights, so that a wrong norm convention cannot hide behind all-zero/all-one gammas."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "visual" in name:
                continue
            if name.endswith("linear_attn.norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif "norm" in name:
                p.copy_(0.2 * torch.randn_like(p))


def causal_lm(config=None, seed: int = 0):
    """Qwen3_5ForCausalLM in fp32 with random weights."""
    from transformers import Qwen3_5ForCausalLM

    torch.manual_seed(seed)
    model = Qwen3_5ForCausalLM(config or text_config()).float().eval()
    _perturb_norms(model)
    return model


def multimodal(seed: int = 0, tie_word_embeddings: bool = False, both_flags: bool = False, **text_overrides):
    """Qwen3_5ForConditionalGeneration: a one-block vision tower around the tiny text model. Ties (or not)
    by the top-level flag, the one transformers' multimodal class obeys; ``text_config`` keeps its own
    (untied) default, so a converter reading the wrong flag fails, unless ``both_flags``: then it says the
    same, as the releases' configs do (tests/qwen35_0.8b_release_config.json)."""
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    torch.manual_seed(seed)
    config = Qwen3_5Config(
        tie_word_embeddings=tie_word_embeddings,
        text_config=text_config(**text_overrides, **(dict(tie_word_embeddings=tie_word_embeddings)
                                                     if both_flags else {})).to_dict(),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           patch_size=4, num_position_embeddings=16),
    )
    model = Qwen3_5ForConditionalGeneration(config).float().eval()
    _perturb_norms(model)
    return model


def add_mtp(directory: str | Path, seed: int = 0) -> None:
    """Add a random MTP head in the release layout (``mtp.*`` tensors in their own shard, listed in the
    index) to a saved checkpoint, as Qwen3.5 releases carry one for speculative decoding."""
    from safetensors.torch import save_file
    from transformers import AutoConfig

    from evaluation.mtp import PREFIX, MTPHead
    from tools.hf_checkpoint import INDEX, SINGLE

    directory = Path(directory)
    torch.manual_seed(seed)
    head = MTPHead(AutoConfig.from_pretrained(directory).get_text_config())
    _perturb_norms(head)
    save_file({PREFIX + k: v.contiguous() for k, v in head.state_dict().items()}, str(directory / "model-mtp.safetensors"),
              metadata={"format": "pt"})
    if (directory / INDEX).is_file():
        index = json.loads((directory / INDEX).read_text())
    else:  # a single-file checkpoint becomes an indexed one
        from safetensors import safe_open

        with safe_open(str(directory / SINGLE), framework="pt") as f:
            index = {"metadata": {}, "weight_map": {k: SINGLE for k in f.keys()}}
    index["weight_map"].update({PREFIX + k: "model-mtp.safetensors" for k in head.state_dict()})
    (directory / INDEX).write_text(json.dumps(index, indent=2))


# Qwen3.5 releases are bf16 but store the GDN decay and output norm in fp32 (transformers' Qwen3.5 has no
# _keep_in_fp32_modules, so from_pretrained in bf16 rounds them; the 0.8B release: 36 fp32 tensors, these
# two per GDN layer)
RELEASE_FP32 = ("linear_attn.A_log", "linear_attn.norm.weight")


def release_dtypes(directory: str | Path) -> Path:
    """Store a saved checkpoint's tensors in bf16 except :data:`RELEASE_FP32`, as the Qwen3.5 releases do."""
    from safetensors.torch import load_file, save_file

    d = Path(directory)
    for f in [*d.glob("model-*.safetensors"), *d.glob("model.safetensors")]:
        tensors = {k: v.float() if k.endswith(RELEASE_FP32) else v.to(torch.bfloat16) for k, v in load_file(str(f)).items()}
        save_file(tensors, str(f), metadata={"format": "pt"})
    config = json.loads((d / "config.json").read_text())
    for part in (config, config.get("text_config", {})):
        part["dtype"] = "bfloat16"
    (d / "config.json").write_text(json.dumps(config, indent=2))
    return d


def write_tokenizer(directory: str | Path, vocab_size: int = 512, texts: list[str] | None = None) -> None:
    """A real Qwen3.5 tokenizer (``Qwen3_5Tokenizer``: Qwen's split regex, NFC, byte-level BPE, no unknown
    tokens) whose merges are trained locally on ``texts``, saved the HF way. Byte-level BPE starts from 256
    byte tokens, so ``vocab_size`` counts those."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen3_5Tokenizer
    from transformers.models.qwen3_5.tokenization_qwen3_5 import PRETOKENIZE_REGEX

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts or DEMO_TEXT * 20, trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    hf = Qwen3_5Tokenizer(vocab=model["vocab"], merges=merges)
    hf.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})  # appended: BPE ids unchanged
    hf.add_tokens(["<think>", "</think>"])
    hf.chat_template = CHAT_TEMPLATE
    hf.save_pretrained(directory)
