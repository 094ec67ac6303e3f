"""Faults on CPU ranks: SIGKILL of a rank, a hung rank, a full disk, failing items, Ctrl-C or
SIGTERM to the launcher (through ``spmd-diff launch``).

The promise under test: every item ends up rendered exactly once (bit-identical to an uninterrupted run) or
listed as failed with its reason, and a failure costs no more than the items in flight.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from spmd_diff.io.codec import psnr
from spmd_diff.io.frames import read_frames
from spmd_diff.io.store import item_key
from tests.mpi._mpirun import MPIRUN_FLAGS, _kill_group, _session_members, mpirun, mpirun_available

pytestmark = pytest.mark.skipif(not mpirun_available(), reason="mpirun or mpi4py missing")

REPO = Path(__file__).resolve().parents[2]
NUM_ITEMS = 20
FAST = ["--set", "video.num_inference_steps=2"]


@pytest.fixture(scope="module")
def env(demo_model_dir):
    return {"SPMD_DIFF_CACHE": str(demo_model_dir.parent)}


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("faults") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"id": f"item-{k:02d}", "prompt": f"scene number {k} with a red ball"}) + "\n"
                            for k in range(NUM_ITEMS)))
    return path


def command(num_ranks: int, prompts: Path, out: Path, *extra: str) -> list[str]:
    return ["mpirun", *MPIRUN_FLAGS, "-n", str(num_ranks), sys.executable, "-m", "spmd_diff", "run",
            str(REPO / "jobs/demo.toml"), "--prompts", str(prompts), "--out", str(out), *FAST, *extra]


def full_env(env: dict, **more: str) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **env, **more}


def videos(out: Path) -> dict[str, np.ndarray]:
    with h5py.File(out / "videos.h5", "r") as f:
        return {k: f["videos"][k][...] for k in f["videos"]}


def assert_exactly_once_and_equal(out: Path, reference: dict[str, np.ndarray]) -> None:
    files = sorted(p.name for p in (out / "items").glob("*/*"))
    assert all(name.endswith(".h5") and ".tmp." not in name for name in files), f"leftovers: {files}"
    keys = sorted(name.split(".")[0] for name in files)  # items/<xx>/<sha1(id)>.<identity>.<token>.h5
    assert keys == sorted(item_key(k) for k in reference), "one final file per item"
    got = videos(out)
    assert sorted(got) == sorted(reference)
    for key, video in reference.items():
        assert np.array_equal(got[key], video), f"{key} differs from the uninterrupted run"


@pytest.fixture(scope="module")
def reference(env, prompts, tmp_path_factory) -> dict[str, np.ndarray]:
    out = tmp_path_factory.mktemp("ref") / "out"
    result = mpirun(4, "spmd_diff", "run", str(REPO / "jobs/demo.toml"), "--prompts", str(prompts), "--out",
                    str(out), *FAST, timeout=300, env=env, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    return videos(out)


def rank_pids(session: int) -> dict[int, int]:
    """MPI rank -> pid of the ranks in a process session (read from each process's environment)."""
    pids = {}
    for pid in _session_members(session):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for entry in environ:
            if entry.startswith(b"OMPI_COMM_WORLD_RANK="):
                pids[int(entry.split(b"=", 1)[1])] = pid
    return pids


def start_and_kill(cmd: list[str], env: dict, out: Path, seed: int) -> subprocess.CompletedProcess:
    """Start the job, wait until a random number of items is done, SIGKILL a random rank."""
    rng = random.Random(seed)
    threshold = rng.randint(1, NUM_ITEMS // 2)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if len(list((out / "items").glob("*/*.h5"))) >= threshold:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the job finished before the kill point"
        ranks = rank_pids(proc.pid)
        os.kill(ranks[rng.randrange(4)], signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=60)
    except BaseException:
        _kill_group(proc)
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def assert_exactly_once_encoded(out: Path, reference: dict[str, np.ndarray]) -> None:
    """One final file per item, each an mp4 that decodes to its item's video (9 frames of 64x64): closer to that
    item's raw frames from the uninterrupted run than to any other item's."""
    files = sorted(p.name for p in (out / "items").glob("*/*"))
    assert all(name.endswith(".h5") and ".tmp." not in name for name in files), f"leftovers: {files}"
    assert sorted(name.split(".")[0] for name in files) == sorted(item_key(k) for k in reference)
    for key, video in reference.items():
        frames = read_frames(out, key)
        assert frames.shape == (9, 64, 64, 3), (key, frames.shape)
        own = psnr(video, frames)
        assert own > 20 and all(own > psnr(other, frames) + 5 for k, other in reference.items() if k != key), key


# A SIGKILL of a rank, with encoded output. (Killed ranks with raw output: the re-plan kills below. A killed
# launcher takes its ranks with it -- Open MPI's orted does that, not this program -- and leaves the store as a
# killed rank does.)
@pytest.mark.parametrize("seed,output", [(1, "h264")])
def test_kill_then_rerun_exactly_once(seed, output, env, prompts, reference, tmp_path):
    out = tmp_path / "out"
    form = ["--set", f"output.video={output}"]
    killed = start_and_kill(command(4, prompts, out, *form), full_env(env), out, seed)
    assert killed.returncode != 0
    partial = len(list((out / "items").glob("*/*.h5")))
    assert 0 < partial < NUM_ITEMS
    rerun = subprocess.run(command(4, prompts, out, *form), cwd=REPO, env=full_env(env), capture_output=True,
                           text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"{NUM_ITEMS - partial} to render" in rerun.stderr
    if output == "raw":
        assert_exactly_once_and_equal(out, reference)
    else:
        assert_exactly_once_encoded(out, reference)
        events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
        encodes = [e for e in events if e.get("ev") == "stage" and e.get("stage") == "encode_video" and e["ok"]]
        assert len({e["item"] for e in encodes}) >= NUM_ITEMS - partial  # the rerun's, each with its CPU time
        assert all(e["cpu_s"] > 0 for e in encodes)


def _kill_launch_tree(proc: subprocess.Popen) -> None:
    """Kill ``spmd-diff launch`` and the launcher it started in a session of its own, with that session's ranks."""
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if int(Path(entry, "stat").read_text().rsplit(")", 1)[1].split()[1]) == proc.pid:
                for pid in _session_members(int(entry.name)):
                    os.kill(pid, signal.SIGKILL)
        except (OSError, ValueError, IndexError):
            continue
    _kill_group(proc)


def _launch_and_stop(env: dict, prompts: Path, out: Path, sig: int, at_items: int,
                     *extra: str) -> subprocess.CompletedProcess:
    """``spmd-diff launch mpirun -n 4 spmd-diff run ... EXTRA``; ``sig`` to the launch once ``at_items`` items are on
    disk."""
    launch = [sys.executable, "-m", "spmd_diff", "launch", *command(4, prompts, out, *extra)]
    proc = subprocess.Popen(launch, cwd=REPO, env=full_env(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if len(list((out / "items").glob("*/*.h5"))) >= at_items:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the job finished before the signal"
        os.kill(proc.pid, sig)
        stdout, stderr = proc.communicate(timeout=120)
    except BaseException:
        _kill_launch_tree(proc)
        raise
    return subprocess.CompletedProcess(launch, proc.returncode, stdout, stderr)


def _assert_stopped_gracefully(stopped: subprocess.CompletedProcess, sig: int, out: Path) -> set[str]:
    """Exit 75, no denoised item lost, the view published and listing every finished item; returns their keys."""
    assert stopped.returncode == 75, stopped.stderr[-3000:]
    assert f"{signal.Signals(sig).name}: asking every rank to finish the items in flight" in stopped.stderr
    assert "SIGUSR1 received: finishing the items in flight" in stopped.stderr
    finished = {p.name.split(".")[0] for p in (out / "items").glob("*/*.h5")}
    assert 0 < len(finished) < NUM_ITEMS
    with h5py.File(out / "videos.h5", "r") as f:
        assert {item_key(k) for k in f["videos"]} == finished
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    last_start = max(e["t"] for e in events if e["ev"] == "job_start")
    run = [e for e in events if e.get("t", e.get("t0", 0)) >= last_start]
    assert [e["status"] for e in run if e["ev"] == "job_end"] == ["interrupted"]
    denoised = {e["item"] for e in run if e["ev"] == "stage" and e["stage"] == "denoise" and e["ok"]}
    written = {e["item"] for e in run if e["ev"] == "stage" and e["stage"] == "write" and e["ok"]}
    assert denoised <= written, f"denoised but lost: {sorted(denoised - written)}"
    return finished


@pytest.mark.parametrize("batches", [(), ("--set", 'roles.policy="auto"', "--set", "roles.batch_s=0.001")],
                         ids=["one-batch", "batches-flowing"])
def test_ctrl_c_to_the_launch_stops_gracefully_and_the_job_resumes_exactly_once(batches, env, prompts, reference,
                                                                                 tmp_path):
    """Ctrl-C (SIGINT) to the job's launch command (``spmd-diff launch mpirun ...``): exit 75, no item in flight
    lost, the view lists every finished item; the rerun renders only the rest and completes the job
    bit-identical to an uninterrupted one. (A bare mpirun cannot do this: Open MPI turns the signal into SIGKILL
    of every rank a second later, exit 1.) SIGTERM to the launch command takes the same path: it is tested
    through srun in tests/slurm/test_launch_signals.py. ``batches-flowing``: the auto plan (every rank every
    stage) in short batches (8 items, then 12): no rank waits for the others at a batch's end, and the stop
    reaches the ranks through the timings they post."""
    out = tmp_path / "out"
    second = _assert_stopped_gracefully(_launch_and_stop(env, prompts, out, signal.SIGINT, 2, *batches),
                                        signal.SIGINT, out)
    if batches:  # the stop came while the ranks ran short batches
        events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
        assert any(e["ev"] == "batch_end" and e["batch"] == 0 and not e["last"] for e in events)
    rerun = subprocess.run(command(4, prompts, out, *batches), cwd=REPO, env=full_env(env), capture_output=True,
                           text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"{NUM_ITEMS - len(second)} to render" in rerun.stderr
    assert_exactly_once_and_equal(out, reference)


def test_hung_rank_becomes_an_error_within_the_deadline(env, prompts, tmp_path):
    out = tmp_path / "out"
    hooks = json.dumps([{"action": "hang", "stage": "denoise", "item": "item-05", "rank": 2},
                        {"action": "hang", "stage": "denoise", "item": "item-05", "rank": 3}])
    started = time.monotonic()
    proc = subprocess.run(command(4, prompts, out, "--set", "run.timeout_s=5"), cwd=REPO, capture_output=True,
                          text=True, timeout=240, env=full_env(env, SPMD_DIFF_TEST_HOOKS=hooks))
    elapsed = time.monotonic() - started
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "test hook: hanging in denoise of 'item-05'" in proc.stderr
    diagnostic = [line for line in proc.stderr.splitlines() if "spmd-diff: error" in line]
    assert diagnostic, proc.stderr[-3000:]
    text = "\n".join(diagnostic)
    # Whoever noticed first names the channel and the stuck DiT rank (2 or 3) it was waiting for.
    assert re.search(r"channel '(enc0->dit[23]|dit[23]->dec1)'", text), text
    assert re.search(r"(producer|consumer) rank [23]", text), text
    assert elapsed < 150, f"took {elapsed:.0f} s"
    for path in (out / "items").glob("*/*.h5"):  # whatever is under a final name is complete
        with h5py.File(path, "r") as f:
            assert f["video"].shape == (9, 64, 64, 3)


def test_a_rank_hung_while_every_rank_renders_alone_stops_the_job_within_the_deadline(env, prompts, tmp_path):
    """The auto plan on CPU ranks (every rank every stage: no channel whose wait would notice a stuck peer), short
    batches: rank 2 hangs in its first denoise; the others finish what they can, then give up waiting for its
    batch within the deadline (run.timeout_s = 5: 15 s) and the job exits 3; what is written is complete."""
    out = tmp_path / "out"
    hooks = json.dumps([{"action": "hang", "stage": "denoise", "item": "*", "rank": 2}])
    started = time.monotonic()
    proc = subprocess.run(command(4, prompts, out, "--set", 'roles.policy="auto"', "--set", "roles.batch_s=0.001",
                                  "--set", "run.timeout_s=5"),
                          cwd=REPO, capture_output=True, text=True, timeout=240,
                          env=full_env(env, SPMD_DIFF_TEST_HOOKS=hooks))
    elapsed = time.monotonic() - started
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "the other ranks did not all finish their share of the batch within 15 s" in proc.stderr, \
        proc.stderr[-3000:]
    assert elapsed < 150, f"took {elapsed:.0f} s"
    written = list((out / "items").glob("*/*.h5"))
    assert 0 < len(written) < NUM_ITEMS
    for path in written:  # whatever is under a final name is complete
        with h5py.File(path, "r") as f:
            assert f["video"].shape == (9, 64, 64, 3)


@pytest.mark.parametrize("output", ["hevc"])  # raw: test_speed_engine's full disk in the background writer
def test_full_disk_stops_cleanly_and_the_store_stays_readable(output, env, prompts, tmp_path):
    out = tmp_path / "out"
    first = tmp_path / "first.jsonl"
    first.write_text("".join(prompts.read_text().splitlines(keepends=True)[:2]))
    base = [sys.executable, "-m", "spmd_diff", "run", str(REPO / "jobs/demo.toml"), "--out", str(out), *FAST,
            "--set", f"output.video={output}"]
    ok = subprocess.run(base + ["--prompts", str(first)], cwd=REPO, env=full_env(env), capture_output=True, text=True,
                        timeout=300)
    assert ok.returncode == 0, ok.stderr[-3000:]
    # Now the file system "fills up": once writing (raw) or encoding (hevc) starts, no file may grow past 40 KB
    # (raw) or 8 KB (hevc); an item file is ~120 KB raw, ~20 KB as an mp4 of the demo's noise.
    stage, limit = ("write", 40_000) if output == "raw" else ("encode_video", 8_000)
    hooks = json.dumps([{"action": "limit_file_size", "stage": stage, "item": "*", "bytes": limit}])
    full = subprocess.run(base + ["--prompts", str(prompts)], cwd=REPO, env=full_env(env, SPMD_DIFF_TEST_HOOKS=hooks),
                          capture_output=True, text=True, timeout=300)
    assert full.returncode == 4, full.stderr[-3000:]
    assert "cannot write item" in full.stderr and "rerun the same command" in full.stderr
    got = videos(out)  # the view of the first run is intact and readable
    assert sorted(got) == ["item-00", "item-01"]
    assert all(read_frames(out, k).shape == (9, 64, 64, 3) for k in got)
    assert len(list((out / "items").glob("*/*.h5"))) == 2
    again = subprocess.run(base + ["--prompts", str(prompts)], cwd=REPO, env=full_env(env), capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(videos(out)) == NUM_ITEMS
    assert all(read_frames(out, k).shape == (9, 64, 64, 3) for k in videos(out))


def test_failed_items_are_listed_then_retried(env, prompts, tmp_path):
    out = tmp_path / "out"
    hooks = json.dumps([{"action": "fail", "stage": "encode", "item": "item-03"},
                        {"action": "nan", "stage": "denoise", "item": "item-07"},
                        {"action": "fail", "stage": "decode", "item": "item-11"}])
    first = mpirun(4, "spmd_diff", "run", str(REPO / "jobs/demo.toml"), "--prompts", str(prompts), "--out", str(out),
                   *FAST, timeout=300, env={**env, "SPMD_DIFF_TEST_HOOKS": hooks}, cwd=REPO)
    assert first.returncode == 0, first.stderr[-3000:]
    with h5py.File(out / "videos.h5", "r") as f:
        assert sorted(f["failed"]) == ["item-03", "item-07", "item-11"]
        assert "injected failure in encode" in f["failed"]["item-03"].attrs["error"]
        assert "non-finite" in f["failed"]["item-07"].attrs["error"]
        assert f["failed"]["item-11"].attrs["stage"] == "decode"
        assert len(f["videos"]) == NUM_ITEMS - 3
    # The follow-up runs use one rank (same videos, a third of the start-up cost on a 2-core CI machine).
    plain = mpirun(1, "spmd_diff", "run", str(REPO / "jobs/demo.toml"), "--prompts", str(prompts), "--out", str(out),
                   *FAST, timeout=300, env=env, cwd=REPO)
    assert plain.returncode == 0 and "nothing to render (no model loaded)" in plain.stderr, plain.stderr[-2000:]
    assert "3 failed earlier: rerun with --retry-failed" in plain.stderr, plain.stderr[-2000:]
    retry = mpirun(1, "spmd_diff", "run", str(REPO / "jobs/demo.toml"), "--prompts", str(prompts), "--out", str(out),
                   *FAST, "--retry-failed", timeout=300, env=env, cwd=REPO)
    assert retry.returncode == 0 and "3 to render" in retry.stderr, retry.stderr[-2000:]
    with h5py.File(out / "videos.h5", "r") as f:
        assert len(f["videos"]) == NUM_ITEMS and len(f["failed"]) == 0


# roles.policy = "auto" with one stage per rank, short batches and a slow denoise: the planner moves ranks to the
# DiT after the first batch (tests/mpi/test_replan_mpi.py shows it does), so the kills below land in a re-plan.
REPLANNING = ("--set", 'roles.policy="auto"', "--set", "roles.colocate=false", "--set", "roles.batch_s=0.5")


def _killed_at(point: str, victim: int, env: dict, prompts: Path, out: Path) -> subprocess.CompletedProcess:
    item = "batch-1" if point == "batch_start" else "*"  # the batch after the first re-plan; any re-plan
    hooks = json.dumps([{"action": "exit", "stage": point, "item": item, "rank": victim}])
    return subprocess.run(command(4, prompts, out, *REPLANNING), cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=full_env(env, SPMD_DIFF_INJECT_DELAY="denoise:0.8",
                                                    SPMD_DIFF_TEST_HOOKS=hooks))


def test_a_kill_during_and_right_after_a_replan_then_rerun_exactly_once(env, prompts, reference, tmp_path):
    """A random rank dies while the ranks switch to a new plan (``replan``), then, in the rerun, one dies as the
    first batch of the new plan starts (``batch_start`` of batch 1, channels re-targeted and components
    reloaded). The last run completes: every item once, bit-identical to the uninterrupted run."""
    out, rng = tmp_path / "out", random.Random(13)
    done = 0
    for point in ("replan", "batch_start"):
        victim = rng.randrange(4)
        killed = _killed_at(point, victim, env, prompts, out)
        assert killed.returncode != 0, killed.stderr[-3000:]
        assert "re-plan after batch 0" in killed.stderr, (point, killed.stderr[-3000:])
        now = len(list((out / "items").glob("*/*.h5")))
        assert done < now < NUM_ITEMS, (point, victim, done, now)  # the first batch's items are kept, no more
        done = now
    rerun = subprocess.run(command(4, prompts, out, *REPLANNING), cwd=REPO, env=full_env(env), capture_output=True,
                           text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"{NUM_ITEMS - done} to render" in rerun.stderr
    assert_exactly_once_and_equal(out, reference)


def test_many_producers_into_one_slow_consumer_finish_without_a_deadline_abort(env, prompts, reference, tmp_path):
    """Three DiT leaders feed one decoder that takes ~1 s per item through one-slot rings, with
    ``run.timeout_s = 2`` (no stage of an item takes longer): a leader with a full ring waits for one item of each
    other leader, ~3 s (asserted below: a 2 s deadline would stop it), and the deadline allows for that queue. A dead peer is still found: tests above (hung rank) use the same rule."""
    out, few = tmp_path / "out", tmp_path / "few.jsonl"
    few.write_text("".join(prompts.read_text().splitlines(keepends=True)[:12]))
    result = subprocess.run(command(5, few, out, "--set", "roles.encoders=1", "--set", "roles.decoders=1",
                                    "--set", "run.timeout_s=2", "--set", "run.ring_slots=1"),
                            cwd=REPO, capture_output=True, text=True, timeout=300,
                            env=full_env(env, SPMD_DIFF_INJECT_DELAY="decode:1.0"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "a consumer serves at most 3 producer(s)" in result.stderr
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    credit = [e["t1"] - e["t0"] for e in events if e["ev"] == "wait" and e.get("what") == "credit"]
    assert max(credit) > 2.0, f"no producer queued longer than a stage: {sorted(credit)[-5:]}"
    got = videos(out)
    assert sorted(got) == sorted(reference)[:12]
    for key, video in got.items():
        assert np.array_equal(video, reference[key]), key
