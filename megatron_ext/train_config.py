"""Training run configuration: one dataclass, loaded from YAML, any key overridable as ``key=value``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from megatron_ext.config import check_fp8

# the decay shapes of megatron's Warmup-Stable-Decay schedule (OptimizerParamScheduler's lr_wsd_decay_style)
DECAY_STYLES = ("cosine", "linear", "exponential", "minus_sqrt")


def _typed(key: str, value: Any, kind: str) -> Any:
    """``value`` as field ``key`` of type ``kind`` takes it: YAML reads 3e-5 and 1e3 (no dot) as strings; any other
    mismatch is refused, naming the key."""
    if value is None and kind.endswith("| None"):
        return None
    base = kind.split(" |")[0]
    if base in ("int", "float") and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"{key}: expected a number, got {value!r}") from None
    if base == "int" and isinstance(value, float) and value.is_integer():
        value = int(value)
    if base == "float" and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    expected = {"int": int, "float": float, "bool": bool, "str": str}.get(base)
    if expected and (not isinstance(value, expected) or (expected is int and isinstance(value, bool))):
        raise ValueError(f"{key}: expected {kind}, got {value!r}")
    return value


@dataclass
class TrainConfig:
    # where things are
    run_dir: str = "runs/cpt"
    init_from: str | None = None  # a converted (tools.convert_from_hf) or trained checkpoint (a run's checkpoints/)
    mix: str = "out/mix/mix.json"  # CPT data, from preprocessing.build_mix
    sft_data: str | None = None  # SFT data (sft.json from preprocessing.build_sft); when set, the run is SFT
    epochs: float = 1.0  # SFT: passes over the conversations when train_iters is not set
    # batch geometry: micro-batches and accumulation are derived from the world size
    seq_length: int = 4096
    global_batch_size: int = 256
    micro_batch_size: int = 1
    train_iters: int | None = None  # default: CPT the mix's token_budget / (global_batch_size * seq_length), SFT epochs
    per_token_loss: bool = False  # mean over the global batch's loss tokens (SFT) rather than per micro-batch
    # AdamW (megatron-core optimizer) with a Warmup-Stable-Decay schedule
    lr: float = 2e-6
    min_lr: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    weight_decay: float = 0.1
    clip_grad: float = 1.0
    fused_adam: bool = True  # torch's fused AdamW kernel (megatron uses torch's AdamW without TE/Apex); false: foreach
    warmup_fraction: float = 0.01
    decay_fraction: float = 0.14  # the last 14% decay (after 1% warmup and 85% stable)
    decay_style: str = "cosine"  # one of DECAY_STYLES
    # numerics and parallelism
    precision: str = "bf16"  # bf16 (fp32 master weights) | fp32
    fp8: str | None = None  # a TE FP8 format ("hybrid", "e4m3"); needs backend: te and precision: bf16
    fp8_recipe: str = "delayed"  # delayed | tensorwise (current scaling) | blockwise | mxfp8 (Blackwell)
    recompute: str | None = None  # None | "selective" | "full"
    loss_chunk: int = 0  # tokens per piece of the output layer + loss, logits recomputed in the backward (0: off)
    compile_elementwise: bool = False  # norms, GDN gates, SwiGLU, bf16 loss: few compiled kernels (megatron_ext/fusions.py)
    # weight gradients added into the fp32 gradient buffer by their GEMM, not written and added apart (megatron's
    # gradient_accumulation_fusion: TE's kernels, Apex's, else megatron_ext/no_apex.py's torch stand-in)
    gradient_accumulation_fusion: bool = True
    tensor_parallel: int = 1
    distributed_optimizer: bool | None = None  # default: on (a resumed run keeps its checkpoint's choice)
    overlap_communication: bool = True  # gradient reduce / parameter gather overlap compute; sets the
    # distributed optimizer checkpoint's buckets: keep it the same within a run
    read_ahead: int = 2  # micro-batches a background thread reads in advance (0: read in the step)
    backend: str = "auto"  # te | local | auto
    gdn_kernel: str = "auto"
    attention_kernel: str = "auto"  # auto | fused | flex | masked: core attention, either backend; te: TE's (backend te)
    # cadence
    # every N steps; 0: never (the last step still logs and saves, and is validated unless eval_interval is 0)
    log_interval: int = 1
    eval_interval: int = 50
    eval_docs: int = 64  # CPT: held-out documents per domain (SFT: all held-out conversations; 0 = no validation)
    save_interval: int = 200  # also on SIGTERM
    keep_last: int = 3  # complete checkpoints kept (0: all)
    seed: int = 1234
    # guards
    max_nonfinite_in_a_row: int = 5
    spike_factor: float = 3.0  # warn when a loss exceeds this multiple of its running mean
    # logging
    tensorboard: bool = True
    wandb_project: str | None = None
    peak_tflops: float | None = None  # per GPU, for MFU; default from the GPU name
    # fault injection for tests: {"nan_at_steps": [..], "kill_in_save_at_step": n}
    debug: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.precision not in ("bf16", "fp32"):
            raise ValueError(f"precision must be bf16 or fp32, got {self.precision!r}")
        if self.recompute not in (None, "selective", "full"):
            raise ValueError(f"recompute must be null, selective or full, got {self.recompute!r}")
        if self.loss_chunk < 0:
            raise ValueError(f"loss_chunk must be >= 0 (0: the whole sequence at once), got {self.loss_chunk}")
        check_fp8(self.fp8, self.fp8_recipe, self.backend, bf16=self.precision == "bf16")
        if self.decay_style not in DECAY_STYLES:
            # megatron's scheduler reads it only once the decay begins, where another name fails an assert
            raise ValueError(f"decay_style must be one of {', '.join(DECAY_STYLES)}, got {self.decay_style!r}")
        if min(self.warmup_fraction, self.decay_fraction) < 0 or self.warmup_fraction + self.decay_fraction > 1:
            # a negative one is no schedule: megatron reads a negative warmup as none, a negative decay as 1 step
            raise ValueError(f"warmup_fraction and decay_fraction must be >= 0 and sum to at most 1, got "
                             f"{self.warmup_fraction} and {self.decay_fraction}")
        for key in ("log_interval", "eval_interval", "save_interval", "keep_last"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} must be >= 0 (0: never, or for keep_last: all), got {getattr(self, key)}")

    @classmethod
    def load(cls, path: str | Path | None, overrides: list[str] = ()) -> "TrainConfig":
        """The YAML at ``path`` with ``key=value`` overrides; a missing or malformed file, an unknown key or a value
        of the wrong type is a ValueError naming it (the trainer prints it as one line)."""
        if path and "=" in str(path) and not Path(path).exists():
            raise ValueError(f"{path!r} is not a config file: give the config first, then key=value overrides")
        try:
            raw = yaml.safe_load(Path(path).read_text()) if path else {}
        except (OSError, yaml.YAMLError) as e:
            raise ValueError(f"cannot read the config: {e}") from None
        raw = raw or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a mapping of config keys, got {type(raw).__name__}")
        types = {f.name: str(f.type) for f in dataclasses.fields(cls)}
        names = set(types)
        unknown = set(raw) - names
        if unknown:
            raise ValueError(f"{path}: unknown keys {sorted(unknown)}")
        for item in overrides:
            key, sep, value = item.partition("=")
            if not sep or key not in names:
                raise ValueError(f"override {item!r}: expected key=value with key one of the config fields")
            # a path or name stays the text given (YAML would read run_dir=2026-01-15 as a date, init_from=off
            # as False); null / ~ / an empty value still clear an optional one
            text = types[key] in ("str", "str | None") and not (types[key] == "str | None" and value in ("", "null", "~"))
            raw[key] = value if text else yaml.safe_load(value)
        for key, value in raw.items():
            raw[key] = _typed(key, value, types[key])
        return cls(**raw)
