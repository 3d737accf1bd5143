"""Shared fixtures: one single-process megatron world per test session and tiny random Qwen3.5 models."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import megatron_ext
from megatron_ext import hf_mapping, parallel


@pytest.fixture(scope="session", autouse=True)
def megatron_world():
    parallel.initialize(tensor_parallel=1, pipeline_parallel=1, seed=1234)
    yield


def megatron_twin(hf_model, **build_kwargs):
    """The megatron model with the HF model's weights, copied through the converters' mapping."""
    config = megatron_ext.Qwen35Config.from_hf(hf_model.config.to_dict())
    model = megatron_ext.build_model(config, backend="local", device="cpu", **build_kwargs)
    state = hf_model.state_dict()
    hf_mapping.copy_hf_into(model, config, state.__getitem__, hf_mapping.lm_prefix(state))
    return model



DEMO = Path(__file__).resolve().parents[1] / "data" / "demo"


def tiny_hf_dir(path: Path, seed: int, chat_template: str | None = None) -> Path:
    """A tiny random Qwen3_5ForCausalLM directory with the demo tokenizer (vocabulary padded to 2048)."""
    from tools.tiny_qwen35 import causal_lm, text_config

    causal_lm(text_config(vocab_size=2048), seed=seed).save_pretrained(path)
    for f in (DEMO / "tokenizer").iterdir():
        shutil.copy2(f, path / f.name)
    if chat_template:
        cfg = json.loads((path / "tokenizer_config.json").read_text())
        cfg["chat_template"] = chat_template
        (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    return path
