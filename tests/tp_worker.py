"""Body of one gloo rank for the tensor-parallel test (spawned by tests/test_tensor_parallel.py)."""

from __future__ import annotations

import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def spawn(fn, *args, world: int = 2) -> None:
    """Run ``fn(rank, world, store, *args)`` on ``world`` gloo ranks. They meet through a file store: no TCP
    port to pick (one picked beforehand can be taken by another process before rank 0 binds it)."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(fn, args=(world, f"file://{tmp}/store", *args), nprocs=world, start_method="spawn", join=True)


def _join(rank: int, world: int, store: str) -> None:
    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=world)


def run(rank: int, world: int, store: str, ckpt: str, inputs: str, out_dir: str) -> None:
    _join(rank, world, store)
    from conftest import float64

    from megatron_ext import parallel
    from megatron_ext.checkpoint import load_model
    from megatron_ext.layers import allreduce_gdn_out_norm_grads

    parallel.initialize(tensor_parallel=world)
    batch = torch.load(inputs)
    with float64():
        model = load_model(ckpt, tensor_parallel=world)
        logits = model(batch["ids"], batch["positions"])
        (logits * batch["weights"]).sum().backward()
    allreduce_gdn_out_norm_grads(model)  # what the trainer's finalize_grads adds to megatron's
    torch.save(
        {
            "logits": logits.detach(),
            "embedding_grad": model.embedding.word_embeddings.weight.grad,
            "final_norm_grad": model.decoder.final_layernorm.weight.grad,
            # every weight each rank holds whole (the norms), but the q/k norms, which megatron's finalize_model_grads sums
            "replicated_grads": {n: p.grad for n, p in model.named_parameters() if not getattr(p, "tensor_model_parallel", False)
                                 and not n.endswith(("q_layernorm.weight", "k_layernorm.weight"))},
        },
        os.path.join(out_dir, f"rank{rank}.pt"),
    )
    parallel.destroy()


def resave(rank: int, world: int, store: str, ckpt: str, out: str) -> None:
    """Load a checkpoint with TP=world and save it again from that layout (as the trainer would)."""
    _join(rank, world, store)
    from megatron_ext import parallel
    from megatron_ext.checkpoint import hf_source_files, load_model, save_model

    parallel.initialize(tensor_parallel=world)
    model = load_model(ckpt, tensor_parallel=world)
    save_model(model, out, hf_files=hf_source_files(ckpt))
    parallel.destroy()
