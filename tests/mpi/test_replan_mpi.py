"""roles.policy = "auto" on 4 CPU ranks: a stage made slower (SPMD_DIFF_INJECT_DELAY) makes the planner move ranks
to it between batches; where every rank renders whole items alone, no rank waits for a slow one at a batch's end;
and the videos stay those of one rank rendering alone."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from tests.mpi._mpirun import mpirun, mpirun_available

pytestmark = pytest.mark.skipif(not mpirun_available(), reason="mpirun or mpi4py missing")

REPO = Path(__file__).resolve().parents[2]
SUBJECTS = ("a cat", "a dog", "a surfer", "a forest", "rain on a window", "a red kite", "a paper boat", "a fox",
            "a steam train", "a lake", "a city at night", "an owl")
FAST = ("--set", "video.num_inference_steps=2")
# One stage per rank (colocate off), so the plan is a split the planner must choose; short batches.
AUTO = ("--set", 'roles.policy="auto"', "--set", "roles.colocate=false", "--set", "roles.batch_s=0.5")


def run(num_ranks: int, prompts: Path, out: Path, env: dict, *extra: str):
    return mpirun(num_ranks, "spmd_diff", "run", str(REPO / "jobs/demo.toml"), "--prompts", str(prompts),
                  "--out", str(out), *FAST, *extra, timeout=400, env=env, cwd=REPO)


def videos(out: Path) -> dict[str, np.ndarray]:
    with h5py.File(out / "videos.h5", "r") as f:
        return {k: f["videos"][k][...] for k in f["videos"]}


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("replan") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"id": f"item-{i:02d}", "prompt": s}) + "\n" for i, s in enumerate(SUBJECTS)))
    return path


@pytest.fixture(scope="module")
def alone(demo_model_dir, prompts, tmp_path_factory) -> dict[str, np.ndarray]:
    """Every video as one rank renders it alone (static plan, one batch)."""
    out = tmp_path_factory.mktemp("alone") / "out"
    result = run(1, prompts, out, {"SPMD_DIFF_CACHE": str(demo_model_dir.parent)})
    assert result.returncode == 0, result.stderr[-4000:]
    got = videos(out)
    assert sorted(got) == [f"item-{i:02d}" for i in range(len(SUBJECTS))]
    return got


def events_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]


def test_a_slow_denoise_moves_ranks_to_the_dit_within_two_batches(demo_model_dir, prompts, alone, tmp_path):
    env = {"SPMD_DIFF_CACHE": str(demo_model_dir.parent)}
    auto = run(4, prompts, tmp_path / "auto", {**env, "SPMD_DIFF_INJECT_DELAY": "denoise:0.6"}, *AUTO)
    assert auto.returncode == 0, auto.stderr[-4000:]
    events = events_of(tmp_path / "auto")
    start = next(e for e in events if e["ev"] == "job_start")
    assert start["testing_aids"] == {"SPMD_DIFF_INJECT_DELAY": "denoise:0.6"}  # what the CLI read, recorded
    replans = [e for e in events if e["ev"] == "replan"]
    assert replans, f"no re-plan; plan {start['plan']}"
    first = replans[0]
    assert first["batch"] <= 1 and first["timings_of_batch"] == first["batch"], first  # drained: no lag
    before = sum(len(g) for g in first["old_plan"]["dit_groups"])
    after = sum(len(g) for g in first["new_plan"]["dit_groups"])
    assert after > before, (first["old_plan"], first["new_plan"])
    # The timings behind the decision say denoise was the stage that grew.
    stages = first["timings"]["stages"]
    per_item = {stage: v["busy_s"] / v["items"] for stage, v in stages.items()}
    assert per_item["denoise"] >= 0.6 and per_item["denoise"] > per_item["decode"], stages
    # Every item exactly once, each video what one rank renders alone.
    got = videos(tmp_path / "auto")
    assert sorted(got) == sorted(alone)
    for key in alone:
        assert np.array_equal(got[key], alone[key]), key


def test_ranks_rendering_alone_go_on_to_the_next_batch_without_waiting_for_a_slow_rank(demo_model_dir, prompts,
                                                                                         alone, tmp_path):
    # Every stage on every rank (the auto plan on CPU ranks), short batches (two items per rank, then 4 items);
    # rank 3's denoise takes 1.5 s longer, so it is still on an item of the first batch when the others have
    # emptied it.
    slow = [{"action": "delay", "stage": "denoise", "item": "*", "rank": 3, "seconds": 1.5}]
    env = {"SPMD_DIFF_CACHE": str(demo_model_dir.parent), "SPMD_DIFF_TEST_HOOKS": json.dumps(slow)}
    out = tmp_path / "flowing"
    result = run(4, prompts, out, env, "--set", 'roles.policy="auto"', "--set", "roles.batch_s=0.001")
    assert result.returncode == 0, result.stderr[-4000:]
    events = events_of(out)
    start = next(e for e in events if e["ev"] == "job_start")
    assert all(g == [r] for r, g in enumerate(start["plan"]["dit_groups"])) and not start["plan"]["encoders"] \
        and not start["plan"]["decoders"], start["plan"]
    ends = {(e["rank"], e["batch"]): e for e in events if e["ev"] == "batch_end"}
    assert sorted({b for _, b in ends}) == [0, 1] and all((r, b) in ends for r in range(4) for b in (0, 1)), ends
    assert [ends[(0, b)]["items"] for b in (0, 1)] == [8, 4]
    first_batch = {e["item"] for e in events if e["ev"] == "stage" and e["stage"] == "encode"
                   and e["t0"] < ends[(e["rank"], 0)]["t"]}
    assert len(first_batch) == 8, first_batch
    # A fast rank started an item of the second batch before the slow rank finished its share of the first.
    second_starts = [e["t0"] for e in events if e["ev"] == "stage" and e["stage"] == "encode"
                     and e["item"] not in first_batch and e["rank"] != 3]
    assert second_starts and min(second_starts) < ends[(3, 0)]["t"] - 0.5, (min(second_starts), ends[(3, 0)])
    assert not [e for e in events if e["ev"] == "replan"]
    got = videos(out)
    assert sorted(got) == sorted(alone)
    for key in alone:
        assert np.array_equal(got[key], alone[key]), key
