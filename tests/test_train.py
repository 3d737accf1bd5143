"""The CPT trainer on CPU: exact resume after SIGKILL, DP=2 == 1 rank with 2x accumulation, a kill during
a checkpoint save, NaN guards, the WSD schedule, metrics and the MFU FLOPs formula."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import hold_in_another_process, kill_after_first_checkpoint, read_metrics, run_trainer, trainer_command

DEMO = Path(__file__).resolve().parents[1] / "data" / "demo"
L, F = "linear_attention", "full_attention"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The demo mix and a tiny random base checkpoint with the demo tokenizer's vocabulary."""
    from preprocessing.build_mix import build
    from preprocessing.recipe import MixRecipe
    from tools import convert_from_hf, tiny_qwen35

    root = tmp_path_factory.mktemp("train")
    build(MixRecipe.load(DEMO / "recipe.yaml", output_dir=str(root / "mix")))
    hf = root / "base_hf"
    tiny_qwen35.causal_lm(tiny_qwen35.text_config(vocab_size=2048, layer_types=[L, F, L, F]), seed=3).save_pretrained(hf)
    convert_from_hf.convert(hf, root / "base")
    return root


def _config(root: Path, run: str, **overrides) -> Path:
    cfg = dict(run_dir=str(root / run), init_from=str(root / "base"), mix=str(root / "mix" / "mix.json"),
               seq_length=128, global_batch_size=4, micro_batch_size=2, train_iters=8, lr=1e-3, min_lr=1e-4,
               warmup_fraction=0.25, decay_fraction=0.25, precision="fp32", backend="local", log_interval=1,
               eval_interval=4, eval_docs=4, save_interval=4, keep_last=2, tensorboard=True)
    cfg.update(overrides)
    path = root / f"{run}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def reference(setup):
    """An uninterrupted 8-step run."""
    run_trainer(_config(setup, "reference"))
    return read_metrics(setup / "reference")


def test_reference_run_logs_learns_and_follows_wsd(reference, setup):
    assert [m["step"] for m in reference] == list(range(1, 9))
    losses = [m["loss"] for m in reference]
    assert losses[-1] < losses[0] - 0.25  # a random model starts learning the demo text
    lrs = [m["lr"] for m in reference]
    # each step's update's lr; 8 steps: warmup 2 (0.25: the first update at 0, as megatron's and transformers'
    # schedules start), stable, cosine decay over the last 2 (0.25) toward min_lr 1e-4
    assert lrs == pytest.approx([0, 5e-4, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3, 5.5e-4])
    for key in ("grad_norm", "tokens_per_s", "mem_gb", "consumed_samples"):
        assert all(m[key] is not None for m in reference), key
    assert {"val/ehr", "val/pubmed_neuro", "val/english"} <= set(reference[3])  # per-domain validation
    run = setup / "reference"
    assert (run / "loss_curve.png").stat().st_size > 5000
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert (run / "checkpoints" / "latest").read_text() == "iter_0000008"
    assert sorted(p.name for p in (run / "checkpoints").glob("iter_*")) == ["iter_0000004", "iter_0000008"]


@pytest.mark.parametrize("style", ["cosine", "linear", "exponential", "minus_sqrt"])
def test_every_decay_style_shapes_the_decay_and_a_misspelt_one_is_refused_at_load(style):
    """The trainer's schedule (the reference run checks cosine end to end): 100 steps, warmup 10, stable, the
    last 20 decaying from lr to min_lr by the style's shape of the fraction r of the decay done. A style megatron
    does not know fails its assert only when the decay begins, 85% into the recipe's run: the config refuses it, as
    it does fractions that make no schedule."""
    import math

    from megatron_ext.train import wsd_scheduler
    from megatron_ext.train_config import TrainConfig

    shape = {"cosine": lambda r: 0.5 * (1 + math.cos(math.pi * r)), "linear": lambda r: 1 - r,
             "exponential": lambda r: 2 * 0.5 ** r - 1, "minus_sqrt": lambda r: 1 - math.sqrt(r)}[style]
    lr, min_lr = 1e-3, 1e-4
    cfg = TrainConfig(lr=lr, min_lr=min_lr, warmup_fraction=0.1, decay_fraction=0.2, decay_style=style)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    scheduler = wsd_scheduler(optimizer, cfg, iters=100)
    lrs = []
    for _ in range(100):
        lrs.append(optimizer.param_groups[0]["lr"])  # the lr the update at this step uses, as the trainer logs it
        scheduler.step(increment=1)
    expected = [lr * s / 10 if s <= 10 else lr if s <= 80 else min_lr + (lr - min_lr) * shape((s - 80) / 20)
                for s in range(100)]
    assert lrs == pytest.approx(expected, rel=1e-12, abs=1e-15)
    with pytest.raises(ValueError, match="decay_style must be one of .*got 'Cosine'"):
        TrainConfig.load(None, ["decay_style=Cosine"])
    for fractions in (["warmup_fraction=-0.05"], ["decay_fraction=-0.1"], ["warmup_fraction=0.5", "decay_fraction=0.6"]):
        with pytest.raises(ValueError, match="must be >= 0 and sum to at most 1"):
            TrainConfig.load(None, fractions)


def test_console_is_quiet_and_the_log_file_has_everything(reference, setup):
    """The trainer's console: its own lines and the TE/Apex fallback once, in one line; megatron's INFO dumps
    (configs, bucket lists) and the libraries' Python warnings only in run_dir/train.log."""
    console = (setup / "reference.out").read_text() + (setup / "reference.err").read_text()
    log = (setup / "reference" / "train.log").read_text()
    for noise in ("Params for bucket", "DistributedDataParallelConfig", "Warning: "):
        assert noise in log and noise not in console, noise
    assert console.count("not installed") == 1 and "Transformer Engine and Apex not installed" in console
    assert "step 8/8" in console and "saved " in console and "saved " in log
    assert "step 8/8 | loss" in log  # the progress lines too: train.log is the run's whole record
    assert len(console.splitlines()) <= 25, console


def test_sigkill_after_a_checkpoint_resumes_bit_exact(reference, setup):
    config = _config(setup, "killed")
    kill_after_first_checkpoint(config)
    assert (setup / "killed" / "checkpoints" / "latest").read_text() == "iter_0000004"
    resumed = run_trainer(config)
    assert "resumed from" in resumed.stderr
    got = read_metrics(setup / "killed")
    assert [m["step"] for m in got] == list(range(1, 9))
    assert [m["loss"] for m in got] == [m["loss"] for m in reference]  # bit-exact on CPU
    assert [m["lr"] for m in got] == [m["lr"] for m in reference]


def test_a_resume_after_a_crash_that_cut_a_metrics_line_keeps_the_history(reference, setup):
    """A full disk, or a node crash, can cut rank 0's last metrics.jsonl line: the resume stopped on it with a bare
    JSONDecodeError naming no file, so the run could not go on. The cut line is dropped with a warning naming it."""
    config = _config(setup, "cut_metrics")
    kill_after_first_checkpoint(config)
    with open(setup / "cut_metrics" / "metrics.jsonl", "ab") as f:
        f.write(b'{"step": 5, "lo' + bytes(20))  # the crash's cut line, and the zeros a lost page leaves
    resumed = run_trainer(config)
    assert "metrics.jsonl:" in resumed.stderr and "not a metrics record" in resumed.stderr
    got = read_metrics(setup / "cut_metrics")
    assert [m["step"] for m in got] == list(range(1, 9))
    assert [m["loss"] for m in got] == [m["loss"] for m in reference]


