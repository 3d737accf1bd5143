"""Body of one gloo rank for the tensor-parallel test (spawned by tests/test_tensor_parallel.py)."""

from __future__ import annotations

import os

import torch


def run(rank: int, world: int, port: int, ckpt: str, inputs: str, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from conftest import float64

    from megatron_ext import parallel
    from megatron_ext.checkpoint import load_model

    parallel.initialize(tensor_parallel=world)
    batch = torch.load(inputs)
    with float64():
        model = load_model(ckpt, tensor_parallel=world)
        logits = model(batch["ids"], batch["positions"])
        (logits * batch["weights"]).sum().backward()
    torch.save(
        {
            "logits": logits.detach(),
            "embedding_grad": model.embedding.word_embeddings.weight.grad,
            "final_norm_grad": model.decoder.final_layernorm.weight.grad,
        },
        os.path.join(out_dir, f"rank{rank}.pt"),
    )
    parallel.destroy()


def resave(rank: int, world: int, port: int, ckpt: str, out: str) -> None:
    """Load a checkpoint with TP=world and save it again from that layout (as the trainer would)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from megatron_ext import parallel
    from megatron_ext.checkpoint import hf_source_files, load_model, save_model

    parallel.initialize(tensor_parallel=world)
    model = load_model(ckpt, tensor_parallel=world)
    save_model(model, out, hf_files=hf_source_files(ckpt))
    parallel.destroy()
