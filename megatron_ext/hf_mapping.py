"""The one HF <-> megatron name and layout table for the Qwen3.5 language model, used both ways.

Megatron names are those of a TP=1 :class:`~megatron_ext.model.Qwen35GPTModel` state dict (the same for the
local and TE specs). HF names are relative to the language-model prefix: ``model.language_model.`` in
``Qwen3_5ForConditionalGeneration`` checkpoints, ``model.`` in older text-only ones; ``lm_head.weight`` is
absolute. Fusions follow megatron's layouts:

* attention ``linear_qkv`` rows, per KV group: [q heads of the group | their output gates | k | v]
  (HF ``q_proj`` interleaves per head: [q_h | gate_h]);
* GDN ``in_proj`` rows: [in_proj_qkv (q | k | v) | in_proj_z | in_proj_b | in_proj_a];
* MLP ``linear_fc1`` rows: [gate_proj | up_proj].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
from torch import Tensor

from megatron_ext.config import LINEAR, Qwen35Config

LM_HEAD = "lm_head.weight"
LM_PREFIXES = ("model.language_model.", "model.")


@dataclass(frozen=True)
class Rule:
    """One megatron tensor and the HF tensors it is made of."""

    megatron: str
    hf: tuple[str, ...]
    merge: Callable[[list[Tensor]], Tensor]  # HF tensors -> megatron tensor
    split: Callable[[Tensor], list[Tensor]]  # megatron tensor -> HF tensors


def _same(ts: list[Tensor]) -> Tensor:
    return ts[0]


def _unsame(t: Tensor) -> list[Tensor]:
    return [t]


def _concat(ts: list[Tensor]) -> Tensor:
    return torch.cat(ts, dim=0)


def _splitter(sizes: list[int]) -> Callable[[Tensor], list[Tensor]]:
    return lambda t: list(torch.split(t, sizes, dim=0))


def _vocab_rule(megatron: str, hf: str, c: Qwen35Config) -> Rule:
    """Embedding or LM head: megatron holds ``padded_vocab_size`` rows, zeros past the HF vocabulary;
    export drops them, so the HF tensor comes back unchanged."""
    pad = c.padded_vocab_size - c.vocab_size
    return Rule(megatron, (hf,), lambda ts: torch.nn.functional.pad(ts[0], (0, 0, 0, pad)),
                lambda t: [t[: c.vocab_size]])


def _qkv_rules(c: Qwen35Config) -> tuple[Callable, Callable]:
    heads, groups, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    r = heads // groups

    def merge(ts: list[Tensor]) -> Tensor:
        q_proj, k_proj, v_proj = ts
        hidden = q_proj.shape[-1]
        qg = q_proj.reshape(groups, r, 2, hd, hidden)
        q, gate = qg[:, :, 0].reshape(groups, r * hd, hidden), qg[:, :, 1].reshape(groups, r * hd, hidden)
        k, v = k_proj.reshape(groups, hd, hidden), v_proj.reshape(groups, hd, hidden)
        return torch.cat([q, gate, k, v], dim=1).reshape(-1, hidden)

    def split(t: Tensor) -> list[Tensor]:
        hidden = t.shape[-1]
        t = t.reshape(groups, 2 * r + 2, hd, hidden)
        q, gate = t[:, :r].reshape(heads, hd, hidden), t[:, r : 2 * r].reshape(heads, hd, hidden)
        q_proj = torch.stack([q, gate], dim=1).reshape(heads * 2 * hd, hidden)
        return [q_proj, t[:, 2 * r].reshape(groups * hd, hidden), t[:, 2 * r + 1].reshape(groups * hd, hidden)]

    return merge, split


def rules(c: Qwen35Config, stored_head: bool = False) -> list[Rule]:
    """All rules for this config, layer by layer, in checkpoint order. ``stored_head``: the tied checkpoint
    stores ``lm_head.weight`` anyway (a copy of the embedding), so the export writes it too."""
    key_dim = c.linear_num_key_heads * c.linear_key_head_dim
    value_dim = c.linear_num_value_heads * c.linear_value_head_dim
    in_proj_sizes = [2 * key_dim + value_dim, value_dim, c.linear_num_value_heads, c.linear_num_value_heads]
    qkv_merge, qkv_split = _qkv_rules(c)
    out = [_vocab_rule("embedding.word_embeddings.weight", "embed_tokens.weight", c)]
    for i, kind in enumerate(c.layer_types):
        m, h = f"decoder.layers.{i}.", f"layers.{i}."
        one = lambda mk, hk: Rule(m + mk, (h + hk,), _same, _unsame)  # noqa: E731
        if kind == LINEAR:
            out += [
                one("self_attention.in_proj.layer_norm_weight", "input_layernorm.weight"),
                Rule(
                    m + "self_attention.in_proj.weight",
                    tuple(h + f"linear_attn.in_proj_{x}.weight" for x in ("qkv", "z", "b", "a")),
                    _concat,
                    _splitter(in_proj_sizes),
                ),
                one("self_attention.conv1d.weight", "linear_attn.conv1d.weight"),
                one("self_attention.dt_bias", "linear_attn.dt_bias"),
                one("self_attention.A_log", "linear_attn.A_log"),
                one("self_attention.out_norm.weight", "linear_attn.norm.weight"),
                one("self_attention.out_proj.weight", "linear_attn.out_proj.weight"),
            ]
        else:
            out += [
                one("self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight"),
                Rule(
                    m + "self_attention.linear_qkv.weight",
                    tuple(h + f"self_attn.{x}_proj.weight" for x in "qkv"),
                    qkv_merge,
                    qkv_split,
                ),
                one("self_attention.q_layernorm.weight", "self_attn.q_norm.weight"),
                one("self_attention.k_layernorm.weight", "self_attn.k_norm.weight"),
                one("self_attention.linear_proj.weight", "self_attn.o_proj.weight"),
            ]
        out += [
            one("mlp.linear_fc1.layer_norm_weight", "post_attention_layernorm.weight"),
            Rule(
                m + "mlp.linear_fc1.weight",
                (h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight"),
                _concat,
                _splitter([c.intermediate_size, c.intermediate_size]),
            ),
            one("mlp.linear_fc2.weight", "mlp.down_proj.weight"),
        ]
    out.append(Rule("decoder.final_layernorm.weight", ("norm.weight",), _same, _unsame))
    if not c.tie_word_embeddings:
        out.append(_vocab_rule("output_layer.weight", LM_HEAD, c))
    elif stored_head:
        out.append(_vocab_rule("embedding.word_embeddings.weight", LM_HEAD, c))
    return out


def lm_prefix(hf_keys: Iterable[str]) -> str:
    """The language-model prefix used by a HF checkpoint's tensor names."""
    keys = list(hf_keys)
    for prefix in LM_PREFIXES:
        if any(k.startswith(prefix + "embed_tokens.") for k in keys):
            return prefix
    raise KeyError("no language-model embedding (…embed_tokens.weight) among the HF tensors: not a Qwen3.5 checkpoint?")