def test_a_resume_with_another_schedule_or_batch_is_refused(reference, setup):
    """megatron restores the schedule from the checkpoint, and the data order is a shuffle of iters x batch samples:
    a longer run (or another lr) resumed from it mixed the two schedules (its added steps at the floor lr) and read
    another shuffle from the saved position. The run stops before it builds anything, naming the values."""
    # Adam's betas and eps come back with its state (the config's were ignored); overlap_communication sets the
    # distributed optimizer checkpoint's buckets (a flip failed deep in megatron's load on a real model)
    config = _config(setup, "replan", run_dir=str(setup / "reference"), train_iters=12, lr=2e-3, adam_beta2=0.5,
                     overlap_communication=False)
    run = run_trainer(config, check=False)
    assert run.returncode == 1 and (
        f"{setup / 'reference' / 'checkpoints' / 'iter_0000008'} was trained with iters=8, lr=0.001, adam_beta2=0.95, "
        "overlap_communication=True; this run's config gives iters=12, lr=0.002, adam_beta2=0.5, "
        "overlap_communication=False. A resumed run keeps its starting weights, schedule and data order") in run.stderr, \
        run.stderr[-2000:]
    # another mix: the same files under other weights (a new shuffle read from the saved position), named by source
    mix = json.loads((setup / "mix" / "mix.json").read_text())
    mix["sources"]["english"]["weight"] = 0.5
    (setup / "mix" / "reweighted.json").write_text(json.dumps(mix))
    remix = _config(setup, "remix", run_dir=str(setup / "reference"), mix=str(setup / "mix" / "reweighted.json"))
    run = run_trainer(remix, check=False)
    assert run.returncode == 1 and "was trained with data 'english'=weight 0.03, " in run.stderr and \
        "this run's config gives data 'english'=weight 0.5, " in run.stderr, run.stderr[-2000:]
    # a resume loads the checkpoint, never init_from: another init_from (make sft-arms rerun with another CPT_CKPT
    # into the same ARMS_DIR) was ignored, and config.json recorded it as if it had been loaded
    other = _config(setup, "reinit", run_dir=str(setup / "reference"), init_from=str(setup / "base_hf"))
    run = run_trainer(other, check=False)
    assert run.returncode == 1 and (f"was trained with init_from={setup / 'base'}; this run's config gives "
                                    f"init_from={setup / 'base_hf'}.") in run.stderr, run.stderr[-2000:]
    assert json.loads((setup / "reference" / "config.json").read_text())["init_from"] == str(setup / "base")
    assert (setup / "reference" / "checkpoints" / "latest").read_text() == "iter_0000008"


def test_rotation_keeps_complete_checkpoints_and_clears_unfinished_saves(tmp_path):
    """A save killed before its rename leaves iter_N.tmp: it counted as one of keep_last and a complete checkpoint
    was deleted in its place. keep_last 0 keeps every checkpoint."""
    from megatron_ext.train import _rotate

    for name in ("iter_0000002", "iter_0000004", "iter_0000006.tmp", "iter_0000008", ".iter_0000004.old"):
        (tmp_path / name).mkdir()
    _rotate(tmp_path, "iter_0000008", keep_last=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".iter_0000004.old", "iter_0000002", "iter_0000004",
                                                          "iter_0000008"]
    _rotate(tmp_path, "iter_0000008", keep_last=2)
    assert sorted(p.name for p in tmp_path.glob("iter_*")) == ["iter_0000004", "iter_0000008"]
    _rotate(tmp_path, "iter_0000004", keep_last=1)  # never the checkpoint just saved (a rewound run's)
    assert sorted(p.name for p in tmp_path.glob("iter_*")) == ["iter_0000004", "iter_0000008"]


