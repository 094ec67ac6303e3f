#!/usr/bin/env bash
# The engine with sequence-parallel DiT groups on the lent 4xH200 machine, in one call:
#   random Wan2.1-1.3B 480p x 81, 4 steps, CFG, 3 prompts; S=1 (2 data-parallel DiT ranks), S=2 (one group),
#   S=4 (one group, encode/decode on the DiT ranks); then the videos of S=2 and S=4 against S=1.
# Usage there: bash perf/gpu_engine_sp.sh OUT_DIR   (wheels installed and PYTHONPATH set by the caller)
set -uo pipefail
out=${1:?OUT dir}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export SPMD_DIFF_CACHE=${SPMD_DIFF_CACHE:-/tmp/spmd_cache}
prompts=/tmp/engine_sp_prompts.jsonl
printf '%s\n' '{"id":"cat","prompt":"A cat walks on the grass."}' '{"id":"surf","prompt":"A surfer at sunset.","seed":7}' \
  '{"id":"city","prompt":"A city skyline at night."}' > $prompts
run() {  # name, --set options...
  local name=$1; shift
  local sets=(); for s in "$@"; do sets+=(--set "$s"); done
  local t0=$(date +%s.%N)
  timeout 170 mpirun --allow-run-as-root -n 4 python3 -m spmd_diff run jobs/wan2.1-t2v-1.3b.toml --prompts $prompts \
    --out /tmp/engine_sp_$name --model random:wan2.1-t2v-1.3b --set video.num_inference_steps=4 "${sets[@]}" \
    > /tmp/engine_sp_$name.log 2>&1
  local rc=$?
  echo "== $name rc=$rc wall=$(python3 -c "import time;print(round(time.time()-$t0,1))")s"
  grep -v "Loading" /tmp/engine_sp_$name.log | grep -E "group|complete|error|transport|Error" | head -8
}
{
  run s1 dit.sp_degree=1
  run s2 dit.sp_degree=2
  run s4 dit.sp_degree=4 roles.encoders=0 roles.decoders=0
  python3 - <<'PY'
import h5py, numpy as np
ref = h5py.File("/tmp/engine_sp_s1/videos.h5", "r")["videos"]
for name in ("s2", "s4"):
    try:
        got = h5py.File(f"/tmp/engine_sp_{name}/videos.h5", "r")["videos"]
    except OSError as exc:
        print(name, "no videos:", exc); continue
    for key in sorted(ref):
        a, b = ref[key][...].astype(np.int16), got[key][...].astype(np.int16)
        d = np.abs(a - b)
        print(f"{name} vs s1 {key}: max {d.max()} mean {d.mean():.4f} levels, frames {a.shape}, std {a.std():.1f}")
PY
} 2>&1 | tee $out/engine_sp.txt
