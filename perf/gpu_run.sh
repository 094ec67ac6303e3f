#!/usr/bin/env bash
# Issue 4 on a lent 4-GPU machine, in one call: GPU tests, the communication benchmark, engine renders.
# Run from the repository root with the wheels in .whl/ (tools: /work/shared/tools/device-wheels.sh) and OUT set:
#   bash perf/gpu_run.sh            (OUT: where logs and results go; default perf/results/gpu-run)
# Steps are independent: a failing step is logged and the next one runs. Everything goes to $OUT/log.txt.
set -u
OUT=${OUT:-perf/results/gpu-run}
STEPS=${STEPS:-checks,bench,engine,renders}  # a subset runs only those steps
source "$(dirname "$0")/gpu_common.sh"
want checks && step "nvshmem checks (4 ranks)" 150 $MPI -n 4 python3 tests/gpu/scripts/nvshmem_checks.py
want bench && step "benchmark (4 ranks)" 240 $MPI -n 4 python3 perf/bench_comm.py --out "$OUT"
want engine && step "pytest tests/gpu engine vs WanPipeline" 240 python3 -m pytest -x -q -s tests/gpu/test_engine_gpu.py
want renders && for n in 4 2 1; do
  case $n in 4) roles="";; 2) roles="--set roles.encoders=0";; 1) roles="--set roles.encoders=0 --set roles.decoders=0";; esac
  step "engine random 1.3B 480p x81, $n GPU(s)" 180 $MPI -n $n python3 -m spmd_diff run perf/jobs/random-1.3b-480p.toml \
    --prompts perf/jobs/prompts3.jsonl --out /tmp/out-random-$n $roles
done
want renders && for n in 2 1; do
  case $n in 2) roles="--set roles.encoders=0";; 1) roles="--set roles.encoders=0 --set roles.decoders=0";; esac
  step "engine demo job, $n GPU(s)" 120 $MPI -n $n python3 -m spmd_diff run jobs/demo.toml \
    --prompts perf/jobs/prompts3.jsonl --out /tmp/out-demo-$n $roles
done
grep -h "^===\|spmd-diff: \(transport\|complete\)\|a2a \|handoff \|group of\|gpu checks\|ok\b\|==\|max diff" "$LOG" > "$OUT/summary.txt" || true
