"""Tuned configurations for fla's Triton kernels, shipped per GPU and Triton version, so that a node with an
empty kernel cache compiles one configuration per kernel instead of timing every candidate (the first GDN
step on an empty cache took about 100 s on an H100 and 190 s on an H200).

fla 0.6.0 reads them itself (``fla.ops.utils.cache``): with ``FLA_CACHE_MODE=strict``, a kernel whose
autotuning key (head counts and sizes, block sizes, flags, dtypes: never the sequence length) has an entry in
``$FLA_CONFIG_DIR/<kernel>.json`` runs that configuration; any other shape autotunes as before. This module
sets the mode before fla is imported (:func:`prefer_shipped`, from the package ``__init__``), points
``FLA_CONFIG_DIR`` at ``megatron_ext/fla_configs/<GPU> sm<capability> triton <version>/`` when the first fla
kernel runs (:func:`use_shipped`; a user's own ``FLA_CONFIG_DIR`` wins), and writes such a directory from the
choices autotuning made in a process (:func:`dump`; ``tools.gpu_check``'s kernels part does, on a GPU).

A GPU with no directory of its own takes one tuned on another GPU of its compute capability with the same Triton
(an H200 the H100's): Triton compiles a configuration for the capability, whose limits (shared memory and
registers per block) decide whether it runs, so it runs on every GPU of it; what differs between them (SM count,
memory bandwidth) can only make another candidate slightly faster there, where autotuning would cost the node's
first GDN step minutes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import threading
from pathlib import Path

log = logging.getLogger(__name__)
ROOT = Path(__file__).with_name("fla_configs")


def prefer_shipped() -> None:
    """fla looks a kernel's configuration up before autotuning it (exact key only), unless the user chose a
    mode. fla reads the mode once, at its import: this runs first. Without a directory to read nothing changes."""
    os.environ.setdefault("FLA_CACHE_MODE", "strict")


def this_gpu(device=None) -> tuple[str, tuple[int, int], str]:
    """What tuned configurations are filed under for a CUDA ``device`` (default: the current one): its name,
    compute capability and the installed Triton's version, as :func:`directory` and :func:`use_shipped` take them."""
    import torch
    import triton

    return torch.cuda.get_device_name(device), torch.cuda.get_device_capability(device), triton.__version__


def directory(device_name: str, capability: tuple[int, int], triton_version: str, root: Path = ROOT) -> Path:
    """Where the configurations tuned on ``device_name`` (compute capability ``capability``, e.g. ``(9, 0)``) with
    Triton ``triton_version`` live."""
    major, minor = capability
    return root / re.sub(r"[^0-9A-Za-z.]+", "_", f"{device_name} sm{major}{minor} triton {triton_version}")


def use_shipped(device_name: str, capability: tuple[int, int], triton_version: str, root: Path = ROOT) -> Path | None:
    """Point fla at the shipped configurations for this GPU and Triton, else at those of another GPU of the same
    compute capability and Triton (the module's docstring says why they serve). Returns the directory fla reads
    (the user's own ``FLA_CONFIG_DIR`` if set), or None where none ships."""
    if "FLA_CONFIG_DIR" in os.environ:
        return Path(os.environ["FLA_CONFIG_DIR"])
    found = directory(device_name, capability, triton_version, root)
    if not found.is_dir():
        same_kind = directory("", capability, triton_version, root).name  # "_sm90_triton_3.7.1"
        siblings = sorted(p for p in root.glob(f"*{same_kind}") if p.is_dir())  # sanitised names: no glob syntax
        if not siblings:
            log.info("no tuned fla configurations for %s (sm%d%d) with Triton %s: fla autotunes its kernels on first "
                     "use", device_name, *capability, triton_version)
            return None
        found = siblings[0]
        log.info("no fla configurations tuned on %s: using those tuned on another GPU of its compute capability "
                 "(sm%d%d) with the same Triton", device_name, *capability)
    os.environ["FLA_CONFIG_DIR"] = str(found)
    log.info("fla kernels: tuned configurations from %s", found)
    return found


def key_hash(key) -> str:
    """The entry name fla gives an autotuning key (``AutotuneKey.key_hash`` in fla 0.6.0: md5 of the key as
    compact JSON with sorted keys); the kernels part of ``tools.gpu_check`` reads every entry back with fla."""
    return hashlib.md5(json.dumps(_plain(key), separators=(",", ":"), sort_keys=True).encode()).hexdigest()


