"""The trainer's optimizer updates equal plain PyTorch's: a few real training steps (``run_trainer`` on a YAML,
fp32, local backend), exported with tools.convert_to_hf, against transformers' Qwen3.5 with AdamW written out, in
float64, on the same rows in the same micro-batches. It pins what tests/test_model_parity.py (forward and
gradients) cannot: the learning rate of each update, which parameters decay, the loss normalisation over
micro-batches and data-parallel ranks, and clipping by the global norm."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import pytest
import torch
import yaml
from conftest import float64, read_metrics, run_trainer

DEMO = Path(__file__).resolve().parents[1] / "data" / "demo"
L, F = "linear_attention", "full_attention"
VOCAB = 2048  # the demo tokenizer's
U = 2.0 ** -24  # float32's unit roundoff: round to nearest errs by at most U relative
# 5 updates of 4 rows, 2 micro-batches of 2 on one rank (1 on each of 2 ranks), at lr 0 and lr/2 (warmup: 40%),
# lr, lr, then one decayed (decay: the last 40%, starting from lr). Weight decay far above the recipe's 0.1, so
# that decay is ~2% of each matrix's update (lr * wd * |w| ~ 2e-5 per step against Adam's ~1e-3) and a wrong rate
# or group shows above float32's rounding. clip_grad lies among this run's gradient norms (1.24 to 1.41): some
# updates are clipped, some not; checked against the reference's norms, since clipping every update alike would
# be invisible to Adam (scale-invariant) and prove nothing. adam_eps 1e-6, not the recipe's 1e-8: Adam divides
# each gradient element by its own size, so an element whose gradient is within its float32 rounding (~1e-9
# here) of zero moves by up to lr in a direction rounding picks; eps caps that at lr * 1e-9 / eps (with 1e-8, one
# embedding element of the per-token run was off by 1.8e-5, the next worst by 2e-7).
RUN = dict(seq_length=32, global_batch_size=4, micro_batch_size=2, train_iters=5, lr=1e-3, min_lr=1e-4,
           warmup_fraction=0.4, decay_fraction=0.4, decay_style="cosine", weight_decay=1.0, clip_grad=1.3,
           adam_eps=1e-6)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A two-source mix of the demo's short documents (built in 2 s; the whole demo mix takes 10) and a tiny random
    base checkpoint (one GDN and one attention layer), with its HF source."""
    from preprocessing.build_mix import build
    from preprocessing.recipe import MixRecipe
    from tools import convert_from_hf, tiny_qwen35

    root = tmp_path_factory.mktemp("update_parity")
    sources = [dict(name="pubmed", paths=[str(DEMO / "pubmed" / "*.jsonl.gz")], format="jsonl", id_key="pmid",
                    share=0.5),
               dict(name="english", paths=[str(DEMO / "en" / "*.jsonl")], format="jsonl", share=0.5)]
    recipe = dict(tokenizer=str(DEMO / "tokenizer"), seq_length=512, token_budget=1000, heldout_fraction=0.05,
                  sources=sources)
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    build(MixRecipe.load(root / "recipe.yaml", output_dir=str(root / "mix")))
    config = tiny_qwen35.text_config(vocab_size=VOCAB, layer_types=[L, F])
    tiny_qwen35.causal_lm(config, seed=3).save_pretrained(root / "base_hf")
    convert_from_hf.convert(root / "base_hf", root / "base")
    return root


def _config(root: Path, run: str, **overrides) -> Path:
    """A run's YAML, as users write one."""
    cfg = dict(run_dir=str(root / run), init_from=str(root / "base"), mix=str(root / "mix" / "mix.json"),
               precision="fp32", backend="local", eval_interval=0, eval_docs=0, save_interval=0,
               tensorboard=False, **RUN)
    cfg.update(overrides)
    path = root / f"{run}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def wsd_lr(done: int, cfg) -> float:
    """The recipe's Warmup-Stable-Decay lr after ``done`` updates: linear from 0 over the first warmup_fraction
    of the iterations, flat, cosine to min_lr over the last decay_fraction. Update k runs at wsd_lr(k - 1), so
    the first at 0: megatron's convention, not the trainer's slip. OptimizerParamScheduler gives the lr after
    ``num_steps`` updates (megatron/core/optimizer_param_scheduler.py: __init__ calls step(0); get_lr returns
    init_lr + (max_lr - init_lr) * num_steps / lr_warmup_steps during warmup, so init_lr, 0 here, at 0), and the
    trainer, like megatron's own loop, steps it after each update; the decay likewise reaches min_lr only after
    the last update."""
    iters = cfg.train_iters
    warmup, decay = round(cfg.warmup_fraction * iters), round(cfg.decay_fraction * iters)
    if done <= warmup:
        return cfg.lr * done / warmup
    if done <= iters - decay:
        return cfg.lr
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * (done - (iters - decay)) / decay))


