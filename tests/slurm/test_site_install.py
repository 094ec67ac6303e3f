"""slurm/site-install.sh: a self-contained install under PREFIX with a launcher and Lmod/Tcl modulefiles.

The venv sees this interpreter's packages (--system-site-packages) and pip may not use an index (--no-index),
so the test installs only spmd-diff itself and never downloads anything.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LMOD_INIT = Path("/usr/share/lmod/lmod/init/bash")

# Stand-ins for the modulefile commands: record what the module would do to the environment.
TCL_STUBS = r"""
set loads {}
proc module-whatis {args} {}
proc conflict {args} {}
proc module {cmd args} { global loads; if {$cmd eq "load"} { lappend loads {*}$args } }
proc prepend-path {var value} { global env; set env($var) "$value:$env($var)" }
proc setenv {var value} { global env; set env($var) $value }
source [lindex $argv 0]
ModulesHelp
puts "loads=$loads"
foreach var {PATH SPMD_DIFF_HOME SPMD_DIFF_PYTHON SPMD_DIFF_SLURM_DIR} { puts "$var=$env($var)" }
"""


@pytest.fixture(scope="module")
def site_prefix(tmp_path_factory) -> Path:
    prefix = tmp_path_factory.mktemp("site") / "spmd-diff"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        ["bash", str(REPO / "slurm/site-install.sh"), str(prefix), "--python", sys.executable,
         "--system-site-packages", "--pip-arg", "--no-index", "--module-load", "openmpi/4.1"],
        capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"module use {prefix}/modulefiles" in result.stderr
    return prefix


def clean_env() -> dict[str, str]:
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root"), "LANG": "C.UTF-8"}


def version_of(prefix: Path) -> str:
    (lua,) = (prefix / "modulefiles/spmd-diff").glob("*.lua")
    return lua.name[:-4]


@pytest.mark.timeout(600)
def test_launcher_runs_the_installed_package(site_prefix, tmp_path):
    launcher = site_prefix / "bin/spmd-diff"
    result = subprocess.run([str(launcher), "--help"], capture_output=True, text=True, timeout=120,
                            env=clean_env(), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "plan" in result.stdout and "merge" in result.stdout
    where = subprocess.run([str(site_prefix / "venv/bin/python"), "-c", "import spmd_diff; print(spmd_diff.__file__)"],
                           capture_output=True, text=True, timeout=120, env=clean_env(), cwd=tmp_path)
    assert where.stdout.startswith(str(site_prefix / "venv")), where.stdout + where.stderr
    # render.sbatch finds the interpreter through the launcher's first line.
    assert launcher.read_text().splitlines()[0] == f"#!{site_prefix}/venv/bin/python -s"
    for script in ("render.sbatch", "render-array.sbatch"):
        assert (site_prefix / "share/spmd-diff/slurm" / script).is_file()
    assert (site_prefix / "share/spmd-diff/jobs/demo.toml").is_file()


@pytest.mark.skipif(shutil.which("tclsh") is None, reason="tclsh not installed")
def test_tcl_modulefile_sets_the_environment(site_prefix, tmp_path):
    modulefile = site_prefix / "modulefiles-tcl/spmd-diff" / version_of(site_prefix)
    assert modulefile.read_text().startswith("#%Module")
    stubs = tmp_path / "stubs.tcl"
    stubs.write_text(TCL_STUBS)
    result = subprocess.run(["tclsh", str(stubs), str(modulefile)], capture_output=True, text=True, timeout=60,
                            env=clean_env())
    assert result.returncode == 0, result.stderr
    values = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
    assert values["loads"] == "openmpi/4.1"
    assert values["PATH"].startswith(f"{site_prefix}/bin:")
    assert values["SPMD_DIFF_PYTHON"] == f"{site_prefix}/venv/bin/python"
    assert values["SPMD_DIFF_SLURM_DIR"] == f"{site_prefix}/share/spmd-diff/slurm"
    assert "render.sbatch" in result.stderr  # ModulesHelp


@pytest.mark.skipif(not LMOD_INIT.exists(), reason="Lmod not installed (.ci/install-slurm.sh installs it)")
@pytest.mark.parametrize("tree", ["modulefiles", "modulefiles-tcl"])
def test_lmod_loads_the_module(site_prefix, tree, tmp_path):
    stub = tmp_path / "stubs/openmpi"
    stub.mkdir(parents=True)
    (stub / "4.1").write_text("#%Module1.0\nsetenv STUB_MPI_LOADED yes\n")
    script = f"""
source {LMOD_INIT}
module use {tmp_path}/stubs
module use {site_prefix}/{tree}
module load spmd-diff/{version_of(site_prefix)} || exit 9
echo "found=$(command -v spmd-diff) python=$SPMD_DIFF_PYTHON mpi=${{STUB_MPI_LOADED:-no}}"
spmd-diff --help >/dev/null || exit 8
"""
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=180, env=clean_env(),
                            cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"found={site_prefix}/bin/spmd-diff python={site_prefix}/venv/bin/python mpi=yes" in result.stdout
