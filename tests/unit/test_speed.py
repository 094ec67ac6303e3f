"""Speed tiers on CPU: the exact tier's new paths are bit-identical to the plain path; the fast tier stays within
its stated tolerance; the background worker reports failures to its owner."""

from __future__ import annotations

import pathlib
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from spmd_diff.config import build_job
from spmd_diff.errors import StageTimeout, StoreFull, UserError
from spmd_diff.models.speed import EmbedCache, StageOptions, frames_to_uint8
from spmd_diff.models.shapes import VideoSpec
from spmd_diff.models.wan import WanStages, _frames_to_uint8
from spmd_diff.runtime.worker import Worker

SPEC = VideoSpec(height=64, width=64, num_frames=9, num_inference_steps=2, guidance_scale=5.0)
SPEC_NO_CFG = VideoSpec(height=64, width=64, num_frames=9, num_inference_steps=2, guidance_scale=1.0)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def exact(demo_model_dir: pathlib.Path) -> Iterator[WanStages]:
    stages = WanStages(demo_model_dir, {"encode", "denoise", "decode"})
    yield stages
    stages.free()


def _numpy_path(video_BCFHW: torch.Tensor) -> np.ndarray:
    """Today's path: diffusers' VideoProcessor to float32 numpy frames, then round(255 x) as uint8."""
    from diffusers.video_processor import VideoProcessor

    frames = VideoProcessor(vae_scale_factor=8).postprocess_video(video_BCFHW, output_type="np")
    return _frames_to_uint8(frames[0])


