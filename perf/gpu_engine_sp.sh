#!/usr/bin/env bash
# The engine with sequence-parallel DiT groups on a lent 2- or 4-GPU H200 machine, in one call:
#   random Wan2.1-1.3B 480p x 81, 4 steps, CFG, 3 prompts; S=1, S=2 (also with dit.compile), S=4 with 4 GPUs
#   (encode/decode on the DiT ranks); then the videos of every S > 1 against S=1.
# Usage there: bash perf/gpu_engine_sp.sh OUT_DIR   (wheels installed and PYTHONPATH set by the caller)
set -uo pipefail
out=${1:?OUT dir}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export SPMD_DIFF_CACHE=${SPMD_DIFF_CACHE:-/tmp/spmd_cache}
ngpu=${NGPU:-$(nvidia-smi -L | wc -l)}
prompts=/tmp/engine_sp_prompts.jsonl
printf '%s\n' '{"id":"cat","prompt":"A cat walks on the grass."}' '{"id":"surf","prompt":"A surfer at sunset.","seed":7}' \
  '{"id":"city","prompt":"A city skyline at night."}' > $prompts
run() {  # name, --set options...
  local name=$1; shift
  local sets=(); for s in "$@"; do sets+=(--set "$s"); done
  local t0=$(date +%s.%N)
  timeout 240 mpirun --allow-run-as-root -n $ngpu python3 -m spmd_diff run jobs/wan2.1-t2v-1.3b.toml --prompts $prompts \
    --out /tmp/engine_sp_$name --model random:wan2.1-t2v-1.3b --set video.num_inference_steps=4 "${sets[@]}" \
    > /tmp/engine_sp_$name.log 2>&1
  local rc=$?
  echo "== $name rc=$rc wall=$(python3 -c "import time;print(round(time.time()-$t0,1))")s"
  grep -v "Loading" /tmp/engine_sp_$name.log | grep -E "group|complete|error|transport|Error" | head -8
}
{
  solo="roles.encoders=0 roles.decoders=0"
  run s1 dit.sp_degree=1 $([ "$ngpu" -lt 4 ] && echo $solo)
  run s2 dit.sp_degree=2 $([ "$ngpu" -lt 4 ] && echo $solo)
  run s2c dit.sp_degree=2 dit.compile=true $([ "$ngpu" -lt 4 ] && echo $solo)
  [ "$ngpu" -ge 4 ] && run s4 dit.sp_degree=4 $solo
  python3 - <<'PY'
import h5py, numpy as np
ref = h5py.File("/tmp/engine_sp_s1/videos.h5", "r")["videos"]
for name in ("s2", "s2c", "s4"):
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
