"""torch.distributed + megatron parallel_state set-up: NCCL on GPUs, gloo on CPU, a 1-process world
when the script was not started by torchrun."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from megatron_ext import cpu_patches, no_apex


def initialize(tensor_parallel: int = 1, pipeline_parallel: int = 1, seed: int = 1234) -> None:
    """Initialise the process group and megatron's model-parallel groups (idempotent).

    Reads torchrun's RANK/WORLD_SIZE/LOCAL_RANK; without them it starts a single-process world.
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    cpu_patches.apply()
    no_apex.apply()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        if "RANK" in os.environ:  # torchrun (or a test harness) set up the rendezvous
            dist.init_process_group(backend)
        else:  # a plain script: a private 1-process world, its store in memory (no port to pick or lose)
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    if parallel_state.model_parallel_is_initialized():
        have = (
            parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_pipeline_model_parallel_world_size(),
        )
        if have != (tensor_parallel, pipeline_parallel):
            raise RuntimeError(f"model parallelism already initialised as TP,PP={have}, asked {tensor_parallel, pipeline_parallel}")
        return
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_parallel, pipeline_model_parallel_size=pipeline_parallel
    )
    model_parallel_cuda_manual_seed(seed)


def is_rank0() -> bool:
    """Rank 0 of the world (or no world at all): the one that writes shared files and logs."""
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def destroy() -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