def _plain(value):
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def dump(autotuners, out_dir: str | Path, triton_version: str) -> dict[str, int]:
    """Write the configurations ``autotuners`` chose (each: ``kernel_name`` and ``cache``, autotuning key ->
    ``triton.Config``, as fla's ``CachedAutotuner`` has them) as fla's ``<kernel>.json`` files in ``out_dir``,
    added to the entries already there (processes that ran other shapes: our packed rows, transformers' batches);
    an entry for the same key is replaced. Two kernels of one name that chose differently for one key would make
    the entry ambiguous: it is left out, with a warning. Returns the number of entries written per kernel."""
    from preprocessing.atomic import write_json_atomic

    entries: dict[str, dict[str, dict]] = {}
    clashes: set[tuple[str, str]] = set()
    for tuner in autotuners:
        for key, config in tuner.cache.items():
            name, h = tuner.kernel_name, key_hash(key)
            entry = {"autotune_key": _plain(key), "config": _config(config)}
            if entries.setdefault(name, {}).setdefault(h, entry) != entry:
                clashes.add((name, h))
    for name, h in clashes:
        log.warning("fla kernel %s: two kernels of that name chose differently for key %s; not written",
                    name, entries[name].pop(h)["autotune_key"])
    out = Path(out_dir)
    for name, tuned in entries.items():
        if tuned:
            path = out / f"{name}.json"
            before = json.loads(path.read_text())["autotune_entries"] if path.is_file() else {}
            write_json_atomic(path, {"kernel_name": name, "triton_version": triton_version,
                                     "autotune_entries": {**before, **tuned}}, indent=1)
    return {name: len(tuned) for name, tuned in entries.items() if tuned}


def _config(config) -> dict:
    """A ``triton.Config`` as fla's reader takes it (kwargs, warps, stages, CTAs, register cap)."""
    out = {"kwargs": dict(config.kwargs), "num_warps": config.num_warps, "num_stages": config.num_stages,
           "num_ctas": config.num_ctas, "maxnreg": config.maxnreg}
    if getattr(config, "ir_override", None) is not None:  # Triton >= 3.4
        out["ir_override"] = config.ir_override
    return out


@contextlib.contextmanager
def saving(out_dir: str | Path, triton_version: str, every: float = 10.0):
    """While the body runs, :func:`dump` what fla has chosen so far whenever it chose more (looked at every
    ``every`` seconds), and once more at its end: a process stopped from outside (a time box, a lease running
    out) keeps the kernels it finished tuning. fla tunes kernel by kernel as each first runs; a cold H100 was
    stopped after 140 s with transformers' shapes part-way and kept none of them. Saving never raises: what
    it could not write is logged, and the body's own exception stays the one that propagates."""
    stop = threading.Event()
    saved_entries = None  # how many entries the last save wrote

    def save():
        nonlocal saved_entries
        try:
            tuners = fla_autotuners()
            entries = sum(len(t.cache) for t in tuners)
            if entries != saved_entries:
                dump(tuners, out_dir, triton_version)
                saved_entries = entries
        except Exception as e:  # e.g. a cache that grew while it was read: the next round gets it
            log.warning("fla configurations not saved to %s this time: %s: %s", out_dir, type(e).__name__, e)

    def rounds():
        while not stop.wait(every):
            save()

    thread = threading.Thread(target=rounds, name="fla-configs", daemon=True)
    thread.start()
    try:
        yield Path(out_dir)
    finally:
        stop.set()
        thread.join()
        save()


def fla_autotuners() -> list:
    """fla's kernels that look their configuration up (``CachedAutotuner``), with what they chose so far:
    found from the module globals of fla's imported modules (its kernels are decorated module-level
    functions; ``triton.heuristics`` often wraps the autotuner, reached through ``.fn``). Cheap enough to run
    beside a timed step, unlike a walk over every object the garbage collector tracks."""
    import sys

    from fla.ops.utils.cache import CachedAutotuner

    found = {}
    for name, module in list(sys.modules.items()):
        if (name == "fla" or name.startswith("fla.")) and module is not None:
            for value in list(vars(module).values()):
                for _ in range(4):  # heuristics -> autotuner -> jit function -> python function
                    if isinstance(value, CachedAutotuner):
                        found[id(value)] = value
                    value = getattr(value, "fn", None)
    return list(found.values())
