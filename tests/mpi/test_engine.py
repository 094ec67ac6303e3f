"""End to end on CPU ranks: the engine's videos equal diffusers' own WanPipeline, on 4 ranks and on 1."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from tests.mpi._mpirun import mpirun, mpirun_available

pytestmark = pytest.mark.skipif(not mpirun_available(), reason="mpirun or mpi4py missing")

REPO = Path(__file__).resolve().parents[2]
PROMPTS = [
    {"id": "cat", "prompt": "A cat walks on the grass, realistic style."},
    {"id": "surf wave", "prompt": "A surfer rides a large wave at sunset.", "seed": 7},
    {"id": "city", "prompt": "Time-lapse of a city skyline at night.", "negative_prompt": "static, dark"},
    {"id": "dog", "prompt": "A dog catches a frisbee in a park.", "seed": 123456789},
]
BASE_SEED = 1234  # jobs/demo.toml run.seed


@pytest.fixture(scope="module")
def engine_env(demo_model_dir, tmp_path_factory):
    """Environment for engine runs: the demo model cache the session fixture built (model.path = "demo")."""
    return {"SPMD_DIFF_CACHE": str(demo_model_dir.parent)}


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    return path


def run_engine(num_ranks: int, prompts: Path, out: Path, env: dict, *extra: str, timeout: float = 240):
    return mpirun(num_ranks, "spmd_diff", "run", str(REPO / "jobs/demo.toml"), "--prompts", str(prompts),
                  "--out", str(out), *extra, timeout=timeout, env=env, cwd=REPO)


def videos(out: Path) -> dict[str, np.ndarray]:
    with h5py.File(out / "videos.h5", "r") as f:
        return {k: f["videos"][k][...] for k in f["videos"]}


def tree_digest(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*.h5")) if p.name != "videos.h5"}


@pytest.fixture(scope="module")
def four_rank_out(engine_env, prompts_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e") / "out4"
    result = run_engine(4, prompts_file, out, engine_env)
    assert result.returncode == 0, result.stderr[-4000:]
    return out, result


def test_four_ranks_match_wan_pipeline(four_rank_out, demo_model_dir):
    from spmd_diff.config import load_job
    from spmd_diff.models.shapes import VideoSpec
    from spmd_diff.models.wan import reference_video

    out, result = four_rank_out
    assert "encoders :     1" in result.stderr and "2 group(s) of 1" in result.stderr
    job = load_job(REPO / "jobs/demo.toml")
    v = job.video
    spec = VideoSpec(v.height, v.width, v.num_frames, v.num_inference_steps, v.guidance_scale)
    got = videos(out)
    assert sorted(got) == sorted(p["id"] for p in PROMPTS)
    with h5py.File(out / "videos.h5", "r") as f:
        for index, p in enumerate(PROMPTS):
            attrs = f["videos"][p["id"]].attrs
            seed = p.get("seed", BASE_SEED + index)
            negative = p.get("negative_prompt", v.negative_prompt)
            assert attrs["prompt"] == p["prompt"] and attrs["seed"] == seed
            assert attrs["negative_prompt"] == negative and attrs["num_inference_steps"] == v.num_inference_steps
            assert attrs["guidance_scale"] == v.guidance_scale and attrs["model"] == "demo"
            expected = reference_video(demo_model_dir, p["prompt"], negative, seed, spec)
            video = got[p["id"]]
            assert video.dtype == np.uint8 and video.shape == expected.shape == (v.num_frames, v.height, v.width, 3)
            diff = np.abs(video.astype(np.int16) - expected.astype(np.int16))
            assert diff.max() <= 1, f"{p['id']}: max diff {diff.max()}, mean {diff.mean():.4f}"
            assert video.std() > 1.0, "a constant video would hide a broken pipeline"


def test_one_rank_equals_four_ranks(four_rank_out, engine_env, prompts_file, tmp_path):
    out4, _ = four_rank_out
    out1 = tmp_path / "out1"
    result = run_engine(1, prompts_file, out1, engine_env)
    assert result.returncode == 0, result.stderr[-4000:]
    one, four = videos(out1), videos(out4)
    assert sorted(one) == sorted(four)
    for key in one:
        assert np.abs(one[key].astype(np.int16) - four[key].astype(np.int16)).max() <= 1, key


def test_rerun_renders_nothing_and_changes_nothing(four_rank_out, engine_env, prompts_file, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(four_rank_out[0], out)
    before = tree_digest(out)
    result = run_engine(4, prompts_file, out, engine_env)
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"nothing to render (no model loaded): {len(PROMPTS)} of {len(PROMPTS)} item(s)" in result.stderr
    assert tree_digest(out) == before
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    assert sum(e["ev"] == "job_start" for e in events) == 2
    second_start = max(e["t"] for e in events if e["ev"] == "job_start")
    assert not [e for e in events if e["ev"] == "stage" and e["t0"] >= second_start]


def test_items_flow_through_stages_concurrently(four_rank_out):
    """While the decoder decodes item i, DiT ranks are already denoising later items."""
    out, _ = four_rank_out
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    decodes = [e for e in events if e["ev"] == "stage" and e["stage"] == "decode"]
    denoises = [e for e in events if e["ev"] == "stage" and e["stage"] == "denoise"]
    assert {e["rank"] for e in denoises} == {2, 3}, "both DiT ranks took items"
    overlaps = [(d, n) for d in decodes for n in denoises if n["item"] != d["item"]
                and n["t0"] < d["t1"] and d["t0"] < n["t1"]]
    assert overlaps, "no decode overlapped a denoise of another item"
    handoffs = [e for e in events if e["ev"] == "handoff"]
    assert {e["channel"].split("->")[0][:3] for e in handoffs} == {"enc", "dit"}
    assert all(e["bytes"] > 0 for e in handoffs)


def test_job_start_records_the_data_plane_and_the_transport(four_rank_out):
    """job_start holds the job's [dataplane] section and the transport rank 0 chose and printed (MPI RMA here:
    CPU ranks have no GPU for NVSHMEM)."""
    out, result = four_rank_out
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    start = next(e for e in events if e["ev"] == "job_start")
    assert start["config"]["dataplane"] == {"p2p_kernel": "cuda", "put_kernel": True, "a2a_blocks": ""}
    assert start["transport"].startswith("mpi (auto: ")
    assert f"spmd-diff: transport: {start['transport']}" in result.stderr


@pytest.mark.parametrize("case", ["missing_model", "bad_job", "bad_prompts", "roles_do_not_fit", "duplicate_ids",
                                  "bad_codec"])
def test_bad_input_fails_on_every_rank(case, engine_env, prompts_file, tmp_path):
    out = tmp_path / "out"
    job = REPO / "jobs/demo.toml"
    prompts = prompts_file
    extra: list[str] = []
    expect = {
        "missing_model": "model directory /nonexistent/wan does not exist",
        "bad_job": "unknown key video.hieght (did you mean 'height'?)",
        "bad_prompts": "prompts.jsonl:2: not valid JSON",
        "roles_do_not_fit": "roles do not fit the allocation: 4 ranks = 2 encoder(s) + 2 decoder(s) + 0 DiT",
        "duplicate_ids": "prompts.jsonl:2: duplicate id 'a' (first on line 1)",
        "bad_codec": "output.video must be one of raw, h264, hevc, got 'vp9'",
    }[case]
    if case == "missing_model":
        extra = ["--model", "/nonexistent/wan"]
    elif case == "bad_job":
        extra = ["--set", "video.hieght=64"]
    elif case == "bad_codec":
        extra = ["--set", "output.video=vp9"]
    elif case == "roles_do_not_fit":
        extra = ["--set", "roles.encoders=2", "--set", "roles.decoders=2"]
    elif case in ("bad_prompts", "duplicate_ids"):
        prompts = tmp_path / "prompts.jsonl"
        second = '{"id": "b", "prompt": ' if case == "bad_prompts" else '{"id": "a", "prompt": "y"}'
        prompts.write_text('{"id": "a", "prompt": "x"}\n' + second + "\n")
    result = mpirun(4, "spmd_diff", "run", str(job), "--prompts", str(prompts), "--out", str(out), *extra,
                    timeout=120, env=engine_env, cwd=REPO)
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    # Every rank says it (lines of different ranks may interleave in mpirun's forwarded stderr).
    assert result.stderr.count("spmd-diff: error") == 4, result.stderr[-3000:]
    assert result.stderr.count(expect) == 4, result.stderr[-3000:]
    assert all(f"(rank {r})" in result.stderr for r in range(4))
    assert not (out / "videos.h5").exists() and not list(out.rglob("items/*/*.h5"))


def test_console_script_and_module_agree():
    for command in (["spmd-diff", "--help"], [sys.executable, "-m", "spmd_diff", "--help"]):
        result = subprocess.run(command, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0 and "demo-model" in result.stdout and "run" in result.stdout


EXTRA = {"id": "boat", "prompt": "A paper boat drifts down a rainy gutter.", "seed": 99}


def test_time_shared_ranks_match_the_pipeline_stage_by_stage(four_rank_out, engine_env, demo_model_dir,
                                                               tmp_path):
    """roles.time_share on 2 ranks, cycles of 2 items: the four items equal the four-rank run's, the fifth
    diffusers' WanPipeline; on each rank a cycle's encodes come before its denoises, which come before its
    decodes, with a move event before each stage."""
    from spmd_diff.config import load_job
    from spmd_diff.models.shapes import VideoSpec
    from spmd_diff.models.wan import reference_video

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in [*PROMPTS, EXTRA]))
    out = tmp_path / "out"
    result = run_engine(2, prompts, out, engine_env, "--set", "roles.time_share=true", "--set", "roles.encoders=0",
                        "--set", "roles.decoders=0", "--set", "roles.stage_batch=2")
    assert result.returncode == 0, result.stderr[-4000:]
    assert "every rank time-shared" in result.stderr
    got, four = videos(out), videos(four_rank_out[0])
    assert sorted(got) == sorted([*four, EXTRA["id"]])
    for key in four:
        assert np.abs(got[key].astype(np.int16) - four[key].astype(np.int16)).max() <= 1, key
    v = load_job(REPO / "jobs/demo.toml").video
    spec = VideoSpec(v.height, v.width, v.num_frames, v.num_inference_steps, v.guidance_scale)
    expected = reference_video(demo_model_dir, EXTRA["prompt"], v.negative_prompt, EXTRA["seed"], spec)
    assert np.abs(got[EXTRA["id"]].astype(np.int16) - expected.astype(np.int16)).max() <= 1

    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    start = next(e for e in events if e["ev"] == "job_start")
    assert start["plan"]["time_shared"] is True and start["plan"]["stage_batch"] == 2
    for rank in (0, 1):
        mine = sorted((e for e in events if e.get("rank") == rank and (e["ev"] == "move" or (
            e["ev"] == "stage" and e["stage"] in ("encode", "denoise", "decode")))), key=lambda e: e["t0"])
        assert mine, f"rank {rank} rendered nothing"
        cycles, stage = [], None
        for e in mine:
            if e["ev"] == "move":
                assert e["bytes"] > 0 and e["seconds"] >= 0 and e["components"]
                if e["stage"] == "encode":
                    cycles.append([])
                stage = e["stage"]
                continue
            assert e["stage"] == stage, f"rank {rank}: {e['stage']} of {e['item']} while {stage} is on the device"
            cycles[-1].append((e["stage"], e["item"]))
        for cycle in cycles:
            order = [s for s, _ in cycle]
            assert order == sorted(order, key=("encode", "denoise", "decode").index), order
            items = {i for _, i in cycle}
            assert 1 <= len(items) <= 2 and len(cycle) == 3 * len(items), cycle
    writes = [e["item"] for e in events if e["ev"] == "stage" and e["stage"] == "write"]
    assert sorted(writes) == sorted(got), "every item written exactly once"
