"""What a training run reports: ``metrics.jsonl`` (rank 0), TensorBoard and optionally W&B, the progress
line's timing, and the loss curve as a PNG."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import torch

from megatron_ext.parallel import is_rank0
from megatron_ext.train_config import TrainConfig
from preprocessing.atomic import write_atomic

log = logging.getLogger(__name__)


def memory_gb() -> float:
    """Peak GPU memory allocated, or the process's resident memory on CPU (GiB)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import psutil

    return psutil.Process().memory_info().rss / 2**30


class Metrics:
    """``metrics.jsonl`` (rank 0), TensorBoard and optionally W&B; a progress line per log interval."""

    def __init__(self, run_dir: Path, cfg: TrainConfig, resume_step: int):
        self.path = run_dir / "metrics.jsonl"
        self.enabled = is_rank0()
        self.tb = self.wandb = None
        if not self.enabled:
            return
        if self.path.exists():  # drop what a killed run logged after the checkpoint we resume from
            self._keep_until(resume_step)
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        if cfg.wandb_project:
            import wandb

            self.wandb = wandb.init(project=cfg.wandb_project, dir=str(run_dir), config=dataclasses.asdict(cfg),
                                    resume="allow", id=run_dir.name)

    def _keep_until(self, resume_step: int) -> None:
        """Keep the records up to ``resume_step``; a line that is not a record (cut by a full disk or a node crash while
        rank 0 wrote it: nothing after it was logged) is dropped with a warning instead of stopping the resume. Rewritten
        atomically: a kill now must not empty the run's history."""
        kept = []
        for i, line in enumerate(self.path.read_bytes().decode(errors="replace").splitlines(), start=1):
            try:
                step = json.loads(line)["step"]
            except (ValueError, TypeError, KeyError):
                log.warning("%s:%d: not a metrics record (cut by a crash?), dropped", self.path, i)
                continue
            if step <= resume_step:
                kept.append(line)
        write_atomic(self.path, "".join(x + "\n" for x in kept))

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step" and v is not None}
        if self.tb:
            for k, v in numbers.items():
                self.tb.add_scalar(k, v, record["step"])
            self.tb.flush()
        if self.wandb:
            self.wandb.log(numbers, step=record["step"])

    def close(self) -> None:
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()


def plot_losses(run_dir: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
    fig, ax = plt.subplots(figsize=(8, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    domains = sorted({k for r in records for k in r if k.startswith("val/")})
    for d in domains:
        pts = [(r["step"], r[d]) for r in records if d in r]
        ax.plot(*zip(*pts), marker="o", label=d)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend(fontsize="small")
    ax.set_title(run_dir.name)
    fig.tight_layout()
    out = run_dir / "loss_curve.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


class Progress:
    """The progress line's timing. A process's first step compiles and autotunes kernels (fla's take about
    110 s on a fresh GPU), so it is named as such and kept out of the average throughput and the ETA."""

    def __init__(self, tokens_per_step: int):
        self.tokens_per_step = tokens_per_step
        self.warm_since: float | None = None  # end of the first step
        self.steps = 0  # steps since then
        self.step_seconds = 0.0  # their training time (evaluation and saves excluded)

    def update(self, step_seconds: float, steps_left: int) -> str:
        now = time.perf_counter()
        if self.warm_since is None:
            self.warm_since = now
            return f"first step {step_seconds:.0f}s (compiling kernels; not in avg or eta)"
        self.steps += 1
        self.step_seconds += step_seconds
        avg = self.tokens_per_step * self.steps / self.step_seconds
        eta = (now - self.warm_since) / self.steps * steps_left  # wall clock: evaluation and saves included
        return f"avg {avg:,.0f} tok/s | eta {eta:.0f}s"
