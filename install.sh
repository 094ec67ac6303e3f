#!/usr/bin/env bash
# Install spmd-diff on a Debian/Ubuntu machine, the one way the README gives (as root or as a user with sudo):
#
#   bash install.sh [VENV]          VENV: the virtual environment to create or update (default: .venv)
#
#   1. Debian packages (.ci/install-slurm.sh): Open MPI (mpi4py is built against it), and Slurm, munge and Lmod,
#      which the test suite uses to start its own one-node Slurm. SKIP_SYSTEM_PACKAGES=1 skips this step.
#   2. The virtual environment: torch first (TORCH_SPEC, default torch==2.13.0; on a machine without a GPU give a
#      CPU build, e.g. TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu", or pip picks
#      a multi-GB CUDA build), then this package with its test and report extras (every other dependency is
#      declared in setup.py), then Triton for the CPU-interpreter kernel tests.
#
# Idempotent. Then: `. VENV/bin/activate` and the README's two commands.
set -euo pipefail
cd "$(dirname "$0")"
venv=${1:-.venv}
PY=${PYTHON:-python3}

if [ "${SKIP_SYSTEM_PACKAGES:-0}" != 1 ]; then
  bash .ci/install-slurm.sh
fi

if [ ! -x "$venv/bin/python" ]; then
  echo "== creating the virtual environment $venv"
  "$PY" -m venv "$venv"
fi
vpy="$venv/bin/python"
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
if ! "$vpy" -c "import torch" 2>/dev/null; then
  echo "== installing $TORCH_SPEC"
  # shellcheck disable=SC2086 - TORCH_SPEC may carry pip options (--index-url ...)
  "$vpy" -m pip install -q $TORCH_SPEC
fi
echo "== installing spmd-diff and its test/report extras"
"$vpy" -m pip install -q -e ".[test,report]"

# Triton, for the CPU-interpreter checks of spmd_diff/kernels/ (tests/unit/test_sp_kernels.py; they skip without it). Not a
# test extra: a CUDA torch pins its own Triton, so only where none imports; 3.6.0 is what the GPU machines run.
TRITON_SPEC=${TRITON_SPEC:-triton==3.6.0}
if ! "$vpy" -c "import triton" 2>/dev/null; then
  echo "== installing $TRITON_SPEC (Triton's CPU interpreter, for the kernel tests)"
  "$vpy" -m pip install -q "$TRITON_SPEC" || echo "== $TRITON_SPEC did not install here: the interpreter tests skip"
fi
"$vpy" -c "import torch, diffusers, transformers, mpi4py.MPI as M; print('installed: torch', torch.__version__, '| diffusers', diffusers.__version__, '| transformers', transformers.__version__, '|', M.Get_library_version().splitlines()[0])"
echo "== done: . $venv/bin/activate"
