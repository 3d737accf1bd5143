"""The flagship's layout through the whole chain: a tied checkpoint whose vocabulary TP=2 does not divide
trains with TP=2, never gives the padded ids probability or gradient, exports, and reloads in transformers
with the trained checkpoint's logits."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import torch
import yaml

from conftest import read_metrics, run_trainer

DEMO = Path(__file__).resolve().parents[1] / "data" / "demo"


def test_tied_odd_vocabulary_trains_under_tp2_exports_and_reloads(tmp_path):
    from megatron_ext.checkpoint import load_model
    from preprocessing.build_mix import build
    from preprocessing.recipe import MixRecipe
    from tools import convert_from_hf, convert_to_hf, tiny_qwen35
    from tools.verify_conversion import compare

    build(MixRecipe.load(DEMO / "recipe.yaml", output_dir=str(tmp_path / "mix")))
    vocab = 1973  # exactly the demo tokenizer's ids: odd, so TP=2 needs padding (to 2048, 128 x TP)
    config = tiny_qwen35.text_config(vocab_size=vocab, tie_word_embeddings=True,
                                     layer_types=["linear_attention", "full_attention"])
    tiny_qwen35.causal_lm(config, seed=4).save_pretrained(tmp_path / "hf")
    for f in (DEMO / "tokenizer").iterdir():
        shutil.copy2(f, tmp_path / "hf" / f.name)
    base = convert_from_hf.convert(tmp_path / "hf", tmp_path / "base", tp=2)
    run = tmp_path / "run"
    cfg = tmp_path / "tied.yaml"
    cfg.write_text(yaml.safe_dump(dict(
        run_dir=str(run), init_from=str(base), mix=str(tmp_path / "mix" / "mix.json"), tensor_parallel=2,
        seq_length=128, global_batch_size=4, micro_batch_size=2, train_iters=4, lr=1e-3, min_lr=1e-4,
        precision="fp32", backend="local", eval_interval=0, save_interval=100)))
    run_trainer(cfg, nproc=2)

    assert all(math.isfinite(r["loss"]) for r in read_metrics(run))
    before = load_model(base).embedding.word_embeddings.weight.detach()
    after = load_model(run / "checkpoints").embedding.word_embeddings.weight.detach()
    assert after.shape[0] == 2048
    assert not torch.equal(after[:vocab], before[:vocab])  # the tied embedding trained ...
    assert after[vocab:].abs().max() == 0  # ... and the padded rows never got a gradient
    release = convert_to_hf.convert(run / "checkpoints", tmp_path / "release")
    assert compare(release, run / "checkpoints", seq_len=64)["max_rel_err"] <= 1e-5