def test_a_removal_killed_half_way_leaves_no_checkpoint_with_files_missing(tmp_path, monkeypatch):
    """The trainer killed while rotation deleted an old checkpoint's files left iter_N with some of them gone, which a
    converter or a rewind took for a checkpoint. The next rotation finishes the removal."""
    from megatron_ext import train

    for name in ("iter_0000002", "iter_0000004", "iter_0000006"):
        (tmp_path / name).mkdir()
        for shard in ("__0_0.distcp", "__1_0.distcp", "common.pt", "metadata.json"):
            (tmp_path / name / shard).write_text(name)
    rmtree = shutil.rmtree

    def killed_after_one_file(path, **kwargs):
        next(Path(path).iterdir()).unlink()
        raise KeyboardInterrupt  # stands in for the kill: nothing after it runs

    monkeypatch.setattr(train.shutil, "rmtree", killed_after_one_file)
    with pytest.raises(KeyboardInterrupt):
        train._rotate(tmp_path, "iter_0000006", keep_last=1)
    for checkpoint in (p for p in tmp_path.iterdir() if re.fullmatch(r"iter_\d+", p.name)):
        assert len(list(checkpoint.iterdir())) == 4, f"{checkpoint.name} has files missing"
    monkeypatch.setattr(train.shutil, "rmtree", rmtree)
    train._rotate(tmp_path, "iter_0000006", keep_last=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000006"]


def test_the_same_sources_in_another_order_are_another_plan(tmp_path):
    """megatron builds the blend in list order: the same files listed in another order give other rows (45 of 200 in
    a helper's run), which a fingerprint compared as a dict let through."""
    from megatron_ext.train import _check_same_plan, _plan
    from megatron_ext.train_config import TrainConfig

    files = {"ehr": "weight 0.5, 10 token bytes, index a", "english": "weight 0.5, 20 token bytes, index b"}
    saved = _plan(TrainConfig(), 8, files)
    _check_same_plan(tmp_path, saved, _plan(TrainConfig(), 8, dict(files)))  # the same: goes on
    with pytest.raises(SystemExit, match="was trained with the sources' order=ehr, english; this run's config gives "
                                         "the sources' order=english, ehr"):
        _check_same_plan(tmp_path, saved, _plan(TrainConfig(), 8, dict(reversed(files.items()))))


def test_intervals_of_zero_mean_never_and_negative_ones_are_refused():
    from megatron_ext.train import _due
    from megatron_ext.train_config import TrainConfig

    assert [_due(s, 0) for s in (1, 2)] == [False, False] and [_due(s, 2) for s in (1, 2, 4)] == [False, True, True]
    for key in ("log_interval", "eval_interval", "save_interval", "keep_last"):
        assert getattr(TrainConfig(**{key: 0}), key) == 0
        with pytest.raises(ValueError, match=f"{key} must be >= 0"):
            TrainConfig(**{key: -1})


def test_adam_runs_torchs_fused_kernel_and_keeps_it_across_a_load(monkeypatch):
    """Without TE or Apex megatron builds torch's AdamW with its multi-tensor default; the trainer runs the
    fused kernel, also after a load that brings back another run's param-group flags."""
    from megatron_ext import Qwen35Config, build_model, parallel
    from megatron_ext.packing import Documents
    from megatron_ext.train import adam_kernel, build_optimizer, data_parallel, release, set_adam_kernel, torch_adams
    from megatron_ext.train_config import TrainConfig
    from tools.tiny_qwen35 import text_config

    calls, fused_adamw = [], torch._fused_adamw_
    monkeypatch.setattr(torch, "_fused_adamw_", lambda *a, **k: calls.append(len(a[0])) or fused_adamw(*a, **k))
    parallel.initialize()
    ids = torch.randint(0, 2048, (1, 32), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(32).expand(1, 32)

    def trained(fused: bool):
        ddp = data_parallel(build_model(Qwen35Config.from_hf(text_config(vocab_size=2048).to_dict()), "local"))
        opt = build_optimizer(ddp, TrainConfig(fused_adam=fused), torch.float32)
        ddp.zero_grad_buffer()
        ddp(ids, pos, labels=ids, packed_seq_params=Documents.from_positions(pos).packed_seq_params()).mean().backward()
        ddp.finish_grad_sync()
        opt.step()
        return ddp, opt

    fused, fused_opt = trained(True)
    per_step = len(calls)  # a call per param group (with and without weight decay)
    assert adam_kernel(fused_opt) == "torch AdamW, fused kernel" and per_step and sum(calls) > 30
    assert {str(s["step"].dtype) for a in torch_adams(fused_opt) for s in a.state.values()} == {"torch.float32"}
    other, foreach_opt = trained(False)
    assert adam_kernel(foreach_opt) == "torch AdamW, unfused" and len(calls) == per_step

    (adam,), (saved,) = torch_adams(fused_opt), torch_adams(foreach_opt)
    adam.load_state_dict(saved.state_dict())  # what a checkpoint's load does to the flags
    assert adam_kernel(fused_opt) == "torch AdamW, unfused"
    set_adam_kernel(fused_opt, True)
    assert adam_kernel(fused_opt) == "torch AdamW, fused kernel"
    fused_opt.step()
    assert len(calls) == 2 * per_step
    for ddp in (fused, other):
        release(ddp)


def test_kill_during_a_save_keeps_the_previous_checkpoint(reference, setup):
    config = _config(setup, "crash_in_save")
    crashed = run_trainer(config, "debug={kill_in_save_at_step: 8}", check=False)
    assert crashed.returncode == -signal.SIGKILL
    checkpoints = setup / "crash_in_save" / "checkpoints"
    assert (checkpoints / "latest").read_text() == "iter_0000004"
    assert not (checkpoints / "iter_0000008").exists()
    from megatron_ext.checkpoint import load_model

    assert load_model(checkpoints).qwen35_config.vocab_size == 2048  # the previous one loads
    resumed = run_trainer(config)
    assert "iter_0000004" in resumed.stderr
    assert [m["loss"] for m in read_metrics(setup / "crash_in_save")] == [m["loss"] for m in reference]


@pytest.fixture(scope="module")
def one_rank(setup):
    run_trainer(_config(setup, "dp1", micro_batch_size=1, train_iters=4, eval_interval=0, save_interval=100))
    return read_metrics(setup / "dp1")


@pytest.mark.parametrize("layout", ["dp2", "tp2", "recompute_full", "loss_chunk", "unfused_wgrad"])
def test_layouts_equal_one_rank(one_rank, setup, layout):
    """DP=2 with half the accumulation, TP=2, full activation recomputation, the loss in pieces of 48
    tokens (of 128), and weight gradients added apart from their GEMMs train like one rank."""
    extra = {"tp2": {"tensor_parallel": 2}, "recompute_full": {"recompute": "full"},
             "loss_chunk": {"loss_chunk": 48}, "unfused_wgrad": {"gradient_accumulation_fusion": False}}.get(layout, {})
    config = _config(setup, layout, micro_batch_size=1, train_iters=4, eval_interval=0, save_interval=100, **extra)
    run_trainer(config, nproc=2 if layout in ("dp2", "tp2") else 1)
    log = (setup / layout / "train.log").read_text()  # what the trainer built, not only what it was asked
    assert {"dp2": "DP=2 TP=1", "tp2": "DP=1 TP=2", "recompute_full": "activation memory: full recomputation",
            "loss_chunk": "output layer and loss in pieces of 48 tokens",
            "unfused_wgrad": "weight gradients written apart, then added"}[layout] in log
    if layout != "unfused_wgrad":
        assert ("weight gradients added into the fp32 gradient buffers by their GEMMs (megatron's layers: one GEMM "
                "adding into the buffer)") in log
    got = read_metrics(setup / layout)
    assert len(got) == len(one_rank) == 4
    for x, y in zip(one_rank, got):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5)
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-4)


def test_overlapped_communication_trains_evaluates_and_saves_like_synchronous(setup):
    """DP=2 overlaps the gradient reduce-scatter with the backward and the parameter all-gather with the next
    forward (the default). Same losses as without overlap; and the evaluation and the checkpoint
    made right after an optimizer step see the updated parameters (stale ones change both)."""
    from megatron_ext.checkpoint import load_model

    for name, overlap in (("overlapped", True), ("synchronous", False)):
        run_trainer(_config(setup, f"dp2_{name}", micro_batch_size=1, train_iters=4, eval_interval=3,
                            save_interval=2, overlap_communication=overlap), nproc=2)  # step 2: a save alone
    overlapped, synchronous = read_metrics(setup / "dp2_overlapped"), read_metrics(setup / "dp2_synchronous")
    assert "gradient reduce and parameter gather overlapped" in (setup / "dp2_overlapped" / "train.log").read_text()
    for key in ("loss", "val/ehr", "val/pubmed_neuro"):
        got, want = [m[key] for m in overlapped if key in m], [m[key] for m in synchronous if key in m]
        assert len(got) == len(want) > 0 and got == pytest.approx(want, rel=1e-6), key
    for step in ("iter_0000002", "iter_0000004"):
        ours, theirs = (load_model(setup / run / "checkpoints" / step) for run in ("dp2_overlapped", "dp2_synchronous"))
        for (name, a), (_, b) in zip(ours.named_parameters(), theirs.named_parameters()):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=0, msg=f"{step} {name}")


@pytest.fixture(scope="module")
def dp2_reference(setup):
    """8 uninterrupted steps on 2 ranks with the distributed optimizer (the default)."""
    run_trainer(_config(setup, "dp2_reference", micro_batch_size=1, eval_interval=0), nproc=2)
    return read_metrics(setup / "dp2_reference")


