"""The trainer's start-up check of the GPU stack, with faked nodes: each refusal is one line naming what
to install, and it comes before any data or weights are read."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from megatron_ext import gpu_stack
from megatron_ext.gpu_stack import Stack

GOOD = {"torch": "2.11.0+cu130", "triton": "3.7.1", "fla-core": "0.6.0", "flash-linear-attention": "0.6.0",
        "tilelang": None, "transformer-engine": None}
H100, A100 = (9, 0), (8, 0)


def node(capability=H100, **versions) -> Stack:
    return Stack(capability, "NVIDIA H100 80GB HBM3" if capability == H100 else "NVIDIA A100", {**GOOD, **versions})


def test_a_checked_stack_and_the_cpu_path_pass():
    assert gpu_stack.problems(node()) == []
    assert gpu_stack.problems(Stack(None, "cpu", {})) == []  # CPU: pure-torch kernels, nothing to install
    assert gpu_stack.problems(node(triton=None, **{"fla-core": None, "flash-linear-attention": None}), "torch") == []


@pytest.mark.parametrize("capability,versions,message", [
    (H100, {"triton": "3.6.0"}, "triton 3.6.0 computes wrong GDN gradients on Hopper (NVIDIA H100 80GB HBM3; fla #640): "
                                "pip install 'triton>=3.7.1' (or tilelang)"),
    (H100, {"triton": "3.2.0"}, "triton 3.2.0 is older than fla 0.6.0 supports (>= 3.3): pip install 'triton>=3.7.1'"),
    (A100, {"triton": None}, "triton is not installed (fla's kernels are Triton kernels): pip install 'triton>=3.7.1'"),
    (H100, {"fla-core": None, "flash-linear-attention": None},
     "flash-linear-attention is not installed: pip install 'flash-linear-attention==0.6.0' 'fla-core[cuda]==0.6.0' "
     "(or gdn_kernel=torch, much slower)"),
    (A100, {"fla-core": "0.5.0"}, "flash-linear-attention 0.5.0 is not the checked 0.6.0: pip install 'fla-core[cuda]==0.6.0'"),
])
def test_each_refusal_says_what_to_install(capability, versions, message):
    with pytest.raises(SystemExit) as stop:
        gpu_stack.check("auto", node(capability, **versions))
    assert str(stop.value) == f"GPU stack: {message}"


def test_hopper_triton_rule_is_hopper_only_and_tilelang_lifts_it():
    assert gpu_stack.problems(node(A100, triton="3.6.0")) == []  # the bad kernels are sm_90 only
    assert gpu_stack.problems(node(H100, triton="3.6.0", tilelang="0.1.9")) == []  # fla then uses tilelang
    assert gpu_stack.problems(node(H100, triton="3.3.1")) == []  # before the regression


def test_the_trainer_checks_before_reading_data_or_weights(monkeypatch, tmp_path):
    from megatron_ext.train import train
    from megatron_ext.train_config import TrainConfig

    monkeypatch.setattr(gpu_stack, "installed", lambda: node(triton="3.6.0"))
    cfg = TrainConfig(run_dir=str(tmp_path / "run"), init_from=str(tmp_path / "missing_ckpt"),
                      mix=str(tmp_path / "missing_mix.json"))
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit, match="^GPU stack: triton 3.6.0 computes wrong GDN gradients"):
        train(cfg)
    assert signal.getsignal(signal.SIGTERM) is before  # its SIGTERM handler is for the call only (megatron_ext.signals)


@pytest.mark.parametrize("given, kept", [(None, "1"), ("0", "0")])
def test_triton_autotuning_is_kept_on_disk_unless_the_user_chose(given, kept):
    """Set by importing megatron_ext, before fla (whose kernels read it when defined) can be imported."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_CACHE_AUTOTUNING"}
    env.update({"TRITON_CACHE_AUTOTUNING": given} if given else {})
    code = "import os, megatron_ext; print(os.environ['TRITON_CACHE_AUTOTUNING'])"
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert run.stdout.strip() == kept
