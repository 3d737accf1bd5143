"""Reading and writing HF safetensors checkpoints one tensor at a time, with errors that name the tensor
and the file, and output directories that appear only when complete."""

from __future__ import annotations

import collections
import contextlib
import json
import math
import os
import shutil
import socket
from pathlib import Path
from typing import Iterator

import torch
from megatron_ext.checkpoint import recover_replace, replace_dir
from safetensors import SafetensorError, safe_open

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
QWEN35_ARCHITECTURES = ("Qwen3_5ForConditionalGeneration", "Qwen3_5ForCausalLM")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}  # --dtype choices
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
                      "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8, "BOOL": torch.bool}
SAFETENSORS_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


class CheckpointError(RuntimeError):
    """A HF checkpoint that cannot be converted; the message names the tensor and/or file."""


class HFCheckpoint:
    """Lazy, read-only view of a HF checkpoint directory's tensors.

    Each read opens its file anew: safetensors maps the file, and every page a read touches stays in this
    process's resident memory while the mapping is open, so a cached handle would add the whole checkpoint
    to the converter's peak memory (measured: 2.6x the checkpoint instead of about 1x)."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        if not self.dir.is_dir():
            raise CheckpointError(f"{self.dir}: no such checkpoint directory")
        self.config = self._read_config()
        if (self.dir / INDEX).is_file():
            try:
                weight_map = json.loads((self.dir / INDEX).read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise CheckpointError(f"{self.dir / INDEX}: unreadable index ({err})") from err
        elif (self.dir / SINGLE).is_file():
            with self._open(self.dir / SINGLE) as f:
                weight_map = {k: SINGLE for k in f.keys()}
        else:
            raise CheckpointError(f"{self.dir}: no {INDEX} or {SINGLE}")
        self.files = {name: self.dir / f for name, f in weight_map.items()}
        listed: dict[Path, set[str]] = {}
        for name, f in self.files.items():
            listed.setdefault(f, set()).add(name)
        for f, names in sorted(listed.items()):
            if not f.is_file():
                raise CheckpointError(f"{f}: shard listed in {INDEX} is missing")
            self._check_shard(f, names)

    def _check_shard(self, path: Path, listed: set[str]) -> None:
        """A shard must hold exactly the tensors the index lists in it: another file under its name (a
        shard of another checkpoint or sharding) would otherwise mix its tensors in unnoticed."""
        with self._open(path) as f:
            held = set(f.keys())
        if held != listed:
            name = min(held ^ listed)
            what = "lacks" if name in listed else "holds"
            raise CheckpointError(f"{path}: {what} tensor {name!r}, which {INDEX} lists "
                                  f"{'in it' if name in listed else 'elsewhere or nowhere'}: not this checkpoint's shard")

    def _read_config(self) -> dict:
        path = self.dir / "config.json"
        if not path.is_file():
            raise CheckpointError(f"{path}: missing")
        try:
            config = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{path}: not valid JSON ({err})") from err
        archs = config.get("architectures") or []
        if not any(a in QWEN35_ARCHITECTURES for a in archs):
            raise CheckpointError(f"{path}: architectures {archs} is not a Qwen3.5 model {QWEN35_ARCHITECTURES}")
        return config

    @contextlib.contextmanager
    def _open(self, path: Path):
        try:
            handle = safe_open(str(path), framework="pt")
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{path}: unreadable safetensors file ({err})") from err
        with handle as f:
            yield f

    def keys(self) -> list[str]:
        return list(self.files)

    def file_of(self, name: str) -> Path:
        return self.files[name]

    def dtype_of(self, name: str) -> torch.dtype:
        with _naming(name, self.files.get(name)), self._open(self.files[name]) as f:
            return SAFETENSORS_DTYPES[f.get_slice(name).get_dtype()]

    def shape_of(self, name: str) -> tuple[int, ...]:
        with _naming(name, self.files.get(name)), self._open(self.files[name]) as f:
            return tuple(f.get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        if name not in self.files:
            raise CheckpointError(f"tensor {name!r} is missing from {self.dir}")
        with _naming(name, self.files[name]), self._open(self.files[name]) as f:
            return f.get_tensor(name)

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
    """Writes a planned set of tensors into ``model-XXXXX-of-YYYYY.safetensors`` shards of at most
    ``max_shard_bytes``, and the index, holding one tensor in memory at a time (``replace_dir`` flushes them
    to disk before publishing the directory).

    ``safetensors.save_file`` needs a shard's tensors all at once (a 5 GB shard: 5 GB of memory). The
    plan (names, dtypes, shapes, in order) fixes every shard's header before any data exists, so each
    shard file starts with its header and ``write`` puts a tensor's bytes straight at its offset."""

    def __init__(self, directory: Path, plan: list[tuple[str, torch.dtype, tuple[int, ...]]], max_shard_bytes: int):
        self.dir = directory
        shards: list[list[tuple[str, torch.dtype, tuple[int, ...], int]]] = [[]]
        size = 0
        for name, dtype, shape in plan:
            nbytes = math.prod(shape) * dtype.itemsize
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append((name, dtype, tuple(shape), nbytes))
            size += nbytes
        n = len(shards)
        self.where: dict[str, tuple[Path, int, torch.dtype, tuple[int, ...]]] = {}
        self.total = 0
        for i, tensors in enumerate(shards):
            path = directory / f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            header, offset = {"__metadata__": {"format": "pt"}}, 0
            for name, dtype, shape, nbytes in tensors:
                header[name] = {"dtype": SAFETENSORS_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
                offset += nbytes
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)  # the format allows space padding; 8-byte alignment as safetensors writes
            with open(path, "wb") as f:
                f.write(len(raw).to_bytes(8, "little") + raw)
                f.truncate(8 + len(raw) + offset)
            for name, dtype, shape, _ in tensors:
                self.where[name] = (path, 8 + len(raw) + header[name]["data_offsets"][0], dtype, shape)
            self.total += offset
        self.pending = set(self.where)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        path, offset, dtype, shape = self.where[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(f"{name}: planned {dtype} {shape}, got {tensor.dtype} {tuple(tensor.shape)}")
        with open(path, "r+b") as f:
            f.seek(offset)
            f.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        self.pending.discard(name)

    def close(self) -> None:
        if self.pending:
            raise RuntimeError(f"tensors planned but never written: {sorted(self.pending)[:5]}")
        weight_map = {name: where[0].name for name, where in sorted(self.where.items())}
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        (self.dir / INDEX).write_text(json.dumps(index, indent=2))


def count_by_part(names: list[str]) -> str:
    """'model.visual.*: 40, mtp.*: 15': tensor names counted by their first part (two under ``model.``)."""
    parts = collections.Counter(".".join(n.split(".")[:2 if n.startswith("model.") else 1]) + ".*" for n in names)
    return ", ".join(f"{part}: {n}" for part, n in sorted(parts.items()))


def check_output(out: str | Path, inputs: list[str | Path], overwrite: bool) -> None:
    """Refuse an ``out`` that exists (unless ``overwrite``) or that is, or holds, an input: the output
    replaces the whole directory, so a mistyped ``--out`` (``.``, the HF directory) would lose what is there.
    An earlier output that a killed run had moved aside is restored first, so that this run keeps it too."""
    out = Path(out).resolve()
    for source in inputs:
        source = Path(source).resolve()
        if out == source or out in source.parents:
            raise CheckpointError(f"--out {out} would replace the input {source}: choose another directory")
    recover_replace(out)
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out} exists: pass --overwrite to replace it (the whole directory)")


@contextlib.contextmanager
def atomic_directory(out: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``out``, on failure it is removed
    and ``out`` (if any) is left untouched."""
    out = Path(out)
    host = socket.gethostname()
    for stale in out.parent.glob(f".{out.name}.tmp-{host}-*"):  # left by a killed run (a whole model's size)
        pid = stale.name.rsplit("-", 1)[1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = out.with_name(f".{out.name}.tmp-{host}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, out)


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host (one we may not signal runs too)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def parse_size(text: str) -> int:
    """Bytes of a size such as ``5GB``, ``500MB``, ``2GiB`` or ``1000000``; ValueError naming the text otherwise."""
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    t = text.strip().upper()
    try:
        for unit, factor in units.items():
            if t.endswith(unit):
                return int(float(t[: -len(unit)]) * factor)
        return int(t)
    except ValueError:
        raise ValueError(f"{text!r} is not a size: give e.g. 5GB, 500MB, 2GiB or a number of bytes") from None


def size_argument(text: str) -> str:
    """An argparse type for a size (:func:`parse_size`, which reads it later): a bad one is refused before any work,
    naming the flag."""
    import argparse

    try:
        parse_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text
