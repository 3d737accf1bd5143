"""tools/bench_train.py without a GPU: rows that run out of memory are reported and the run goes on, and
ratios to transformers are taken only between rows with the same memory policy."""

from __future__ import annotations

import re
import time

import pytest

import torch

from tools import bench_train
from tools.bench_train import Result, Setup, TrainStep


RELEASED = []


def _setup(name: str, memory: str, seconds: float | Exception, baseline: bool = False) -> Setup:
    def build(config, seq, micro_batch):
        def forward_backward():
            if isinstance(seconds, Exception):
                raise seconds
            return seconds

        return TrainStep(forward_backward, lambda: None, lambda: RELEASED.append(name))

    return Setup(name, memory, build, baseline)


def test_failing_rows_are_reported_and_the_others_still_run(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(bench_train, "_time_steps", lambda step, warmup, iters: (step.forward_backward(), 0.5, 40.0, 30.0, 9.0))
    setups = [_setup("a", "none", 2.0), _setup("b", "none", torch.OutOfMemoryError("CUDA out of memory")),
              _setup("c", "full", 4.0), _setup("d", "full", NotImplementedError("no kernel for head_dim 256"))]
    results = bench_train.measure(seqs=(64, 128), setups=setups)  # the 2B shape's FLOPs, H100 peak
    assert [(r.setup.name, r.seq, r.seconds, r.failure) for r in results] == [
        (name, seq, seconds, failure) for seq in (64, 128)
        for name, seconds, failure in [("a", 2.0, ""), ("b", None, "OOM"), ("c", 4.0, ""), ("d", None, "NotImplementedError")]]
    assert results[0].tokens_per_s == 32 and 0 < results[0].mfu < results[4].mfu  # twice the tokens in the same time
    # 32 micro-batches of 1.5 s each and one update of 0.5 s: 48.5 s for 32 times the tokens of a 2 s step
    assert results[0].mfu_accumulated == pytest.approx(results[0].mfu * 32 * 2.0 / 48.5, rel=1e-12)
    assert bench_train.cells(results[1]) == ["OOM"] * 7 and bench_train.cells(results[3])[0] == "NotImplementedError"
    assert RELEASED == ["a", "b", "c", "d"] * 2  # every row's model released, a failed one's too


def test_a_released_data_parallel_model_is_freed():
    """megatron's DDP hooks hold the DDP itself; without :func:`release` a benchmark row's model stayed
    allocated for the rows after it (about 18 GiB per 2B row on an H200)."""
    import gc
    import weakref

    from megatron_ext import build_model, parallel
    from megatron_ext.packing import Documents
    from megatron_ext.train import build_optimizer, data_parallel, release
    from megatron_ext.train_config import TrainConfig
    from megatron_ext import Qwen35Config
    from tools.tiny_qwen35 import text_config

    parallel.initialize()
    model = build_model(Qwen35Config.from_hf(text_config().to_dict()), "local")
    ddp = data_parallel(model)  # overlapped: forward pre-hooks too
    opt = build_optimizer(ddp, TrainConfig(), torch.float32)
    ids = torch.randint(0, model.qwen35_config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(32).expand(1, 32)
    for _ in range(2):  # the second forward runs the parameter-gather hooks
        ddp.zero_grad_buffer()
        opt.zero_grad()
        packed = Documents.from_positions(pos).packed_seq_params()
        ddp(ids, pos, labels=ids, packed_seq_params=packed).mean().backward()
        ddp.finish_grad_sync()
        opt.step()
    refs = [weakref.ref(x) for x in (model, ddp)]
    release(ddp)
    del model, ddp, opt
    gc.collect()
    assert [r() for r in refs] == [None, None]


def test_ratios_compare_the_same_memory_policy_and_each_sides_best_that_fits_is_labelled():
    ours_full, ours_none, hf_full, hf_none = (_setup("ours", "full", 0), _setup("ours", "none", 0),
                                              _setup("hf", "full", 0, True), _setup("hf", "none", 0, True))
    def ran(setup, seconds, peak, tokens_per_s):
        return Result(setup, 64, seconds, update_seconds=0.25, peak_gib=peak, resident_gib=20.0, tokens_per_s=tokens_per_s)

    rows = [ran(ours_full, 2.0, 30.0, 32.0), ran(ours_none, 1.0, 50.0, 64.0), ran(hf_full, 3.0, 35.0, 64 / 3),
            Result(hf_none, 64, failure="OOM")]
    lines = bench_train.table(rows, accumulate=8)
    assert "| MFU at 8 micro-batches per update |" in lines[0]
    assert lines[2].startswith("| ours | full | 64 | 2.000 | 0.250 | 32 | n/a | n/a |") and lines[2].endswith("| 1.50x |")
    assert lines[3].endswith("| 50.0 | 20.0 |  |")  # no transformers row with this policy fits: no ratio
    assert lines[5] == "| hf | none | 64 | " + "OOM | " * 7 + " |"
    assert lines[-1] == "| 64 | ours [none]: 64 tok/s, 50.0 GiB | hf [full]: 21 tok/s, 35.0 GiB | 3.00x |"


def test_a_step_is_timed_in_its_two_phases(monkeypatch):
    """The update's time apart from the step's (sleeps stand in for the phases: lower bounds only)."""
    for name in ("synchronize", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 3 * 2**30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda: 2**30)
    phases = []
    step = TrainStep(lambda: phases.append("fb") or time.sleep(0.01), lambda: phases.append("up") or time.sleep(0.05))
    seconds, update, peak, resident, first = bench_train._time_steps(step, warmup=1, iters=2)
    assert phases == ["fb", "up"] * 3
    assert update >= 0.05 and seconds - update >= 0.01 and (peak, resident) == (3.0, 1.0)
    assert first >= 0.06  # the warm-up step: both phases
    assert bench_train._time_steps(step, warmup=0, iters=1)[4] is None


def test_te_rows_without_transformer_engine_say_so_and_build_nothing(monkeypatch):
    from megatron_ext import spec

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(spec, "transformer_engine_error", lambda: "ImportError: No module named 'transformer_engine'")
    te = [s for s in bench_train.SETUPS if s.needs_te]
    assert [s.name for s in te] == ["te-bf16", "te-bf16, compiled elementwise", "te-fp8-delayed", "te-fp8-tensorwise"]
    results = bench_train.measure(seqs=(4096,), setups=te)  # building one would fail: no CUDA here
    assert [(r.setup.name, r.failure) for r in results] == [(s.name, "needs TE") for s in te]


def test_profile_step_writes_where_a_step_spends_its_time(tmp_path):
    a = torch.randn(256, 256, generator=torch.Generator().manual_seed(0))
    counts = bench_train.profile_step(lambda: (a @ a).relu_().sum(), tmp_path / "rows" / "ours-full-4096.txt")
    text = (tmp_path / "rows" / "ours-full-4096.txt").read_text()
    device, by_operator, by_own, by_cumulative = re.split(r"\nHost time, by [^\n]*\n", text)
    for table in device, by_operator:
        assert "Name" in table and "aten::mm" in table and "aten::relu_" in table
    assert "Self CPU" in by_operator.splitlines()[2]
    assert "Ordered by: internal time" in by_own and "Ordered by: cumulative time" in by_cumulative
    for functions in by_own, by_cumulative:  # the Python calls of the step itself
        assert "relu_" in functions and "<lambda>" in functions
    # matmul, relu_, sum: what they call inside ATen (mm, clamp_min_, fill_, ...) is not counted again
    assert counts == "operator calls: 3" and text.startswith(counts)


def test_device_time_by_kind_sums_each_kind_of_kernel():
    """The profile's GPU line from kernel events as torch.profiler gives them on CUDA (device events beside the
    CPU operators that launched them), named as on the H100s so far; CPU events count nowhere."""
    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import FunctionEvent

    kernels = [  # (name, microseconds)
        ("nvjet_sm90_tst_256x128_64x4_2x1_v_bz_coopA_TNN", 900), ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n", 100),
        ("void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits<256>>", 400),
        ("chunk_gated_delta_rule_fwd_kernel_h_blockdim64", 250), ("causal_conv1d_fwd_kernel", 50),
        ("prepare_wy_repr_bwd_kernel", 160), ("triton_poi_fused__to_copy_add_mul_rsqrt_0", 300),
        ("triton_red_fused_pow_mean_1", 50),
        ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor<float, 4>>", 200),
        ("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>", 30),
        ("Memcpy DtoD (Device -> Device)", 20), ("void at::native::elementwise_kernel<128, 2, direct_copy_kernel_cuda>", 50),
        ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>", 70),
        ("void at::native::reduce_kernel<512, 1, ReduceOp<float, MeanOps<float>>>", 30),
        ("ncclDevKernel_ReduceScatter_Sum_f32_RING_LL", 500), ("some_new_kernel", 5)]
    events = [FunctionEvent(id=i, name=name, thread=0, start_us=10 * i, end_us=10 * i + us,
                            device_type=DeviceType.CUDA) for i, (name, us) in enumerate(kernels)]
    events.append(FunctionEvent(id=99, name="aten::mm", thread=0, start_us=0, end_us=5000))  # CPU: not a kernel
    expected = [("GEMM", 1.0, 2), ("communication", 0.5, 1), ("GDN (fla)", 0.46, 3), ("attention", 0.4, 1),
                ("compiled chains", 0.35, 2), ("optimizer", 0.2, 1), ("copies and fills", 0.1, 3),
                ("elementwise", 0.07, 1), ("reductions", 0.03, 1), ("other", 0.005, 1)]
    kinds = bench_train.device_time_by_kind(events)
    assert [(kind, n) for kind, _, n in kinds] == [(kind, n) for kind, _, n in expected]
    assert [ms for _, ms, _ in kinds] == pytest.approx([ms for _, ms, _ in expected])
    assert bench_train.device_time_line(events).startswith(
        "GPU kernel time 3.1 ms: GEMM 1.0 (2), communication 0.5 (1), GDN (fla) 0.5 (3), attention 0.4 (1), ")
    assert bench_train.device_time_line(events[-1:]) == ""


def test_the_baseline_names_its_conv1d_kernel(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "causal_conv1d" else real(name, *a))
    assert bench_train.baseline_conv1d() == "fla's Triton kernel (causal_conv1d not installed)"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "causal_conv1d" else real(name, *a))
    assert bench_train.baseline_conv1d() == "causal_conv1d package"


def test_the_conv1d_put_in_transformers_slot_computes_what_transformers_does(monkeypatch):
    """The baseline's conv adapter, with our torch kernel in place of fla's (fla needs CUDA; the kernels part
    of tools/gpu_check compares the two): transformers' Qwen3.5 gives the same logits and gradients through it
    as through its own conv, in float64 (the whole model: its layers pass more keyword arguments to the slot,
    use_cache among them, than the conv's own)."""
    from transformers.models.qwen3_5 import modeling_qwen3_5

    from tools.float64 import float64
    from tools.tiny_qwen35 import causal_lm, text_config

    model = causal_lm(text_config(), seed=4).double().train()
    ids = torch.randint(0, model.config.vocab_size, (2, 37), generator=torch.Generator().manual_seed(0))

    def run():
        model.zero_grad()
        with float64():  # transformers' GDN upcasts to float32 inside; here that means float64
            out = model(input_ids=ids, labels=ids)
            out.loss.backward()
        return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    want, want_grads = run()
    ours, calls = bench_train.conv1d_for_transformers("torch"), []
    monkeypatch.setattr(modeling_qwen3_5, "causal_conv1d_fn", lambda *a, **k: calls.append(sorted(k)) or ours(*a, **k))
    got, got_grads = run()
    assert calls and "activation" in calls[0]  # the model went through the adapter, keyword arguments and all
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert got_grads.keys() == want_grads.keys() and any("conv1d" in n for n in got_grads)
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-12, atol=1e-12, msg=name)
    x, weight = torch.randn(1, 8, 5, dtype=torch.float64), torch.randn(8, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="unpacked rows only"):
        ours(x, weight, None, "silu", seq_idx=torch.zeros(1, 5, dtype=torch.int32))


