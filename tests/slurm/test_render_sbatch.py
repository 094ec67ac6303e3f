"""slurm/render.sbatch and slurm/render-array.sbatch on a real local Slurm, checked against a one-process run.

Every job here renders the same NUM_PROMPTS prompts with the demo model, so each result is compared item by item with
``reference_out`` (conftest.py): same ids, frames equal within one uint8 level, every item exactly once.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import h5py
import numpy as np
import pytest

from tests.slurm.conftest import DEMO_JOB, NUM_PROMPTS, REPO, RUN_SETTINGS

RENDER = REPO / "slurm" / "render.sbatch"
RENDER_ARRAY = REPO / "slurm" / "render-array.sbatch"
JOB_TIMEOUT_S = 420


def read_view(out: Path) -> dict[str, np.ndarray]:
    with h5py.File(out / "videos.h5", "r") as f:
        return {k: f["videos"][k][...] for k in f["videos"]}


def item_files(out: Path) -> list[Path]:
    return sorted((out / "items").glob("*/*.h5"))


def assert_matches_reference(out: Path, reference: Path) -> None:
    """Same ids as the reference, one finished file each, frames within one uint8 level, no temporaries."""
    expected = read_view(reference)
    got = read_view(out)
    assert sorted(got) == sorted(expected)
    ids_in_files = []
    for path in item_files(out):
        with h5py.File(path, "r") as f:
            ids_in_files.append(str(f["video"].attrs["id"]))
    assert Counter(ids_in_files) == Counter(list(expected)), "items/ must hold exactly one file per id"
    assert not list(out.rglob("*.tmp.*")), "temporary files left behind"
    for item_id, video in expected.items():
        assert got[item_id].shape == video.shape, item_id
        diff = np.abs(got[item_id].astype(np.int16) - video.astype(np.int16)).max()
        assert diff <= 1, f"{item_id}: frames differ by {diff} levels"


def write_counts(out: Path) -> Counter:
    """How often each item was written, over every run recorded in OUT/events/ (a resumed job appends)."""
    counts: Counter = Counter()
    for path in (out / "events").glob("rank-*.jsonl"):
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("ev") == "stage" and record.get("stage") == "write":
                counts[record["item"]] += 1
    return counts


def submit_render(cluster, demo_env, out: Path, prompts: Path, *sbatch_opts: str, script: Path = RENDER,
                  env: dict | None = None) -> tuple[str, Path]:
    log = out.parent / f"{out.name}-%j.log"
    argv = [*sbatch_opts, f"--output={log}", str(script), str(DEMO_JOB), str(prompts), str(out), *RUN_SETTINGS]
    job_id = cluster.submit(argv, env={**demo_env, **(env or {})}, cwd=str(out.parent))
    return job_id, out.parent / f"{out.name}-{job_id}.log"


def job_logs(out: Path) -> str:
    return "\n".join(f"----- {p}\n{p.read_text(errors='replace')}" for p in sorted(out.parent.glob(f"{out.name}-*.log")))


def wait_ok(cluster, job_id: str, out: Path, timeout_s: float = JOB_TIMEOUT_S) -> list[dict]:
    try:
        records = cluster.wait_job(job_id, timeout_s)
    except TimeoutError as exc:
        pytest.fail(f"{exc}\n{job_logs(out)}\n{cluster.logs(20)}")
    for record in records:
        assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", (record, job_logs(out))
    return records


def wait_until(ready, cluster, job_id: str, out: Path, what: str, timeout_s: float = JOB_TIMEOUT_S) -> None:
    """Poll ``ready()``; fail at once (with the job's log) if the job ends first, or after ``timeout_s``."""
    deadline, polls = time.monotonic() + timeout_s, 0
    while not ready():
        polls += 1
        if polls % 10 == 0 and cluster.job_finished(job_id):
            pytest.fail(f"job {job_id} ended before {what}\n{job_logs(out)}")
        if time.monotonic() > deadline:
            cluster.run(["scancel", job_id], check=False)
            pytest.fail(f"no {what} after {timeout_s} s\n{job_logs(out)}")
        time.sleep(0.2)


def log_has(log: Path, after: str, text: str):
    """A predicate: ``text`` appears in the job log after the first ``after``."""
    def ready() -> bool:
        content = log.read_text(errors="replace") if log.exists() else ""
        _, found, tail = content.partition(after)
        return bool(found) and text in tail
    return ready


@pytest.mark.timeout(3 * JOB_TIMEOUT_S)
def test_signals_requeue_and_the_job_resumes_exactly_once(slurm_cluster, demo_env, prompts_file, reference_out,
                                                          tmp_path):
    """One job, interrupted twice, three runs:

    1. `scancel --signal=TERM` once the first item is on disk: the ranks get SIGTERM (as with --signal=TERM@T,
       preemption or a time limit), finish what is in flight, exit 75; the script requeues;
    2. `scancel --batch --signal=USR1` once the second run has written an item: only the batch shell gets it
       (as with --signal=B:USR1@T) and must forward it to the ranks; exit 75, requeue again;
    3. the third run renders what is left.
    The result must hold every item exactly once (one file, one write event over all runs) and equal the
    uninterrupted one-process run. Each run is one MPI world of 4 tasks started by srun.
    """
    out = tmp_path / "out"
    # 4 ranks: at most ~8 items in flight when a signal lands, 24 prompts.
    job_id, log = submit_render(slurm_cluster, demo_env, out, prompts_file, "--ntasks=4")
    wait_until(lambda: len(item_files(out)) >= 1, slurm_cluster, job_id, out, "first item")
    slurm_cluster.run(["scancel", "--signal=TERM", job_id])
    wait_until(log_has(log, "restart 1,", "to render"), slurm_cluster, job_id, out, "second run")
    num_done_by_first_run = len(item_files(out))
    wait_until(lambda: len(item_files(out)) > num_done_by_first_run, slurm_cluster, job_id, out,
               "an item from the second run")
    slurm_cluster.run(["scancel", "--batch", "--signal=USR1", job_id])
    records = wait_ok(slurm_cluster, job_id, out, 2 * JOB_TIMEOUT_S)
    text = log.read_text()
    assert "probe: srun started one MPI world of 4 rank(s)" in text, text
    assert f"launch: srun --mpi={slurm_cluster.mpi_default}" in text, text
    assert int(records[0]["Restarts"]) == 2, (records[0], text)
    assert text.count("requeued job") == 2 and "restart 2," in text, text
    first_run, _, later_runs = text.partition("restart 1,")
    second_run = later_runs.partition("restart 2,")[0]
    assert "SIGTERM received" in first_run, text
    assert "forwarded SIGUSR1 to the ranks" in second_run and "SIGUSR1 received" in second_run, text
    assert 0 < num_done_by_first_run < NUM_PROMPTS
    assert_matches_reference(out, reference_out)
    counts = write_counts(out)
    assert counts == Counter({item_id: 1 for item_id in read_view(reference_out)}), f"items written: {counts}"


@pytest.mark.timeout(JOB_TIMEOUT_S + 120)
def test_array_shards_merge_into_one_view(slurm_cluster, demo_env, prompts_file, reference_out, tmp_path):
    """Two array tasks, each rendering its shard into the same OUT/. They also take the fallback launch path:
    with srun --mpi=none the srun probe fails and render.sbatch runs Open MPI's mpirun in the allocation."""
    out = tmp_path / "out"
    array_id, _ = submit_render(slurm_cluster, demo_env, out, prompts_file, "--array=0-1", "--ntasks=1",
                                script=RENDER_ARRAY, env={"SPMD_DIFF_SRUN_MPI": "none"})
    records = wait_ok(slurm_cluster, array_id, out)
    assert len(records) == 2
    logs = job_logs(out)
    assert "--shard 0/2" in logs and "--shard 1/2" in logs, logs
    assert logs.count("falling back to mpirun inside the allocation") == 2, logs
    assert logs.count(f"{NUM_PROMPTS // 2} to render") == 2, logs
    # The last task to finish merged every task's items into the view; `spmd-diff merge` rebuilds the same.
    assert_matches_reference(out, reference_out)
    merge = subprocess.run([sys.executable, "-m", "spmd_diff", "merge", str(out)], capture_output=True, text=True,
                           cwd=REPO, env={**slurm_cluster.env, **demo_env}, timeout=120)
    assert merge.returncode == 0, merge.stderr
    assert_matches_reference(out, reference_out)
    with h5py.File(out / "videos.h5", "r") as f:
        assert int(f.attrs["num_videos"]) == NUM_PROMPTS


@pytest.mark.timeout(240)
def test_render_sbatch_refuses_a_launch_that_is_not_one_mpi_job(slurm_cluster, demo_env, prompts_file, tmp_path):
    """srun --mpi=none: the tasks cannot form one MPI world; the script says so and renders nothing."""
    out = tmp_path / "out"
    job_id, log = submit_render(slurm_cluster, demo_env, out, prompts_file, "--ntasks=2",
                                env={"SPMD_DIFF_SRUN_MPI": "none", "SPMD_DIFF_LAUNCHER": "srun"})
    records = slurm_cluster.wait_job(job_id, 200)
    text = log.read_text()
    assert records[0]["JobState"] == "FAILED" and records[0]["ExitCode"] == "2:0", (records[0], text)
    assert "srun cannot start one MPI job of 2 task(s)" in text, text
    assert int(records[0]["Restarts"]) == 0
    assert not item_files(out)


@pytest.mark.timeout(240)
def test_engine_refuses_singletons_under_srun(slurm_cluster, demo_env, prompts_file, tmp_path):
    """Two srun tasks that each start a singleton MPI world (as with an MPI that srun's PMI cannot reach): the
    engine sees world size 1 but SLURM_STEP_NUM_TASKS=2 and every task exits 2 before touching OUT."""
    out = tmp_path / "out"
    keep = ["PATH", "HOME", "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_PROCID", "SPMD_DIFF_CACHE", "PYTHONPATH"]
    wrapper = 'exec env -i ' + " ".join(f'{k}="${{{k}:-}}"' for k in keep) + ' "$@"'
    argv = ["srun", "--mpi=none", "--ntasks=2", "bash", "-c", wrapper, "wrapper", sys.executable, "-m", "spmd_diff",
            "run", str(DEMO_JOB), "--prompts", str(prompts_file), "--out", str(out), *RUN_SETTINGS]
    result = slurm_cluster.run(argv, env=demo_env, check=False, timeout=200, cwd=str(REPO))
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("Slurm started 2 tasks but MPI sees a world of 1") == 2, result.stderr
    assert not item_files(out)


@pytest.mark.timeout(JOB_TIMEOUT_S)
def test_plain_scancel_is_not_requeued(slurm_cluster, demo_env, prompts_file, tmp_path):
    """A cancel is a cancel: the ranks still stop cleanly (exit 75), but the script must not requeue the job
    (`scontrol requeue` would accept the cancelled job)."""
    out = tmp_path / "out"
    job_id, log = submit_render(slurm_cluster, demo_env, out, prompts_file, "--ntasks=1")
    wait_until(log_has(log, "restart 0,", "to render"), slurm_cluster, job_id, out, "the run to start")
    slurm_cluster.run(["scancel", job_id])
    records = slurm_cluster.wait_job(job_id, 120)
    time.sleep(3)  # the batch script may still be finishing its last lines when the job is already CANCELLED
    text = log.read_text()
    assert records[0]["JobState"] == "CANCELLED" and int(records[0]["Restarts"]) == 0, (records[0], text)
    assert "so not requeueing" in text and "requeued job" not in text, text
    assert len(item_files(out)) < NUM_PROMPTS


@pytest.mark.timeout(240)
def test_signal_before_the_launch_stops_without_rendering(slurm_cluster, demo_env, prompts_file, tmp_path):
    """A warning signal that reaches the batch shell while it is still probing the launch: the shell survives
    (traps come first), starts nothing and exits 75. (SPMD_DIFF_MAX_RESTARTS=0 keeps this test to one run.)"""
    out = tmp_path / "out"
    job_id, log = submit_render(slurm_cluster, demo_env, out, prompts_file, "--ntasks=2",
                                env={"SPMD_DIFF_MAX_RESTARTS": "0"})
    wait_until(log_has(log, "render.sbatch: job", "restart 0,"), slurm_cluster, job_id, out, "the script to start")
    slurm_cluster.run(["scancel", "--batch", "--signal=USR1", job_id])
    records = slurm_cluster.wait_job(job_id, 200)
    text = log.read_text()
    assert "got SIGUSR1" in text and "a stop signal arrived before the launch" in text, text
    assert records[0]["ExitCode"] == "75:0" and int(records[0]["Restarts"]) == 0, (records[0], text)
    assert "not requeueing" in text and "spmd-diff exited" not in text, text
    assert not item_files(out)
