"""Ctrl-C and SIGTERM to an interactive srun launch end gracefully: exit 75, the items in flight finished, the view
published, and a rerun renders exactly the rest.

srun itself turns SIGTERM into SIGKILL of every task, and a single Ctrl-C into a status report; so the documented
ways are ``spmd-diff launch srun ...`` (SIGTERM or Ctrl-C to it become SIGUSR1 to the tasks) and, for Ctrl-C only,
``srun --disable-status`` (-X: one Ctrl-C is passed to the tasks as SIGINT).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py

from tests.slurm.conftest import DEMO_JOB, NUM_PROMPTS, REPO, RUN_SETTINGS
from tests.slurm.test_render_sbatch import assert_matches_reference, item_files


def _start(cluster, demo_env, argv: list[str]) -> subprocess.Popen:
    env = {k: v for k, v in cluster.env.items() if not k.startswith(("SLURM_JOB", "SLURM_STEP"))}
    env.update(demo_env, OMP_NUM_THREADS="1")
    return subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _signal_after_two_items(proc: subprocess.Popen, out: Path, sig: int, cluster) -> tuple[str, str]:
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None and len(item_files(out)) < 2:
            time.sleep(0.05)
        assert proc.poll() is None, "the job finished before the signal"
        os.kill(proc.pid, sig)
        return proc.communicate(timeout=120)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        cluster.run(["scancel", "--user", "root"], check=False)
        raise


def _assert_stopped_gracefully(out: Path, returncode: int, stderr: str) -> set[str]:
    assert returncode == 75, stderr[-3000:]
    finished = {p.name.split(".")[0] for p in item_files(out)}
    assert 0 < len(finished) < NUM_PROMPTS
    with h5py.File(out / "videos.h5", "r") as f:
        assert len(f["videos"]) == len(finished)
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    denoised = {e["item"] for e in events if e["ev"] == "stage" and e["stage"] == "denoise" and e["ok"]}
    written = {e["item"] for e in events if e["ev"] == "stage" and e["stage"] == "write" and e["ok"]}
    assert denoised <= written, f"denoised but lost: {sorted(denoised - written)}"
    return finished


def _run_argv(prompts: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "spmd_diff", "run", str(DEMO_JOB), "--prompts", str(prompts), "--out", str(out),
            *RUN_SETTINGS]


def test_sigterm_to_spmd_diff_launch_srun(slurm_cluster, demo_env, prompts_file, reference_out, tmp_path):
    out = tmp_path / "out"
    launch = [sys.executable, "-m", "spmd_diff", "launch", "srun", "-n", "3", *_run_argv(prompts_file, out)]
    proc = _start(slurm_cluster, demo_env, launch)
    _, stderr = _signal_after_two_items(proc, out, signal.SIGTERM, slurm_cluster)
    assert "SIGTERM: asking every rank to finish the items in flight" in stderr
    finished = _assert_stopped_gracefully(out, proc.returncode, stderr)
    rerun = _start(slurm_cluster, demo_env, ["srun", "-n", "3", *_run_argv(prompts_file, out)])
    _, stderr = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, stderr[-3000:]
    assert f"{NUM_PROMPTS - len(finished)} to render" in stderr
    assert_matches_reference(out, reference_out)


def test_ctrl_c_to_srun_with_disable_status(slurm_cluster, demo_env, prompts_file, tmp_path):
    out = tmp_path / "out"
    proc = _start(slurm_cluster, demo_env, ["srun", "--disable-status", "-n", "3", *_run_argv(prompts_file, out)])
    _, stderr = _signal_after_two_items(proc, out, signal.SIGINT, slurm_cluster)
    assert "SIGINT received: finishing the items in flight" in stderr
    _assert_stopped_gracefully(out, proc.returncode, stderr)
