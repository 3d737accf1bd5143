"""The tokenizer as the data pipeline and the trainer both see it, without datatrove (a training node may
have only the training stack): loading, EOS id, and the token dtype of the indexed datasets."""

from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path

import numpy as np


@functools.cache
def hf_tokenizer(tokenizer_dir: str):
    """The user's tokenizer exactly as transformers loads it (so training, evaluation and serving agree)."""
    from transformers import AutoTokenizer

    if not (Path(tokenizer_dir) / "tokenizer_config.json").is_file() and not (Path(tokenizer_dir) / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{tokenizer_dir}: no HF tokenizer files; point 'tokenizer' at a local tokenizer directory")
    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


def load_tokenizer(tokenizer_dir: str):
    """The Rust tokenizer behind the HF one: batched, GIL-free, picklable to workers."""
    return hf_tokenizer(str(tokenizer_dir)).backend_tokenizer


def text_tokenizer(tokenizer_dir: str):
    """A copy of :func:`load_tokenizer`'s that encodes document text as text: a special token's string in it (a
    literal ``<|endoftext|>`` or ``<|im_start|>`` in a scraped page or a paper about LLMs) becomes the characters it
    is, not the control token, which would end the document mid-text or teach chat markup out of place. A copy:
    chat rendering (SFT) must still read those strings as the tokens. Pickling drops the setting: a worker that
    receives the tokenizer sets ``encode_special_tokens`` again (:func:`as_text`)."""
    from tokenizers import Tokenizer

    return as_text(Tokenizer.from_str(load_tokenizer(tokenizer_dir).to_str()))


def as_text(tokenizer):
    """``tokenizer`` (a :func:`text_tokenizer`) set to encode special tokens' strings as text; returned."""
    tokenizer.encode_special_tokens = True
    return tokenizer


def eos_id(tokenizer_dir: str) -> int:
    eos = hf_tokenizer(str(tokenizer_dir)).eos_token_id
    if eos is None:
        raise ValueError(f"the tokenizer in {tokenizer_dir} defines no eos_token")
    return eos


def token_dtype(vocab_size: int):
    return np.int32 if vocab_size > 65535 else np.uint16


def bundle_tokenizer(tokenizer_dir: str | Path, out_dir: str | Path) -> str:
    """Save the tokenizer into a data build's output directory and return its path relative to it, so
    mix.json / sft.json name a tokenizer that moves with them (to another machine, another path)."""
    out = Path(out_dir)
    tmp, final = out / "tokenizer.tmp", out / "tokenizer"
    shutil.rmtree(tmp, ignore_errors=True)
    hf_tokenizer(str(tokenizer_dir)).save_pretrained(str(tmp))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final.name
