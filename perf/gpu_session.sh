#!/usr/bin/env bash
# Issues 4 and 5 on a lent 4-GPU machine, in one call: GPU checks and tests, the communication benchmark, the
# sequence-parallel benchmark. Run from the repository root with the wheels in .whl/ (and .whl-xfuser/ for the
# xDiT phase; tools: /work/shared/tools/device-wheels.sh):
#   OUT=... STEPS=checks,comm,sptests,sp SP_ARGS="--cases 1.3B-720p --degrees 1,4 --compile" bash perf/gpu_session.sh
# Steps are independent: a failing step is logged and the next one runs. Everything goes to $OUT/log.txt.
set -u
OUT=${OUT:-perf/results/gpu-session}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export SPMD_DIFF_CACHE=/tmp/spmd_cache OMP_NUM_THREADS=4
LOG="$OUT/log.txt"
MPI="mpirun --allow-run-as-root --oversubscribe --bind-to none"
STEPS=${STEPS:-checks,comm,sptests,sp}
SP_ARGS=${SP_ARGS:-}
SPTESTS=${SPTESTS:-not nothing}  # a pytest -k expression
SP_BUDGET=${SP_BUDGET:-300}
NGPU=${NGPU:-$(nvidia-smi -L | wc -l)}
want() { [[ ",$STEPS," == *",$1,"* ]]; }
step() { local name=$1 limit=$2; shift 2; local t0=$SECONDS
  echo "=== $name (limit ${limit}s)" | tee -a "$LOG"
  timeout "$limit" "$@" >> "$LOG" 2>&1; local rc=$?
  echo "=== $name: rc=$rc in $((SECONDS - t0)) s" | tee -a "$LOG"; }
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >> "$LOG" 2>&1 && export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-$PWD}
step "gpus" 30 bash -c 'nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; nvidia-smi topo -m'
want checks && step "nvshmem checks ($NGPU ranks)" 180 $MPI -n $NGPU python3 tests/gpu/scripts/nvshmem_checks.py
want comm && step "communication benchmark ($NGPU ranks)" 240 $MPI -n $NGPU python3 perf/bench_comm.py --out "$OUT"
want sptests && step "pytest tests/gpu/test_sp_gpu.py -k '$SPTESTS'" 240 python3 -m pytest -q -s tests/gpu/test_sp_gpu.py -k "$SPTESTS"
want engine && step "pytest tests/gpu/test_engine_gpu.py" 240 python3 -m pytest -x -q -s tests/gpu/test_engine_gpu.py
want sp && step "sequence-parallel benchmark" $((SP_BUDGET + 60)) python3 perf/bench_sp.py all --gpus $NGPU --out "$OUT/sp" \
  --budget-s "$SP_BUDGET" $SP_ARGS
grep -h "^===\|a2a \|handoff \|group of\|gpu checks\|ok\b\|passed\|failed\|ratio\|\] phase" "$LOG" \
  > "$OUT/summary.txt" || true
