"""Qwen3.5 hybrid (Gated DeltaNet + gated attention) language model on megatron-core."""

from megatron_ext import cpu_patches, fla_configs, gpu_stack, logs, no_apex

gpu_stack.keep_autotuning()  # before anything imports fla
fla_configs.prefer_shipped()  # likewise

logs.hide_harmless_warnings()  # before megatron's modules warn that TE/Apex are absent (logs.setup says it once)
cpu_patches.apply()  # no-op when CUDA is present
no_apex.apply()  # no-op where TE or Apex is installed

from megatron_ext.config import Qwen35Config  # noqa: E402
from megatron_ext.model import Qwen35GPTModel, build_model  # noqa: E402

__all__ = ["Qwen35Config", "Qwen35GPTModel", "build_model"]
