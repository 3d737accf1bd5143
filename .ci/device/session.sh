#!/usr/bin/env bash
# One lent GPU session's checks and benchmarks, after .ci/device/stage.sh has installed the stack:
#   bash .ci/device/stage.sh run bash .ci/device/session.sh [DEADLINE_SECONDS] [PHASES]
# PHASES (default check,bench), each cut to what is left of DEADLINE (default 530 s, for a call of 560; the
# install before this script, about 25 s on a fresh machine, comes out of the call's margin):
#   check  the correctness parts, in two gpu_check processes at once (their timings are not the point, and the GPU
#          has room for both), leaving BENCH_SECONDS (default 230) of DEADLINE to the bench when both phases run
#   bench  bench_train alone, its rows timed, most wanted first: seq 4096 at micro-batch 2 (half the host's launches
#          per token of the host-bound one-sequence step; every row issues 12 and 16 compare), the recipe's
#          micro-batch 4, seq 8192, then micro-batch 1 (what each lever gains) with what is left
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
    --parts attention,te_attention,te_parity,compiled,te_ckpt --workdir out/gc2 --budget "$budget" \
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
  # about 53-58 GiB a row on one GPU (resident 31.6 plus twice the one-sequence activations); the allocator's
  # expandable segments keep fragmentation from failing a row that fits
  PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True bench 4096x2 15 --seqs 4096 --micro-batch 2 --profile "$OUT/profile" \
    --only '^(local-fused, compiled elementwise \[(selective-mlp|none)\]|(te-bf16|te-fp8-delayed|te-fp8-tensorwise) \[selective-mlp\]|transformers \+ fla \[full\])$'
  # the flagship recipe's own micro-batch: 4 rows of 4096 tokens (about 74 GiB on one GPU, where nothing is sharded);
  # [none] too, the least host time per token: by count from the fourth session's rows (7.9 GiB more than selective-mlp
  # per 4096 tokens) about 105 GiB, an OOM row on an 80 GB H100 and a row on an H200 (141 GB GPUs could run the
  # recipe so: 87 GiB with the optimizer sharded over 8)
  PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True bench 4096x4 15 --seqs 4096 --micro-batch 4 --accumulate 8 \
    --only '^(local-fused, compiled elementwise \[(selective-mlp|none)\]|transformers \+ fla \[full\])$'
  bench 8192 10 --seqs 8192 --profile "$OUT/profile" --only '^((local-fused, compiled elementwise|te-bf16) \[selective-mlp\]|transformers \+ fla \[full\])$'
  # what each lever gains, one sequence a micro-batch (the earlier sessions' rows): last, with what is left
  # eager [none] too: on the CPU proxy (tools/bench_calls) it has the least host time of all rows
  bench 4096 15 --seqs 4096 --profile "$OUT/profile" \
    --only '^(local-fused, compiled elementwise(, fused loss|, unfused weight gradients)? \[selective-mlp\]|local-fused(, compiled elementwise)? \[none\]|transformers \+ fla \[full\])$'
fi
# what comes back is at most 8 files: the rows' profiles and the check's logs come back as one archive each
for d in profile check_logs; do
  [ -d "$OUT/$d" ] && tar -czf "$OUT/$d.tgz" -C "$OUT" "$d" && rm -rf "${OUT:?}/$d"
done
echo "session.sh: $SECONDS s"
