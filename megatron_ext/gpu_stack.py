"""The GPU software stack the trainer needs, checked at start-up before any data or weights are loaded.

A wrong stack otherwise fails late and far from its cause: fla's GDN backward raises after minutes of
kernel compilation when Triton is between 3.4.0 and 3.7.1 on Hopper (wrong gradients there, fla #640),
and a missing fla only shows when the first layer runs. One line says what to install instead.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from importlib import metadata

from packaging.version import Version

FLA = "0.6.0"  # flash-linear-attention / fla-core, as pinned in pyproject.toml
TRITON_MIN = Version("3.3")  # fla-core 0.6.0's own floor
HOPPER_BAD_TRITON = (Version("3.4.0"), Version("3.7.1"))  # [from, to): fla refuses gated GDN backward on sm_90
PACKAGES = ("torch", "triton", "fla-core", "flash-linear-attention", "tilelang", "transformer-engine")


@dataclass
class Stack:
    """What a node has: the CUDA device's compute capability (None without CUDA) and package versions."""

    capability: tuple[int, int] | None
    device: str = ""
    versions: dict[str, str | None] = field(default_factory=dict)


@functools.cache
def transformer_engine_error() -> str | None:
    """Why Transformer Engine's PyTorch modules do not import here, or None when they do."""
    try:
        import transformer_engine.pytorch  # noqa: F401  (availability probe)
    except Exception as e:  # not installed (ImportError), or a binding built for another torch/CUDA (OSError, ...)
        return f"{type(e).__name__}: {e}"
    return None


def installed() -> Stack:
    import torch

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    if not torch.cuda.is_available():
        return Stack(None, "cpu", versions)
    return Stack(torch.cuda.get_device_capability(), torch.cuda.get_device_name(), versions)


def problems(stack: Stack, gdn_kernel: str = "auto") -> list[str]:
    """What stops this stack from training; empty when it can. Only the CUDA + fla path has needs: on CPU,
    or with ``gdn_kernel: torch``, the pure-torch kernels run anywhere."""
    if stack.capability is None or gdn_kernel == "torch":
        return []
    v = stack.versions
    fla = v.get("fla-core") or v.get("flash-linear-attention")
    if fla is None:
        return [f"flash-linear-attention is not installed: pip install 'flash-linear-attention=={FLA}' "
                f"'fla-core[cuda]=={FLA}' (or gdn_kernel=torch, much slower)"]
    out = []
    if Version(fla) != Version(FLA):
        out.append(f"flash-linear-attention {fla} is not the checked {FLA}: pip install 'fla-core[cuda]=={FLA}'")
    triton = v.get("triton")
    if triton is None:
        return out + [f"triton is not installed (fla's kernels are Triton kernels): pip install 'triton>={HOPPER_BAD_TRITON[1]}'"]
    t = Version(triton)
    if t < TRITON_MIN:
        out.append(f"triton {triton} is older than fla {FLA} supports (>= {TRITON_MIN}): pip install 'triton>={HOPPER_BAD_TRITON[1]}'")
    elif stack.capability[0] == 9 and HOPPER_BAD_TRITON[0] <= t < HOPPER_BAD_TRITON[1] and v.get("tilelang") is None:
        out.append(f"triton {triton} computes wrong GDN gradients on Hopper ({stack.device}; fla #640): "
                   f"pip install 'triton>={HOPPER_BAD_TRITON[1]}' (or tilelang)")
    return out


def check(gdn_kernel: str = "auto", stack: Stack | None = None) -> None:
    """Stop with one line naming what to install, or return quietly."""
    found = problems(stack or installed(), gdn_kernel)
    if found:
        raise SystemExit("GPU stack: " + "; ".join(found))


def keep_autotuning() -> None:
    """Keep Triton's autotuning choices on disk beside its compiled kernels, unless the user set
    ``TRITON_CACHE_AUTOTUNING`` already. Without it each new process times every candidate configuration
    of fla's kernels again: a restarted or resumed job, each part of ``tools.gpu_check`` (on a fresh H200
    the first step of each took minutes). Triton reads the setting when fla's kernels are defined, at
    fla's import: this runs first, from ``megatron_ext``'s ``__init__``."""
    os.environ.setdefault("TRITON_CACHE_AUTOTUNING", "1")
