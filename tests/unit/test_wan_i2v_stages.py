"""Image-to-video stage functions (one rank: encode, denoise, decode) against diffusers' own
WanImageToVideoPipeline on the tiny I2V demo model (CPU, float32). The engine's end-to-end I2V runs are in
tests/mpi/test_i2v.py; this checks the shared denoise loop (``WanStages.denoise`` with the image's inputs) directly.
"""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

from spmd_diff.io.images import load_image
from spmd_diff.models.demo import demo_model_dir
from spmd_diff.models.shapes import VideoSpec
from spmd_diff.models.wan_i2v import WanI2VStages, reference_i2v_video

REPO = pathlib.Path(__file__).resolve().parents[2]
IMAGES = sorted((REPO / "jobs/demo-i2v-images").iterdir())

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return demo_model_dir(tmp_path_factory.mktemp("i2v_cache"), task="i2v")


@pytest.mark.parametrize("guidance, negative, seed", [(5.0, "static, blurry", 3), (1.0, None, 2**33 + 1)],
                         ids=["cfg", "no-cfg"])
def test_i2v_stages_match_the_pipeline(model: pathlib.Path, guidance: float, negative: str | None,
                                       seed: int) -> None:
    spec = VideoSpec(height=48, width=64, num_frames=9, num_inference_steps=3, guidance_scale=guidance)
    image = load_image(str(IMAGES[0]))
    prompt = "the camera moves slowly over the scene"
    stages = WanI2VStages(model, {"encode", "denoise", "decode"})
    try:
        embeds = stages.encode(prompt, negative, spec, image=image)
        video = stages.decode(stages.denoise(embeds, seed, spec))
    finally:
        stages.free()
    reference = reference_i2v_video(model, image, prompt, negative, seed, spec)
    assert video.shape == reference.shape == (9, 48, 64, 3)
    diff = np.abs(video.astype(np.int16) - reference.astype(np.int16))
    assert diff.max() <= 1, f"{diff.max()} uint8 levels from WanImageToVideoPipeline"
    assert reference.std() > 2.0, "degenerate video: the comparison would prove nothing"