@pytest.mark.parametrize("memory", ["none", "full"])
def test_the_baseline_trains_fp32_master_weights_under_bf16_autocast(monkeypatch, memory):
    """Like ours: bf16 matmuls, fp32 weights that an update of the recipe's lr 2e-6 actually moves (in bf16 it
    would round away). On CPU with the torch conv in fla's place."""
    from megatron_ext import Qwen35Config
    from transformers.models.qwen3_5 import modeling_qwen3_5

    from tools.parity import reference_kernels
    from tools.tiny_qwen35 import text_config

    monkeypatch.setattr(modeling_qwen3_5, "causal_conv1d_fn", None)  # hf() fills the slot; put back afterwards
    torch.manual_seed(0)
    step = bench_train.hf(Qwen35Config.from_hf(text_config().to_dict()), 16, 2, memory=memory, device="cpu")
    model = step.model
    matmul_dtypes = set()
    model.lm_head.register_forward_hook(lambda m, args, out: matmul_dtypes.add(out.dtype))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with reference_kernels(model):  # transformers' own torch GDN kernels (fla, where installed, needs CUDA)
        step()
    assert matmul_dtypes == {torch.bfloat16}
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert len(moved) == len(before)
    assert model.is_gradient_checkpointing == (memory == "full") and not model.config.use_cache
    # the same AdamW update applied to bf16 weights leaves most of them where they were
    w = before["model.embed_tokens.weight"]
    stuck = (w.bfloat16() + (model.model.embed_tokens.weight.detach() - w).bfloat16()) == w.bfloat16()
    assert stuck.float().mean() > 0.9


