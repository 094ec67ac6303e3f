#!/usr/bin/env bash
# Site install of spmd-diff for an HPC center: a self-contained tree under PREFIX and environment modules.
#
#   bash slurm/site-install.sh PREFIX [options]
#
# Builds:
#   PREFIX/venv/                         a Python virtual environment with spmd-diff and its dependencies
#   PREFIX/bin/spmd-diff                 the launcher (runs the venv's Python, ignores ~/.local)
#   PREFIX/share/spmd-diff/slurm/        render.sbatch, render-array.sbatch
#   PREFIX/share/spmd-diff/jobs/         example jobs (demo.toml, ...)
#   PREFIX/modulefiles/spmd-diff/V.lua   Lmod module          (module use PREFIX/modulefiles)
#   PREFIX/modulefiles-tcl/spmd-diff/V   Tcl module for Environment Modules (and Lmod)
#
# Options:
#   --python PY              interpreter for the venv (default: python3); >= 3.10
#   --torch-spec SPEC        pip requirement for torch, installed before the package (e.g. "torch==2.13.0",
#                            with --pip-arg --index-url=https://download.pytorch.org/whl/cu128 for a CUDA
#                            build); without it pip picks torch as a dependency of the package
#   --pip-arg ARG            extra argument for every pip install (repeatable): --index-url=..., --no-index,
#                            --find-links=DIR for an offline wheelhouse, ...
#   --system-site-packages   let the venv see the interpreter's packages (reuse a site torch/mpi4py; when
#                            --python is itself a virtual environment, its packages)
#   --module-load MOD        the module the install needs loaded (repeatable), e.g. the MPI that mpi4py was
#                            built against: --module-load openmpi/4.1.6
#   --version V              module version name (default: the package's version)
#   --force                  replace an existing PREFIX/venv instead of updating it
#
# mpi4py is compiled against the MPI whose `mpicc` is on PATH while this runs: load the site's MPI module
# first (and pass it to --module-load), or use --system-site-packages with a site mpi4py.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit "${1:-2}"; }
say() { printf 'site-install: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 2; }

src=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=python3 torch_spec= system_site=0 version= force=0
pip_args=() module_loads=()
prefix=
while (($#)); do
  if [[ $1 == --*=* ]]; then  # --opt=value -> --opt value
    set -- "${1%%=*}" "${1#*=}" "${@:2}"
  fi
  case $1 in
    -h | --help) usage 0 ;;
    --python) python=$2; shift ;;
    --torch-spec) torch_spec=$2; shift ;;
    --pip-arg) pip_args+=("$2"); shift ;;
    --system-site-packages) system_site=1 ;;
    --module-load) module_loads+=("$2"); shift ;;
    --version) version=$2; shift ;;
    --force) force=1 ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) [[ -z $prefix ]] || die "one PREFIX only (got $prefix and $1)"; prefix=$1 ;;
  esac
  shift
done
[[ -n $prefix ]] || usage 2
[[ -f $src/setup.py && -d $src/spmd_diff ]] || die "$src is not a spmd-diff checkout"
mkdir -p "$prefix"
prefix=$(cd "$prefix" && pwd)
venv=$prefix/venv

"$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || die "$python is older than Python 3.10"

# ------------------------------------------------------------------------------------------- venv
if [[ -d $venv && $force == 1 ]]; then
  say "removing $venv (--force)"
  rm -rf "$venv"
fi
if [[ ! -x $venv/bin/python ]]; then
  venv_args=()
  # With the interpreter's packages visible, use its pip and setuptools too: a venv's own bundled copies
  # would shadow them, and an old bundled setuptools makes pip download a newer one (torch needs >= 77).
  ((system_site)) && venv_args+=(--system-site-packages --without-pip)
  say "creating $venv with $("$python" -c 'import sys; print(sys.executable, sys.version.split()[0])')"
  "$python" -m venv "${venv_args[@]}" "$venv"
  if ((system_site)); then
    # --python may itself be a virtual environment (one with torch and mpi4py, say): its packages are not the
    # base interpreter's "system site", so expose them to the new venv with a .pth file.
    "$python" - "$venv" <<'PY'
