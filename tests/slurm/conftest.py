"""tests/slurm: a real one-node Slurm (munged, slurmctld, slurmd from Debian's packages) for the session.

The cluster lives in a temporary directory and is stopped at the end. Where Slurm cannot start at all (not
installed, not root) the tests skip with the reason and the daemons' logs; set SPMD_DIFF_REQUIRE_SLURM=1 (CI)
to make that a failure instead.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.slurm.cluster import LocalSlurm, SlurmUnavailable

REPO = Path(__file__).resolve().parents[2]
DEMO_JOB = REPO / "jobs" / "demo.toml"
# Small renders: the demo model, 2 denoising steps. The same settings for every run a test compares.
RUN_SETTINGS = ("--set", "video.num_inference_steps=2")
NUM_PROMPTS = 24  # enough that the items in flight when a signal lands never finish the job
SUBJECTS = ("a cat", "a surfer", "a city skyline", "a dog", "a forest", "rain on a window", "a red kite",
            "a paper boat", "a lighthouse", "a sleeping fox", "a glass of water", "a steam train")


@pytest.fixture(scope="session")
def slurm_cluster():
    """A started :class:`LocalSlurm`; its ``env`` is what client commands need (SLURM_CONF)."""
    # A short root: the munge socket path must fit in a sockaddr_un (108 bytes).
    root = Path(tempfile.mkdtemp(prefix="spmd-slurm-", dir="/tmp"))
    cluster = LocalSlurm(root)
    try:
        cluster.start()
    except SlurmUnavailable as exc:
        shutil.rmtree(root, ignore_errors=True)
        message = f"Slurm cannot start on this machine: {exc}"
        if os.environ.get("SPMD_DIFF_REQUIRE_SLURM") == "1":
            pytest.fail(message)
        pytest.skip(message)
    print(f"local Slurm up in {root} (srun --mpi default: {cluster.mpi_default})", file=sys.stderr)
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def demo_env(demo_model_dir) -> dict[str, str]:
    """Environment for renders: the demo model the session built (jobs/demo.toml has model.path = "demo")."""
    return {"SPMD_DIFF_CACHE": str(demo_model_dir.parent), "PYTHONUNBUFFERED": "1",
            "SPMD_DIFF_PYTHON": sys.executable}


@pytest.fixture(scope="session")
def prompts_file(tmp_path_factory) -> Path:
    """NUM_PROMPTS prompts (ids p00, p01, ...), some with their own seed or negative prompt."""
    path = tmp_path_factory.mktemp("slurm_prompts") / "prompts.jsonl"
    lines = []
    for i in range(NUM_PROMPTS):
        record = {"id": f"p{i:02d}", "prompt": f"{SUBJECTS[i % len(SUBJECTS)]}, cinematic, item {i}"}
        if i % 3 == 1:
            record["seed"] = 1000 + i
        if i % 4 == 2:
            record["negative_prompt"] = "static, dark"
        lines.append(json.dumps(record) + "\n")
    path.write_text("".join(lines))
    return path


@pytest.fixture(scope="session")
def reference_out(tmp_path_factory, demo_env, prompts_file) -> Path:
    """The same prompts rendered by one plain process, outside Slurm: what every Slurm run must equal."""
    out = tmp_path_factory.mktemp("slurm_reference") / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
    env.update(demo_env)
    cmd = [sys.executable, "-m", "spmd_diff", "run", str(DEMO_JOB), "--prompts", str(prompts_file),
           "--out", str(out), *RUN_SETTINGS]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert result.returncode == 0, f"reference run failed ({result.returncode}):\n{result.stderr[-4000:]}"
    return out
