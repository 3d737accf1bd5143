"""What the evaluation tools share: loading a HF model directory and ``name=path`` arguments."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def load_hf_model(model_dir: str | Path, device: str, dtype: torch.dtype = torch.float32):
    """transformers model and tokenizer of a HF directory (the multimodal class for a multimodal one)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3_5ForConditionalGeneration

    config = json.loads((Path(model_dir) / "config.json").read_text())
    cls = Qwen3_5ForConditionalGeneration if "text_config" in config else AutoModelForCausalLM
    model = cls.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


def named_paths(items: list[str], what: str) -> dict[str, str]:
    """``name=path`` command-line items as an ordered dict, with a clear error for a malformed one."""
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--{what} {item!r}: expected name=path")
        out[name] = value
    return out