import pathlib, site, sys
if sys.prefix != sys.base_prefix:
    venv = pathlib.Path(sys.argv[1])
    (target,) = venv.glob("lib/python*/site-packages")
    (target / "_spmd_diff_site_python.pth").write_text("\n".join(site.getsitepackages()) + "\n")
PY
  fi
  if ! "$venv/bin/python" -c 'import pip' 2>/dev/null; then
    "$venv/bin/python" -m ensurepip --default-pip >/dev/null
  fi
else
  say "updating the existing $venv"
fi
pip=("$venv/bin/python" -m pip install --disable-pip-version-check "${pip_args[@]}")
if [[ -n $torch_spec ]]; then
  say "installing $torch_spec"
  "${pip[@]}" "$torch_spec"
fi
# Build without an isolated build environment where setuptools is at hand: no download just to build.
# (setuptools >= 70.1 builds wheels itself; older ones need the wheel package.)
if "$venv/bin/python" -c 'import importlib.util as u, setuptools
assert u.find_spec("wheel") or u.find_spec("setuptools.command.bdist_wheel")' 2>/dev/null; then
  pip+=(--no-build-isolation)
fi
say "installing spmd-diff from $src"
"${pip[@]}" "$src"

# ------------------------------------------------------------------------------------- the rest
[[ -n $version ]] || version=$("$venv/bin/python" -c 'import spmd_diff; print(spmd_diff.__version__)')
[[ $version =~ ^[A-Za-z0-9._+-]+$ ]] || die "version name $version: use letters, digits and ._+- only"

mkdir -p "$prefix/bin" "$prefix/share/spmd-diff"
launcher=$prefix/bin/spmd-diff
shebang="#!$venv/bin/python -s"
((${#shebang} < 128)) || say "warning: the launcher's first line is ${#shebang} bytes; kernels before Linux 5.1 read 127"
cat >"$launcher.tmp" <<EOF
$shebang
# spmd-diff $version, site install of $(date +%F) from $src. -s: ignore ~/.local site-packages.
import sys

from spmd_diff.cli import main

sys.exit(main())
EOF
chmod 755 "$launcher.tmp"
mv -f "$launcher.tmp" "$launcher"

rm -rf "$prefix/share/spmd-diff/slurm" "$prefix/share/spmd-diff/jobs"
mkdir -p "$prefix/share/spmd-diff/slurm"
cp "$src"/slurm/*.sbatch "$prefix/share/spmd-diff/slurm/"
[[ -d $src/jobs ]] && cp -r "$src/jobs" "$prefix/share/spmd-diff/jobs"

# Modulefiles from the templates: @PREFIX@, @VERSION@, @DATE@ and @LOADS@ (one load line per --module-load).
sed_escape() { printf '%s' "$1" | sed -e 's/[\\|&]/\\&/g'; }
render_module() {  # render_module TEMPLATE DEST LOAD_FORMAT
  local template=$1 dest=$2 format=$3 loads="" mod
  for mod in "${module_loads[@]}"; do
    loads+=$(printf "$format" "$mod")$'\n'
  done
  mkdir -p "$(dirname "$dest")"
  sed -e "s|@PREFIX@|$(sed_escape "$prefix")|g" -e "s|@VERSION@|$(sed_escape "$version")|g" \
    -e "s|@DATE@|$(date +%F)|g" "$template" |
    awk -v loads="$loads" '$0 == "@LOADS@" { printf "%s", loads; next } { print }' >"$dest.tmp"
  mv -f "$dest.tmp" "$dest"
}
render_module "$src/slurm/spmd-diff.lua.in" "$prefix/modulefiles/spmd-diff/$version.lua" 'depends_on("%s")'
render_module "$src/slurm/spmd-diff.tcl.in" "$prefix/modulefiles-tcl/spmd-diff/$version" 'module load %s'

"$launcher" --help >/dev/null || die "$launcher --help failed"
say "installed spmd-diff $version in $prefix"
cat >&2 <<EOF

Users load it with:
  module use $prefix/modulefiles          # Lmod
  module use $prefix/modulefiles-tcl      # Environment Modules (Tcl)
  module load spmd-diff/$version
and submit with:
  sbatch --ntasks-per-node=4 --gpus-per-node=4 \$SPMD_DIFF_SLURM_DIR/render.sbatch JOB.toml prompts.jsonl OUT/
EOF
