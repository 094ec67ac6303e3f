"""The engine on GPUs (one rank per GPU, up to 4; NVSHMEM moves the handoffs when it can): its videos equal
diffusers' own WanPipeline run on the same GPU in bfloat16 (VAE in float32, as the engine), within bf16 tolerance."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from tests.gpu._gpu import has_nvshmem, num_gpus
from tests.mpi._mpirun import mpirun, mpirun_available

pytestmark = pytest.mark.skipif(num_gpus() < 1 or not mpirun_available(), reason="needs CUDA GPUs and mpirun")

REPO = Path(__file__).resolve().parents[2]
PROMPTS = [{"id": "cat", "prompt": "A cat walks on the grass, realistic style."},
           {"id": "wave", "prompt": "A surfer rides a large wave at sunset.", "seed": 7},
           {"id": "city", "prompt": "Time-lapse of a city skyline at night.", "negative_prompt": "static, dark"}]


def pipeline_video_on_gpu(model_dir: Path, prompt: str, negative: str, seed: int, job) -> np.ndarray:
    import torch
    from diffusers import AutoencoderKLWan, WanPipeline

    from spmd_diff.models.wan import _frames_to_uint8

    vae = AutoencoderKLWan.from_pretrained(model_dir / "vae", torch_dtype=torch.float32)
    pipeline = WanPipeline.from_pretrained(model_dir, vae=vae, torch_dtype=torch.bfloat16).to("cuda:0")
    pipeline.set_progress_bar_config(disable=True)
    v = job.video
    frames = pipeline(prompt=prompt, negative_prompt=negative, height=v.height, width=v.width,
                      num_frames=v.num_frames, num_inference_steps=v.num_inference_steps,
                      guidance_scale=v.guidance_scale, generator=torch.Generator("cpu").manual_seed(seed),
                      output_type="np", max_sequence_length=v.max_sequence_length).frames
    return _frames_to_uint8(frames[0])


def test_engine_videos_on_gpu_equal_wan_pipeline_on_gpu(tmp_path):
    from spmd_diff.config import load_job
    from spmd_diff.models.demo import demo_model_dir

    cache = tmp_path / "cache"
    model_dir = demo_model_dir(cache)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    out = tmp_path / "out"
    num_ranks = min(4, num_gpus())
    roles = {1: ["--set", "roles.encoders=0", "--set", "roles.decoders=0"], 2: ["--set", "roles.encoders=0"]}
    result = mpirun(num_ranks, "spmd_diff", "run", str(REPO / "jobs/demo.toml"), "--prompts", str(prompts),
                    "--out", str(out), *roles.get(num_ranks, []), timeout=400, env={"SPMD_DIFF_CACHE": str(cache)},
                    cwd=REPO)
    print(result.stderr[-3000:])
    assert result.returncode == 0, result.stderr[-6000:]
    if num_ranks > 1 and has_nvshmem():
        assert "transport: nvshmem" in result.stderr
    job = load_job(REPO / "jobs/demo.toml")
    with h5py.File(out / "videos.h5", "r") as f:
        got = {k: f["videos"][k][...] for k in f["videos"]}
    assert sorted(got) == sorted(p["id"] for p in PROMPTS)
    for index, p in enumerate(PROMPTS):
        seed = p.get("seed", job.run.seed + index)
        negative = p.get("negative_prompt", job.video.negative_prompt)
        expected = pipeline_video_on_gpu(model_dir, p["prompt"], negative, seed, job)
        diff = np.abs(got[p["id"]].astype(np.int16) - expected.astype(np.int16))
        print(f"{p['id']}: max diff {diff.max()}, mean {diff.mean():.4f}")
        assert got[p["id"]].shape == expected.shape
        assert diff.max() <= 16 and diff.mean() <= 1.0, f"{p['id']}: max {diff.max()}, mean {diff.mean():.4f}"
        assert got[p["id"]].std() > 1.0