def training_rows(cfg) -> list[dict]:
    """The rows the run reads, in order, from the trainer's own dataset code (megatron's blended GPTDataset):
    update k takes rows [k * global_batch_size, (k + 1) * global_batch_size), each micro-batch the next
    micro_batch_size of them (on 2 ranks, rank r the r-th micro-batch of each pair: the same groups)."""
    from megatron_ext.data import load_training_data

    train = load_training_data(cfg, model_vocab=VOCAB).train
    return [train[i] for i in range(cfg.train_iters * cfg.global_batch_size)]


def _row_loss_sum(model, row: dict) -> torch.Tensor:
    """Summed masked next-token loss of a packed row, each document (positions restart at 0) run on its own."""
    starts = (row["position_ids"] == 0).nonzero().flatten().tolist() + [len(row["tokens"])]
    total = 0
    for a, b in zip(starts, starts[1:]):
        logits = model(input_ids=row["tokens"][None, a:b]).logits[0]
        losses = torch.nn.functional.cross_entropy(logits, row["labels"][a:b], reduction="none")
        total = total + (losses * row["loss_mask"][a:b].to(losses.dtype)).sum()
    return total


def reference_run(hf_dir: Path, cfg, rows: list[dict], dtype: torch.dtype, compute: torch.dtype | None = None) -> dict:
    """The run in plain PyTorch in ``dtype``: transformers' model, the loss per micro-batch mean averaged over
    the micro-batches (or, per_token_loss, over every loss token of the global batch), the gradient clipped
    by its global norm (megatron: coefficient clip / (norm + 1e-6), applied below 1), then AdamW (decoupled
    decay, bias-corrected moments, eps outside the root) with no decay on 1-D parameters and biases (megatron's
    default groups: optimizer/__init__.py get_standard_config_overrides; the trainer passes no overrides).
    ``compute``: the dtype of the forward and backward (default ``dtype``), as in a bf16 run: the model holds its
    weights in it, each update is made on master weights in ``dtype`` and copied into the model, rounded.
    Returns the final (master) parameters, and per update the token-weighted loss and the norm before clipping."""
    from transformers import AutoModelForCausalLM

    mode = float64 if dtype == torch.float64 else contextlib.nullcontext
    with mode():
        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).to(compute or dtype)
    params = dict(model.named_parameters())
    master = {n: p.detach().to(dtype) for n, p in params.items()}
    m = {n: torch.zeros_like(p) for n, p in master.items()}
    v = {n: torch.zeros_like(p) for n, p in master.items()}
    b1, b2, eps, gbs, mbs = cfg.adam_beta1, cfg.adam_beta2, cfg.adam_eps, cfg.global_batch_size, cfg.micro_batch_size
    losses, norms = [], []
    for k in range(cfg.train_iters):
        batch = rows[k * gbs:(k + 1) * gbs]
        micro = [batch[i:i + mbs] for i in range(0, gbs, mbs)]
        batch_tokens = sum(r["loss_mask"].sum() for r in batch)
        model.zero_grad()
        loss_sum = 0.0
        with mode():
            for rows_of_micro in micro:
                summed = sum(_row_loss_sum(model, r) for r in rows_of_micro)
                tokens = sum(r["loss_mask"].sum() for r in rows_of_micro)
                (summed / batch_tokens if cfg.per_token_loss else summed / tokens / len(micro)).backward()
                loss_sum += summed.item()
        losses.append(loss_sum / batch_tokens.item())
        norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params.values())).item()
        norms.append(norm)
        clip = min(1.0, cfg.clip_grad / (norm + 1e-6))
        lr = wsd_lr(k, cfg)
        with torch.no_grad():
            for n, p in master.items():
                g = params[n].grad.to(dtype) * clip
                decay = cfg.weight_decay if p.ndim >= 2 and not n.endswith(".bias") else 0.0
                p.mul_(1 - lr * decay)
                m[n].mul_(b1).add_(g, alpha=1 - b1)
                v[n].mul_(b2).addcmul_(g, g, value=1 - b2)
                p.sub_(lr / (1 - b1 ** (k + 1)) * m[n] / ((v[n] / (1 - b2 ** (k + 1))).sqrt() + eps))
                params[n].copy_(p)
    return {"params": {n: p.double() for n, p in master.items()}, "losses": losses, "norms": norms}


