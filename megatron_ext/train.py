"""Continued pre-training and SFT of Qwen3.5 on megatron-core.

    python -m megatron_ext.train --config launch/configs/neuro_cpt_2b.yaml [key=value ...]
    torchrun --nproc_per_node 8 -m megatron_ext.train --config ...        (launch/cpt_8gpu.sh, sft_8gpu.sh)

A config with ``sft_data`` (``sft.json`` from preprocessing.build_sft) trains on packed conversations with
their loss masks; otherwise on the CPT mix. Everything else (checkpoints, resume, guards, logging) is shared.

megatron-core does the work: DistributedDataParallel, its optimizer (AdamW, distributed optimizer, fp32
master weights under BF16), OptimizerParamScheduler's Warmup-Stable-Decay schedule, the no-pipelining
forward/backward schedule with gradient accumulation, dist_checkpointing. This file wires them together
and adds what a long CPT run needs: exact resume, atomic checkpoints with a ``latest`` pointer, per-domain
validation, NaN/Inf guards, metrics (jsonl, TensorBoard, optional W&B) and a loss curve.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import faulthandler
import itertools
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import time
import traceback
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megatron_ext.data import FIELDS
from megatron_ext.metrics import Metrics, Progress, memory_gb, plot_losses
from megatron_ext.parallel import is_rank0
from megatron_ext.signals import on_sigterm, record_stop, record_training
from megatron_ext.train_config import TrainConfig
from preprocessing import logs
from preprocessing.atomic import DirectoryInUse, hold_directory
from preprocessing.cli import about

log = logging.getLogger("neurocpt.train")
progress_log = logging.getLogger("neurocpt.progress")  # the step lines: console and train.log
CPU_WARN_PARAMS = 100_000_000  # a model this big on a CPU is a GPU recipe launched by mistake, not a demo
CHECKPOINTS = "checkpoints"
DDP_BUCKET = 40_000_000  # megatron's default gradient-bucket size (elements) up to DP 40


@dataclass
class TrainState:
    step: int = 0
    consumed_samples: int = 0
    skipped_steps: int = 0
    nonfinite_in_a_row: int = 0
    loss_ema: float | None = None
    spikes: int = 0


# ------------------------------------------------------------------------------------------ helpers


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _loss_totals(outputs: list[dict]) -> torch.Tensor:
    """(loss sum, tokens) of this rank's micro-batches, on the device: no host sync per micro-batch."""
    if not outputs:
        return torch.zeros(2, dtype=torch.float64, device=_device())
    return torch.stack([o["lm loss"] for o in outputs]).double().sum(0)


def _mean_loss(outputs: list[dict]) -> float:
    """Token-weighted mean of the micro-batches' ``lm loss`` (sum, tokens) pairs over all ranks (see
    :func:`_reduce_step` for why the whole world)."""
    totals = _loss_totals(outputs)
    dist.all_reduce(totals)
    loss_sum, tokens = totals.tolist()
    return loss_sum / max(tokens, 1.0)


def _reduce_step(outputs: list[dict], ddp, stop_requested: bool) -> tuple[float, bool, bool]:
    """What every rank must agree on after a step, in one all-reduce and one host sync: the token-weighted
    loss over the data-parallel ranks, whether every gradient on every rank is finite, and whether any rank
    got SIGTERM. Summed over the whole world: tensor-parallel ranks hold the same loss sum and token count,
    which leaves the ratio unchanged. Non-finite gradients show in each gradient buffer's sum (inf and NaN
    propagate; no buffer-sized mask is made); a sum overflows only where gradients are already absurd
    (~1e29 each), and such a step is skipped too."""
    sums = torch.stack([b.grad_data.sum(dtype=torch.float32) for b in ddp.buffers + ddp.expert_parallel_buffers])
    nonfinite = (~sums.isfinite()).sum().double().view(1)
    stop = torch.full((1,), float(stop_requested), dtype=torch.float64, device=sums.device)
    totals = torch.cat([_loss_totals(outputs), nonfinite, stop])
    dist.all_reduce(totals)
    loss_sum, tokens, nonfinite_buffers, stopping = totals.tolist()
    return loss_sum / max(tokens, 1.0), nonfinite_buffers == 0, stopping > 0


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = run_dir / CHECKPOINTS / "latest"
    return run_dir / CHECKPOINTS / pointer.read_text().strip() if pointer.is_file() else None


def _rng_state() -> dict:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "tracker": get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


# --------------------------------------------------------------------------------------------- steps


