"""Reading and writing HF safetensors checkpoints one tensor at a time, with errors that name the tensor
and the file, and output directories that appear only when complete."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterator

import torch
from megatron_ext.checkpoint import replace_dir
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
QWEN35_ARCHITECTURES = ("Qwen3_5ForConditionalGeneration", "Qwen3_5ForCausalLM")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}  # --dtype choices
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
                      "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8, "BOOL": torch.bool}


class CheckpointError(RuntimeError):
    """A HF checkpoint that cannot be converted; the message names the tensor and/or file."""


class HFCheckpoint:
    """Lazy, read-only view of a HF checkpoint directory's tensors."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        self._handles: dict[Path, object] = {}
        if not self.dir.is_dir():
            raise CheckpointError(f"{self.dir}: no such checkpoint directory")
        self.config = self._read_config()
        if (self.dir / INDEX).is_file():
            try:
                weight_map = json.loads((self.dir / INDEX).read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise CheckpointError(f"{self.dir / INDEX}: unreadable index ({err})") from err
        elif (self.dir / SINGLE).is_file():
            weight_map = {k: SINGLE for k in self._open(self.dir / SINGLE).keys()}
        else:
            raise CheckpointError(f"{self.dir}: no {INDEX} or {SINGLE}")
        self.files = {name: self.dir / f for name, f in weight_map.items()}
        for f in set(self.files.values()):
            if not f.is_file():
                raise CheckpointError(f"{f}: shard listed in {INDEX} is missing")

    def _read_config(self) -> dict:
        path = self.dir / "config.json"
        if not path.is_file():
            raise CheckpointError(f"{path}: missing")
        config = json.loads(path.read_text())
        archs = config.get("architectures") or []
        if not any(a in QWEN35_ARCHITECTURES for a in archs):
            raise CheckpointError(f"{path}: architectures {archs} is not a Qwen3.5 model {QWEN35_ARCHITECTURES}")
        return config

    @property
    def is_multimodal(self) -> bool:
        return "text_config" in self.config

    def _open(self, path: Path):
        if path not in self._handles:
            try:
                self._handles[path] = safe_open(str(path), framework="pt")
            except (SafetensorError, OSError) as err:
                raise CheckpointError(f"{path}: unreadable safetensors file ({err})") from err
        return self._handles[path]

    def keys(self) -> list[str]:
        return list(self.files)

    def file_of(self, name: str) -> Path:
        return self.files[name]

    def dtype_of(self, name: str) -> torch.dtype:
        with _naming(name, self.files.get(name)):
            return SAFETENSORS_DTYPES[self._open(self.files[name]).get_slice(name).get_dtype()]

    def get(self, name: str) -> torch.Tensor:
        if name not in self.files:
            raise CheckpointError(f"tensor {name!r} is missing from {self.dir}")
        with _naming(name, self.files[name]):
            return self._open(self.files[name]).get_tensor(name)

    def extra_files(self) -> list[Path]:
        """Everything that is not a weight: configs, tokenizer, chat template, processor files."""
        skip = {INDEX}
        return sorted(p for p in self.dir.iterdir() if p.is_file() and p.name not in skip and not p.name.endswith(WEIGHT_SUFFIXES))


@contextlib.contextmanager
def _naming(name: str, file: Path | None):
    try:
        yield
    except CheckpointError:
        raise
    except Exception as err:  # safetensors raises plain errors on truncated data
        raise CheckpointError(f"tensor {name!r} in {file}: cannot be read ({err})") from err


class ShardedWriter:
    """Writes tensors into ``model-XXXXX-of-YYYYY.safetensors`` shards of at most ``max_shard_bytes`` and
    the index. Holds at most one shard in memory."""

    def __init__(self, directory: Path, max_shard_bytes: int):
        self.dir = directory
        self.max = max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += size
        self.total += size

    def _flush(self) -> None:
        path = self.dir / f"shard-{len(self.shards):05d}.tmp"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        fsync(path)  # durable before the directory is renamed into place
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        if self.pending:
            self._flush()
        n = len(self.shards)
        weight_map = {}
        for i, names in enumerate(self.shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.dir / f"shard-{i:05d}.tmp", self.dir / final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.dir / INDEX).write_text(json.dumps(index, indent=2))


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_directory(out: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``out``, on failure it is removed
    and ``out`` (if any) is left untouched."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, out)


def parse_size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    t = text.strip().upper()
    for unit, factor in units.items():
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * factor)
    return int(t)
