"""The speed tiers end to end on one CPU rank (decode on its own thread, writes on a background thread):

- exact (the default): every video bit-identical to the plain stage path (no cache, numpy post-processing, one
  thread) and within 1 level of diffusers' WanPipeline; the tier is in job.json and in each video's attributes;
- fast: within its stated tolerance of exact (on CPU: the bf16 VAE; compile and attention are GPU options);
- a background writer that hits a full disk stops the job with exit 4, and nothing is half visible.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from tests.mpi._mpirun import mpirun, mpirun_available

pytestmark = pytest.mark.skipif(not mpirun_available(), reason="mpirun or mpi4py missing")

REPO = Path(__file__).resolve().parents[2]
STEPS = ["--set", "video.num_inference_steps=2"]
PROMPTS = [
    {"id": "cat", "prompt": "A cat walks on the grass, realistic style."},
    {"id": "wave", "prompt": "A surfer rides a large wave at sunset.", "seed": 7},
    {"id": "city", "prompt": "Time-lapse of a city skyline at night.", "negative_prompt": "static, dark"},
    {"id": "dog", "prompt": "A dog catches a frisbee in a park."},
]


@pytest.fixture(scope="module")
def env(demo_model_dir):
    return {"SPMD_DIFF_CACHE": str(demo_model_dir.parent)}


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("speed") / "prompts.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    return path


def run_one_rank(prompts: Path, out: Path, env: dict, *extra: str):
    return mpirun(1, "spmd_diff", "run", str(REPO / "jobs/demo.toml"), "--prompts", str(prompts), "--out", str(out),
                  *STEPS, *extra, timeout=300, env=env, cwd=REPO)


def videos_and_attrs(out: Path) -> tuple[dict[str, np.ndarray], dict[str, dict]]:
    with h5py.File(out / "videos.h5", "r") as f:
        return ({k: f["videos"][k][...] for k in f["videos"]},
                {k: dict(f["videos"][k].attrs) for k in f["videos"]})


@pytest.fixture(scope="module")
def exact_out(env, prompts, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("exact") / "out"
    result = run_one_rank(prompts, out, env)
    assert result.returncode == 0, result.stderr[-4000:]
    return out


def test_exact_tier_is_bit_identical_to_the_plain_path(exact_out, demo_model_dir):
    from spmd_diff.config import load_job
    from spmd_diff.models.speed import StageOptions
    from spmd_diff.models.shapes import VideoSpec
    from spmd_diff.models.wan import WanStages, reference_video

    job = load_job(REPO / "jobs/demo.toml", STEPS[1:])
    v = job.video
    spec = VideoSpec(v.height, v.width, v.num_frames, v.num_inference_steps, v.guidance_scale)
    plain = WanStages(demo_model_dir, {"encode", "denoise", "decode"}, options=StageOptions(negative_cache_size=0))
    got, attrs = videos_and_attrs(exact_out)
    assert sorted(got) == sorted(p["id"] for p in PROMPTS)
    for index, p in enumerate(PROMPTS):
        seed = p.get("seed", job.run.seed + index)
        negative = p.get("negative_prompt", v.negative_prompt)
        want = plain.decode(plain.denoise(plain.encode(p["prompt"], negative, spec), seed, spec))
        np.testing.assert_array_equal(got[p["id"]], want, err_msg=p["id"])
        assert attrs[p["id"]]["tier"] == "exact" and json.loads(attrs[p["id"]]["speed"]) == {"tier": "exact"}
    pipeline = reference_video(demo_model_dir, PROMPTS[2]["prompt"], "static, dark", job.run.seed + 2, spec)
    assert np.abs(got["city"].astype(np.int16) - pipeline.astype(np.int16)).max() <= 1
    settings = json.loads((exact_out / "job.json").read_text())["settings"]
    assert settings["speed.tier"] == "exact" and json.loads(settings["speed.resolved"]) == {"tier": "exact"}


def test_exact_tier_events(exact_out):
    events = [json.loads(line) for line in (exact_out / "events.jsonl").read_text().splitlines()]
    assert sum(e["ev"] == "warmup" for e in events) == 1
    stages = {(e["stage"], e["item"]) for e in events if e["ev"] == "stage" and e["ok"]}
    assert stages == {(s, p["id"]) for s in ("encode", "denoise", "decode", "write") for p in PROMPTS}
    job_start = next(e for e in events if e["ev"] == "job_start")
    assert job_start["config"]["speed"]["tier"] == "exact"


def test_fast_tier_within_tolerance(exact_out, env, prompts, tmp_path):
    out = tmp_path / "fast"
    result = run_one_rank(prompts, out, env, "--set", "speed.tier='fast'")
    assert result.returncode == 0, result.stderr[-4000:]
    exact, _ = videos_and_attrs(exact_out)
    fast, attrs = videos_and_attrs(out)
    for key in exact:
        diff = np.abs(fast[key].astype(np.int16) - exact[key].astype(np.int16))
        print(f"{key}: fast vs exact mean {diff.mean():.3f}, max {diff.max()} levels")
        assert diff.mean() <= 1.5 and diff.max() <= 64 and 0 < diff.max(), key  # the tiny demo VAE in bf16
        assert attrs[key]["tier"] == "fast" and json.loads(attrs[key]["speed"])["vae_dtype"] == "bfloat16"
    settings = json.loads((out / "job.json").read_text())["settings"]
    assert settings["speed.tier"] == "fast" and json.loads(settings["speed.resolved"]) == {
        "tier": "fast", "vae_dtype": "bfloat16", "compile_dit": True, "attention": "_native_cudnn"}
    refused = run_one_rank(prompts, exact_out, env, "--set", "speed.tier='fast'")  # another tier, same OUT
    assert refused.returncode == 2 and "speed.tier: 'exact' there, 'fast' now" in refused.stderr


def test_full_disk_in_the_background_writer_stops_with_exit_4(env, prompts, tmp_path):
    out = tmp_path / "out"
    hooks = json.dumps([{"action": "limit_file_size", "stage": "write", "item": "*", "bytes": 40_000}])
    full = run_one_rank(prompts, out, {**env, "SPMD_DIFF_TEST_HOOKS": hooks})
    assert full.returncode == 4, full.stderr[-3000:]
    assert "cannot write item" in full.stderr and "rerun the same command" in full.stderr
    assert not list(out.rglob("*.tmp.*")), "a half-written temporary was left behind"
    assert not list((out / "items").glob("*/*.h5")) and not (out / "videos.h5").exists()
    again = subprocess.run([sys.executable, "-m", "spmd_diff", "run", str(REPO / "jobs/demo.toml"), "--prompts",
                            str(prompts), "--out", str(out), *STEPS], cwd=REPO, capture_output=True, text=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1", **env}, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(videos_and_attrs(out)[0]) == len(PROMPTS)
