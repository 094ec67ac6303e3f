"""random:<name> models: config-only directories with the published Wan2.1 shapes, seeded random weights."""

from __future__ import annotations

import json

import pytest
import torch

from spmd_diff.errors import UserError
from spmd_diff.models.random_wan import (
    RandomWanStages,
    architecture_name,
    build_random_module,
    is_random_model_dir,
    make_stages,
    random_model_dir,
)
from spmd_diff.models.shapes import VideoSpec, read_shapes
from spmd_diff.models.wan import WanStages


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    from spmd_diff.models.demo import demo_model_dir

    root = tmp_path_factory.mktemp("random_cache")
    demo_model_dir(root)
    return root


@pytest.mark.parametrize("name, dim, heads, layers, ffn", [("wan2.1-t2v-1.3b", 1536, 12, 30, 8960),
                                                           ("wan2.1-t2v-14b", 5120, 40, 40, 13824)])
def test_published_shapes(cache, name, dim, heads, layers, ffn):
    model_dir = random_model_dir("random:" + name, cache)
    assert is_random_model_dir(model_dir) and random_model_dir(name, cache) == model_dir
    config = json.loads((model_dir / "transformer" / "config.json").read_text())
    assert config["num_attention_heads"] * config["attention_head_dim"] == dim
    assert (config["num_attention_heads"], config["num_layers"], config["ffn_dim"]) == (heads, layers, ffn)
    assert (config["text_dim"], config["freq_dim"], config["patch_size"]) == (4096, 256, [1, 2, 2])
    text = json.loads((model_dir / "text_encoder" / "config.json").read_text())
    assert (text["d_model"], text["num_layers"], text["num_heads"], text["d_ff"], text["vocab_size"]) == (
        4096, 24, 64, 10240, 256384)
    shapes = read_shapes(model_dir, VideoSpec(480, 832, 81, 50, 5.0))
    assert shapes.num_video_tokens == 32760 and shapes.latents_shape == (1, 16, 21, 60, 104)
    assert shapes.text_dim == 4096 and shapes.num_attention_heads == heads


def test_unknown_name():
    with pytest.raises(UserError, match="unknown random architecture.*random:wan2.1-t2v-1.3b"):
        architecture_name("random:wan9")


def test_weights_are_seeded_and_cast_like_from_pretrained(cache):
    model_dir = random_model_dir("random:wan2.1-t2v-tiny", cache)
    a = build_random_module("transformer", model_dir, "cpu", torch.bfloat16, seed=5)
    b = build_random_module("transformer", model_dir, "cpu", torch.bfloat16, seed=5)
    c = build_random_module("transformer", model_dir, "cpu", torch.bfloat16, seed=6)
    state_a, state_b, state_c = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert not torch.equal(state_a["proj_out.weight"], state_c["proj_out.weight"])
    assert state_a["proj_out.weight"].dtype == torch.bfloat16
    assert state_a["scale_shift_table"].dtype == torch.float32  # diffusers keeps it in fp32
    assert state_a["condition_embedder.time_embedder.linear_1.weight"].dtype == torch.float32


def test_stages_render_end_to_end_on_cpu(cache):
    model_dir = random_model_dir("random:wan2.1-t2v-tiny", cache)
    stages = make_stages(model_dir, {"encode", "denoise", "decode"}, device="cpu", dtype=torch.float32)
    assert isinstance(stages, RandomWanStages)
    assert isinstance(make_stages(cache / "demo-v1", {"decode"}), WanStages)
    spec = VideoSpec(32, 32, 5, 2, 3.0, max_sequence_length=16)
    embeds = stages.encode("a cat bakes a cake", "", spec)
    latents = stages.denoise(embeds, 7, spec)
    video = stages.decode(latents)
    assert video.shape == (5, 32, 32, 3) and video.dtype.name == "uint8"
    again = RandomWanStages(model_dir, {"denoise"}, device="cpu").denoise(embeds, 7, spec)
    assert torch.equal(latents, again)
    stages.free()