def test_compiled_chains_take_the_norms_elementwise_calls_off_the_host():
    """tools.bench_calls on a 2-layer model: compiled, the norms' and gates' operators are gone from the calls
    (inductor's C++ kernels run them), and far fewer calls remain."""
    from tools import bench_calls

    eager = bench_calls.count(False, layers=2, tokens=16)
    threads = torch.get_num_threads()
    with bench_calls.micro_batch(True, layers=2, tokens=16) as step:
        compiled = bench_calls.calls(step)
        assert 0 < bench_calls.host_ms(step, rounds=2, steps=1) < 60_000  # the timing column of its table
    assert torch.get_num_threads() == threads  # timed on one thread, then given back
    assert eager["pow"] > 0 and eager["rsqrt"] > 0 and compiled["pow"] == compiled["rsqrt"] == 0
    assert compiled.total() < 0.7 * eager.total()
    assert compiled["matmul"] == eager["matmul"]  # the GEMMs stay extern calls
    # the fused loss row runs megatron's fused cross entropy (compiled chains: fewer calls than the default's unfused
    # loss); without recomputation the MLPs' recomputed forward (and megatron's checkpoint function) is gone
    fused_loss = bench_calls.count(True, layers=2, tokens=16, cross_entropy_loss_fusion=True)
    no_recompute = bench_calls.count(True, layers=2, tokens=16, memory="none")
    assert compiled.total() > fused_loss.total() and compiled.total() > no_recompute.total()
    assert no_recompute["matmul"] < compiled["matmul"] == fused_loss["matmul"]


def test_the_gpu_session_commands_select_rows_and_their_baseline():
    """.ci/device/session.sh picks bench rows by regular expression: a pattern that matches nothing costs a GPU
    session its measurement silently, and a command without the transformers row has no ratio to report."""
    from pathlib import Path

    script = (Path(__file__).parents[1] / ".ci/device/session.sh").read_text()
    patterns = re.findall(r"--only '([^']+)'", script)
    labels = [f"{s.name} [{s.memory}]" for s in bench_train.SETUPS]
    assert len(patterns) == script.count("--only ") >= 4
    for pattern in patterns:
        chosen = [label for label in labels if re.search(pattern, label)]
        assert "transformers + fla [full]" in chosen and len(chosen) >= 2, (pattern, chosen)
        assert any(label.startswith("local-fused, compiled elementwise [") for label in chosen), (pattern, chosen)
