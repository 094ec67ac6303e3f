"""Mixed jobs on CPU ranks: items with their own size, frame count, steps and guidance in one job.

One job of two resolutions, two frame counts and two step counts (and one item without guidance) on 4 ranks,
first with a fixed DiT group of 2 (CFG parallel; an encoder and a decoder rank), whose decoder exits in the
middle; then rerun with a per-item SP degree (``dit.per_item_degree``: groups of 1 and 2 formed item by item)
for what is left, the larger items. Every item ends up rendered exactly once, each video equal to diffusers' own
``WanPipeline`` for that item's own settings (within 1 uint8 level), and its attributes record those settings.
A per-item job whose schedule widens no item is pulled by the fixed-degree groups instead, with the same videos.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from spmd_diff.io.store import item_key
from tests.mpi._mpirun import mpirun, mpirun_available

pytestmark = pytest.mark.skipif(not mpirun_available(), reason="mpirun or mpi4py missing")

REPO = Path(__file__).resolve().parents[2]
BASE_SEED = 1234  # jobs/demo.toml run.seed
# jobs/demo.toml's [video]: 64 x 64, 9 frames, 4 steps, guidance 5.0. The job hands items out longest first
# (engine.render_order): large-default, large-3-steps, large-short-nocfg, small-long, small-short. The first run,
# killed at the second item's write, finishes large-default on its group of 2 and the rerun gets the rest, the
# longest of which (large-3-steps) is worth a group of 2 under the per-item degree.
PROMPTS = [
    {"id": "small-short", "prompt": "A cat walks on the grass.", "height": 32, "width": 48, "num_frames": 5,
     "num_inference_steps": 2},
    {"id": "small-long", "prompt": "A dog catches a frisbee.", "height": 32, "width": 48, "num_inference_steps": 2},
    {"id": "large-short-nocfg", "prompt": "Time-lapse of a city at night.", "num_frames": 5, "guidance_scale": 1.0},
    {"id": "large-default", "prompt": "A surfer rides a wave at sunset.", "seed": 7},
    {"id": "large-3-steps", "prompt": "Snow falls on a quiet street.", "num_inference_steps": 3},
]


@pytest.fixture(scope="module")
def env(demo_model_dir):
    return {"SPMD_DIFF_CACHE": str(demo_model_dir.parent)}


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("mixed") / "prompts.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    return path


PER_ITEM = ("--set", "dit.per_item_degree=true", "--set", "roles.encoders=0", "--set", "roles.decoders=0")


def run(prompts: Path, out: Path, env: dict, *extra: str, hooks: list | None = None):
    more = {"SPMD_DIFF_TEST_HOOKS": json.dumps(hooks)} if hooks else {}
    return mpirun(4, "spmd_diff", "run", str(REPO / "jobs/demo.toml"), "--prompts", str(prompts), "--out",
                  str(out), *extra, timeout=240, env={**env, **more}, cwd=REPO)


def own_settings(index: int) -> dict:
    p = PROMPTS[index]
    return {"height": p.get("height", 64), "width": p.get("width", 64), "num_frames": p.get("num_frames", 9),
            "num_inference_steps": p.get("num_inference_steps", 4), "guidance_scale": p.get("guidance_scale", 5.0)}


@pytest.fixture(scope="module")
def killed_then_rerun(prompts, env, tmp_path_factory):
    out = tmp_path_factory.mktemp("mixed-out") / "out"
    # The decoder (rank 1) dies as it starts writing the second item: the job aborts with items in flight.
    killed = run(prompts, out, env, "--set", "dit.sp_degree=2",
                 hooks=[{"action": "exit", "stage": "write", "item": "large-3-steps", "rank": 1}])
    partial = {p.name.split(".")[0] for p in (out / "items").glob("*/*.h5")}
    rerun = run(prompts, out, env, *PER_ITEM)
    return out, killed, partial, rerun


def test_killed_then_rerun_at_per_item_degrees_renders_every_item_once_equal_to_the_pipeline(killed_then_rerun,
                                                                                           demo_model_dir):
    from diffusers import WanPipeline

    from spmd_diff.models.shapes import VideoSpec
    from spmd_diff.models.wan import reference_video

    out, killed, partial, rerun = killed_then_rerun
    assert killed.returncode != 0 and "1 group(s) of 2" in killed.stderr
    assert 0 < len(partial) < len(PROMPTS), partial
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    assert f"{len(PROMPTS) - len(partial)} to render" in rerun.stderr
    assert "per-item SP degree: " in rerun.stderr
    files = sorted(p.name for p in (out / "items").glob("*/*"))
    assert all(name.endswith(".h5") and ".tmp." not in name for name in files), files
    assert sorted(name.split(".")[0] for name in files) == sorted(item_key(p["id"]) for p in PROMPTS)
    pipeline = WanPipeline.from_pretrained(demo_model_dir)  # one load for every item's reference
    with h5py.File(out / "videos.h5", "r") as f:
        for index, p in enumerate(PROMPTS):
            dataset = f["videos"][p["id"]]
            settings = own_settings(index)
            assert {key: dataset.attrs[key] for key in settings} == settings, p["id"]
            spec = VideoSpec(**settings)
            expected = reference_video(demo_model_dir, p["prompt"], "blurry, low quality",
                                       p.get("seed", BASE_SEED + index), spec, pipeline)
            video = dataset[...]
            assert video.shape == expected.shape == (spec.num_frames, spec.height, spec.width, 3), p["id"]
            diff = np.abs(video.astype(np.int16) - expected.astype(np.int16))
            assert diff.max() <= 1, f"{p['id']}: max diff {diff.max()}, mean {diff.mean():.4f}"
            assert video.std() > 1.0, "a constant video would hide a broken pipeline"


def test_each_item_ran_on_the_group_its_leader_announced_some_larger_ones_on_two_ranks(killed_then_rerun):
    out, _, partial, _ = killed_then_rerun
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    rerun_start = max(e["t"] for e in events if e["ev"] == "job_start")
    denoised: dict[str, set[int]] = {}
    for e in events:
        if e["ev"] == "stage" and e["stage"] == "denoise" and e["ok"] and e["t0"] >= rerun_start:
            denoised.setdefault(e["item"], set()).add(e["rank"])
    groups = {e["item"]: e for e in events if e["ev"] == "item_group" and e["t"] >= rerun_start}
    left = {p["id"] for p in PROMPTS if item_key(p["id"]) not in partial}
    assert set(denoised) == set(groups) == left
    for item, group in groups.items():
        assert denoised[item] == set(group["ranks"]) and group["degree"] == len(group["ranks"]), group
        assert group["rank"] == group["ranks"][0], "the leader announces its group"
    assert {g["degree"] for g in groups.values()} == {1, 2}
    assert any(item.startswith("large") and g["degree"] == 2 for item, g in groups.items())
    [summary] = [e for e in events if e["ev"] == "item_groups" and e["t"] >= rerun_start]
    assert sum(summary["degrees"].values()) == len(left)


def test_a_per_item_schedule_at_the_fixed_degree_is_pulled_and_equal_to_the_pipeline(prompts, env, demo_model_dir,
                                                                                      tmp_path):
    """Items whose schedule widens none (four items of one small kind on 2 ranks: each alone on a rank) are pulled
    by the plan's DiT groups of dit.sp_degree instead (no precomputed schedule: no item_group records); every video
    equals diffusers' WanPipeline for its settings."""
    from diffusers import WanPipeline

    from spmd_diff.models.shapes import VideoSpec
    from spmd_diff.models.wan import reference_video

    settings = {"height": 32, "width": 32, "num_frames": 5, "num_inference_steps": 2}
    uniform, out = tmp_path / "uniform.jsonl", tmp_path / "out"
    uniform.write_text("".join(json.dumps({"id": f"u{k}", "prompt": p["prompt"], **settings}) + "\n"
                               for k, p in enumerate(PROMPTS[:4])))
    result = mpirun(2, "spmd_diff", "run", str(REPO / "jobs/demo.toml"), "--prompts", str(uniform), "--out",
                    str(out), *PER_ITEM, timeout=240, env=env, cwd=REPO)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "per-item SP degree: 4 item(s) at degree 1 (every item at dit.sp_degree = 1: the DiT groups pull them" \
        in result.stderr, result.stderr[-3000:]
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    assert not [e for e in events if e["ev"] == "item_group"]
    [summary] = [e for e in events if e["ev"] == "item_groups"]
    assert summary["pulled"] and summary["degrees"] == {"1": 4}
    assert {e["rank"] for e in events if e["ev"] == "stage" and e["stage"] == "denoise"} == {0, 1}  # both pulled
    pipeline = WanPipeline.from_pretrained(demo_model_dir)
    with h5py.File(out / "videos.h5", "r") as f:
        assert sorted(f["videos"]) == [f"u{k}" for k in range(4)]
        for k, p in enumerate(PROMPTS[:4]):
            expected = reference_video(demo_model_dir, p["prompt"], "blurry, low quality", BASE_SEED + k,
                                       VideoSpec(**settings, guidance_scale=5.0), pipeline)
            diff = np.abs(f["videos"][f"u{k}"][...].astype(np.int16) - expected.astype(np.int16))
            assert diff.max() <= 1, f"u{k}: max diff {diff.max()}"