def forward_step(data_iterator, model, nan_now: bool = False):
    """megatron-core forward step: per-token losses from the model, summed under the loss mask. The
    schedule turns the sum into a per-micro-batch mean, or, with ``calculate_per_token_loss`` (SFT), into a
    mean over every loss token of the global batch (megatron's finalize_model_grads divides the gradients
    by that count), so short and long answers weigh by their tokens."""
    batch = next(data_iterator)
    device = next(model.parameters()).device
    packed = batch["documents"].to(device).packed_seq_params()  # found on the host by the loader (collate)
    batch = {k: batch[k].to(device, non_blocking=True) for k in FIELDS}
    losses = model(batch["tokens"], batch["position_ids"], labels=batch["labels"], packed_seq_params=packed)

    def loss_func(output):
        mask = batch["loss_mask"].float()
        loss_sum = (output.float() * mask).sum()
        if nan_now:
            loss_sum = loss_sum * float("nan")
        # clone: the schedule divides the returned loss in place
        return loss_sum, mask.sum().int(), {"lm loss": torch.stack([loss_sum.detach().clone(), mask.sum().detach()])}

    return losses, loss_func


def data_parallel(model, distributed_optimizer: bool = True, overlap: bool = True):
    """megatron's DistributedDataParallel as the trainer runs it (also used by the benchmarks). With
    ``overlap`` the gradient reduce-scatter runs bucket by bucket during the backward of the last
    micro-batch, and the parameter all-gather during the next forward, instead of in one block inside
    optimizer.step(); the gathered parameters arrive lazily (see :func:`_synced_parameters`). On at every DP
    size, 1 included (the collectives then cost nothing), with megatron's 40M-element buckets fixed: the
    distributed optimizer's checkpoint keeps its state per bucket, and the same buckets everywhere let a
    run resume on another DP size (without overlap megatron makes one bucket; its default grows past DP 40)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=distributed_optimizer,
        bucket_size=DDP_BUCKET if overlap else None, overlap_grad_reduce=overlap,
        overlap_param_gather=overlap and distributed_optimizer)
    return DistributedDataParallel(config=model.config, ddp_config=config, module=model)


def build_optimizer(ddp, cfg: TrainConfig, dtype: torch.dtype, distributed: bool = True):
    """megatron's Adam(W) over ``ddp`` as the trainer configures it from ``cfg`` (the benchmarks and the GPU
    check build theirs here too, so that they time the trainer's optimizer step)."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=cfg.lr, min_lr=cfg.min_lr, weight_decay=cfg.weight_decay,
                        adam_beta1=cfg.adam_beta1, adam_beta2=cfg.adam_beta2, adam_eps=cfg.adam_eps,
                        clip_grad=cfg.clip_grad, bf16=dtype == torch.bfloat16, params_dtype=dtype,
                        use_distributed_optimizer=distributed),
        [ddp],
    )
    set_adam_kernel(optimizer, cfg.fused_adam)
    _main_params_in_megatrons_order(optimizer)
    return optimizer


