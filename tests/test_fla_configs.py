"""Shipped fla kernel configurations (megatron_ext/fla_configs.py): the directory chosen per GPU and Triton
version, the user's own choice kept, and what :func:`dump` writes read back by fla 0.6.0's own lookup code
(``fla/ops/utils/cache.py`` as installed; Triton, which has no CPU build here, replaced by the two names that
module imports). On a GPU, ``tools.gpu_check``'s kernels part reads them back with the real Triton."""

from __future__ import annotations

import importlib.util
import logging
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest

from megatron_ext import fla_configs


def test_the_mode_is_set_unless_the_user_chose_one(monkeypatch):
    monkeypatch.delenv("FLA_CACHE_MODE", raising=False)
    fla_configs.prefer_shipped()
    assert fla_configs.os.environ["FLA_CACHE_MODE"] == "strict"
    monkeypatch.setenv("FLA_CACHE_MODE", "disabled")
    fla_configs.prefer_shipped()
    assert fla_configs.os.environ["FLA_CACHE_MODE"] == "disabled"


def test_the_directory_for_this_gpu_and_triton_is_used_and_a_users_own_wins(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("FLA_CONFIG_DIR", "")  # recorded, so that what use_shipped sets is undone afterwards
    monkeypatch.delenv("FLA_CONFIG_DIR")
    h100 = fla_configs.directory("NVIDIA H100 80GB HBM3", (9, 0), "3.7.1", tmp_path)
    assert h100.name == "NVIDIA_H100_80GB_HBM3_sm90_triton_3.7.1"
    h100.mkdir()
    for name, other_architecture in (("NVIDIA A100-SXM4-80GB", (8, 0)), ("NVIDIA B200", (10, 0))):
        assert fla_configs.use_shipped(name, other_architecture, "3.7.1", tmp_path) is None
    assert "FLA_CONFIG_DIR" not in fla_configs.os.environ
    assert fla_configs.use_shipped("NVIDIA H100 80GB HBM3", (9, 0), "3.8.0", tmp_path) is None  # another Triton
    assert fla_configs.use_shipped("NVIDIA H100 80GB HBM3", (9, 0), "3.7.1", tmp_path) == h100
    assert fla_configs.os.environ["FLA_CONFIG_DIR"] == str(h100)
    monkeypatch.delenv("FLA_CONFIG_DIR")
    # a GPU of the same compute capability without its own (an H200): the H100's, and the log says so
    with caplog.at_level(logging.INFO, logger=fla_configs.log.name):
        assert fla_configs.use_shipped("NVIDIA H200", (9, 0), "3.7.1", tmp_path) == h100
    assert "no fla configurations tuned on NVIDIA H200: using those tuned on another GPU" in caplog.text
    assert str(h100) in caplog.text
    monkeypatch.delenv("FLA_CONFIG_DIR")
    h200 = fla_configs.directory("NVIDIA H200", (9, 0), "3.7.1", tmp_path)
    h200.mkdir()  # its own, once tuned, comes first
    assert fla_configs.use_shipped("NVIDIA H200", (9, 0), "3.7.1", tmp_path) == h200
    monkeypatch.setenv("FLA_CONFIG_DIR", str(tmp_path / "mine"))
    assert fla_configs.use_shipped("NVIDIA H100 80GB HBM3", (9, 0), "3.7.1", tmp_path) == tmp_path / "mine"


@pytest.fixture
def fla_lookup(monkeypatch):
    """fla's config lookup module, loaded from the installed fla-core in strict mode."""
    triton = types.ModuleType("triton")
    triton.__version__ = "3.7.1"
    runtime, autotuner = types.ModuleType("triton.runtime"), types.ModuleType("triton.runtime.autotuner")
    autotuner.Autotuner = type("Autotuner", (), {})
    for name, module in (("triton", triton), ("triton.runtime", runtime), ("triton.runtime.autotuner", autotuner)):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setenv("FLA_CACHE_MODE", "strict")
    path = Path(importlib.util.find_spec("fla").submodule_search_locations[0]) / "ops" / "utils" / "cache.py"
    spec = importlib.util.spec_from_file_location("fla_cache_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _config(**kwargs):
    """What ``triton.Config`` holds."""
    return SimpleNamespace(kwargs=kwargs, num_warps=kwargs.pop("warps"), num_stages=kwargs.pop("stages"),
                           num_ctas=1, maxnreg=None, ir_override=None)


def test_what_dump_writes_fla_finds_by_key(fla_lookup, monkeypatch, tmp_path, caplog):
    bf16, fp32 = "torch.bfloat16", "torch.float32"
    h_key = (16, 16, 128, 128, 64, False, True, bf16, bf16, bf16, fp32)  # H, HV, K, V, BT, flags, dtypes
    tuners = [
        SimpleNamespace(kernel_name="chunk_gated_delta_rule_fwd_kernel_h", cache={
            h_key: _config(BV=32, warps=4, stages=2),
            (16, 16, 128, 128, 64, False, False, bf16, bf16, bf16): _config(BV=64, warps=8, stages=3)}),
        SimpleNamespace(kernel_name="causal_conv1d_fwd_kernel", cache={(6144, 4, bf16, bf16): _config(BD=128, warps=4, stages=1)}),
        # two kernels of one name that chose differently for one key: ambiguous, left out
        SimpleNamespace(kernel_name="chunk_local_cumsum_scalar_kernel", cache={(1, 16, 64, True, False, fp32): _config(warps=2, stages=1)}),
        SimpleNamespace(kernel_name="chunk_local_cumsum_scalar_kernel", cache={(1, 16, 64, True, False, fp32): _config(warps=4, stages=1)}),
    ]
    with caplog.at_level(logging.WARNING):
        written = fla_configs.dump(tuners, tmp_path / "tuned", "3.7.1")
    assert written == {"chunk_gated_delta_rule_fwd_kernel_h": 2, "causal_conv1d_fwd_kernel": 1}
    assert "chunk_local_cumsum_scalar_kernel: two kernels of that name chose differently" in caplog.text
    assert not (tmp_path / "tuned" / "chunk_local_cumsum_scalar_kernel.json").exists()

    monkeypatch.setenv("FLA_CONFIG_DIR", str(tmp_path / "tuned"))
    found = fla_lookup.load_cached_config("chunk_gated_delta_rule_fwd_kernel_h", fla_lookup.AutotuneKey(h_key))
    assert found == {"kwargs": {"BV": 32}, "num_warps": 4, "num_stages": 2, "num_ctas": 1, "maxnreg": None}
    conv = fla_lookup.load_cached_config("causal_conv1d_fwd_kernel", fla_lookup.AutotuneKey((6144, 4, bf16, bf16)))
    assert conv["kwargs"] == {"BD": 128} and conv["num_stages"] == 1
    # strict: another shape (8 heads) or dtype finds nothing and autotunes
    assert fla_lookup.load_cached_config("chunk_gated_delta_rule_fwd_kernel_h",
                                         fla_lookup.AutotuneKey((8,) + h_key[1:])) is None
    assert fla_lookup.load_cached_config("causal_conv1d_fwd_kernel",
                                         fla_lookup.AutotuneKey((6144, 4, fp32, fp32))) is None

    # another process (transformers' batches) adds its shapes; the entries already there stay
    batch_key = (6144, 4, fp32, fp32)
    assert fla_configs.dump([SimpleNamespace(kernel_name="causal_conv1d_fwd_kernel", cache={
        batch_key: _config(BD=64, warps=8, stages=2)})], tmp_path / "tuned", "3.7.1") == {"causal_conv1d_fwd_kernel": 1}
    fla_lookup.load_config_file.cache_clear()  # fla reads each file once per process
    for key, block in (((6144, 4, bf16, bf16), 128), (batch_key, 64)):
        assert fla_lookup.load_cached_config("causal_conv1d_fwd_kernel", fla_lookup.AutotuneKey(key))["kwargs"] == {"BD": block}


SHIPPED = sorted(p for p in fla_configs.ROOT.iterdir() if p.is_dir())


def test_configurations_ship_for_the_h100_with_triton_3_7_1(monkeypatch):
    """Tuned by tools.gpu_check's kernels part on an H100 (2026-11-27, docs/benchmarks.md): the 2B's GDN geometry;
    the H200 (also sm90) takes them."""
    monkeypatch.setenv("FLA_CONFIG_DIR", "")  # recorded, so that what use_shipped sets is undone afterwards
    monkeypatch.delenv("FLA_CONFIG_DIR")
    found = fla_configs.use_shipped("NVIDIA H100 80GB HBM3", (9, 0), "3.7.1")
    assert found in SHIPPED and len(list(found.glob("*.json"))) >= 10
    monkeypatch.delenv("FLA_CONFIG_DIR")
    assert fla_configs.use_shipped("NVIDIA H200", (9, 0), "3.7.1") == found  # the same architecture (Hopper)


def test_this_gpu_files_a_node_as_the_shipped_directories_are_named(monkeypatch):
    """What the trainer's fla path and gpu_check read off the GPU (CUDA-only calls, stood in here), as the lookup and
    the directory names take it: an H200 with Triton 3.7.1 lands on the shipped H100 directory."""
    import torch

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setitem(sys.modules, "triton", SimpleNamespace(__version__="3.7.1"))
    assert fla_configs.this_gpu() == ("NVIDIA H200", (9, 0), "3.7.1")
    monkeypatch.setenv("FLA_CONFIG_DIR", "")  # recorded, so that what use_shipped sets is undone afterwards
    monkeypatch.delenv("FLA_CONFIG_DIR")
    assert fla_configs.use_shipped(*fla_configs.this_gpu()) == SHIPPED[0]


@pytest.mark.parametrize("shipped", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_entry_is_found_by_fla_under_its_own_key(shipped, fla_lookup, monkeypatch):
    """A hand-edited or truncated file, or a key hashed another way, would make fla autotune after all (or read
    a configuration meant for another shape): each entry must be the one fla's lookup returns for its key."""
    import json

    triton_version = shipped.name.rpartition("_triton_")[2]
    monkeypatch.setenv("FLA_CONFIG_DIR", str(shipped))
    fla_lookup.load_config_file.cache_clear()
    for path in sorted(shipped.glob("*.json")):
        data = json.loads(path.read_text())
        assert data["kernel_name"] == path.stem and data["triton_version"] == triton_version, path
        assert data["autotune_entries"], path
        for h, entry in data["autotune_entries"].items():
            assert h == fla_configs.key_hash(entry["autotune_key"]), path
            key = fla_lookup.AutotuneKey(tuple(entry["autotune_key"]))
            assert fla_lookup.load_cached_config(path.stem, key) == entry["config"], path


def test_choices_are_saved_while_tuning_goes_on_and_at_the_end(monkeypatch, tmp_path):
    """A part stopped by its time box keeps what was tuned before: the saver writes as choices come."""
    import json
    import time

    bf16 = "torch.bfloat16"
    tuner = SimpleNamespace(kernel_name="causal_conv1d_fwd_kernel", cache={})
    monkeypatch.setattr(fla_configs, "fla_autotuners", lambda: [tuner])
    path = tmp_path / "tuned" / "causal_conv1d_fwd_kernel.json"

    def entries():
        return json.loads(path.read_text())["autotune_entries"] if path.is_file() else {}

    with fla_configs.saving(tmp_path / "tuned", "3.7.1", every=0.05) as out:
        assert out == tmp_path / "tuned"
        tuner.cache[(6144, 4, bf16, bf16)] = _config(BD=128, warps=4, stages=1)  # the first kernel is tuned
        deadline = time.monotonic() + 10
        while not entries() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(entries()) == 1  # on disk while the body still runs

    with fla_configs.saving(tmp_path / "tuned", "3.7.1", every=3600):  # no round in time: the end saves
        tuner.cache[(2048, 4, bf16, bf16)] = _config(BD=64, warps=4, stages=1)
        time.sleep(0.1)
        assert len(entries()) == 1
    assert len(entries()) == 2


def test_fla_autotuners_are_found_in_flas_modules_also_under_heuristics(monkeypatch):
    """Found through fla's module globals, also when ``triton.heuristics`` wraps the autotuner (fla's usual
    decorator stack), once each, and nothing outside fla."""
    class CachedAutotuner:  # stands in for fla's (its module imports triton, which has no CPU build here)
        def __init__(self, fn=None):
            self.fn, self.cache = fn, {}

    class Heuristics:
        def __init__(self, fn):
            self.fn = fn

    cache = types.ModuleType("fla.ops.utils.cache")
    cache.CachedAutotuner = CachedAutotuner
    plain, wrapped, elsewhere = CachedAutotuner(), CachedAutotuner(fn=lambda: None), CachedAutotuner()
    ops = types.ModuleType("fla.ops.fake")
    ops.kernel, ops.alias, ops.kernel_h, ops.other = plain, plain, Heuristics(wrapped), 3
    outside = types.ModuleType("not_fla")
    outside.kernel = elsewhere
    for module in (cache, ops, outside):
        monkeypatch.setitem(sys.modules, module.__name__, module)
    found = fla_configs.fla_autotuners()
    assert sorted(map(id, found)) == sorted(map(id, [plain, wrapped]))
