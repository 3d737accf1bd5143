"""Benchmark: CPU training steps before and after a checkpoint save, through the real trainer.

    python -m tools.bench_save [--steps 10] [--out out/bench_save]

Builds the demo mix and a demo-size random Qwen3.5 (as ``make demo`` trains), then runs ``megatron_ext.train``
for ``2 * steps`` steps with one checkpoint save after step ``steps``, with the distributed optimizer (the
default) and without it. Reports the median tokens/s before the save (the first step excluded: it compiles)
and after it, from ``metrics.jsonl``. Goal: after / before >= 0.9. Other load on the machine moves these
figures a lot (OpenMP threads spin-wait): run it on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "data" / "demo"
L, F = "linear_attention", "full_attention"


def prepare(out: Path) -> tuple[Path, Path]:
    """The demo mix and a converted tiny base checkpoint (made once, reused by later runs)."""
    from preprocessing.build_mix import build
    from preprocessing.recipe import MixRecipe
    from tools import convert_from_hf, tiny_qwen35

    mix, base = out / "mix" / "mix.json", out / "base_megatron"
    if not mix.is_file():
        build(MixRecipe.load(DEMO / "recipe.yaml", output_dir=str((out / "mix").resolve())))
    if not base.is_dir():
        hf = out / "base_hf"
        tiny_qwen35.causal_lm(tiny_qwen35.text_config(vocab_size=2048, hidden_size=128, intermediate_size=256,
                                                      layer_types=[L, L, L, F] * 2), seed=0).save_pretrained(hf)
        convert_from_hf.convert(hf, base)
    return mix, base


def run(out: Path, steps: int, extra: tuple[str, ...] = ()) -> dict:
    mix, base = prepare(out)
    run_dir = out / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "megatron_ext.train", "--config", str(ROOT / "launch" / "configs" / "demo_cpu.yaml"),
           f"run_dir={run_dir}", f"init_from={base}", f"mix={mix}", f"train_iters={2 * steps}", f"save_interval={steps}",
           "eval_interval=0", "keep_last=1", "tensorboard=false", *extra]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    speed = [json.loads(x)["tokens_per_s"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    before, after = statistics.median(speed[1:steps]), statistics.median(speed[steps:])
    return {"before": before, "after": after, "ratio": after / before}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10, help="steps before the save, and after it")
    p.add_argument("--out", type=Path, default=Path("out/bench_save"))
    args = p.parse_args(argv)
    print(f"{date.today()}, CPU, launch/configs/demo_cpu.yaml; median tokens/s of steps 2-{args.steps} (before the "
          f"save at step {args.steps}) and of steps {args.steps + 1}-{2 * args.steps} (after it)\n")
    print("| optimizer | before the save | after the save | after / before |\n|---|---|---|---|")
    for name, extra in (("distributed (default)", ()), ("not distributed", ("distributed_optimizer=false",))):
        r = run(args.out, args.steps, extra)
        print(f"| {name} | {r['before']:,.0f} | {r['after']:,.0f} | {r['ratio']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