def test_distributed_optimizer_resumes_bit_exact_and_reshards_to_one_and_four_ranks(dp2_reference, setup):
    from megatron.core import dist_checkpointing

    config = _config(setup, "dp2_killed", micro_batch_size=1, eval_interval=0)
    kill_after_first_checkpoint(config, nproc=2)
    checkpoint = setup / "dp2_killed" / "checkpoints" / "iter_0000004"
    assert (checkpoint.parent / "latest").read_text() == checkpoint.name
    assert dist_checkpointing.load_common_state_dict(str(checkpoint))["optimizer_format"] == {
        "distributed": True, "distrib_optim_sharding_type": "dp_reshardable"}
    for other in ("dp2_to_1", "dp2_to_4"):  # the same step-4 state, to continue on 1 and on 4 ranks
        shutil.copytree(setup / "dp2_killed", setup / other)

    run_trainer(config, nproc=2)
    assert [m["loss"] for m in read_metrics(setup / "dp2_killed")] == [m["loss"] for m in dp2_reference]

    # DP 2 -> 1 and 2 -> 4: the optimizer state reshards. Not bit-exact (the gradient sums run in another
    # order), but a lost or wrong Adam state (step count, moments) moves the loss by ~1e-3.
    for other, nproc in (("dp2_to_1", 1), ("dp2_to_4", 4)):
        run = run_trainer(_config(setup, other, micro_batch_size=1, eval_interval=0), nproc=nproc)
        got = read_metrics(setup / other)
        assert [m["step"] for m in got] == list(range(1, 9))
        for x, y in zip(dp2_reference, got):
            assert y["loss"] == pytest.approx(x["loss"], rel=1e-6, abs=0), other
    assert "has no RNG state for rank 3 (saved by fewer ranks)" in run.stderr

    refused = run_trainer(config, "distributed_optimizer=false", check=False)
    assert refused.returncode != 0
    assert "holds the distributed optimizer's state; resume with distributed_optimizer=true" in refused.stderr


def test_plain_optimizer_resumes_on_two_ranks_and_on_the_other_adam_kernel(dp2_reference, setup):
    """distributed_optimizer: false (moments and fp32 master weights as sharded tensors, Adam's step count in
    the checkpoint's common part, saved from the host: train._steps_on_host), saved by a run on torch's unfused
    AdamW and resumed on the fused kernel: the trainer re-applies its kernel after loading (a checkpoint's
    param groups carry the saving run's), and the Adam state carries over (a lost step count or moments would
    move the losses by ~1e-3; the two kernels round differently, by far less). The reference is the distributed
    optimizer's uninterrupted run: on CPU in fp32 the plain one's 8 losses equal it to the bit."""
    from megatron.core import dist_checkpointing

    config = _config(setup, "plain_killed", micro_batch_size=1, eval_interval=0, distributed_optimizer=False,
                     fused_adam=False)
    kill_after_first_checkpoint(config, nproc=2)
    assert "Adam update: torch AdamW, unfused" in (setup / "plain_killed" / "train.log").read_text()
    common = dist_checkpointing.load_common_state_dict(str(setup / "plain_killed" / "checkpoints" / "iter_0000004"))
    assert common["optimizer_format"] == {"distributed": False}
    assert common["optimizer"]["state"]["common_step"].item() == 4
    resumed = run_trainer(config, "fused_adam=true", nproc=2)
    assert "Adam update: torch AdamW, fused kernel" in resumed.stderr
    got = read_metrics(setup / "plain_killed")
    assert [m["step"] for m in got] == list(range(1, 9))
    for x, y in zip(dp2_reference, got):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5, abs=0)


@pytest.fixture(scope="module")
def release_base(setup):
    """The base converted from a checkpoint stored as the Qwen3.5 releases are: bf16, the GDN's A_log and
    output norm fp32."""
    from tools import convert_from_hf, tiny_qwen35

    hf = shutil.copytree(setup / "base_hf", setup / "release_hf")
    return convert_from_hf.convert(tiny_qwen35.release_dtypes(hf), setup / "release_base")


def test_only_what_the_model_holds_narrower_than_the_checkpoint_is_kept_wider(release_base):
    """In a bf16 model the release's fp32 tensors are kept fp32; in an fp32 model there is nothing to keep (and
    nothing for the trainer to report or warn about)."""
    from megatron_ext import build_model
    from megatron_ext.checkpoint import read_config, stored_wider

    config = read_config(release_base)
    bf16 = stored_wider(build_model(config, "local", params_dtype=torch.bfloat16, device="cpu"), release_base)
    assert sorted(bf16) == [f"decoder.layers.{i}.self_attention.{n}" for i in (0, 2) for n in ("A_log", "out_norm.weight")]
    assert set(bf16.values()) == {torch.float32}
    assert stored_wider(build_model(config, "local", params_dtype=torch.float32, device="cpu"), release_base) == {}


def test_a_bf16_run_keeps_a_releases_fp32_tensors_in_fp32_resumes_and_exports_them_unrounded(setup, release_base):
    """A bf16 run from a release trains the tensors it stores in fp32 (the GDN's A_log and output norm) in fp32:
    in bf16 the load would round the release's values, and a CPT's update to them is below one bf16 step. They
    are saved, resumed and exported unrounded. megatron's distributed optimizer then has bf16 and fp32
    parameters in one group and, sharded over 2 ranks, resumes bit-exactly (megatron 0.16.1 alone saved another
    parameter's state there: train._main_params_in_megatrons_order)."""
    from megatron_ext.checkpoint import load_model
    from tools import convert_to_hf
    from tools.hf_checkpoint import HFCheckpoint

    fields = dict(init_from=str(release_base), precision="bf16", micro_batch_size=1, eval_interval=0, lr=1e-4,
                  min_lr=1e-5)
    run_trainer(_config(setup, "release_reference", **fields), nproc=2)
    config = _config(setup, "release_killed", **fields)
    kill_after_first_checkpoint(config, nproc=2)
    run_trainer(config, nproc=2)
    run = setup / "release_killed"
    assert [m["loss"] for m in read_metrics(run)] == [m["loss"] for m in read_metrics(setup / "release_reference")]
    assert ("4 parameters stay float32 as the checkpoint stores them, the rest is bfloat16: self_attention.A_log, "
            "self_attention.out_norm.weight") in (run / "train.log").read_text()

    base, trained = (dict(load_model(d).named_parameters()) for d in (release_base, run / "checkpoints"))
    release = HFCheckpoint(convert_to_hf.convert(run / "checkpoints", setup / "release_export"))
    for layer in (0, 2):
        for ours, theirs in (("A_log", "A_log"), ("out_norm.weight", "norm.weight")):
            param = trained[f"decoder.layers.{layer}.self_attention.{ours}"]
            exported = release.get(f"model.layers.{layer}.linear_attn.{theirs}")
            assert param.dtype == exported.dtype == torch.float32 and torch.equal(exported, param.detach()), ours
            moved = (param - base[f"decoder.layers.{layer}.self_attention.{ours}"]).abs().max()
            assert 0 < moved < 1e-2, ours  # trained, by less than a bf16 step of these values
            assert not torch.equal(param, param.bfloat16().float()), ours  # never rounded to bf16
    assert trained["embedding.word_embeddings.weight"].dtype == torch.bfloat16