@pytest.fixture(scope="module")
def references(setup):
    """Per loss mode: the rows, the float64 reference and its float32 twin (which sizes float32's rounding)."""
    from megatron_ext.train_config import TrainConfig

    out = {}
    for per_token in (False, True):
        cfg = TrainConfig.load(_config(setup, f"reference_{per_token}", per_token_loss=per_token))
        rows = training_rows(cfg)
        out[per_token] = {dtype: reference_run(setup / "base_hf", cfg, rows, dtype)
                          for dtype in (torch.float64, torch.float32)}
        out[per_token]["rows"] = rows
    return out


def _trained_weights(run_dir: Path, out: Path) -> dict[str, torch.Tensor]:
    """The run's last checkpoint as users export it (tools.convert_to_hf), by HF name."""
    from transformers import AutoModelForCausalLM

    from megatron_ext.train import latest_checkpoint
    from tools import convert_to_hf

    convert_to_hf.convert(latest_checkpoint(run_dir), out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    return {n: p.detach().double() for n, p in model.named_parameters()}


@pytest.mark.parametrize("nproc", [1, 2], ids=["1rank", "dp2"])
@pytest.mark.parametrize("per_token_loss", [False, True], ids=["per_micro_batch", "per_token"])
def test_trainer_updates_equal_plain_pytorch_adamw(setup, references, per_token_loss, nproc):
    """Each update's lr is the recipe's WSD value; the logged loss and gradient norm and the final weights are the
    float64 reference's up to float32 rounding; 2 data-parallel ranks give the update of 1 rank with twice the
    micro-batches."""
    from transformers import AutoModelForCausalLM

    from megatron_ext.train_config import TrainConfig

    run = f"run_{'token' if per_token_loss else 'micro_batch'}_{nproc}"
    config = _config(setup, run, per_token_loss=per_token_loss)
    cfg = TrainConfig.load(config)
    run_trainer(config, nproc=nproc)
    ref, ref32, rows = (references[per_token_loss][key] for key in (torch.float64, torch.float32, "rows"))

    # the data the test's premises need: clipping on some updates only; micro-batches of unequal loss-token
    # counts, where the two loss modes weigh tokens differently
    assert min(ref["norms"]) < cfg.clip_grad < max(ref["norms"]), ref["norms"]
    counts = {int(sum(r["loss_mask"].sum() for r in rows[i:i + cfg.micro_batch_size]))
              for i in range(0, len(rows), cfg.micro_batch_size)}
    assert len(counts) > 1, counts

    metrics = read_metrics(setup / run)
    assert [m["step"] for m in metrics] == list(range(1, cfg.train_iters + 1))
    lrs = [wsd_lr(k, cfg) for k in range(cfg.train_iters)]
    assert lrs[0] == 0 and lrs[2] == cfg.lr and cfg.min_lr < lrs[-1] < cfg.lr  # warmup, stable and decay all run
    assert [m["lr"] for m in metrics] == pytest.approx(lrs, rel=1e-12, abs=0)
    # The loss: float32's bound for its longest reduction, the log-softmax over the 2048-word vocabulary (as
    # test_model_parity bounds the logits). The norm: a float32 sum of n non-negative terms errs by at most
    # (n - 1) * U relative in any order of summation, its root by half that; n is the largest parameter's size
    # (megatron sums each parameter's squares apart), and the other half covers the gradients' own rounding. On
    # CPU the trainer's norm is ~1e-5 low: megatron's fallback without Apex takes each norm with torch.norm.
    assert [m["loss"] for m in metrics] == pytest.approx(ref["losses"], rel=VOCAB * U)
    largest = max(p.numel() for p in ref["params"].values())
    assert [m["grad_norm"] for m in metrics] == pytest.approx(ref["norms"], rel=largest * U)

    start = {n: p.detach().double() for n, p in
             AutoModelForCausalLM.from_pretrained(setup / "base_hf", dtype=torch.float32).named_parameters()}
    trained = _trained_weights(setup / run, setup / f"{run}_hf")
    assert trained.keys() == ref["params"].keys()
    # Two float32 errors, per tensor. Every update (at lr > 0) rounds the stored weight: at most U * |w| per element.
    # And the rest: the gradient's rounding, which Adam's per-element normalisation magnifies where a gradient element
    # is small (the GDN gates' dt_bias, A_log and in_proj_a: sums with cancellation, see test_model_parity), and
    # Adam's own float32 arithmetic; no useful a-priori bound, so the float32 twin of the reference measures it. The
    # trainer rounds in another order, so its error is of that size, not that value: twice the sum (the worst tensor
    # uses half of it; a 1% change of lr, weight decay or clip_grad exceeds it 40 times or more).
    _assert_updates_within(trained, ref["params"], ref32["params"], start, sum(lr > 0 for lr in lrs), 2, "float32")


def _assert_updates_within(got: dict, want: dict, twin: dict, start: dict, updates: int, factor: float, what: str):
    """Per tensor, ``got`` within ``factor`` x (the rounding of ``updates`` float32 updates + the twin's distance from
    ``want``) of ``want``; a failure says how much of the tensor's update is off."""
    for name, w in want.items():
        rounding = updates * U * w.norm()
        allowed = factor * (rounding + (twin[name] - w).norm())
        error, moved = (got[name] - w).norm(), (w - start[name]).norm()
        assert error <= allowed, f"{name}: {error / moved:.2e} of its update off the reference, {what} allows {allowed / moved:.2e}"


# The bf16 runs: the recipe's precision and lr. An update of 2e-6 per element is ~1e-4 of a weight (~0.02), far
# below half a bf16 ulp (2^-9 relative, ~4e-5): bf16 weights would not move at all; fp32 master weights round it
# by U * |w| ~ 1e-9, ~1e-3 of itself. Weight decay 20: lr * wd * |w| ~ 8e-7 per step, about 40% of Adam's lr, so
# that decay, too, is well above the bf16 noise (~1% of the update, below); min_lr a tenth of lr, so the last
# update's decayed lr is checked as well.
BF16_RUN = dict(precision="bf16", lr=2e-6, min_lr=2e-7, weight_decay=20.0)


@pytest.fixture(scope="module")
def bf16_references(setup):
    """The bf16 runs' start, the base rounded to bf16 (the trainer loads the fp32 base into its bf16 model and makes
    its fp32 master weights of those), and from it the float64 reference and its twin with a bf16 forward and
    backward (float64 master weights), which sizes the noise a bf16 forward and backward puts into the update."""
    from transformers import AutoModelForCausalLM

    from megatron_ext.train_config import TrainConfig

    rounded = setup / "base_bf16_hf"
    base = AutoModelForCausalLM.from_pretrained(setup / "base_hf", dtype=torch.float32)
    base.to(torch.bfloat16).to(torch.float32).save_pretrained(rounded)
    cfg = TrainConfig.load(_config(setup, "reference_bf16", **BF16_RUN))
    rows = training_rows(cfg)
    return {"start": {n: p.detach().double() for n, p in base.named_parameters()},
            torch.float64: reference_run(rounded, cfg, rows, torch.float64),
            torch.bfloat16: reference_run(rounded, cfg, rows, torch.float64, compute=torch.bfloat16)}


def _master_weights(cfg, model_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The fp32 master weights of the run's last checkpoint, by HF name, as a resumed run gets them: the trainer's
    own model, DDP, optimizer and checkpoint load, in this process (the bf16 weights it exports are those rounded,
    which loses an update of 2e-6). Also checks that the gradients accumulate into fp32 buffers (``main_grad``)."""
    from megatron.core import dist_checkpointing

    from megatron_ext import build_model, hf_mapping
    from megatron_ext.checkpoint import read_config
    from megatron_ext.train import (_load_checkpoint, build_optimizer, data_parallel, latest_checkpoint,
                                    wsd_scheduler)

    path = latest_checkpoint(Path(cfg.run_dir))
    config = read_config(path)
    model = build_model(config, cfg.backend, params_dtype=model_dtype, perform_initialization=False)
    ddp = data_parallel(model, cfg.distributed_optimizer, cfg.overlap_communication)
    optimizer = build_optimizer(ddp, cfg, model_dtype, cfg.distributed_optimizer)
    _load_checkpoint(path, dist_checkpointing.load_common_state_dict(str(path)), model, optimizer,
                     wsd_scheduler(optimizer, cfg, cfg.train_iters), cfg.distributed_optimizer, cfg.fused_adam)
    params = dict(model.named_parameters())
    assert {p.dtype for p in params.values()} == {model_dtype}
    assert {b.grad_data.dtype for b in ddp.buffers} == {p.main_grad.dtype for p in params.values()} == {torch.float32}
    assert {p.main_param.dtype for p in params.values()} == {torch.float32}
    master = {n: p.main_param.detach().view(p.shape).double() for n, p in params.items()}  # 1 rank: the whole shard
    return dict(hf_mapping.megatron_to_hf(config, master.__getitem__, "model."))


@pytest.mark.parametrize("distributed_optimizer, nproc", [(True, 1), (False, 1), (True, 2)],
                         ids=["distributed_optimizer", "plain_optimizer", "distributed_optimizer_dp2"])
def test_bf16_master_weights_take_the_adamw_update_at_the_recipes_lr(setup, bf16_references, distributed_optimizer,
                                                                     nproc):
    """precision: bf16 at lr 2e-6: the fp32 master weights move by the reference's AdamW update (by nothing, were
    they kept in bf16), up to the noise of a bf16 forward and backward; the exported weights are those rounded to
    bf16; the logged lr is the schedule's, loss and gradient norm the reference's to bf16 accuracy. On 2 ranks the
    distributed optimizer holds half the master weights on each, updates its half and all-gathers the bf16 weights,
    as on the flagship's 8 GPUs; its checkpoint is read back on one rank."""
    from megatron_ext.train_config import TrainConfig

    run = f"run_bf16_{'distributed' if distributed_optimizer else 'plain'}_{nproc}"
    config = _config(setup, run, distributed_optimizer=distributed_optimizer, **BF16_RUN)
    cfg = TrainConfig.load(config)
    run_trainer(config, nproc=nproc)
    start, ref, twin = (bf16_references[key] for key in ("start", torch.float64, torch.bfloat16))

    metrics = read_metrics(setup / run)
    lrs = [wsd_lr(k, cfg) for k in range(cfg.train_iters)]
    assert [m["lr"] for m in metrics] == pytest.approx(lrs, rel=1e-12, abs=0)
    # bf16 logits and gradients, the loss and the norm summed in fp32: within bf16's unit roundoff (2^-8) of the
    # float64 values (they read ~1e-5 and ~3e-4 off)
    assert [m["loss"] for m in metrics] == pytest.approx(ref["losses"], rel=2 ** -8)
    assert [m["grad_norm"] for m in metrics] == pytest.approx(ref["norms"], rel=2 ** -8)

    master = _master_weights(cfg, torch.bfloat16)
    assert master.keys() == ref["params"].keys()
    # what the trainer trains and exports is the master weights rounded: the bf16 copy made after each update
    exported = _trained_weights(setup / run, setup / f"{run}_hf")
    for name, weight in master.items():
        assert torch.equal(exported[name], weight.float().bfloat16().double()), name
    # As in the fp32 test, two errors per tensor: the fp32 master weight's rounding at each update (at most U * |w|
    # per element; the whole of the error where an update is below it, e.g. the GDN dt_bias at 1.0), and the bf16
    # forward and backward's, measured by the bf16 twin (~1% of the update; Adam's per-element normalisation keeps it
    # from growing with the bf16 roundoff of small gradient elements, which adam_eps caps). The trainer's noise is
    # another draw of the same size (it reads 0.6x to 1.4x the twin's, per tensor, the small 1-D tensors varying
    # most): three times the sum. A 10% error of lr exceeds it on every weight matrix (2x on the embedding, 3x or more
    # on the rest); master weights updated in bf16 (hardly moving) exceed it 20 times or more.
    _assert_updates_within(master, ref["params"], twin["params"], start, sum(lr > 0 for lr in lrs), 3, "bf16")
