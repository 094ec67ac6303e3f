"""roles.policy = "auto" on 4 CPU ranks: a stage made slower (SPMD_DIFF_INJECT_DELAY) makes the planner move ranks
to it between batches, and the videos stay those of one rank rendering alone."""

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


def test_a_slow_denoise_moves_ranks_to_the_dit_within_two_batches(demo_model_dir, tmp_path):
    env = {"SPMD_DIFF_CACHE": str(demo_model_dir.parent)}
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"item-{i:02d}", "prompt": s}) + "\n"
                               for i, s in enumerate(SUBJECTS)))
    auto = run(4, prompts, tmp_path / "auto", {**env, "SPMD_DIFF_INJECT_DELAY": "denoise:0.6"}, *AUTO)
    assert auto.returncode == 0, auto.stderr[-4000:]
    events = [json.loads(line) for line in (tmp_path / "auto" / "events.jsonl").read_text().splitlines()]
    start = next(e for e in events if e["ev"] == "job_start")
    assert start["testing_aids"] == {"SPMD_DIFF_INJECT_DELAY": "denoise:0.6"}  # what the CLI read, recorded
    replans = [e for e in events if e["ev"] == "replan"]
    assert replans, f"no re-plan; plan {start['plan']}"
    first = replans[0]
    assert first["batch"] <= 1, first
    before = sum(len(g) for g in first["old_plan"]["dit_groups"])
    after = sum(len(g) for g in first["new_plan"]["dit_groups"])
    assert after > before, (first["old_plan"], first["new_plan"])
    # The timings behind the decision say denoise was the stage that grew.
    stages = first["timings"]["stages"]
    per_item = {stage: v["busy_s"] / v["items"] for stage, v in stages.items()}
    assert per_item["denoise"] >= 0.6 and per_item["denoise"] > per_item["decode"], stages
    # Every item exactly once, each video what one rank renders alone (static plan, one batch).
    alone = run(1, prompts, tmp_path / "alone", env)
    assert alone.returncode == 0, alone.stderr[-4000:]
    got, want = videos(tmp_path / "auto"), videos(tmp_path / "alone")
    assert sorted(got) == sorted(want) == [f"item-{i:02d}" for i in range(len(SUBJECTS))]
    for key in want:
        assert np.array_equal(got[key], want[key]), key