def test_a_bf16_run_on_the_plain_optimizer_rounds_a_releases_fp32_tensors_and_says_so(setup, release_base):
    """megatron's plain mixed-precision optimizer cannot checkpoint fp32 parameters in a bf16 model (it pairs its
    fp32 copies with the state of bf16 parameters only: the first save failed on a shape mismatch), so there
    they train in bf16, as the trainer warns; the run saves and resumes."""
    from megatron.core import dist_checkpointing

    config = _config(setup, "release_plain", init_from=str(release_base), precision="bf16", micro_batch_size=1,
                     eval_interval=0, train_iters=4, save_interval=2, distributed_optimizer=False)
    kill_after_first_checkpoint(config)
    resumed = run_trainer(config)
    assert "resumed from" in resumed.stderr and len(read_metrics(setup / "release_plain")) == 4
    assert ("distributed_optimizer: false: 4 parameters that the checkpoint stores in float32 train in bfloat16, "
            "rounded at load") in (setup / "release_plain" / "train.log").read_text()  # the first run's
    saved = dist_checkpointing.load_tensors_metadata(str(setup / "release_plain" / "checkpoints" / "iter_0000004"))
    assert saved["decoder.layers.0.self_attention.A_log"].dtype == torch.bfloat16


def test_trains_from_a_moved_mix_on_a_node_without_datatrove(setup, tmp_path):
    """A training node: datatrove cannot be imported, and the mix was built elsewhere and moved here."""
    moved = tmp_path / "elsewhere" / "mix"
    shutil.copytree(setup / "mix", moved)
    mix = json.loads((moved / "mix.json").read_text())
    paths = [mix["tokenizer"]] + [s[k] for s in mix["sources"].values() for k in ("prefix", "heldout")]
    assert not any(Path(p).is_absolute() for p in paths), paths
    (tmp_path / "blocker" / "datatrove").mkdir(parents=True)
    (tmp_path / "blocker" / "datatrove" / "__init__.py").write_text("raise ImportError('no datatrove on this node')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "blocker")}
    assert subprocess.run([sys.executable, "-c", "import datatrove"], env=env, capture_output=True).returncode != 0
    config = _config(setup, "no_datatrove", mix=str(moved / "mix.json"), train_iters=2, eval_interval=2,
                     save_interval=100)
    run = subprocess.run(trainer_command(config), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    got = read_metrics(setup / "no_datatrove")
    assert [m["step"] for m in got] == [1, 2] and "val/ehr" in got[1]


def test_micro_batches_are_read_ahead_in_order_by_a_bounded_thread_that_hands_on_its_errors():
    import threading

    from megatron_ext.data import ReadAhead

    produced, threads = [], set()

    def rows(n: int, error: Exception | None = None):
        for i in range(n):
            threads.add(threading.current_thread().name)
            produced.append(i)
            yield i
        if error:
            raise error

    batches = ReadAhead(rows(10, ValueError("shard 3: record 17 is not JSON")), depth=2)
    assert next(batches) == 0
    deadline = time.time() + 30
    while len(produced) < 4 and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)
    assert produced == [0, 1, 2, 3]  # one taken, two waiting, one being handed over: then the reader waits
    assert [next(batches) for _ in range(9)] == list(range(1, 10)) and threads == {"read-ahead"}
    with pytest.raises(ValueError, match="record 17"):
        next(batches)
    assert list(batches) == []  # and then it has ended
    assert list(ReadAhead(rows(3), depth=1)) == [0, 1, 2]


def test_read_ahead_pauses_for_a_checkpoint_save():
    """While paused (a save forks its writers) the thread neither reads nor starts a read: the read in progress
    finishes first, and what was read before still comes out."""
    from megatron_ext.data import ReadAhead, reading_paused

    reads, inside = [], []

    def rows():
        for i in range(50):
            reads.append(i)
            inside.append(i)
            time.sleep(0.05)  # a read takes a while: the pause comes during one
            inside.pop()
            yield i

    batches = ReadAhead(rows(), depth=2)
    assert next(batches) == 0  # the buffer has room: the thread is reading on
    with reading_paused(batches):
        assert not inside
        started = len(reads)
        assert [next(batches) for _ in range(started - 1)] == list(range(1, started))
        time.sleep(0.3)  # the buffer has room again, but no read starts
        assert len(reads) == started and not inside
    assert next(batches) == started
    with reading_paused(iter([0])):  # read in the step (read_ahead: 0): nothing to pause
        pass


def test_progress_keeps_the_compiling_first_step_out_of_average_and_eta(monkeypatch):
    from megatron_ext import metrics

    clock = iter([100.0, 101.0, 104.0])  # wall clock at the end of steps 1, 2, 3
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(clock))
    progress = metrics.Progress(tokens_per_step=1000)
    assert progress.update(95.0, steps_left=3) == "first step 95s (compiling kernels; not in avg or eta)"
    assert progress.update(1.0, steps_left=2) == "avg 1,000 tok/s | eta 2s"
    assert progress.update(3.0, steps_left=1) == "avg 500 tok/s | eta 2s"  # 2 steps in 4 s of wall clock


def test_sigterm_saves_and_exits_then_resumes(reference, setup):
    """SIGTERM saves and exits; SIGUSR1 before it prints every thread's stack and the run goes on."""
    config = _config(setup, "sigterm")
    with open(config.with_suffix(".err"), "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "megatron_ext.train", "--config", str(config)],
                                stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        metrics = setup / "sigterm" / "metrics.jsonl"
        deadline = time.time() + 300
        for steps, sig in ((1, signal.SIGUSR1), (2, signal.SIGTERM)):  # SIGTERM: what a scheduler sends to preempt
            while (not metrics.exists() or len(metrics.read_text().splitlines()) < steps) and time.time() < deadline:
                time.sleep(0.05)
            proc.send_signal(sig)
        assert proc.wait(timeout=300) == 0
    stacks = config.with_suffix(".err").read_text()
    assert "most recent call first" in stacks and "megatron_ext/train.py" in stacks, stacks[-2000:]
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    stopped_at = len(read_metrics(setup / "sigterm"))
    assert 2 <= stopped_at < 8
    assert (setup / "sigterm" / "checkpoints" / "latest").read_text() == f"iter_{stopped_at:07d}"
    run_trainer(config)
    assert [m["loss"] for m in read_metrics(setup / "sigterm")] == [m["loss"] for m in reference]


def test_the_launcher_ends_with_status_0_after_the_ranks_saved_on_a_sigterm(setup):
    """Through launch/cpt_8gpu.sh (torchrun, 2 ranks): a SIGTERM to torchrun, as a scheduler sends it, reaches the
    ranks, which save and stop; the launcher then ends with status 0 and one line naming the step saved, where
    torchrun's own status, 1 and a traceback, made the job a failed one (a job queued to resume it with Slurm's
    afterok never started)."""
    launcher = Path(__file__).resolve().parents[1] / "launch" / "cpt_8gpu.sh"
    run_dir = setup / "sigterm_launcher"
    config = _config(setup, "sigterm_launcher", train_iters=40, eval_interval=0, save_interval=100)
    env = {**os.environ, "GPUS_PER_NODE": "2", "PYTHON": sys.executable}
    with open(config.with_suffix(".err"), "w") as err:
        proc = subprocess.Popen([str(launcher), str(config)], env=env, stdout=subprocess.DEVNULL, stderr=err,
                                start_new_session=True)
        try:
            deadline = time.time() + 300
            metrics = run_dir / "metrics.jsonl"
            while (not metrics.exists() or len(metrics.read_text().splitlines()) < 2) and time.time() < deadline:
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=300)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    stderr = config.with_suffix(".err").read_text()
    stopped_at = len(read_metrics(run_dir))
    assert code == 0 and "Traceback" not in stderr, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == (f"stopped by SIGTERM after the ranks saved step {stopped_at} in {run_dir}: "
                                               "run the same command to resume"), stderr[-3000:]
    assert 2 <= stopped_at < 40 and (run_dir / "checkpoints" / "latest").read_text() == f"iter_{stopped_at:07d}"


