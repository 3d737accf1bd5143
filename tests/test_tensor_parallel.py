"""Two gloo ranks with TP=2 compute what one rank computes: logits and gradients; also load_model.
Both sides run in float64 (``conftest.float64``), so the split reductions agree to 1e-10."""

from __future__ import annotations

import torch
import tp_worker
from conftest import float64, megatron_twin

from tools.tiny_qwen35 import causal_lm, text_config

from megatron_ext.checkpoint import load_model, save_model

L, F = "linear_attention", "full_attention"


def test_tp2_equals_tp1(tmp_path):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 96, (2, 45), generator=gen)
    positions = torch.cat([torch.arange(20), torch.arange(25)]).expand(2, 45).contiguous()  # 2 docs a row
    weights = torch.randn(2, 45, 96, generator=gen, dtype=torch.float64)
    torch.save({"ids": ids, "positions": positions, "weights": weights}, tmp_path / "inputs.pt")
    with float64():
        hf = causal_lm(text_config(layer_types=[L, F, L], num_attention_heads=4, num_key_value_heads=2), seed=4)
        model = megatron_twin(hf)
        save_model(model, tmp_path / "ckpt")
        logits = model(ids, positions)
        (logits * weights).sum().backward()
        # the single-process checkpoint, loaded as-is, gives the same model back
        reloaded = load_model(tmp_path / "ckpt")
        torch.testing.assert_close(reloaded(ids, positions), logits.detach(), atol=0, rtol=0)
    assert logits.dtype == torch.float64

    tp_worker.spawn(tp_worker.run, str(tmp_path / "ckpt"), str(tmp_path / "inputs.pt"), str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for r in ranks:
        torch.testing.assert_close(r["logits"], logits.detach(), atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(r["final_norm_grad"], model.decoder.final_layernorm.weight.grad, atol=1e-10, rtol=1e-10)
        # every norm each rank holds whole, the GDN output norm among them: shared by all value heads while each rank
        # sees only its own, so allreduce_gdn_out_norm_grads must sum it (the trainer's tp2 layout test, comparing
        # losses and gradient norms over 4 steps, passes with only each rank's part)
        grads = dict(model.named_parameters())
        assert sum(n.endswith("out_norm.weight") for n in r["replicated_grads"]) == 2
        for name, grad in r["replicated_grads"].items():
            torch.testing.assert_close(grad, grads[name].grad, atol=1e-10, rtol=1e-10, msg=name)
    # the vocab-parallel embedding: each rank holds half of the rows
    torch.testing.assert_close(
        torch.cat([r["embedding_grad"] for r in ranks]), model.embedding.word_embeddings.weight.grad, atol=1e-10, rtol=1e-10
    )
