#!/usr/bin/env bash
# Install what spmd_diff needs on a fresh Debian/Ubuntu machine: Open MPI, then torch (first: the local CPU
# build, never the multi-GB CUDA one), then the package with its test and report extras. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
PY=${PYTHON:-python3}

if ! command -v mpirun >/dev/null || ! [ -e /usr/include/x86_64-linux-gnu/mpi/mpi.h -o -e /usr/lib/x86_64-linux-gnu/openmpi/include/mpi.h ]; then
  echo "== installing Open MPI (Debian packages)"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q openmpi-bin libopenmpi-dev
fi

TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
if ! $PY -c "import torch" 2>/dev/null; then
  echo "== installing $TORCH_SPEC"
  $PY -m pip install -q "$TORCH_SPEC"
fi
echo "== installing spmd_diff and its test/report extras"
$PY -m pip install -q -e ".[test,report]"

# Triton, for the CPU-interpreter checks of kernels/ (tests/unit/test_sp_kernels.py; they skip without it). Not a
# test extra: a CUDA torch pins its own Triton, so only where none imports; 3.6.0 is what the GPU machines run.
TRITON_SPEC=${TRITON_SPEC:-triton==3.6.0}
if ! $PY -c "import triton" 2>/dev/null; then
  echo "== installing $TRITON_SPEC (Triton's CPU interpreter, for the kernel tests)"
  $PY -m pip install -q "$TRITON_SPEC" || echo "== $TRITON_SPEC did not install here: the interpreter tests skip"
fi
$PY -c "import torch, diffusers, mpi4py.MPI as M; print('torch', torch.__version__, '| diffusers', diffusers.__version__, '|', M.Get_library_version().splitlines()[0])"