def test_the_launcher_ends_with_status_0_on_a_sigterm_before_the_ranks_train(setup):
    """A SIGTERM while the ranks start (here: once the first is in train(), starting the process group, loading the
    model) loses no step: status 0 and a line saying so, where torchrun's status 1 made the job a failed one (and
    broke a Slurm afterok chain); and it ends them at once (a rank waiting in the process group's start for a peer
    the signal had ended waited for torchrun's kill, 300 s later, when the trainer's handler was set this early)."""
    launcher = Path(__file__).resolve().parents[1] / "launch" / "cpt_8gpu.sh"
    run_dir = setup / "sigterm_at_start"
    config = _config(setup, "sigterm_at_start", train_iters=40, eval_interval=0)
    env = {**os.environ, "GPUS_PER_NODE": "2", "PYTHON": sys.executable}
    proc = subprocess.Popen([str(launcher), str(config)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not (run_dir / "train.log").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert proc.returncode == 0 and "Traceback" not in stderr, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == ("stopped by SIGTERM before the ranks began training (nothing to save "
                                               "yet): run the same command to resume"), stderr[-3000:]
    assert not (run_dir / "checkpoints").exists()


def test_the_launcher_fails_a_sigterm_that_ended_training_without_a_save(monkeypatch, capsys):
    """What the ranks told the launcher decides its status after a SIGTERM (torchrun stood in for, as the two
    tests above run it for the other cases): training with no save after it (the ranks killed mid-save) fails as
    torchrun does, a save or nothing begun ends with status 0 and says which."""
    import torch.distributed.run
    from torch.distributed.elastic.multiprocessing.api import SignalException

    from megatron_ext import launch
    from megatron_ext.signals import STOPPED_FILE_ENV

    monkeypatch.setenv(STOPPED_FILE_ENV, "")  # launch.main sets it for its ranks: unset again after the test
    for said in ("training", "saved step 7 in /runs/a", ""):
        def torchrun(argv, said=said):
            Path(os.environ[STOPPED_FILE_ENV]).write_text(said)
            raise SignalException("got signal 15", sigval=signal.SIGTERM)

        monkeypatch.setattr(torch.distributed.run, "main", torchrun)
        if said == "training":
            with pytest.raises(SignalException):
                launch.main([])
        else:
            launch.main([])
            assert capsys.readouterr().err.startswith(f"stopped by SIGTERM {'after the ranks ' + said if said else 'before'}")


def test_nonfinite_steps_are_skipped_counted_and_halt(setup):
    config = _config(setup, "nan", train_iters=6, eval_interval=0, save_interval=100, spike_factor=0.5)
    run = run_trainer(config, "debug={nan_at_steps: [3]}", "--verbose")
    assert "spike #" in run.stderr  # with factor 0.5 every later loss counts as a spike: the warning works
    assert "Params for bucket" in run.stderr  # --verbose: megatron's INFO on the console too
    m = read_metrics(setup / "nan")
    assert m[2]["loss"] is None and m[2]["skipped_steps"] == 1 and m[-1]["skipped_steps"] == 1
    assert all(x["loss"] is not None and x["loss"] == x["loss"] for i, x in enumerate(m) if i != 2)
    # the schedule does not advance on a skipped step: 6 steps (2 warmup, 2 cosine decay toward 1e-4) with step 3
    # skipped end one schedule step short (advancing, the last would be 5.5e-4)
    assert [x["lr"] for x in m] == pytest.approx([0, 5e-4, 1e-3, 1e-3, 1e-3, 1e-3])
    halted = run_trainer(_config(setup, "nan_halt", train_iters=6, eval_interval=0, save_interval=100,
                            max_nonfinite_in_a_row=2), "debug={nan_at_steps: [2, 3]}", check=False)
    assert halted.returncode != 0 and "halting: 2 non-finite steps in a row at step 3" in halted.stderr


def test_launcher_uses_a_standalone_rendezvous_on_one_node_and_the_given_master_on_several(tmp_path):
    """One node needs no port from anyone (torchrun binds a free one: two jobs on a node do not collide);
    several nodes meet at MASTER_ADDR:MASTER_PORT."""
    fake = tmp_path / "python"  # PYTHON: prints the torchrun command line instead of running it
    fake.write_text('#!/bin/sh\necho "$@"\n')
    fake.chmod(0o755)
    launcher = Path(__file__).resolve().parents[1] / "launch" / "cpt_8gpu.sh"
    env = {k: v for k, v in os.environ.items() if k not in ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT")}

    def command(**more: str) -> list[str]:
        run = subprocess.run([str(launcher), "c.yaml", "lr=1e-5"], env={**env, "PYTHON": str(fake), **more},
                             capture_output=True, text=True, check=True)
        return run.stdout.split()

    one = command(GPUS_PER_NODE="2")
    assert one[:7] == ["-m", "megatron_ext.launch", "--standalone", "--local-addr", "127.0.0.1", "--nproc_per_node", "2"]
    assert one[7:] == ["-m", "megatron_ext.train", "--config", "c.yaml", "lr=1e-5"]
    several = command(NNODES="2", NODE_RANK="1", MASTER_ADDR="10.0.0.1")
    assert "--standalone" not in several
    assert " ".join(several).startswith("-m megatron_ext.launch --nnodes 2 --node_rank 1 --master_addr 10.0.0.1 "
                                        "--master_port 29500 --nproc_per_node 8 -m megatron_ext.train")
    assert "--master_port 29611" in " ".join(command(MASTER_PORT="29611"))  # a port given on one node is used
    # a MASTER_ADDR a scheduler exports on one node: still standalone (a fixed port 29500 failed a second job)
    assert command(MASTER_ADDR="10.0.0.1")[2] == "--standalone"
    # several nodes without the first node's address each waited on their own loopback, silently
    for missing in ({"NODE_RANK": "1"}, {"MASTER_ADDR": "10.0.0.1"}):
        run = subprocess.run([str(launcher), "c.yaml"], env={**env, "PYTHON": str(fake), "NNODES": "2", **missing},
                             capture_output=True, text=True)
        assert run.returncode == 2 and "NNODES=2: set MASTER_ADDR" in run.stderr and not run.stdout
    # overrides without a config: the recipe's config, from any working directory
    run = subprocess.run([str(launcher), "run_dir=/x"], env={**env, "PYTHON": str(fake)}, capture_output=True,
                         text=True, check=True, cwd=tmp_path)
    assert run.stdout.split()[-3:] == ["--config", f"{launcher.parent}/configs/neuro_cpt_2b.yaml", "run_dir=/x"]
    assert Path(run.stdout.split()[-2]).is_file()
    # time for the ranks' save after a SIGTERM before torchrun kills them (its default: 30 s)
    fake.write_text('#!/bin/sh\necho "$TORCH_ELASTIC_SHUTDOWN_TIMEOUT"\n')
    assert command() == ["300"] and command(TORCH_ELASTIC_SHUTDOWN_TIMEOUT="900") == ["900"]


def test_the_slurm_script_starts_the_launcher_on_each_node_with_its_rank(tmp_path):
    """launch/slurm.sh under sbatch (Slurm's srun and scontrol stood in for): every node's launcher gets the
    allocation's node count, its own rank and the first node's name, from any folder sbatch ran its copy in; one node
    keeps the standalone rendezvous; the GPUs per node are Slurm's."""
    root = Path(__file__).resolve().parents[1]
    fake = tmp_path / "python"  # PYTHON: prints the torchrun command line instead of running it
    fake.write_text('#!/bin/sh\necho "$@"\n')
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "NNODES", "NODE_RANK", "MASTER_", "GPUS_"))}
    env.update(PYTHON=str(fake), PATH=f"{Path(__file__).parent / 'fake_slurm'}:{env['PATH']}", SLURM_SUBMIT_DIR=str(root))
    spool = tmp_path / "spool"  # where sbatch keeps its copy of the script, and runs it from
    spool.mkdir()
    shutil.copy(root / "launch" / "slurm.sh", spool / "slurm_script")

    def command(**slurm: str) -> str:
        run = subprocess.run(["bash", str(spool / "slurm_script"), "c.yaml", "lr=1e-5"], env={**env, **slurm},
                             cwd=spool, capture_output=True, text=True, check=True)
        return run.stdout.strip()

    assert command(SLURM_JOB_NUM_NODES="2", SLURM_NODEID="1", SLURM_JOB_NODELIST="gpu01,gpu02", SLURM_GPUS_ON_NODE="4") \
        == ("-m megatron_ext.launch --nnodes 2 --node_rank 1 --master_addr gpu01 --master_port 29500 --nproc_per_node 4 "
            "-m megatron_ext.train --config c.yaml lr=1e-5")
    assert command(SLURM_JOB_NUM_NODES="1", SLURM_NODEID="0", SLURM_JOB_NODELIST="gpu07").startswith(
        "-m megatron_ext.launch --standalone --local-addr 127.0.0.1 --nproc_per_node 8 -m megatron_ext.train")


