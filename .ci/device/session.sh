#!/usr/bin/env bash
# One lent GPU session's checks in one command, after .ci/device/stage.sh has installed the stack:
#   bash .ci/device/stage.sh run bash .ci/device/session.sh [DEADLINE_SECONDS]
# The correctness parts run in two gpu_check processes at once (their timings are not the point, and the
# GPU has room for both), then bench_train runs alone, its rows timed: seq 4096 first (every row issues 12
# and 16 compare), then seq 8192 for what is left. Each step is cut to what is left of DEADLINE (default 530 s,
# for a call of 560). Rows print as they come; logs, per-part logs and profiles come back under $OUT.
set -u
deadline=${1:-530}
left() { echo $((deadline - SECONDS)); }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import transformer_engine.pytorch as te; print('transformer_engine.pytorch imports:', te.__version__)" \
  2>&1 | tail -4
mkdir -p out/gc2 && cp -r out/gpu_check/mix out/gc2/
box=$(( $(left) - 230 ))  # the bench after them needs about 230 s
timeout "$box" python -m tools.gpu_check --parts te_fp8,te_packed --workdir out/gpu_check --budget "$box" \
  --out "$OUT/check_a.md" > "$OUT/check_a.log" 2>&1 &
timeout "$box" python -m tools.gpu_check --parts attention,compiled,te_attention,te_parity,te_ckpt --workdir out/gc2 --budget "$box" \
  --out "$OUT/check_b.md" 2>&1 | tee "$OUT/check_b.log"
wait
cat "$OUT/check_a.md"
rows='^(local-fused(, compiled elementwise(, unfused loss)?)? \[selective-mlp\]|local-fused, compiled elementwise \[none\]|te-.*|transformers \+ fla \[full\])$'
timeout $(( $(left) - 15 )) python -m tools.bench_train --seqs 4096 --warmup 1 --iters 3 --only "$rows" \
  --profile /tmp/profile 2>&1 | tee "$OUT/bench_4096.log"
# the flagship recipe's own micro-batch: 4 rows of 4096 tokens (about 74 GiB on one GPU, where nothing is sharded)
timeout $(( $(left) - 15 )) python -m tools.bench_train --seqs 4096 --micro-batch 4 --accumulate 8 --warmup 1 --iters 3 \
  --only '^local-fused, compiled elementwise \[selective-mlp\]$' 2>&1 | tee "$OUT/bench_4096x4.log"
if [ "$(left)" -gt 75 ]; then
  timeout $(( $(left) - 10 )) python -m tools.bench_train --seqs 8192 --warmup 1 --iters 3 \
    --only '^(local-fused, compiled elementwise \[selective-mlp\]|te-bf16.*|transformers \+ fla \[full\])$' 2>&1 |
    tee "$OUT/bench_8192.log"
fi
tar czf "$OUT/logs.tgz" out/gpu_check/*.log out/gc2/*.log /tmp/profile 2>/dev/null
echo "session.sh: $SECONDS s"
