"""Benchmark one training step on one GPU: our megatron-core Qwen3.5 (BF16, and FP8 when Transformer
Engine is present) against transformers' Qwen3.5 with flash-linear-attention kernels, same shape, same run.

    python -m tools.bench_train [--hf-config Qwen3.5-2B-Base/config.json] [--seq 4096] [--micro-batch 1]

Random init, seq 4096, AdamW step included. Reports tokens/s, MFU (formula: megatron_ext/flops.py) and
peak memory as a markdown table for docs/benchmarks.md. Goals: >= 45% MFU in BF16, >= 1.5x the HF step.
"""

from __future__ import annotations

import argparse
import gc
import time
from datetime import date

import torch

# The Qwen3.5-2B shape as far as it matters for speed (pass --hf-config with the real config.json for
# recorded numbers): tied embeddings, 24 layers 3:1 GDN:attention, GDN 16 key / 16 value heads of 128.
APPROX_2B = dict(
    vocab_size=248320, hidden_size=2048, intermediate_size=6144, num_hidden_layers=24,
    num_attention_heads=8, num_key_value_heads=2, head_dim=256, linear_key_head_dim=128,
    linear_value_head_dim=128, linear_num_key_heads=16, linear_num_value_heads=16, tie_word_embeddings=True,
)


def _time_steps(step, warmup: int, iters: int) -> tuple[float, float]:
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters, torch.cuda.max_memory_allocated() / 2**30


def ours(config, seq: int, mbs: int, fp8: str | None, warmup: int, iters: int):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron_ext import build_model

    overrides = {"fp8": fp8, "fp8_recipe": "delayed"} if fp8 else {}
    model = build_model(config, "auto", params_dtype=torch.bfloat16, recompute_granularity="selective", **overrides)
    ddp = DistributedDataParallel(config=model.config, ddp_config=DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=True), module=model)
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=2e-6, bf16=True, params_dtype=torch.bfloat16,
                                                 use_distributed_optimizer=True, clip_grad=1.0), [ddp])
    ids = torch.randint(0, config.vocab_size, (mbs, seq), device="cuda")
    pos = torch.arange(seq, device="cuda").expand(mbs, seq)

    def step():
        ddp.zero_grad_buffer()
        opt.zero_grad()
        ddp(ids, pos, labels=torch.roll(ids, -1, 1)).mean().backward()
        ddp.finish_grad_sync()
        opt.step()

    return _time_steps(step, warmup, iters)  # the model is freed when this returns


def hf(config, seq: int, mbs: int, warmup: int, iters: int):
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

    hf_config = Qwen3_5TextConfig(**config.to_hf_text_dict())
    with torch.device("cuda"):  # initialise on the GPU: a 2B init on the CPU takes longer than the benchmark
        model = Qwen3_5ForCausalLM._from_config(hf_config, dtype=torch.bfloat16, attn_implementation="sdpa")
    model.gradient_checkpointing_enable()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-6, fused=True)
    ids = torch.randint(0, config.vocab_size, (mbs, seq), device="cuda")

    def step():
        opt.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()

    return _time_steps(step, warmup, iters)


def measure(config=None, seq: int = 4096, micro_batch: int = 1, warmup: int = 3, iters: int = 10):
    """Rows (implementation, s/step, tokens/s, MFU text, peak GiB): ours in BF16 (and FP8 with TE), then
    transformers + fla, one after the other on this GPU (each model is freed before the next)."""
    from megatron_ext import Qwen35Config, parallel
    from megatron_ext.flops import peak_tflops, train_flops_per_token
    from megatron_ext.spec import have_transformer_engine

    parallel.initialize()
    config = config or Qwen35Config(**APPROX_2B)
    tokens = seq * micro_batch
    flops = train_flops_per_token(config, seq) * tokens
    peak = peak_tflops(torch.cuda.get_device_name())
    runs = [("neurocpt megatron-core BF16", lambda: ours(config, seq, micro_batch, None, warmup, iters))]
    if have_transformer_engine():
        runs.append(("neurocpt megatron-core FP8 (TE)", lambda: ours(config, seq, micro_batch, "hybrid", warmup, iters)))
    runs.append(("transformers Qwen3.5 + fla, BF16", lambda: hf(config, seq, micro_batch, warmup, iters)))
    rows = []
    for name, run in runs:
        seconds, mem = run()
        gc.collect()  # the model and optimizer of this run, before the next one allocates its own
        torch.cuda.empty_cache()
        rows.append((name, seconds, tokens / seconds, f"{flops / seconds / (peak * 1e12):.1%}" if peak else "n/a", mem))
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-config")
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    from megatron_ext import Qwen35Config

    config = Qwen35Config.from_hf(args.hf_config) if args.hf_config else None
    rows = measure(config, args.seq, args.micro_batch, args.warmup, args.iters)
    base = rows[-1][1]
    print(f"\n### Training step ({date.today()}, {torch.cuda.get_device_name()}, seq {args.seq}, micro-batch "
          f"{args.micro_batch}, shape {'from ' + args.hf_config if args.hf_config else 'APPROX_2B'})\n")
    print("| implementation | s/step | tokens/s | MFU | peak GiB | vs HF |\n|---|---|---|---|---|---|")
    for name, seconds, tokens_per_s, mfu, mem in rows:
        print(f"| {name} | {seconds:.3f} | {tokens_per_s:,.0f} | {mfu} | {mem:.1f} | {base / seconds:.2f}x |")


if __name__ == "__main__":
    main()
