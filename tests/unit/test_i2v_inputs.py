"""Image-to-video inputs without a model run: the prompts file's ``image``, image loading, the T2V/I2V fit, the
shapes of the encode message, and the planner's I2V encoder stage."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from spmd_diff.errors import UserError
from spmd_diff.io.images import ImageError, image_sha256, load_image
from spmd_diff.io.inputs import Item, load_prompts
from spmd_diff.models.tasks import check_items_fit_task, model_task


def test_image_paths_resolve_against_the_prompts_file(tmp_path: Path) -> None:
    folder = tmp_path / "job"
    folder.mkdir()
    path = folder / "p.jsonl"
    path.write_text(json.dumps({"prompt": "a", "image": "img/a.png"}) + "\n"
                    + json.dumps({"prompt": "b", "image": "/data/b.jpg"}) + "\n" + json.dumps({"prompt": "c"}) + "\n")
    items = load_prompts(path, 0)
    assert [item.image for item in items] == [str(folder / "img/a.png"), "/data/b.jpg", None]
    path.write_text(json.dumps({"prompt": "a", "image": 3}) + "\n")
    with pytest.raises(UserError, match="p.jsonl:1: image must be a non-empty string"):
        load_prompts(path, 0)


def test_load_image_converts_to_rgb_and_checks_the_hash(tmp_path: Path) -> None:
    import PIL.Image

    for mode, name in (("RGBA", "a.png"), ("L", "b.webp"), ("RGB", "c.jpg")):
        PIL.Image.new(mode, (20, 12)).save(tmp_path / name)
        image = load_image(str(tmp_path / name), image_sha256(str(tmp_path / name)))
        assert image.mode == "RGB" and image.size == (20, 12)
    with pytest.raises(ImageError, match="changed during the run"):
        load_image(str(tmp_path / "a.png"), "0" * 64)
    PIL.Image.new("RGB", (20, 12)).save(tmp_path / "d.gif")
    with pytest.raises(ImageError, match="GIF; only PNG, JPEG, WEBP"):
        load_image(str(tmp_path / "d.gif"))
    assert image_sha256(str(tmp_path / "missing.png")) == ""


def test_items_must_fit_the_task(tmp_path: Path) -> None:
    with_image, without = Item(0, "a", "p", None, 1, "/x.png"), Item(1, "b", "p", None, 2)
    check_items_fit_task("t2v", [without], "demo")
    check_items_fit_task("i2v", [with_image], "demo-i2v")
    with pytest.raises(UserError, match=r"1 item\(s\) \('a'\) give an image, but the model is text-to-video"):
        check_items_fit_task("t2v", [with_image, without], "demo")
    with pytest.raises(UserError, match=r"\('b'\) give no image"):
        check_items_fit_task("i2v", [with_image, without], "demo-i2v")
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "WanImageToVideoPipeline"}))
    assert model_task(tmp_path) == "i2v"
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(UserError, match="'FluxPipeline' pipeline"):
        model_task(tmp_path)


def test_i2v_shapes_size_the_encode_message_exactly(tmp_path: Path) -> None:
    import torch

    from spmd_diff.models.random_wan import random_model_dir
    from spmd_diff.models.shapes import VideoSpec, read_shapes

    model = random_model_dir("random:wan2.1-i2v-14b-480p", tmp_path)
    shapes = read_shapes(model, VideoSpec(480, 832, 81, 4, 5.0))
    assert shapes.latents_shape == (1, 16, 21, 60, 104)  # noise: the VAE's z_dim, not in_channels (36)
    assert shapes.encoded_shapes() == {"prompt_embeds": (1, 512, 4096), "negative_prompt_embeds": (1, 512, 4096),
                                       "image_embeds": (1, 257, 1280), "condition": (1, 20, 21, 60, 104)}
    expected = 2 * 512 * 4096 * 2 + math.ceil(257 * 1280 * 2 / 64) * 64 + 20 * 21 * 60 * 104 * 4
    assert shapes.encoded_nbytes(torch.bfloat16, 64) == expected
    t2v = read_shapes(random_model_dir("random:wan2.1-t2v-14b", tmp_path), VideoSpec(480, 832, 81, 4, 1.0))
    assert t2v.encoded_shapes() == {"prompt_embeds": (1, 512, 4096)} and t2v.latents_shape[1] == 16


def test_the_planner_prices_the_i2v_encoder_stage() -> None:
    from spmd_diff.plan.cost_model import AnalyticPrior
    from spmd_diff.plan.memory import MemoryModel
    from spmd_diff.plan.model_sizes import WAN21_I2V_14B, WAN21_T2V_14B
    from spmd_diff.plan.workload import WorkClass

    work = WorkClass(480, 832, 81, 4, True)
    i2v, t2v = AnalyticPrior(WAN21_I2V_14B), AnalyticPrior(WAN21_T2V_14B)
    # The encoder's VAE encode of 81 frames costs about a float32 VAE decode (the decode less its postprocess).
    vae_decode = i2v.seconds("decode", work) - work.num_pixels * i2v.postprocess_s_per_pixel
    assert i2v.seconds("encode", work) - t2v.seconds("encode", work) == pytest.approx(vae_decode, rel=0.05)
    memory_i2v, memory_t2v = MemoryModel.for_model(WAN21_I2V_14B), MemoryModel.for_model(WAN21_T2V_14B)
    clip_and_vae = WAN21_I2V_14B.image_encoder_params * 2 + WAN21_I2V_14B.vae_params * 4
    assert memory_i2v.component_bytes("encode") - memory_t2v.component_bytes("encode") == pytest.approx(clip_and_vae,
                                                                                                       abs=2)
    assert memory_i2v.activation_bytes("encode", work) >= memory_i2v.activation_bytes("decode", work)
    assert np.isclose(WAN21_I2V_14B.image_encoder_params, 6.3e8, rtol=0.02)  # CLIP ViT-H/14's vision tower
