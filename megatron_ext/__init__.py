"""Qwen3.5 hybrid (Gated DeltaNet + gated attention) language model on megatron-core.

Importing the package is cheap where CUDA is present: megatron-core, fla and the model load on first use of
``Qwen35Config``, ``Qwen35GPTModel`` or ``build_model`` (a GPU check's parent process, which only reads
versions, spent about 20 s importing them on an H100). megatron's no-Apex patch is applied with the process
group (:func:`megatron_ext.parallel.initialize`), before any optimizer exists.
"""

import importlib

from megatron_ext import cpu_patches, fla_configs, gpu_stack
from preprocessing import logs

gpu_stack.keep_autotuning()  # before anything imports fla
fla_configs.prefer_shipped()  # likewise

logs.hide_harmless_warnings()  # before megatron's modules warn that TE/Apex are absent (logs.setup says it once)
cpu_patches.apply()  # no-op when CUDA is present

_LAZY = {"Qwen35Config": "megatron_ext.config", "Qwen35GPTModel": "megatron_ext.model", "build_model": "megatron_ext.model"}
__all__ = list(_LAZY)


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'megatron_ext' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)
