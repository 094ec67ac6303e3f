"""Time-shared components on a GPU (skipped without one): random Wan2.1-1.3B, one stage's components on the device
at a time. The allocator's own counters show it: after each move the device holds that stage's weights and no
other's, each stage's peak stays under what the stages together would need, and the video is bit-identical to
the one rendered with every component on the device."""

from __future__ import annotations

import pytest
import torch

from spmd_diff.models.random_wan import make_stages, random_model_dir
from spmd_diff.models.shapes import VideoSpec
from tests.gpu._gpu import num_gpus

pytestmark = pytest.mark.skipif(num_gpus() < 1, reason="needs a CUDA GPU")

SPEC = VideoSpec(height=240, width=416, num_frames=17, num_inference_steps=2, guidance_scale=5.0)
MIB = 2**20


def _render(stages, use=lambda stage: None):
    use("encode")
    embeds = stages.encode("A red fox runs through fresh snow.", "blurry", SPEC)
    use("denoise")
    latents = stages.denoise(embeds, 1234, SPEC)
    use("decode")
    return stages.decode_uint8(latents).cpu()


def test_one_stage_on_the_gpu_at_a_time(tmp_path) -> None:
    device = torch.device("cuda", 0)
    model_dir = random_model_dir("random:wan2.1-t2v-1.3b", tmp_path)
    plain = make_stages(model_dir, {"encode", "denoise", "decode"}, device=device, dtype=torch.bfloat16)
    expected = _render(plain)
    plain.free()
    del plain
    torch.cuda.empty_cache()

    base = torch.cuda.memory_allocated(device)
    shared = make_stages(model_dir, {"encode", "denoise", "decode"}, device=device, dtype=torch.bfloat16,
                         time_shared=True)
    weights = {stage: sum(c.nbytes for c in copies.values()) for stage, copies in shared._host_copies.items()}
    assert torch.cuda.memory_allocated(device) - base < 64 * MIB, "every component parked in host memory"
    moves = []

    def use(stage: str) -> None:
        moves.append(shared.use(stage))
        held = torch.cuda.memory_allocated(device) - base
        assert weights[stage] <= held < weights[stage] + 64 * MIB, (stage, held, weights)
        torch.cuda.reset_peak_memory_stats(device)

    videos = []
    for _ in range(2):  # a second cycle: the weights moved back unchanged give the same video
        stage_peaks = {}

        def use_and_measure(stage: str) -> None:
            if moves:
                stage_peaks[moves[-1]["stage"]] = torch.cuda.max_memory_allocated(device) - base
            use(stage)

        videos.append(_render(shared, use_and_measure))
        stage_peaks["decode"] = torch.cuda.max_memory_allocated(device) - base
        together = sum(weights.values())
        for stage, peak in stage_peaks.items():
            print(f"TIME_SHARE_GPU {stage}: weights {weights[stage] / 2**30:.2f} GiB, peak {peak / 2**30:.2f} GiB "
                  f"(all stages' weights together {together / 2**30:.2f} GiB)")
            assert peak < together, (stage, peak, together)
        assert stage_peaks["denoise"] < weights["encode"], "the text encoder left the GPU before denoising"
    for move in moves:
        print(f"TIME_SHARE_GPU move {move['stage']}: {move['bytes'] / 2**30:.2f} GiB in {move['seconds']:.3f} s")
    assert all(torch.equal(v, expected) for v in videos), "bit-identical to every component on the GPU"
    shared.free()
