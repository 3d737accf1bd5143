"""Model checkpoints: megatron-core dist_checkpointing (any TP/PP layout loads into any other) plus the
architecture as ``qwen35_config.json``, written to a temporary directory and renamed into place."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.core import CheckpointingException
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

from megatron_ext import parallel
from megatron_ext.parallel import barrier, is_rank0
from megatron_ext.config import Qwen35Config
from megatron_ext.model import Qwen35GPTModel, build_model, widen_parameters

log = logging.getLogger(__name__)

CONFIG_FILE = "qwen35_config.json"
HF_SOURCE_DIR = "hf_source"  # the source HF checkpoint's non-weight files (config, tokenizer, chat template)
HF_TENSORS_FILE = "neurocpt_hf_tensors.json"  # in hf_source/: the source's language-model tensors, by dtype
LATEST_FILE = "latest"  # a run directory's pointer to its newest complete checkpoint
EXTRA_STATE = "_extra_state"  # the state-dict key suffix of torch's Module.get_extra_state
EMBEDDING = "embedding.word_embeddings.weight"


def resolve(ckpt_dir: str | Path) -> Path:
    """A checkpoint directory, or a run directory whose ``latest`` file names one."""
    path = Path(ckpt_dir)
    if (path / LATEST_FILE).is_file():
        path = path / (path / LATEST_FILE).read_text().strip()
    if not (path / CONFIG_FILE).is_file():
        hint = (f": it is an HF checkpoint, convert it first (python -m tools.convert_from_hf --hf-dir {path} --out DIR)"
                if (path / "config.json").is_file() and any(path.glob("*.safetensors")) else "")
        raise FileNotFoundError(f"{path} is not a neurocpt model checkpoint (no {CONFIG_FILE}){hint}")
    return path


def read_config(ckpt_dir: str | Path) -> Qwen35Config:
    return Qwen35Config(**json.loads((resolve(ckpt_dir) / CONFIG_FILE).read_text()))


def save_model(
    model: Qwen35GPTModel,
    out_dir: str | Path,
    extra=None,
    hf_files: list[Path] = (),
    hf_tensors: dict[str, torch.dtype] | None = None,
    hf_left_out: list[str] = (),
    hf_records: dict[str, dict] | None = None,
    rank_state: dict | None = None,
    before_publish=None,
) -> Path:
    """Save ``model`` (all ranks call this) as a dist checkpoint at ``out_dir``, atomically: it appears
    only once complete, replacing an older one of the same name.

    ``extra``: further state saved alongside: a dict, or a function of the model's sharded state dict
    returning one (the optimizer's sharded state needs it); ShardedTensors are sharded, other values go
    to the common file. ``rank_state``: per-rank objects (RNG states). ``hf_files`` (tokenizer, configs)
    are kept under ``hf_source/`` for the export back to HF, with ``hf_tensors``: the source's language-model
    tensors (names relative to its language-model prefix) and their dtypes, which the export restores
    (a checkpoint saved from one carries its ``hf_files``, this record included), and ``hf_left_out``: the names of
    its other tensors (vision tower, MTP head), which an export without a template lacks. ``hf_records``: JSON files
    written there too (an SFT run's ``preprocessing.chat.SFT_CHAT_FILE``), replacing ``hf_files`` of the same name.
    ``before_publish`` runs when everything is written but not yet renamed into place (fault injection in tests).
    """
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    if is_rank0():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    model_state = model.sharded_state_dict()
    state = {"model": model_state, **((extra(model_state) if callable(extra) else extra) or {})}
    _results_queue_without_spawn()
    dist_checkpointing.save(state, str(tmp))
    if rank_state is not None:
        torch.save(rank_state, tmp / f"rank_state_{dist.get_rank() if dist.is_initialized() else 0:05d}.pt")
    if is_rank0():
        (tmp / CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(model.qwen35_config), indent=1))
        if hf_files or hf_tensors or hf_records:
            (tmp / HF_SOURCE_DIR).mkdir()
            for f in hf_files:
                shutil.copy2(f, tmp / HF_SOURCE_DIR / Path(f).name)
            for name, record in (hf_records or {}).items():
                (tmp / HF_SOURCE_DIR / name).write_text(json.dumps(record, indent=1))
        if hf_tensors:
            record = {name: str(dtype).removeprefix("torch.") for name, dtype in hf_tensors.items()}
            (tmp / HF_SOURCE_DIR / HF_TENSORS_FILE).write_text(
                json.dumps({"dtypes": record, "left_out": sorted(hf_left_out)}, indent=1))
    barrier()
    if before_publish is not None:
        before_publish()
    if is_rank0():
        replace_dir(tmp, out)
    barrier()
    return out


def _results_queue_without_spawn() -> None:
    """megatron-core's ``torch_dist`` writer collects its forked writer processes' results through a queue
    served by a multiprocessing Manager it starts with *spawn*: a fresh interpreter that imports the caller's
    main module again (torch, megatron: ~5 s on CPU, 23 s seen on a GPU node at a run's first save). The
    queue only has to cross a fork; a Manager started by fork serves it the same without the import."""
    import multiprocessing

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = multiprocessing.get_context("fork").Manager().Queue()


def replace_dir(new: Path, out: Path) -> None:
    """Put the finished directory ``new`` at ``out``: ``new`` is made durable, the older ``out`` moves aside
    to ``.out.old`` and is removed only once ``new`` is in place. A run killed in between leaves ``.out.old``,
    which the next writer of ``out`` restores or discards (:func:`recover_replace`) before anything else."""
    recover_replace(out)
    fsync_tree(new)
    old = _aside(out, "old")
    if out.exists():
        os.replace(out, old)
    os.replace(new, out)
    fsync(out.parent)
    _discard_old(out)


def recover_replace(out: Path) -> None:
    """Finish what a killed :func:`replace_dir` left: ``.out.old`` without ``out`` is the previous output,
    moved aside just before the kill, and goes back; beside ``out`` it is a replaced one and goes. A copy
    being deleted is renamed first (``.out.trash``), so ``.out.old`` is always whole."""
    old, trash = _aside(out, "old"), _aside(out, "trash")
    shutil.rmtree(trash, ignore_errors=True)
    if not old.exists():
        return
    if out.exists():
        _discard_old(out)
    else:
        os.replace(old, out)
        log.warning("restored %s, which an interrupted replace had moved to %s", out, old.name)


def _aside(out: Path, what: str) -> Path:
    return out.with_name(f".{out.name}.{what}")


def _discard_old(out: Path) -> None:
    old, trash = _aside(out, "old"), _aside(out, "trash")
    if old.exists():
        os.replace(old, trash)
        shutil.rmtree(trash)


def fsync_tree(directory: Path) -> None:
    """Flush every file under ``directory`` and the directories themselves, so that what a rename publishes
    is on disk (an index or config still in the page cache at a crash would be an empty file)."""
    for path in sorted(directory.rglob("*"), reverse=True):
        if path.is_file() or path.is_dir():
            fsync(path)
    fsync(directory)


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def hf_source_files(ckpt_dir: str | Path) -> list[Path]:
    src = resolve(ckpt_dir) / HF_SOURCE_DIR
    return sorted(src.iterdir()) if src.is_dir() else []


def hf_source_tensors(ckpt_dir: str | Path) -> tuple[dict[str, torch.dtype], list[str]]:
    """The source's language-model tensors and dtypes, and the names of its other tensors, as ``save_model``
    recorded them; empty for a checkpoint converted before they were recorded."""
    path = resolve(ckpt_dir) / HF_SOURCE_DIR / HF_TENSORS_FILE
    if not path.is_file():
        return {}, []
    record = json.loads(path.read_text())
    return {name: getattr(torch, dtype) for name, dtype in record["dtypes"].items()}, record.get("left_out", [])


def saved_dtype(ckpt_dir: str | Path) -> torch.dtype:
    """The dtype the checkpoint's weights were saved in: the embedding's (a converted checkpoint may keep a
    few small tensors wider, as its source stored them: :func:`stored_wider`)."""
    return dist_checkpointing.load_tensors_metadata(str(resolve(ckpt_dir)))[EMBEDDING].dtype


def saved_dtype_of(sharded, saved: dict[str, torch.dtype]) -> torch.dtype | None:
    """The dtype a model tensor (a ShardedTensor, or a factory that saves a fused weight in parts: GDN ``in_proj``,
    ``conv1d``, GLU ``linear_fc1``) was saved in, the widest of its parts; None if the checkpoint lacks it."""
    parts = [d for k, d in saved.items() if k == sharded.key or k.startswith(sharded.key + ".")]
    return functools.reduce(torch.promote_types, parts) if parts else None


def stored_wider(model: Qwen35GPTModel, ckpt_dir: str | Path) -> dict[str, torch.dtype]:
    """The model's parameters that the checkpoint stores wider than its weights and than the model holds them,
    with the stored dtype: a converted bf16 release's fp32 GDN ``A_log`` and output norm, in a bf16 model (none
    in an fp32 one). Widened before a load (:func:`~megatron_ext.model.widen_parameters`), they are not rounded;
    in a bf16 run they then train in fp32 and are saved and exported unrounded (a CPT's update to them is
    smaller than one bf16 step)."""
    saved = {key: t.dtype for key, t in dist_checkpointing.load_tensors_metadata(str(resolve(ckpt_dir))).items()}
    weights = saved[EMBEDDING]
    params = dict(model.named_parameters())
    stored = {name: dtype for name, sh in model.sharded_state_dict().items()
              if name in params and hasattr(sh, "key") and (dtype := saved_dtype_of(sh, saved)) is not None}
    return {name: dtype for name, dtype in stored.items()
            if torch.promote_types(dtype, weights) != weights and torch.promote_types(dtype, params[name].dtype) != params[name].dtype}


def load_state(model: Qwen35GPTModel, request: dict, ckpt_dir: str | Path) -> dict:
    """Load ``request`` from a dist checkpoint (its ``"model"`` entry: ``model.sharded_state_dict()``) and the
    model's part into ``model``; returns everything loaded.

    The checkpoint may lack the model's ``_extra_state`` entries (torch's slot for a module's non-tensor
    state), and only those: Transformer Engine's modules keep FP8 scaling state there (its RMSNorm, for one,
    where the local spec's norm has none), so a checkpoint converted or trained under the local spec on a
    CPU node has none of them, and TE starts that state afresh. Any other mismatch fails as before.
    """
    saved = {entry.key for entry in load_sharded_metadata(str(ckpt_dir)).values()}
    request = {**request, "model": {k: v for k, v in request["model"].items() if not (
        isinstance(v, ShardedObject) and k.endswith(EXTRA_STATE) and v.key not in saved)}}
    loaded = dist_checkpointing.load(request, str(ckpt_dir))
    result = model.load_state_dict(loaded["model"], strict=False)
    missing = [k for k in result.missing_keys if not k.endswith(EXTRA_STATE)]
    if missing or result.unexpected_keys:
        raise CheckpointingException(f"{ckpt_dir}: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}")
    return loaded


def load_weights(model: Qwen35GPTModel, ckpt_dir: str | Path) -> None:
    """Load the model tensors of a checkpoint (saved with any TP/PP, either backend) into ``model``."""
    load_state(model, {"model": model.sharded_state_dict()}, resolve(ckpt_dir))


def load_model(
    ckpt_dir: str | Path,
    device: str = "cpu",
    *,
    backend: str = "auto",
    gdn_kernel: str = "auto",
    params_dtype: torch.dtype | None = None,
    tensor_parallel: int = 1,
) -> Qwen35GPTModel:
    """A ready, eval-mode model from a checkpoint; sets up parallel state (1 process) if needed.
    ``params_dtype`` defaults to the dtype the checkpoint was saved in, with the tensors it keeps wider
    kept so (:func:`stored_wider`): the model as saved.

    ``model(input_ids, position_ids)`` returns logits [batch, seq, vocab].
    """
    if not parallel_state.model_parallel_is_initialized():
        parallel.initialize(tensor_parallel=tensor_parallel)
    config = read_config(ckpt_dir)
    if device == "cpu" and backend == "auto":
        backend = "local"
    dtype = params_dtype or saved_dtype(ckpt_dir)
    model = build_model(
        config, backend, gdn_kernel=gdn_kernel, params_dtype=dtype, device=device, perform_initialization=False
    )  # every weight comes from the checkpoint
    if params_dtype is None:
        widen_parameters(model, stored_wider(model, ckpt_dir))
    load_weights(model, ckpt_dir)
    log.info("loaded %s (%s backend) from %s", type(model).__name__, model.backend, resolve(ckpt_dir))
    return model.eval()