def test_overrides_and_bad_config(tmp_path):
    from megatron_ext.train_config import TrainConfig

    cfg = TrainConfig.load(None, ["lr=3e-5", "recompute=selective", "debug={nan_at_steps: [1]}"])
    assert cfg.lr == 3e-5 and cfg.recompute == "selective" and cfg.debug == {"nan_at_steps": [1]}
    with pytest.raises(ValueError, match="key=value"):
        TrainConfig.load(None, ["learning_rate=1"])
    with pytest.raises(ValueError, match="precision"):
        TrainConfig.load(None, ["precision=fp16"])
    with pytest.raises(ValueError, match="loss_chunk"):
        TrainConfig.load(None, ["loss_chunk=-1"])
    from megatron_ext import train

    def refused(*args: str) -> str:  # the one line `python -m megatron_ext.train` prints (SystemExit's message)
        with pytest.raises(SystemExit) as stop:
            train.main(list(args))
        return str(stop.value)

    assert "backend: te" in refused("fp8=hybrid")
    # paths and names stay the text given; numbers as YAML misreads them are read as numbers; a wrong type is named
    cfg = TrainConfig.load(None, ["run_dir=2026-01-15", "init_from=off", "train_iters=1e3", "fp8=null", "mix=1"])
    assert (cfg.run_dir, cfg.init_from, cfg.train_iters, cfg.fp8, cfg.mix) == ("2026-01-15", "off", 1000, None, "1")
    for bad, named in (("train_iters=many", "train_iters: expected a number"), ("eval_interval=true", "eval_interval"),
                       ("tensorboard=3", "tensorboard: expected bool"), ("lr=[1]", "lr: expected")):
        with pytest.raises(ValueError, match=named):
            TrainConfig.load(None, [bad])
    # a missing or malformed file, or an override where the config belongs: one line naming it, from every command
    (tmp_path / "bad.yaml").write_text("lr: [1\n")
    (tmp_path / "unknown.yaml").write_text("lr_max: 1\n")
    for args, says in ((["--config", str(tmp_path / "none.yaml")], "cannot read the config"),
                       (["--config", str(tmp_path / "bad.yaml")], "cannot read the config"),
                       (["--config", "run_dir=/x"], "is not a config file: give the config first")):
        assert says in refused(*args)
    # the command itself: that line alone, no traceback, the file named once
    unknown = str(tmp_path / "unknown.yaml")
    run = subprocess.run([sys.executable, "-m", "megatron_ext.train", "--config", unknown], capture_output=True, text=True)
    assert run.returncode != 0 and "Traceback" not in run.stderr, run.stderr[-1500:]
    assert f"{unknown}: unknown keys ['lr_max']" in run.stderr and run.stderr.count(unknown) == 1, run.stderr[-1500:]


def test_a_second_run_into_a_held_run_dir_stops_before_it_reads_anything(tmp_path):
    """A requeued job beside the one still running, or a launch typed twice: both would save into one checkpoints/
    (each deleting the other's half-written checkpoint, rotation counting both). The second stops with one line
    naming the first, before it loads a checkpoint (there is none here to load)."""
    run_dir = tmp_path / "run"
    holder = hold_in_another_process(run_dir)
    try:
        run = subprocess.run([sys.executable, "-m", "megatron_ext.train", f"run_dir={run_dir}",
                              f"init_from={tmp_path / 'none'}"], capture_output=True, text=True, timeout=300)
    finally:
        holder.kill()
        holder.wait()
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert run.stderr.strip().splitlines()[-1].startswith(
        f"{run_dir} is in use by another training run (pid {holder.pid} on "), run.stderr[-3000:]
    assert not (run_dir / "checkpoints").exists()


def test_a_big_model_on_a_machine_without_cuda_is_warned_about():
    from megatron_ext.train import cpu_warning

    assert "no CUDA device: training 2.00B parameters on the CPU" in cpu_warning(2_000_000_000, cuda=False)
    assert cpu_warning(2_000_000_000, cuda=True) is None and cpu_warning(1_300_000, cuda=False) is None  # the demo


def test_flops_count_every_matmul_weight():
    """The parameter part of the MFU formula equals 2 FLOPs per weight of every linear layer + LM head."""
    from megatron_ext import Qwen35Config, build_model
    from megatron_ext.flops import forward_flops_per_token

    config = Qwen35Config(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                          layer_types=[L, L, L, F], num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                          linear_key_head_dim=8, linear_value_head_dim=12, linear_num_key_heads=2,
                          linear_num_value_heads=4, tie_word_embeddings=False)
    model = build_model(config, "local", device="cpu")
    weights = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "word_embeddings" not in n)
    assert forward_flops_per_token(config, 4096)["matmul_params"] == 2 * weights


