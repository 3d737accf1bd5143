"""Benchmark: checkpoint conversion time against a plain copy of the same safetensors files, same run.

    python -m tools.bench_convert [--hidden 1024] [--layers 12] [--vocab 32000] [--dtype bf16] [--repeat 2]

Builds a random Qwen3.5 checkpoint (release layout: multimodal, sharded), then times (best of --repeat):
``cp`` of its shard files, ``convert_from_hf`` and ``convert_to_hf --hf-template``. Goal: each conversion
at most 3x the copy. Prints a markdown table to paste into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import logging
import platform
import shutil
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

from tools.hf_checkpoint import fsync

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def _copy_shards(src: Path, dst: Path, durable: bool) -> None:

    """``cp`` of the shard files; ``durable`` also fsyncs each, as the converters' writers do."""
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir()
    for f in src.glob("*.safetensors"):
        shutil.copyfile(f, dst / f.name)
        if durable:
            fsync(dst / f.name)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dtype", default="bf16", choices=DTYPES)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--workdir", type=Path, default=None, help="where to write (default: a temp dir)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from tools import convert_from_hf, convert_to_hf, tiny_qwen35

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_convert_"))
    work.mkdir(parents=True, exist_ok=True)
    hf = work / "hf"
    h = args.hidden
    pattern = [("full_attention" if (i + 1) % 4 == 0 else "linear_attention") for i in range(args.layers)]
    model = tiny_qwen35.multimodal(
        seed=0, vocab_size=args.vocab, hidden_size=h, intermediate_size=3 * h, layer_types=pattern,
        num_attention_heads=h // 128, num_key_value_heads=max(1, h // 512), head_dim=128,
        linear_key_head_dim=64, linear_value_head_dim=64, linear_num_key_heads=h // 128, linear_num_value_heads=h // 64,
    ).to(DTYPES[args.dtype])
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(hf, max_shard_size="200MB")
    del model
    size = sum(f.stat().st_size for f in hf.glob("*.safetensors"))

    plain_s = _best(lambda: _copy_shards(hf, work / "copy", durable=False), args.repeat)
    copy_s = _best(lambda: _copy_shards(hf, work / "copy", durable=True), args.repeat)
    from_s = _best(lambda: convert_from_hf.convert(hf, work / "ckpt"), args.repeat)
    to_s = _best(lambda: convert_to_hf.convert(work / "ckpt", work / "export", hf_template=hf), args.repeat)

    print(f"\n### Checkpoint conversion vs copy ({date.today()}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads)\n")
    print(f"Random Qwen3.5 (multimodal layout), {n_params / 1e6:.0f}M params, {args.dtype}, {size / 1e6:.0f} MB "
          f"of safetensors; best of {args.repeat}.\n")
    print("Baseline: copying the shard files with fsync, since both converters fsync what they write "
          "(dist_checkpointing does; safetensors shards are renamed into place). The page-cache-only copy "
          "is shown for reference.\n")
    print("| step | seconds | MB/s | x copy+fsync | goal <= 3x |\n|---|---|---|---|---|")
    rows = [("copy shards, page cache only", plain_s), ("copy shards + fsync (baseline)", copy_s),
            ("convert_from_hf", from_s), ("convert_to_hf (template)", to_s)]
    for name, s in rows:
        ratio = s / copy_s
        print(f"| {name} | {s:.2f} | {size / 1e6 / s:.0f} | {ratio:.2f} | {'yes' if ratio <= 3 else 'NO'} |")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
