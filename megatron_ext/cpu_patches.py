"""Everything megatron-core needs to run without CUDA, in one place, applied only when CUDA is absent.

megatron-core assumes a GPU in a handful of spots (device placement, the RNG tracker, torch.compile'd
fusions, the GDN import guard). Each patch below says which spot and why; none changes the maths.
On a machine with CUDA, :func:`apply` does nothing.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sys

import torch

log = logging.getLogger(__name__)
_applied = False


class CpuRNGStatesTracker:
    """Stand-in for megatron's ``CudaRNGStatesTracker`` that keeps named *CPU* generator states.

    Same interface (add/fork/get_states/set_states/reset); fork swaps the CPU default generator state,
    which is the generator CPU dropout and init actually draw from.
    """

    def __init__(self, *args, **kwargs):
        self.reset()

    def is_initialized(self) -> bool:
        return self._is_initialized

    def reset(self) -> None:
        self._is_initialized = False
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()

    def get_states(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.states_.items()}

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._is_initialized = True
        self.states_ = {k: v.clone() for k, v in states.items()}

    def add(self, name: str, seed: int) -> None:
        self._is_initialized = True
        if seed in self.seeds_:
            raise ValueError(f"seed {seed} already exists")
        if name in self.states_:
            raise ValueError(f"rng state {name} already exists")
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        if name not in self.states_:
            raise KeyError(f"rng state {name} is not added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


class _CpuDeviceTorch:
    """The ``torch`` module as seen by megatron modules that hard-code ``device='cuda'`` in tensor
    factories: the same module, with those factories allocating on the CPU instead."""

    _FACTORIES = ("tensor", "zeros", "ones", "empty", "full", "arange")

    def __getattr__(self, name):
        attr = getattr(torch, name)
        if name not in self._FACTORIES:
            return attr

        def factory(*args, **kwargs):
            if str(kwargs.get("device", "")).startswith("cuda"):
                kwargs["device"] = "cpu"
            return attr(*args, **kwargs)

        return factory


def _clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """megatron's clip_grad_by_total_norm_fp32 without its assertion that grads are torch.cuda tensors."""
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr) for p in parameters if getattr(p, attr, None) is not None]
    assert all(g.dtype == torch.float32 or use_decoupled_grad for g in grads)
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0:
        for g in grads:
            g.detach().mul_(clip_coeff)


def _reporting_cuda_type_names(init):
    """Wrap an optimizer ``__init__`` that sorts parameters by ``param.type()`` against CUDA type names
    ('torch.cuda.FloatTensor', ...): while it runs, a CPU tensor's argument-less ``type()`` answers with
    the CUDA name of its dtype, so CPU parameters sort into the same fp32/fp16/bf16 groups."""
    plain_type = torch.Tensor.type

    def cuda_type(self, dtype=None, non_blocking=False, **kwargs):
        name = plain_type(self, dtype, non_blocking, **kwargs)
        if dtype is None and not kwargs and isinstance(name, str) and name.startswith("torch.") and self.device.type == "cpu":
            return name.replace("torch.", "torch.cuda.", 1)
        return name

    @functools.wraps(init)
    def wrapped(*args, **kwargs):
        torch.Tensor.type = cuda_type
        try:
            return init(*args, **kwargs)
        finally:
            torch.Tensor.type = plain_type

    return wrapped


@contextlib.contextmanager
def _not_importable(package: str):
    """Inside the block, ``import package`` raises ImportError at once, as for a package not installed (unless it
    is imported already)."""
    if package in sys.modules:
        yield
        return
    sys.modules[package] = None  # the import system's own "not importable" mark
    try:
        yield
    finally:
        if sys.modules.get(package, False) is None:
            del sys.modules[package]


def apply() -> None:
    """Apply the CPU patches once, if and only if CUDA is unavailable."""
    global _applied
    if _applied or torch.cuda.is_available():
        return
    _applied = True

    # 0. megatron's GDN module imports fla at its own import, in an ImportError guard. Without CUDA fla's kernels never
    #    run (kernels.resolve_kernel refuses them; without the gpu extra, Triton, which they are written in, is not
    #    even installed), but fla's package import loads its model zoo first (transformers' modeling code: about 3 s
    #    of every process's start). The guard meets fla as not installed; fla stays importable afterwards.
    with _not_importable("fla"):
        import megatron.core.ssm.gated_delta_net as gdn
    import megatron.core.tensor_parallel.random as mrandom

    # 1. megatron allocates parameters and buffers with device=torch.cuda.current_device()
    #    (GatedDeltaNet's conv1d/A_log/dt_bias, the global memory buffer of local attention).
    torch.cuda.current_device = lambda: torch.device("cpu")

    #    dist_checkpointing's writer synchronises the (absent) CUDA stream before copying tensors out.
    torch.cuda.synchronize = lambda *a, **k: None

    # 2. The RNG tracker stores CUDA generator states; keep CPU generator states instead.
    mrandom.CudaRNGStatesTracker = CpuRNGStatesTracker
    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    #    model_parallel_cuda_manual_seed also seeds the CUDA generator directly.
    torch.cuda.manual_seed = lambda seed: None

    # 3. megatron wraps small fusions (e.g. the attention output gate) in torch.compile; on CPU that is
    #    a long inductor C++ build per shape for no speed-up, so run them eagerly.
    torch._dynamo.config.disable = True

    # 4. GatedDeltaNet refuses to build when fla's Triton kernels fail to import (no Triton on CPU).
    #    Our subclass picks kernels by device and uses the pure-torch ones here.
    gdn.HAVE_FLA = True

    # 5. The optimizer wrappers, gradient clipping and the forward/backward schedules allocate small
    #    tensors with device='cuda' (loss scale, norms and their local multi-tensor fallback in utils,
    #    overflow flags, token counts); give those modules a torch whose factories use the CPU.
    import megatron.core.optimizer.clip_grads as clip_grads
    import megatron.core.optimizer.optimizer as optimizer
    import megatron.core.pipeline_parallel.schedules as schedules
    import megatron.core.utils as utils

    for module in (optimizer, clip_grads, schedules, utils):
        module.torch = _CpuDeviceTorch()

    # 6. Gradient clipping asserts that grads are torch.cuda.FloatTensor; same clipping, CPU tensors.
    clip_grads.clip_grad_by_total_norm_fp32 = optimizer.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_fp32

    # 7. Both mixed-precision optimizers (distributed and plain) sort parameters into fp32/fp16/bf16 groups by
    #    comparing param.type() with CUDA type names and refuse anything else; same grouping for CPU parameters.
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for mixed in (DistributedOptimizer, optimizer.Float16OptimizerWithFloat16Params):
        mixed.__init__ = _reporting_cuda_type_names(mixed.__init__)

    log.info("CUDA not available: applied megatron-core CPU patches")
