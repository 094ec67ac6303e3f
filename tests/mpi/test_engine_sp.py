"""Sequence-parallel DiT groups in the engine: for each layout and S in {2, 4} (torus as 2 x 2 on a virtual
two-node topology), the videos equal the S = 1 videos within 1 uint8 level. Groups of 4 that decode their own
items decode together; the Ulysses group of 4 runs the planner's "auto" CFG parallel (halves of 2), the others
none (more CFG cases: tests/unit/test_cfg_parallel.py; Ulysses over 4 alone: tests/mpi/test_sp_mpi.py).
Dedicated decoder ranks decoding as a group (roles.group_decode): uneven bands against the one-rank run and
WanPipeline, and a hung member ending the job at the deadline."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from tests.mpi._mpirun import mpirun, mpirun_available

pytestmark = pytest.mark.skipif(not mpirun_available(), reason="mpirun or mpi4py missing")

REPO = Path(__file__).resolve().parents[2]
FAST = ["--set", "video.num_inference_steps=3"]
PROMPTS = [{"id": "a", "prompt": "A red ball bounces on a wooden floor."},
           {"id": "b", "prompt": "Waves crash on black rocks.", "seed": 99},
           {"id": "c", "prompt": "A paper boat drifts down a gutter.", "negative_prompt": "dry"}]


@pytest.fixture(scope="module")
def setup(demo_model_dir, tmp_path_factory):
    base = tmp_path_factory.mktemp("sp")
    prompts = base / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    env = {"SPMD_DIFF_CACHE": str(demo_model_dir.parent)}
    reference = run(1, prompts, base / "s1", env)
    return prompts, env, base, reference


def run(num_ranks, prompts, out, env, *extra):
    result = mpirun(num_ranks, "spmd_diff", "run", str(REPO / "jobs/demo.toml"), "--prompts", str(prompts),
                    "--out", str(out), *FAST, *extra, timeout=300, env=env, cwd=REPO)
    assert result.returncode == 0, result.stderr[-4000:]
    with h5py.File(out / "videos.h5", "r") as f:
        return {k: f["videos"][k][...] for k in f["videos"]}, result.stderr


NO_CFG = "dit.cfg_parallel=false"
# A Ulysses group of 2 between an encoder and a decoder rank is tests/mpi/test_i2v.py's 4-rank run (and the
# layouts at S = 2 and 4 are tests/mpi/test_sp_mpi.py's, in one launch); here each layout once in the engine.
CASES = {
    # name: (--set options, what the plan must say)
    "cfg-ulysses-4": (["dit.sp_degree=4", "dit.sp_layout=ulysses", "roles.encoders=0", "roles.decoders=0"],
                      "1 group(s) of 4 (ulysses), CFG parallel: halves of 2, groups decode together"),
    "ring-4": (["dit.sp_degree=4", "dit.sp_layout=ring", "roles.encoders=0", "roles.decoders=0", NO_CFG],
               "1 group(s) of 4 (ring), groups decode together"),
    "torus-2x2": (["dit.sp_degree=4", "roles.encoders=0", "roles.decoders=0", "world.ranks_per_node=2", NO_CFG],
                  "1 group(s) of 4 (torus 2x2), groups decode together"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_sp_layout_equals_one_rank(name, setup):
    prompts, env, base, (reference, _) = setup
    options, plan_line = CASES[name]
    extra = [x for opt in options for x in ("--set", opt)]
    got, stderr = run(4, prompts, base / name, env, *extra)
    assert plan_line in stderr, stderr[-3000:]
    assert sorted(got) == sorted(reference)
    for key in reference:
        diff = np.abs(got[key].astype(np.int16) - reference[key].astype(np.int16))
        assert diff.max() <= 1, f"{name} {key}: max diff {diff.max()}"


def test_decoder_group_equals_one_rank(setup, demo_model_dir):
    """roles.group_decode: 1 DiT rank (encoding its items) and 3 decoder ranks that decode every video together
    (heights are multiples of 16, so latent rows are even: 3 decoders split them unevenly): latent heights 8 and
    10 rows (bands 3+3+2, 4+3+3), and 2 rows (fewer than the decoders: its holder decodes it alone); an item
    failing upstream reaches the writer as its failure. Videos: the one-rank run's (height 64) and diffusers'
    WanPipeline's (80 and 16), within 1 uint8 level."""
    from spmd_diff.config import load_job
    from spmd_diff.models.shapes import VideoSpec
    from spmd_diff.models.wan import reference_video

    prompts, env, base, (reference, _) = setup
    items = [PROMPTS[0], {**PROMPTS[1], "height": 80}, {**PROMPTS[2], "height": 16},
             {"id": "broken", "prompt": "A kite in a storm."}]
    path = base / "decoder-group.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in items))
    hooks = json.dumps([{"action": "fail", "stage": "encode", "item": "broken"}])
    out = base / "decoder-group"
    result = mpirun(4, "spmd_diff", "run", str(REPO / "jobs/demo.toml"), "--prompts", str(path), "--out", str(out),
                    *FAST, "--set", "roles.encoders=0", "--set", "roles.decoders=3", "--set", "roles.group_decode=true",
                    timeout=300,
                    env={**env, "SPMD_DIFF_TEST_HOOKS": hooks}, cwd=REPO)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "decode each video together (roles.group_decode)" in result.stderr
    with h5py.File(out / "videos.h5", "r") as f:
        got = {k: f["videos"][k][...] for k in f["videos"]}
        assert sorted(f["failed"]) == ["broken"]
    assert json.loads((out / "job.json").read_text())["job"]["roles"]["group_decode"] is True
    v = load_job(REPO / "jobs/demo.toml", ["video.num_inference_steps=3"]).video
    expected = {"a": reference["a"]}
    for p in items[1:3]:
        spec = VideoSpec(p["height"], v.width, v.num_frames, v.num_inference_steps, v.guidance_scale)
        expected[p["id"]] = reference_video(demo_model_dir, p["prompt"], p.get("negative_prompt", v.negative_prompt),
                                            p["seed"] if "seed" in p else 1234 + items.index(p), spec)
    assert sorted(got) == sorted(expected)
    for key, want in expected.items():
        assert got[key].shape == want.shape
        diff = np.abs(got[key].astype(np.int16) - want.astype(np.int16))
        assert diff.max() <= 1, f"{key}: max diff {diff.max()}"
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    decodes = [e for e in events if e["ev"] == "stage" and e["stage"] == "decode"]
    # split videos: a decode event on each decoder rank, 3 bands; the 2-row one: one event, decoded alone
    bands = {"a": 3, "b": 3, "c": 1}
    assert sorted((e["item"], e["bands"]) for e in decodes) == sorted((k, n) for k, n in bands.items()
                                                                     for _ in range(n))
    plan = next(e for e in events if e["ev"] == "job_start")["plan"]
    assert {e["rank"] for e in decodes} == set(plan["decoders"]) and len(plan["decoders"]) == 3

