#!/usr/bin/env bash
# One lent GPU session's checks and benchmarks, after .ci/device/stage.sh has installed the stack:
#   bash .ci/device/stage.sh run bash .ci/device/session.sh [DEADLINE_SECONDS] [PHASES]
# PHASES (default check,bench), each cut to what is left of DEADLINE (default 530 s, for a call of 560; the
# install before this script, about 25 s on a fresh machine, comes out of the call's margin):
#   check  the correctness parts, in two gpu_check processes at once (their timings are not the point, and the GPU
#          has room for both), leaving BENCH_SECONDS (default 230) of DEADLINE to the bench when both phases run;
#          syncs with TE installed (megatron then takes TE's fused RoPE for packed rows: on an H200, 2026-11-30,
#          megatron's RoPE dispatch held 1.3-2.5 ms of host time per call that the profile's calls do not explain)
#   bench  bench_train alone, its rows timed, most wanted first: seq 4096 at the recipe's micro-batch 4 (where the
#          step stops being host-bound; ours, TE BF16 and FP8, transformers), seq 8192, micro-batch 2, micro-batch 1
#          (what each lever gains), then micro-batch 2 without the allocator's expandable segments
# With a tight lease run the phases as two calls back to back: `... session.sh 330 check`, `... session.sh 420
# bench`. fla's tuned configurations ship for the H100 and serve every sm90 GPU (the H200 too); on another
# architecture its first steps autotune for minutes. Rows print as they come; the logs are written under $OUT as
# each command ends, the profiles and the check's logs packed at the end (a call brings back at most 8 files).
set -u
deadline=${1:-530}
phases=${2:-check,bench}
left() { echo $((deadline - SECONDS)); }
# `timeout` with what is left less a margin, or a line saying why not: timeout 0 would mean no limit at all
boxed() {
  local margin=$1 need=$2 what=$3; shift 3
  local t=$(( $(left) - margin ))
  if [ "$t" -lt "$need" ]; then echo "session.sh: $what not run: $(left) s left"; return 0; fi
  timeout "$t" "$@"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import transformer_engine as te, transformer_engine.pytorch; print('transformer_engine.pytorch imports:',
te.__version__)" 2>&1 | tail -4

if [[ $phases == *check* ]]; then
  mkdir -p out/gc2 && cp -r out/gpu_check/mix out/gc2/
  reserve=0; [[ $phases == *bench* ]] && reserve=${BENCH_SECONDS:-230}
  box=$(( $(left) - reserve - 10 ))
  budget=$(( box - 20 ))  # the check's own budget ends first: it stops its last part and writes its rows
  boxed $(( reserve + 10 )) 60 "gpu_check te_fp8,te_packed" python -m tools.gpu_check --parts te_fp8,te_packed \
    --workdir out/gpu_check --budget "$budget" --out "$OUT/check_a.md" > "$OUT/check_a.log" 2>&1 &
  boxed $(( reserve + 10 )) 60 "gpu_check attention,..." python -m tools.gpu_check \
    --parts attention,te_attention,te_parity,compiled,te_ckpt,syncs --workdir out/gc2 --budget "$budget" \
    --out "$OUT/check_b.md" 2>&1 | tee "$OUT/check_b.log"
  wait
  cat "$OUT/check_a.md" 2>/dev/null
  mkdir -p "$OUT/check_logs" && cp out/gpu_check/*.log out/gc2/*.log "$OUT/check_logs/" 2>/dev/null
fi

if [[ $phases == *bench* ]]; then
  bench() {  # NAME MARGIN ARGS...: one bench_train command, its log under $OUT
    local name=$1 margin=$2; shift 2
    boxed "$margin" 45 "bench $name" python -m tools.bench_train --warmup 1 --iters 3 "$@" 2>&1 | tee "$OUT/bench_$name.log"
  }
  # One allocator setting for every command (expandable segments: fragmentation must not fail a row that fits), so
  # that rows compare; one command without it at the end, as on 2026-11-30 the commands with it (micro-batch 2
  # and 4) met a host slower per operator than those without.
  export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
  # the flagship recipe's own micro-batch, 4 rows of 4096 tokens, where the local spec's step stopped being host-bound
  # (H200, 2026-11-30: 90.0 / 105.0 GiB on one GPU with selective-mlp / none, before the loss went unfused, 3.8 GiB
  # less a sequence by count: about 75 / 90 GiB now, so selective-mlp may fit an 80 GB H100, none does not), and
  # TE's BF16 and FP8 there, never measured off the host bound
  bench 4096x4 15 --seqs 4096 --micro-batch 4 --accumulate 8 --profile "$OUT/profile" \
    --only '^(local-fused, compiled elementwise \[(selective-mlp|none)\]|(te-bf16|te-fp8-delayed) \[selective-mlp\]|transformers \+ fla \[full\])$'
  # seq 8192: the activations issue 12 holds to 40 GB per GPU, with the unfused loss
  bench 8192 15 --seqs 8192 --profile "$OUT/profile" \
    --only '^(local-fused, compiled elementwise \[(selective-mlp|none)\]|te-bf16 \[selective-mlp\]|transformers \+ fla \[full\])$'
  bench 4096x2 15 --seqs 4096 --micro-batch 2 --profile "$OUT/profile" \
    --only '^(local-fused, compiled elementwise \[none\]|(te-bf16, compiled elementwise|te-fp8-tensorwise) \[selective-mlp\]|transformers \+ fla \[full\])$'
  # what each lever gains, one sequence a micro-batch (the earlier sessions' rows)
  bench 4096 15 --seqs 4096 --profile "$OUT/profile" \
    --only '^(local-fused, compiled elementwise(, fused loss|, unfused weight gradients)? \[selective-mlp\]|local-fused(, compiled elementwise)? \[none\]|transformers \+ fla \[full\])$'
  # the allocator's setting alone: micro-batch 2's fastest row again without expandable segments
  (unset PYTORCH_CUDA_ALLOC_CONF; bench 4096x2-plain 10 --seqs 4096 --micro-batch 2 \
    --only '^(local-fused, compiled elementwise \[none\]|transformers \+ fla \[full\])$')
fi
# what comes back is at most 8 files: the rows' profiles and the check's logs come back as one archive each
for d in profile check_logs; do
  [ -d "$OUT/$d" ] && tar -czf "$OUT/$d.tgz" -C "$OUT" "$d" && rm -rf "${OUT:?}/$d"
done
echo "session.sh: $SECONDS s"