def _levels(a: np.ndarray, b: np.ndarray) -> tuple[float, int]:
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return float(diff.mean()), int(diff.max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_uint8_conversion_is_bit_identical_to_the_numpy_path(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(0)
    video = torch.randn(1, 3, 5, 24, 40, generator=generator) * 0.7
    # Every float32 tie 255 * x = k + 0.5 the denormalised value can hit, values out of range, and signed zeros.
    ties = (torch.arange(256, dtype=torch.float32) + 0.5) / 255.0 * 2.0 - 1.0
    near = torch.cat([ties, torch.nextafter(ties, ties + 1), torch.nextafter(ties, ties - 1),
                      torch.tensor([-1.5, -1.0, -0.0, 0.0, 1.0, 1.5, 3e38, -3e38])])
    flat = video.view(-1)
    flat[: near.numel()] = near
    flat[-near.numel():] = near.flip(0)
    video = video.to(dtype)
    got = frames_to_uint8(video)
    assert got.dtype == torch.uint8 and got.is_contiguous() and tuple(got.shape) == (5, 24, 40, 3)
    np.testing.assert_array_equal(got.numpy(), _numpy_path(video))


def test_decode_uint8_equals_decode(exact: WanStages) -> None:
    latents = exact.denoise(exact.encode("A lighthouse in a storm.", "blurry", SPEC), 5, SPEC)
    video = exact.decode_uint8(latents)
    assert video.dtype == torch.uint8 and video.device == exact.device
    np.testing.assert_array_equal(video.numpy(), exact.decode(latents))


def test_cached_negative_embeddings_are_the_same_tensors(exact: WanStages, demo_model_dir: pathlib.Path) -> None:
    uncached = WanStages(demo_model_dir, {"encode"}, options=StageOptions(negative_cache_size=0))
    cache = exact.negative_cache
    hits = cache.num_hits
    for prompt in ("A cat on a roof.", "A dog in the rain."):
        got = exact.encode(prompt, "low quality, static", SPEC)
        want = uncached.encode(prompt, "low quality, static", SPEC)
        assert torch.equal(got["prompt_embeds"], want["prompt_embeds"])
        assert torch.equal(got["negative_prompt_embeds"], want["negative_prompt_embeds"])
    assert cache.num_hits >= hits + 1, "the second item's negative prompt came from the cache"
    assert "negative_prompt_embeds" not in exact.encode("A cat.", "low quality", SPEC_NO_CFG)


def test_embed_cache_drops_the_least_recently_used() -> None:
    calls: list[str] = []

    def embed(text: str, length: int) -> torch.Tensor:
        calls.append(text)
        return torch.full((1, length, 2), float(len(calls)))

    cache = EmbedCache(2)
    a = cache.get("a", 4, embed)
    cache.get("b", 4, embed)
    assert cache.get("a", 4, embed) is a  # hit; "b" is now the oldest
    cache.get("c", 4, embed)
    cache.get("b", 4, embed)
    assert calls == ["a", "b", "c", "b"] and cache.get("a", 8, embed) is not a  # the length is part of the key
    assert EmbedCache(0).get("a", 4, embed) is not EmbedCache(0).get("a", 4, embed)


def test_fast_tier_bf16_vae_within_tolerance(exact: WanStages, demo_model_dir: pathlib.Path) -> None:
    """bf16 VAE on the demo model's tiny VAE (3 base channels, so coarser than Wan's real VAE: on the H200 with
    Wan2.1's VAE the results file measures mean ~0.9 / max ~7 levels). Compiled blocks and the attention backend
    are GPU options (compiling on a 2-core CPU takes minutes): measured in perf/results/throughput-*.md."""
    fast = WanStages(demo_model_dir, {"decode"}, options=StageOptions(vae_dtype=torch.bfloat16))
    assert fast.vae.dtype == torch.bfloat16
    for prompt, seed, spec in (("A red fox runs in the snow.", 3, SPEC), ("Waves at dusk.", 9, SPEC_NO_CFG)):
        latents = exact.denoise(exact.encode(prompt, "blurry", spec), seed, spec)
        want = exact.decode(latents)
        got = fast.decode_uint8(latents).numpy()
        mean, peak = _levels(got, want)
        print(f"bf16 VAE vs exact: mean {mean:.3f}, max {peak} uint8 levels")
        assert got.shape == want.shape and mean <= 1.5 and peak <= 64
        assert np.percentile(np.abs(got.astype(np.int16) - want.astype(np.int16)), 90) <= 2


def test_warmup_changes_no_item(demo_model_dir: pathlib.Path, exact: WanStages) -> None:
    prompt = "A kite over a beach."
    before = exact.decode_uint8(exact.denoise(exact.encode(prompt, "blurry", SPEC), 4, SPEC))
    exact.warmup(SPEC)
    after = exact.decode_uint8(exact.denoise(exact.encode(prompt, "blurry", SPEC), 4, SPEC))
    assert torch.equal(before, after)


def test_speed_section_is_typed_validated_and_fingerprinted() -> None:
    job = build_job({}, "job.toml")
    assert job.speed.tier == "exact" and job.speed.resolved() == {"tier": "exact"}
    fast = build_job({"speed": {"tier": "fast", "fast_vae_bf16": False}}, "job.toml", ["speed.write_queue=4"])
    assert fast.speed.resolved() == {"tier": "fast", "vae_dtype": "float32", "compile_dit": True,
                                   "attention": "_native_cudnn"}
    assert fast.speed.write_queue == 4 and fast.to_dict()["speed"]["overlap_decode"] is True
    for data, message in (({"tier": "turbo"}, "speed.tier must be one of exact, fast"),
                          ({"fast_attention": "sage"}, "speed.fast_attention must be one of"),
                          ({"write_queue": -1}, "speed.write_queue must be >= 0"),
                          ({"fast_vae_bf16": "yes"}, "speed.fast_vae_bf16 must be bool"),
                          ({"tier_": "fast"}, "unknown key speed.tier_ (did you mean 'tier'?)")):
        with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
            build_job({"speed": data}, "job.toml")


# ---- the background worker --------------------------------------------------------------------------------------


def test_worker_runs_jobs_in_order_on_its_thread() -> None:
    seen: list[tuple[int, str]] = []
    worker = Worker("w", 2)
    for k in range(5):
        worker.submit(lambda k=k: seen.append((k, threading.current_thread().name)), timeout_s=5)
    worker.join(timeout_s=5)
    assert [k for k, _ in seen] == list(range(5)) and {name for _, name in seen} == {"w"}
    inline = Worker("inline", 0)
    inline.submit(lambda: seen.append((9, threading.current_thread().name)), timeout_s=5)
    assert seen[-1] == (9, threading.main_thread().name)


def test_a_failing_job_stops_the_worker_and_reaches_the_owner() -> None:
    ran: list[int] = []
    release = threading.Event()
    worker = Worker("writer", 1)

    def full() -> None:
        release.wait(5)
        raise StoreFull("disk full")

    worker.submit(full, timeout_s=5)
    worker.submit(lambda: ran.append(1), timeout_s=5)  # queued behind the failing job: dropped
    release.set()
    time.sleep(0.1)
    with pytest.raises(StoreFull, match="disk full"):
        worker.submit(lambda: ran.append(2), timeout_s=5)
    with pytest.raises(StoreFull):
        worker.join(timeout_s=5)
    assert ran == []


def test_a_stuck_worker_times_out() -> None:
    block = threading.Event()
    worker = Worker("stuck", 1)
    worker.submit(lambda: block.wait(10), timeout_s=1)
    worker.submit(lambda: None, timeout_s=1)  # fills the queue
    with pytest.raises(StageTimeout, match="stuck: no job finished"):
        worker.submit(lambda: None, timeout_s=0.2)
    block.set()
    worker.join(timeout_s=5)