def test_flops_of_attention_and_the_gdn_core_against_the_kernels_own_count():
    """The non-parameter parts of the MFU formula against torch's FLOP counter on the model's own CPU kernels
    (forward, one 128-token row): the masked attention computes every query-key pair, so the formula's causal
    attention is exactly half of it; the torch GDN kernel computes each 64-token chunk square in full, so the
    formula's delta rule + conv lies between half of that count and all of it. The training total is 3x the
    forward (backward 2x) over the same parts: a dropped term, a missing causal half or a wrong factor fails."""
    from torch.utils.flop_counter import FlopCounterMode

    from megatron_ext import Qwen35Config, build_model
    from megatron_ext.flops import forward_flops_per_token, train_flops_per_token

    types = [F, L, L, F]
    config = Qwen35Config(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                          layer_types=types, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                          linear_key_head_dim=8, linear_value_head_dim=12, linear_num_key_heads=2,
                          linear_num_value_heads=4, tie_word_embeddings=False)
    model = build_model(config, "local", device="cpu")
    s = 128
    ids = torch.randint(0, 512, (1, s), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), FlopCounterMode(display=False, depth=None) as counter:
        model(ids)
    counts = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    layer = "Qwen35GPTModel.decoder.layers.{}.self_attention".format
    attention = sum(counts[layer(i) + ".core_attention"] for i, t in enumerate(types) if t == F)
    gdn = sum(counts[layer(i)] - counts[layer(i) + ".in_proj"] - counts[layer(i) + ".out_proj"]
              for i, t in enumerate(types) if t == L)
    matmuls = counts["Global"] - attention - gdn  # every linear layer and the LM head
    parts = forward_flops_per_token(config, s)
    assert attention > 0 and gdn > 0
    assert parts["matmul_params"] * s == matmuls
    assert parts["attention_scores"] * s == attention / 2  # causal: half of the square the masked kernel computes
    assert gdn / 2 <= parts["gdn_core"] * s <= gdn
    train = train_flops_per_token(config, s) * s
    assert 3 * (matmuls + attention / 2 + gdn / 2) <= train <= 3 * (matmuls + attention / 2 + gdn)


def test_the_logged_loss_is_the_mean_over_loss_tokens_not_over_micro_batches():
    """forward_step's per-micro-batch (loss sum, tokens) pairs, reduced as the step and the validation reduce them:
    the mean over every loss token. Micro-batches of 3 and 9 loss tokens (as SFT's are): a mean of the micro-batch
    means weighs the 3 tokens like the 9 and differs; in CPT, where every micro-batch has the same number of loss
    tokens, it would agree, and every comparison between runs reduces both sides the same way."""
    import types

    from megatron_ext import parallel
    from megatron_ext.data import collate
    from megatron_ext.train import _mean_loss, _reduce_step, forward_step

    parallel.initialize()

    class GivenLosses(torch.nn.Module):  # the model's per-token losses, given
        def __init__(self, losses):
            super().__init__()
            self.anchor = torch.nn.Parameter(torch.zeros(1))
            self.losses = losses

        def forward(self, tokens, position_ids, labels=None, packed_seq_params=None):
            return self.losses

    gen = torch.Generator().manual_seed(0)
    outputs, total, tokens = [], 0.0, 0
    for n in (3, 9):
        mask = torch.zeros(1, 16)
        mask[0, torch.randperm(16, generator=gen)[:n]] = 1
        losses = torch.rand(1, 16, generator=gen, dtype=torch.float64) * 10
        row = {"tokens": torch.zeros(16, dtype=torch.long), "labels": torch.zeros(16, dtype=torch.long),
               "loss_mask": mask[0], "position_ids": torch.arange(16)}
        out, loss_func = forward_step(iter([collate([row])]), GivenLosses(losses))
        outputs.append(loss_func(out)[2])
        total, tokens = total + (losses * mask).sum().item(), tokens + n
    want = total / tokens
    assert _mean_loss(outputs) == pytest.approx(want, rel=1e-6)
    ddp = types.SimpleNamespace(buffers=[types.SimpleNamespace(grad_data=torch.ones(4))], expert_parallel_buffers=[])
    loss, finite, stopping = _reduce_step(outputs, ddp, False)
    assert loss == pytest.approx(want, rel=1e-6) and finite and not stopping
    ddp.buffers[0].grad_data[2] = float("nan")
    assert _reduce_step(outputs, ddp, True)[1:] == (False, True)


def test_peak_flops_by_gpu_name_tell_the_variants_apart():
    """MFU's denominator: an H100 PCIe (756 dense BF16 TFLOP/s) or an NVL card (835) read as an SXM one (989) would
    understate their MFU by 24% and 16%."""
    from megatron_ext.flops import peak_tflops

    names = {"NVIDIA H100 80GB HBM3": 989, "NVIDIA H200": 989, "NVIDIA H100 PCIe": 756, "NVIDIA H100 NVL": 835,
             "NVIDIA H200 NVL": 835, "NVIDIA A100-SXM4-80GB": 312, "NVIDIA L40S": 362, "NVIDIA T4": None}
    assert {name: peak_tflops(name) for name in names} == names
    assert peak_tflops("NVIDIA H100 PCIe", override=700) == 700 and peak_tflops(None) is None


def test_sigterm_before_the_first_step_ends_the_run_at_once(monkeypatch, tmp_path):
    """Before the loop there is nothing to save: a SIGTERM then has the process's own action (by default the end at
    once, which reaches a rank inside a C++ call; a Python handler would wait for it to return), and train() leaves
    the process's SIGTERM handler as it found it. Here the process's handler is the test's, which raises."""
    import signal

    from megatron_ext import gpu_stack
    from megatron_ext.train import train
    from megatron_ext.train_config import TrainConfig

    class Terminated(Exception):
        pass

    def process_handler(signum, frame):
        raise Terminated

    monkeypatch.setattr(gpu_stack, "check", lambda kernel: os.kill(os.getpid(), signal.SIGTERM))  # during start-up
    before = signal.signal(signal.SIGTERM, process_handler)
    try:
        with pytest.raises(Terminated):
            train(TrainConfig(run_dir=str(tmp_path / "run"), init_from=str(tmp_path / "missing")))
        assert signal.getsignal(signal.SIGTERM) is process_handler
    finally:
        signal.signal(signal.SIGTERM, before)


def test_a_missing_checkpoint_or_mix_is_named_in_one_line(setup, tmp_path):
    """A mistyped init_from or mix (or a HF directory given as init_from) ends the trainer with one line naming the
    path; the traceback goes to train.log only."""
    for name, overrides, says in (
            ("no_init", {"init_from": str(tmp_path / "none")}, f"{tmp_path / 'none'} is not a neurocpt model checkpoint"),
            ("hf_init", {"init_from": str(setup / "base_hf")},
             f"it is an HF checkpoint, convert it first (python -m tools.convert_from_hf --hf-dir {setup / 'base_hf'} --out DIR)"),
            ("no_mix", {"mix": str(tmp_path / "mix.json")}, f"{tmp_path / 'mix.json'}: not found (run python -m preprocessing.build_mix")):
        config = _config(tmp_path, name, **{**overrides, **({} if "init_from" in overrides else {"init_from": str(setup / "base")})})
        run = subprocess.run([sys.executable, "-m", "megatron_ext.train", "--config", str(config)], capture_output=True,
                             text=True, timeout=300)
        assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr[-3000:]
        assert says in run.stderr.strip().splitlines()[-1], run.stderr[-3000:]
        assert "Traceback" in (tmp_path / name / "train.log").read_text()
