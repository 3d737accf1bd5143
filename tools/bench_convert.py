"""Benchmark: checkpoint conversion time and peak memory against a plain copy of the same safetensors files.

    python -m tools.bench_convert [--hidden 1024] [--layers 24] [--vocab 64000] [--dtype bf16] [--repeat 2]

Builds a random Qwen3.5 checkpoint (release layout: multimodal, tied, sharded), then times (best of
--repeat): ``cp`` of its shard files, ``convert_from_hf`` and ``convert_to_hf --hf-template``, each
conversion in a fresh process whose peak resident memory (``VmHWM``; ``ru_maxrss`` would start from the
parent's size at fork) is recorded, with the resident
memory it had after its imports (torch, megatron, transformers) before converting. Goals: each conversion
at most 3x the copy; peak minus imports at most 1.3x the checkpoint's size. Prints a markdown table to
paste into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

from megatron_ext.checkpoint import fsync

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


# run in a child: import what the converters use, note the resident memory, convert, report time and peak
_CHILD = """
import json, time, psutil
import megatron_ext.checkpoint, transformers
from tools import convert_from_hf, convert_to_hf
def peak():
    status = open("/proc/self/status").read()
    return int(status.split("VmHWM:")[1].split()[0]) * 1024
before = psutil.Process().memory_info().rss
t = time.perf_counter()
{call}
print(json.dumps({{"seconds": time.perf_counter() - t, "imports_rss": before, "peak_rss": peak()}}))
"""


def _measured(call: str, repeat: int) -> dict:
    """Best time of ``repeat`` fresh processes running ``call``, with the largest peak memory seen."""
    runs = []
    for _ in range(repeat):
        out = subprocess.run([sys.executable, "-c", _CHILD.format(call=call)], check=True, capture_output=True, text=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {"seconds": min(r["seconds"] for r in runs), "imports_rss": max(r["imports_rss"] for r in runs),
            "peak_rss": max(r["peak_rss"] for r in runs)}


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
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--vocab", type=int, default=64000)
    p.add_argument("--dtype", default="bf16", choices=DTYPES)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--workdir", type=Path, default=None, help="where to write (default: a temp dir)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from tools import tiny_qwen35

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_convert_"))
    work.mkdir(parents=True, exist_ok=True)
    hf = work / "hf"
    h = args.hidden
    pattern = [("full_attention" if (i + 1) % 4 == 0 else "linear_attention") for i in range(args.layers)]
    model = tiny_qwen35.multimodal(
        seed=0, tie_word_embeddings=True, vocab_size=args.vocab, hidden_size=h, intermediate_size=3 * h, layer_types=pattern,
        num_attention_heads=h // 128, num_key_value_heads=max(1, h // 512), head_dim=128,
        linear_key_head_dim=64, linear_value_head_dim=64, linear_num_key_heads=h // 128, linear_num_value_heads=h // 64,
    ).to(DTYPES[args.dtype])
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(hf, max_shard_size="200MB")
    del model
    size = sum(f.stat().st_size for f in hf.glob("*.safetensors"))

    plain_s = _best(lambda: _copy_shards(hf, work / "copy", durable=False), args.repeat)
    copy_s = _best(lambda: _copy_shards(hf, work / "copy", durable=True), args.repeat)
    from_hf = _measured(f"convert_from_hf.convert({str(hf)!r}, {str(work / 'ckpt')!r}, overwrite=True)", args.repeat)
    to_hf = _measured(f"convert_to_hf.convert({str(work / 'ckpt')!r}, {str(work / 'export')!r}, "
                      f"hf_template={str(hf)!r}, overwrite=True)", args.repeat)

    print(f"\n### Checkpoint conversion vs copy ({date.today()}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads)\n")
    print(f"Random Qwen3.5 (multimodal layout, tied), {n_params / 1e6:.0f}M params, {args.dtype}, {size / 1e6:.0f} MB "
          f"of safetensors; best of {args.repeat}; each conversion in a fresh process.\n")
    print("Baseline: copying the shard files with fsync, since both converters fsync what they write "
          "(dist_checkpointing does; safetensors shards are renamed into place). The page-cache-only copy "
          "is shown for reference.\n")
    print("| step | seconds | MB/s | x copy+fsync | goal <= 3x | peak RSS MB | after imports MB | "
          "(peak - imports) / checkpoint | goal <= 1.3x |\n|---|---|---|---|---|---|---|---|---|")
    rows = [("copy shards, page cache only", plain_s, None), ("copy shards + fsync (baseline)", copy_s, None),
            ("convert_from_hf", from_hf["seconds"], from_hf), ("convert_to_hf (template)", to_hf["seconds"], to_hf)]
    for name, s, mem in rows:
        ratio = s / copy_s
        cells = f"| {name} | {s:.2f} | {size / 1e6 / s:.0f} | {ratio:.2f} | {'yes' if ratio <= 3 else 'NO'} |"
        if mem:
            grown = (mem["peak_rss"] - mem["imports_rss"]) / size
            cells += (f" {mem['peak_rss'] / 1e6:.0f} | {mem['imports_rss'] / 1e6:.0f} | {grown:.2f} | "
                      f"{'yes' if grown <= 1.3 else 'NO'} |")
        else:
            cells += " | | | |"
        print(cells)
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
