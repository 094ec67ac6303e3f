#!/usr/bin/env bash
# Issues 4 and 5 on a lent 4-GPU machine, in one call: GPU checks and tests, the communication benchmark, the
# sequence-parallel benchmark. Run from the repository root with the wheels in .whl/ (and .whl-xfuser/ for the
# xDiT phase; tools: /work/shared/tools/device-wheels.sh):
#   OUT=... STEPS=checks,comm,sptests,sp SP_ARGS="--cases 1.3B-720p --degrees 1,4 --compile" bash perf/gpu_session.sh
# Steps are independent: a failing step is logged and the next one runs. Everything goes to $OUT/log.txt.
set -u
OUT=${OUT:-perf/results/gpu-session}
STEPS=${STEPS:-checks,comm,sptests,sp}
SP_ARGS=${SP_ARGS:-}
SPTESTS=${SPTESTS:-not nothing}  # a pytest -k expression
SP_BUDGET=${SP_BUDGET:-300}
NGPU=${NGPU:-$(nvidia-smi -L | wc -l)}
source "$(dirname "$0")/gpu_common.sh"
want checks && step "nvshmem checks ($NGPU ranks)" 180 $MPI -n $NGPU python3 tests/gpu/scripts/nvshmem_checks.py
want comm && step "communication benchmark ($NGPU ranks)" 240 $MPI -n $NGPU python3 perf/bench_comm.py --out "$OUT"
want sptests && step "pytest tests/gpu/test_sp_gpu.py -k '$SPTESTS'" 240 python3 -m pytest -q -s tests/gpu/test_sp_gpu.py -k "$SPTESTS"
want engine && step "pytest tests/gpu/test_engine_gpu.py" 240 python3 -m pytest -x -q -s tests/gpu/test_engine_gpu.py
want sp && step "sequence-parallel benchmark" $((SP_BUDGET + 60)) python3 perf/bench_sp.py all --gpus $NGPU --out "$OUT/sp" \
  --budget-s "$SP_BUDGET" $SP_ARGS
grep -h "^===\|a2a \|handoff \|group of\|gpu checks\|ok\b\|passed\|failed\|ratio\|\] phase" "$LOG" \
  > "$OUT/summary.txt" || true