def is_language_model(name: str, prefix: str) -> bool:
    """Whether an HF tensor belongs to the language model (vs. vision tower, MTP head, ...)."""
    if name == LM_HEAD:
        return True
    if prefix == "model.":  # text-only layout: other towers would sit beside it under model.
        return name.startswith(prefix) and not name.startswith(("model.visual.", "model.language_model."))
    return name.startswith(prefix)


def hf_name(rel: str, prefix: str) -> str:
    return rel if rel == LM_HEAD else prefix + rel


def relative_name(name: str, prefix: str) -> str:
    """The inverse of :func:`hf_name`: the same name in either layout (text-only or multimodal)."""
    return name if name == LM_HEAD else name.removeprefix(prefix)


def megatron_to_hf(c: Qwen35Config, get: Callable[[str], Tensor], prefix: str,
                   stored_head: bool = False) -> Iterator[tuple[str, Tensor]]:
    """Yield (absolute HF name, tensor), fetching megatron tensors by name through ``get``."""
    for rule in rules(c, stored_head):
        for k, t in zip(rule.hf, rule.split(get(rule.megatron)), strict=True):
            yield hf_name(k, prefix), t.contiguous()


def copy_hf_into(
    model: torch.nn.Module,
    c: Qwen35Config,
    get: Callable[[str], Tensor],
    prefix: str,
    describe: Callable[[str], str] = str,
    progress: bool = False,
) -> None:
    """Copy HF tensors into a TP=1, single-stage model in place, one rule at a time.

    ``describe`` turns an HF tensor name into the text errors use (e.g. with its file)."""
    from tqdm import tqdm

    params = model.state_dict(keep_vars=True)
    expected = {k for k in params if not k.endswith("_extra_state")}
    seen = set()
    with torch.no_grad():
        for rule in tqdm(rules(c), desc="HF -> megatron", unit="tensor", disable=not progress):
            names = [hf_name(k, prefix) for k in rule.hf]
            parts = [get(n) for n in names]
            source = ", ".join(f"{describe(n)} {tuple(t.shape)}" for n, t in zip(names, parts))
            if rule.megatron not in params:
                raise KeyError(f"the megatron model has no tensor {rule.megatron!r} (is it TP=1 and one pipeline stage?)")
            target = params[rule.megatron]
            try:
                tensor = rule.merge(parts)
            except RuntimeError as err:
                raise ValueError(f"shape mismatch: {source} cannot form {rule.megatron} {tuple(target.shape)}") from err
            if tensor.shape != target.shape:
                raise ValueError(f"shape mismatch: {source} gives {tuple(tensor.shape)} for {rule.megatron}, "
                                 f"the model expects {tuple(target.shape)}")
            target.copy_(tensor)
            seen.add(rule.megatron)
    if expected - seen:
        raise KeyError(f"model tensors not covered by the mapping: {sorted(expected - seen)}")