def _main_params_in_megatrons_order(optimizer) -> None:
    """megatron-core 0.16.1's distributed optimizer finds a parameter's main copy and Adam state (for its
    checkpoints) at the parameter's place in the gradient buffers, but puts each group's fp32 parameters
    before its bf16 ones: in a group that has both (the no-weight-decay group of a bf16 model that keeps a
    release's fp32 tensors, :func:`megatron_ext.checkpoint.stored_wider`) it saved another parameter's state
    (the first save stopped on a size mismatch). Index them in the order megatron made them."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if hasattr(opt, "model_param_group_index_map"):
            for group, params in enumerate(zip(opt.model_fp32_groups, opt.model_float16_groups)):
                for order, param in enumerate(itertools.chain(*params)):
                    opt.model_param_group_index_map[param] = (group, order)


def torch_adams(optimizer) -> list[torch.optim.Optimizer]:
    """The torch Adam(W) instances inside megatron's optimizer: megatron falls back to torch's AdamW where
    neither Transformer Engine nor Apex is installed (with them it runs their FusedAdam: none here). AdamW
    subclasses Adam only from torch 2.7 on: both named."""
    inner = (opt.optimizer for opt in getattr(optimizer, "chained_optimizers", [optimizer]))
    return [opt for opt in inner if isinstance(opt, (torch.optim.Adam, torch.optim.AdamW))]


def adam_kernel(optimizer) -> str:
    """What runs the Adam update, for the log ("unfused": torch's default, multi-tensor on GPUs)."""
    kinds = {"torch AdamW, fused kernel" if group["fused"] else "torch AdamW, unfused"
             for adam in torch_adams(optimizer) for group in adam.param_groups}
    return ", ".join(sorted(kinds)) or "FusedAdam of Transformer Engine or Apex"


def set_adam_kernel(optimizer, fused: bool) -> None:
    """Run torch's AdamW as one fused kernel per device and dtype (``fused``), or torch's default (multi-tensor
    foreach: about ten passes over the fp32 master weights and moments, each a full read and write, against
    the fused kernel's one; megatron builds torch's AdamW with the defaults). The flags live in the param
    groups, which a checkpoint's load replaces with the ones it was saved with: apply after every load too.
    Each parameter's ``step`` goes where that kernel reads it (torch's own placement rule: on the
    parameter's device for the fused kernel, on the host otherwise)."""
    for adam in torch_adams(optimizer):
        for group in adam.param_groups:
            group.update(fused=fused, foreach=None)  # None: torch picks foreach where it is not fused
            for param in group["params"]:
                state = adam.state.get(param)
                if state and "step" in state:
                    state["step"] = state["step"].to(device=param.device if fused else "cpu", dtype=torch.float32)


def release(ddp) -> None:
    """Let a model wrapped by :func:`data_parallel` be freed while the process goes on (the benchmarks
    build one after another). megatron's DDP hooks every gradient accumulator (autograd nodes it keeps in
    ``grad_accs``) and, with overlapped parameter gathering, every module's forward, with closures that
    hold the DDP itself; ``gc.collect()`` freed neither, and each 2B benchmark row left about 18 GiB
    allocated on an H200 for the rows after it."""
    ddp.grad_accs.clear()
    if ddp.use_forward_hook:
        ddp.disable_forward_pre_hook(param_sync=False)


# ---------------------------------------------------------------------------------------------- train


def train(cfg: TrainConfig) -> TrainState:
    """Train as ``cfg`` says, resuming from ``run_dir``'s latest checkpoint. SIGTERM (a scheduler preempting the
    job) asks the loop to save after the step it is in and stop, for this call only (megatron_ext.signals). Before
    the loop it keeps the process's own action, by default the end at once (there is nothing to save yet): a
    handler would run only once the rank's C++ call returned, and a rank waiting in one for a peer the signal
    already ended (the process group's start) waited for torchrun's kill, minutes later."""
    with contextlib.ExitStack() as held:
        if int(os.environ.get("RANK", 0)) == 0:  # one job per run_dir: two would save into each other's checkpoints
            held.enter_context(hold_directory(cfg.run_dir, "training run"))
        return _train(cfg, held)


def wsd_scheduler(optimizer, cfg: TrainConfig, iters: int):
    """megatron's Warmup-Stable-Decay schedule over ``iters`` steps: linear warmup from 0 to ``lr``, then ``lr``,
    then ``decay_style`` down to ``min_lr`` over the last ``decay_fraction``; weight decay constant. The bounds
    megatron reads are each parameter group's ``max_lr``/``min_lr``, from build_optimizer's OptimizerConfig, not
    the ``max_lr``/``min_lr`` given here: both come from ``cfg`` (tests/test_update_parity.py checks every update's lr)."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=cfg.lr, min_lr=cfg.min_lr,
        lr_warmup_steps=round(cfg.warmup_fraction * iters), lr_decay_steps=iters, lr_decay_style="WSD",
        start_wd=cfg.weight_decay, end_wd=cfg.weight_decay, wd_incr_steps=iters, wd_incr_style="constant",
        wsd_decay_steps=max(1, round(cfg.decay_fraction * iters)), lr_wsd_decay_style=cfg.decay_style,
    )


def _train(cfg: TrainConfig, held: contextlib.ExitStack) -> TrainState:
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_ext import build_model, gpu_stack, no_apex, parallel
    from megatron_ext.checkpoint import hf_source_files, load_weights, read_config, stored_wider
    from megatron_ext.data import load_training_data, micro_batches, reading_paused
    from megatron_ext.flops import peak_tflops, train_flops_per_token
    from megatron_ext.layers import allreduce_gdn_out_norm_grads
    from preprocessing.chat import SFT_CHAT_FILE

    gpu_stack.check(cfg.gdn_kernel)  # before anything slow: a wrong GPU stack stops here with what to install
    parallel.initialize(tensor_parallel=cfg.tensor_parallel, seed=cfg.seed)
    run_dir = Path(cfg.run_dir)
    resume = latest_checkpoint(run_dir)
    source = resume or (Path(cfg.init_from) if cfg.init_from else None)
    if source is None:
        raise SystemExit("nothing to start from: set init_from to a converted checkpoint (tools.convert_from_hf)")
    qcfg = read_config(source)
    data_info = load_training_data(cfg, qcfg.vocab_size)
    iters = data_info.iters

    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    if cfg.global_batch_size % (cfg.micro_batch_size * dp):
        raise SystemExit(f"global_batch_size {cfg.global_batch_size} is not a multiple of micro_batch_size x DP "
                         f"= {cfg.micro_batch_size} x {dp}")
    num_micro = cfg.global_batch_size // (cfg.micro_batch_size * dp)
    # the checkpoint's common state (scheduler, data position, optimizer kind): read once, a few KB
    common = dist_checkpointing.load_common_state_dict(str(resume)) if resume is not None else None
    plan = _plan(cfg, iters, data_info.files)
    if common is not None:
        _check_same_plan(resume, common.get("plan"), plan)
    dist_opt = _use_distributed_optimizer(cfg, resume, common)

    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    overrides = {"calculate_per_token_loss": cfg.per_token_loss, "compile_elementwise": cfg.compile_elementwise,
                 "gradient_accumulation_fusion": cfg.gradient_accumulation_fusion}
    if cfg.recompute:
        overrides.update(recompute_granularity=cfg.recompute)
        if cfg.recompute == "full":
            overrides.update(recompute_method="uniform", recompute_num_layers=1)
    if cfg.fp8:
        overrides.update(fp8=cfg.fp8, fp8_recipe=cfg.fp8_recipe)
    model = build_model(qcfg, cfg.backend, gdn_kernel=cfg.gdn_kernel, attention_kernel=cfg.attention_kernel,
                        params_dtype=dtype, perform_initialization=False, loss_chunk=cfg.loss_chunk, **overrides)
    _keep_wider(model, stored_wider(model, source), dtype, dist_opt)
    if resume is None:
        load_weights(model, cfg.init_from)
    log.info("activation memory: %s recomputation; output layer and loss %s",
             model.config.recompute_granularity or "no",
             f"in pieces of {model.loss_chunk} tokens" if model.loss_chunk else "at once")
    if model.config.gradient_accumulation_fusion:
        log.info("weight gradients added into the fp32 gradient buffers by their GEMMs (megatron's layers: %s)",
                 no_apex.wgrad_path(dtype, next(model.parameters()).device))
    else:
        log.info("weight gradients written apart, then added into the fp32 gradient buffers")
    if warning := cpu_warning(sum(p.numel() for p in model.parameters()), torch.cuda.is_available()):
        log.warning(warning)
    ddp = data_parallel(model, dist_opt, cfg.overlap_communication)
    def finalize_grads(*args, **kwargs):
        finalize_model_grads(*args, **kwargs)
        allreduce_gdn_out_norm_grads(ddp)

    if ddp.ddp_config.overlap_grad_reduce:  # what was built, not what was asked for (the log line is tested)
        log.info("gradient reduce%s overlapped with compute, in buckets of %d elements",
                 " and parameter gather" * ddp.ddp_config.overlap_param_gather, ddp.ddp_config.bucket_size)
    model.config.finalize_model_grads_func = finalize_grads
    model.config.no_sync_func = ddp.no_sync
    optimizer = build_optimizer(ddp, cfg, dtype, dist_opt)
    scheduler = wsd_scheduler(optimizer, cfg, iters)
    state = TrainState()
    if resume is not None:
        state = _load_checkpoint(resume, common, model, optimizer, scheduler, dist_opt, cfg.fused_adam)
        log.info("resumed from %s at step %d", resume, state.step)
    log.info("Adam update: %s", adam_kernel(optimizer))
    hf_files = hf_source_files(source)
    hf_records = {SFT_CHAT_FILE: data_info.chat} if data_info.chat else None  # kept through the export to HF

    data = micro_batches(data_info.train, state.consumed_samples, cfg.micro_batch_size, dp_rank, dp, cfg.read_ahead)
    eval_sets = data_info.eval_sets
    if is_rank0():
        run_dir.mkdir(parents=True, exist_ok=True)
    metrics = Metrics(run_dir, cfg, state.step)
    if is_rank0():
        (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    flops_per_token = train_flops_per_token(qcfg, cfg.seq_length)
    peak = peak_tflops(torch.cuda.get_device_name() if torch.cuda.is_available() else None, cfg.peak_tflops)
    forward_backward = get_forward_backward_func()
    nan_steps = set(cfg.debug.get("nan_at_steps", []))
    tokens_per_step = cfg.global_batch_size * cfg.seq_length
    if is_rank0():
        log.info("training %d steps of %d x %d tokens; %d micro-batches of %d per rank, DP=%d TP=%d",
                 iters, cfg.global_batch_size, cfg.seq_length, num_micro, cfg.micro_batch_size, dp, cfg.tensor_parallel)

    ddp.train()
    progress = Progress(tokens_per_step)
    stop = {"requested": False}  # from here a SIGTERM saves first
    held.enter_context(on_sigterm(lambda signum, frame: stop.update(requested=True)))
    record_training()
    while state.step < iters:
        t0 = time.perf_counter()
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        out = forward_backward(
            forward_step_func=partial(forward_step, nan_now=state.step + 1 in nan_steps), data_iterator=data,
            model=[ddp], num_microbatches=num_micro, seq_length=cfg.seq_length,
            micro_batch_size=cfg.micro_batch_size, forward_only=False,
        )
        loss, grads_finite, stopping = _reduce_step(out, ddp, stop["requested"])
        state.step += 1
        state.consumed_samples += cfg.global_batch_size
        record = {"step": state.step, "lr": optimizer.param_groups[0]["lr"]}  # this step's, before the scheduler moves it
        if math.isfinite(loss) and grads_finite:
            _, grad_norm, _ = optimizer.step()
            scheduler.step(increment=1)
            state.nonfinite_in_a_row = 0
            if state.loss_ema is not None and loss > cfg.spike_factor * state.loss_ema:
                state.spikes += 1
                log.warning("step %d: loss %.4f is %.1fx its running mean %.4f (spike #%d)",
                            state.step, loss, loss / state.loss_ema, state.loss_ema, state.spikes)
            state.loss_ema = loss if state.loss_ema is None else 0.9 * state.loss_ema + 0.1 * loss
            record.update(loss=loss, grad_norm=grad_norm)
        else:
            state.skipped_steps += 1
            state.nonfinite_in_a_row += 1
            log.warning("step %d: non-finite loss or gradient; update skipped (%d in a row, %d in all)",
                        state.step, state.nonfinite_in_a_row, state.skipped_steps)
            record.update(loss=None, grad_norm=None)
            if state.nonfinite_in_a_row >= cfg.max_nonfinite_in_a_row:
                raise SystemExit(f"halting: {state.nonfinite_in_a_row} non-finite steps in a row at step {state.step}; "
                                 f"resume from the last checkpoint with a lower lr or check the data")
        elapsed = time.perf_counter() - t0
        tps = tokens_per_step / elapsed
        record.update(tokens_per_s=tps,
                      mfu=flops_per_token * tps / (peak * 1e12 * dist.get_world_size()) if peak else None,
                      mem_gb=memory_gb(), skipped_steps=state.skipped_steps, consumed_samples=state.consumed_samples)
        last = state.step == iters
        if cfg.eval_interval and (_due(state.step, cfg.eval_interval) or last):  # 0: no validation
            with _synced_parameters(ddp):
                record.update(_evaluate(ddp, eval_sets, forward_backward, cfg, dp_rank, dp))
        metrics.log(record)
        timing = progress.update(elapsed, iters - state.step)
        if is_rank0() and (_due(state.step, cfg.log_interval) or last):
            progress_log.info(f"step {state.step}/{iters} | loss {record['loss'] if record['loss'] is None else round(record['loss'], 4)}"
                              f" | lr {record['lr']:.2e} | {tps:,.0f} tok/s | mfu {record['mfu'] or 0:.1%} | "
                              f"mem {record['mem_gb']:.1f} GB | {timing}")
        if _due(state.step, cfg.save_interval) or last or stopping:
            with _synced_parameters(ddp), reading_paused(data):  # the save forks its writers
                _save_checkpoint(run_dir, cfg, model, optimizer, scheduler, state, plan, hf_files, hf_records, dist_opt)
        if stopping:
            log.warning("SIGTERM: saved step %d, exiting", state.step)
            record_stop(state.step, run_dir)
            break
    metrics.close()
    if is_rank0():
        plot_losses(run_dir)
    return state


@contextlib.contextmanager
def _synced_parameters(ddp):
    """Every parameter up to date on every rank for the duration. With ``overlap_param_gather`` the
    optimizer step leaves each rank's copy stale outside its own shard until the next training forward
    gathers it bucket by bucket; evaluation and checkpoints need all of it now (megatron's own training loop
    does the same: forward pre-hooks off with a synchronous gather, back on after)."""
    if not ddp.use_forward_hook:
        yield
        return
    ddp.disable_forward_pre_hook(param_sync=True)
    try:
        yield
    finally:
        ddp.enable_forward_pre_hook()


def _evaluate(ddp, eval_sets: dict, forward_backward, cfg: TrainConfig, dp_rank: int, dp: int) -> dict:
    """Validation loss per held-out domain (token-weighted), batches split over DP ranks."""
    ddp.eval()
    out = {}
    with torch.no_grad():
        for domain, batches in eval_sets.items():
            mine = batches[dp_rank::dp]
            res = forward_backward(forward_step_func=forward_step, data_iterator=iter(mine), model=[ddp],
                                   num_microbatches=len(mine), seq_length=cfg.seq_length,
                                   micro_batch_size=cfg.micro_batch_size, forward_only=True) if mine else []
            out[f"val/{domain}"] = _mean_loss(res)
    ddp.train()
    return out


# The distributed optimizer's checkpoint format, the same on save and load. dp_reshardable: each rank writes
# and reads its own shard of the optimizer state in parallel, with no gather and no host copy of the whole
# state (fully_reshardable gathers 12 bytes per parameter, 29 GB at 2B, at every save), and it reshards
# across data-parallel sizes (a 16-GPU run resumes on 8, a 2-rank run on 1), which is what changes between
# jobs of one run. A new tensor-parallel size starts from the weights (init_from) instead. megatron-core
# 0.16.1's default, fully_sharded_model_space, cannot be saved at all (ShardedTensor.flattened_range).
DISTRIBUTED_OPTIMIZER_FORMAT = {"distrib_optim_sharding_type": "dp_reshardable"}


def _keep_wider(model, wider: dict[str, torch.dtype], dtype: torch.dtype, distributed_optimizer: bool) -> None:
    """Train the parameters that the checkpoint stores wider than the model holds them (``wider``: a release's fp32
    GDN tensors in a bf16 run; resumed, as saved) in their own dtype, where the optimizer can checkpoint them:
    megatron-core's plain mixed-precision optimizer pairs its fp32 copies with the optimizer state of bf16
    parameters only."""
    from megatron_ext.model import widen_parameters

    if not wider:
        return
    names = ", ".join(sorted({re.sub(r".*layers[.][0-9]+[.]", "", n) for n in wider}))
    wide = "/".join(sorted({str(d).removeprefix("torch.") for d in wider.values()}))
    if not distributed_optimizer:
        log.warning("distributed_optimizer: false: %d parameters that the checkpoint stores in %s train in %s, "
                    "rounded at load (megatron's plain optimizer cannot checkpoint them wider): %s",
                    len(wider), wide, str(dtype).removeprefix("torch."), names)
        return
    widen_parameters(model, wider)
    log.info("%d parameters stay %s as the checkpoint stores them, the rest is %s: %s", len(wider), wide,
             str(dtype).removeprefix("torch."), names)


def _optimizer_metadata(distributed: bool) -> dict | None:
    return DISTRIBUTED_OPTIMIZER_FORMAT if distributed else None


def _use_distributed_optimizer(cfg: TrainConfig, resume: Path | None, common: dict | None) -> bool:
    """The config's choice (default on), which must match the optimizer state a resumed checkpoint holds."""
    saved = None if common is None else common.get("optimizer_format", {}).get("distributed")
    if cfg.distributed_optimizer is None:
        return True if saved is None else saved
    if saved is not None and saved != cfg.distributed_optimizer:
        kind = "the distributed" if saved else "megatron's plain"
        raise SystemExit(f"{resume} holds {kind} optimizer's state; resume with distributed_optimizer={str(saved).lower()} "
                         f"(or leave it unset)")
    return cfg.distributed_optimizer


def _steps_on_host(state: dict) -> dict:
    """The plain optimizer's checkpoint keeps Adam's step count as a tensor in its common part, which megatron's
    save sends from rank 0 to every rank by pickling: a step on the GPU (the fused kernel keeps it there)
    arrives on cuda:0 of every rank, each opening a context on GPU 0. Saved from the host instead."""
    for key, value in state.items():
        if key == "common_step" and isinstance(value, torch.Tensor):
            state[key] = value.cpu()
        elif isinstance(value, dict):
            _steps_on_host(value)
    return state


# What a resumed run keeps from its checkpoint whatever its config says: megatron restores the learning-rate schedule
# from the checkpoint (peak, floor, warmup and decay lengths) and Adam's hyperparameters with its state, the data
# order is a shuffle of iters x global_batch_size samples whose position the checkpoint holds, and the distributed
# optimizer's checkpoint is laid out in the gradient buckets that overlap_communication sets.
PLAN = ("global_batch_size", "seq_length", "seed", "lr", "min_lr", "weight_decay", "warmup_fraction", "decay_fraction",
        "decay_style", "adam_beta1", "adam_beta2", "adam_eps", "overlap_communication")


def _due(step: int, interval: int) -> bool:
    """Whether an every-``interval``-steps action falls on ``step`` (0: never; the last step is the caller's)."""
    return interval > 0 and step % interval == 0


def cpu_warning(params: int, cuda: bool) -> str | None:
    """A GPU recipe launched where torch sees no CUDA (a CPU build of torch, the wrong PYTHON) trains on gloo,
    with nothing else to say so: said when the model is too big for a CPU to be the plan."""
    if cuda or params <= CPU_WARN_PARAMS:
        return None
    return (f"no CUDA device: training {params / 1e9:.2f}B parameters on the CPU (gloo), hours a step; on a GPU node "
            "check that PYTHON is the environment with a CUDA build of torch")


def _plan(cfg: TrainConfig, iters: int, files: dict[str, str]) -> dict:
    """What a resume must not change: the schedule, the batch geometry, the data and its order (``files``: the
    training files' :func:`~megatron_ext.data.fingerprint`, weights included), and the weights the run started
    from (a resume loads the checkpoint, never init_from: a new init_from would be ignored)."""
    init_from = str(Path(cfg.init_from).resolve()) if cfg.init_from else None
    # the sources as a list: their order is the blend's (dicts compare equal in any order)
    return {"iters": iters, "init_from": init_from, "data": list(files.items()), **{key: getattr(cfg, key) for key in PLAN}}


def _check_same_plan(resume: Path, saved: dict | None, plan: dict) -> None:
    """A resume with another schedule or batch geometry would mix the saved schedule with the new one (a longer run
    at the floor lr for its added steps) and read another shuffle from the saved position (some samples twice,
    others never): refuse it, naming the values. Checkpoints saved before plans were recorded resume unchecked."""
    if saved is None:
        return
    changed = {k: (saved[k], v) for k, v in plan.items() if k in saved and saved[k] != v}
    if "data" in changed:  # name the sources that differ, not all of them
        was, now = (dict(sources) for sources in changed.pop("data"))
        if was == now:
            changed["the sources' order"] = (", ".join(was), ", ".join(now))
        for name in sorted(set(was) | set(now), key=lambda n: (n not in was, n)):
            if was.get(name) != now.get(name):
                changed[f"data {name!r}"] = (was.get(name, "absent"), now.get(name, "absent"))
    if changed:
        raise SystemExit(f"{resume} was trained with " + ", ".join(f"{k}={a}" for k, (a, _) in changed.items())
                         + "; this run's config gives " + ", ".join(f"{k}={b}" for k, (_, b) in changed.items())
                         + ". A resumed run keeps its starting weights, schedule and data order: set them back, or "
                         "change them in a new run (another run_dir, init_from this run's checkpoints)")


def _save_checkpoint(run_dir: Path, cfg: TrainConfig, model, optimizer, scheduler, state: TrainState, plan: dict,
                     hf_files, hf_records, dist_opt: bool) -> None:
    from megatron_ext.checkpoint import fsync, save_model

    checkpoints = run_dir / CHECKPOINTS
    name = f"iter_{state.step:07d}"
    kill_at = cfg.debug.get("kill_in_save_at_step")

    def crash():  # fault injection: die with everything written but nothing published
        if kill_at == state.step:
            os.kill(os.getpid(), signal.SIGKILL)

    save_model(
        model, checkpoints / name,
        extra=lambda model_state: {
            "optimizer": _steps_on_host(optimizer.sharded_state_dict(model_state, metadata=_optimizer_metadata(dist_opt))),
            "optimizer_format": {"distributed": dist_opt, **(_optimizer_metadata(dist_opt) or {})},
            "scheduler": scheduler.state_dict(), "train_state": dataclasses.asdict(state), "plan": plan},
        hf_files=hf_files, hf_records=hf_records, rank_state=_rng_state(), before_publish=crash,
    )
    if is_rank0():
        tmp = checkpoints / "latest.tmp"
        tmp.write_text(name)
        fsync(tmp)
        os.replace(tmp, checkpoints / "latest")  # only now does a restart use the new checkpoint
        fsync(checkpoints)
        _rotate(checkpoints, name, cfg.keep_last)
        log.info("saved %s", checkpoints / name)
    dist.barrier()


def _rotate(checkpoints: Path, saved: str, keep_last: int) -> None:
    """Remove the complete checkpoints before the last ``keep_last`` (0: keep all), never ``saved``, and the
    ``iter_*.tmp`` a killed save or removal left (incomplete, never resumed from: one must not count as a kept
    checkpoint). A checkpoint is renamed to ``iter_N.tmp`` before its files go, so a removal killed half-way leaves
    no ``iter_N`` with files missing (which a converter or a rewind would take for a checkpoint)."""
    for stale in checkpoints.glob("iter_*.tmp"):
        log.info("removing %s: an unfinished save or removal", stale)
        shutil.rmtree(stale, ignore_errors=True)
    complete = sorted(p for p in checkpoints.glob("iter_*") if re.fullmatch(r"iter_\d+", p.name))
    for old in complete[:-keep_last] if keep_last else []:
        if old.name != saved:
            doomed = old.rename(old.with_name(f"{old.name}.tmp"))
            shutil.rmtree(doomed, ignore_errors=True)


@torch.no_grad()  # the fp32 distributed optimizer's main parameters are views of the model's: copy in place
def _load_checkpoint(path: Path, common: dict, model, optimizer, scheduler, dist_opt: bool,
                     fused_adam: bool) -> TrainState:
    from megatron.core.optimizer.distrib_optimizer import HAVE_APEX_OR_TE

    from megatron_ext.checkpoint import load_state

    torch_adam = dist_opt and not HAVE_APEX_OR_TE  # the distributed optimizer on torch's Adam (no TE or Apex)
    distributed_optimizers = getattr(optimizer, "chained_optimizers", [optimizer]) if torch_adam else []
    for opt in distributed_optimizers:
        # It reads the step count from allocated Adam state even when loading: allocate it (a zero-gradient
        # step, as megatron does for its FSDP format); the checkpoint overwrites all of it.
        opt._init_optimizer_states_with_dummy_values()
    model_state = model.sharded_state_dict()
    request = {"model": model_state, "optimizer": optimizer.sharded_state_dict(
        model_state, is_loading=True, metadata=_optimizer_metadata(dist_opt))}
    loaded = load_state(model, request, path)  # a checkpoint saved under the local spec resumes under TE too
    optimizer.load_state_dict(loaded["optimizer"])
    for opt in distributed_optimizers:
        # megatron-core 0.16.1 restores Adam's step count into the param groups, but then copies the step
        # tensors captured before loading (our zero-gradient step's) back over each parameter's, and would
        # share one tensor that torch's Adam increments once per parameter. Each its own, from the groups.
        for group in opt.optimizer.param_groups:
            for param in group["params"]:
                opt.optimizer.state[param]["step"] = torch.tensor(float(group["step"]))
    set_adam_kernel(optimizer, fused_adam)  # the loaded param groups carry the saving run's kernel flags
    scheduler.load_state_dict(common["scheduler"])
    rank_state = path / f"rank_state_{dist.get_rank():05d}.pt"
    if rank_state.is_file():
        _set_rng_state(torch.load(rank_state, weights_only=False))
    else:  # a rank the saving run did not have: the run goes on, but not bit-exactly as it would have
        log.warning("%s has no RNG state for rank %d (saved by fewer ranks): this rank keeps its seeded RNG; a "
                    "resume is bit-exact only on the layout that saved", path, dist.get_rank())
    return TrainState(**common["train_state"])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML run config (launch/configs/)")
    p.add_argument("overrides", nargs="*", help="key=value overrides of config fields")
    p.add_argument("--verbose", action="store_true", help="every library's log on the console (always in run_dir/train*.log)")
    args = p.parse_args(argv)
    try:
        cfg = TrainConfig.load(args.config, args.overrides)
    except ValueError as e:  # a bad key or value: one line, not a traceback (naming the file once)
        raise SystemExit(about(args.config or "config", e)) from None
    rank = int(os.environ.get("RANK", 0))
    # a hung run names where it waits: `kill -USR1 <pid>` prints every thread's stack (a collective one rank
    # never joined, a writer process, a loader worker: forked helpers inherit the handler)
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    log_file = logs.setup(Path(cfg.run_dir) / ("train.log" if rank == 0 else f"train.rank{rank}.log"), args.verbose, rank=rank)
    try:
        train(cfg)
    except DirectoryInUse as e:
        raise SystemExit(str(e)) from None
    except FileNotFoundError as e:  # a mix.json, sft.json or checkpoint that is not there: its path in one line
        with open(log_file, "a") as f:
            traceback.print_exc(file=f)
        raise SystemExit(f"{args.config or 'config'}: {e}") from None


if __name__ == "__main__":
    main()
