# Sourced by perf/gpu_run.sh and perf/gpu_session.sh (set OUT and STEPS first): the environment every GPU call
# needs (NVLink multicast off), the log, `want STEP`, `step NAME LIMIT_S CMD...` (a failing step is logged and
# the next one runs), the carried wheels installed into /tmp/site, and a first step naming the GPUs.
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export SPMD_DIFF_CACHE=/tmp/spmd_cache OMP_NUM_THREADS=4
LOG="$OUT/log.txt"
MPI="mpirun --allow-run-as-root --oversubscribe --bind-to none"
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
