"""Wan stage functions against diffusers' own WanPipeline, on the tiny demo model (CPU, float32)."""

from __future__ import annotations

import json
import pathlib
import shutil
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from spmd_diff.errors import UserError
from spmd_diff.models.shapes import VideoSpec, WanShapes, read_shapes
from spmd_diff.models.wan import WanStages, reference_video

SPEC_CFG = VideoSpec(height=64, width=64, num_frames=9, num_inference_steps=4, guidance_scale=5.0)
SPEC_NO_CFG = VideoSpec(height=64, width=64, num_frames=9, num_inference_steps=3, guidance_scale=1.0)
SPEC_WIDE_CFG = VideoSpec(height=48, width=80, num_frames=9, num_inference_steps=3, guidance_scale=3.5)

CASES = [  # (prompt, negative prompt, seed, spec)
    ("A cat and a dog bake a cake in a sunny kitchen.", "blurred details, low quality, static", 0, SPEC_CFG),
    ("A red fox runs across a snowy field at dawn.", None, 1234, SPEC_NO_CFG),
    ("  Waves crash against the rocks &amp; seagulls   circle above.  ", None, 2**40 + 7, SPEC_WIDE_CFG),
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def split_stages(demo_model_dir: pathlib.Path) -> Iterator[dict[str, WanStages]]:
    """One WanStages per stage, as the encoder, DiT and decoder ranks hold them."""
    stages = {name: WanStages(demo_model_dir, {name}) for name in ("encode", "denoise", "decode")}
    yield stages
    for s in stages.values():
        s.free()


def _render(stages: dict[str, WanStages], prompt: str, negative: str | None, seed: int, spec: VideoSpec) -> np.ndarray:
    embeds = stages["encode"].encode(prompt, negative, spec)
    latents = stages["denoise"].denoise(embeds, seed, spec)
    return stages["decode"].decode(latents)


def _assert_close_video(video: np.ndarray, reference: np.ndarray) -> None:
    assert video.dtype == reference.dtype == np.uint8
    assert video.shape == reference.shape
    diff = np.abs(video.astype(np.int16) - reference.astype(np.int16))
    print(f"video vs WanPipeline: max |diff| {diff.max()} uint8 levels, mean {diff.mean():.4f}; "
          f"video std {video.std():.1f}")
    assert diff.max() <= 1
    assert video.std() > 2.0, "degenerate video: the comparison would prove nothing"


@pytest.mark.parametrize("prompt, negative, seed, spec", CASES, ids=["cfg-negative", "no-cfg", "cfg-wide"])
def test_stages_match_wan_pipeline(split_stages: dict[str, WanStages], demo_model_dir: pathlib.Path, prompt: str,
                                   negative: str | None, seed: int, spec: VideoSpec) -> None:
    video = _render(split_stages, prompt, negative, seed, spec)
    assert video.shape == (spec.num_frames, spec.height, spec.width, 3)
    assert video.shape == read_shapes(demo_model_dir, spec).video_shape
    _assert_close_video(video, reference_video(demo_model_dir, prompt, negative, seed, spec))


def test_encode_and_denoise_equal_pipeline_internals(split_stages: dict[str, WanStages],
                                                     demo_model_dir: pathlib.Path) -> None:
    from diffusers import WanPipeline

    prompt, negative, seed, spec = CASES[0]
    pipeline = WanPipeline.from_pretrained(demo_model_dir)
    pipeline.set_progress_bar_config(disable=True)
    with torch.no_grad():
        want_pos, want_neg = pipeline.encode_prompt(prompt, negative, True, max_sequence_length=512)
    embeds = split_stages["encode"].encode(prompt, negative, spec)
    assert set(embeds) == {"prompt_embeds", "negative_prompt_embeds"}
    assert torch.equal(embeds["prompt_embeds"], want_pos) and torch.equal(embeds["negative_prompt_embeds"], want_neg)

    steps: list[tuple[int, int]] = []
    latents = split_stages["denoise"].denoise(embeds, seed, spec, callback=lambda i, n: steps.append((i, n)))
    want = pipeline(prompt=prompt, negative_prompt=negative, height=spec.height, width=spec.width,
                    num_frames=spec.num_frames, num_inference_steps=spec.num_inference_steps,
                    guidance_scale=spec.guidance_scale, generator=torch.Generator("cpu").manual_seed(seed),
                    output_type="latent").frames
    assert latents.dtype == torch.float32 and latents.device.type == "cpu"
    assert torch.equal(latents, want)
    assert steps == [(i, spec.num_inference_steps) for i in range(spec.num_inference_steps)]


def test_encode_shapes_padding_and_no_cfg(split_stages: dict[str, WanStages], demo_model_dir: pathlib.Path) -> None:
    shapes = read_shapes(demo_model_dir, SPEC_NO_CFG)
    embeds = split_stages["encode"].encode("A horse gallops along the shore.", "ignored without CFG", SPEC_NO_CFG)
    assert list(embeds) == ["prompt_embeds"] and shapes.num_embeds == 1
    pe = embeds["prompt_embeds"]
    assert tuple(pe.shape) == shapes.embeds_shape == (1, 512, 32) and pe.dtype == torch.float32
    used = int(pe[0].abs().sum(dim=1).gt(0).sum())
    assert 2 < used < 30 and pe[0, used:].eq(0).all()  # trimmed to the prompt's tokens, zero re-padded
    assert shapes.embeds_nbytes(torch.bfloat16) == 512 * 32 * 2
    assert read_shapes(demo_model_dir, SPEC_CFG).embeds_nbytes(torch.float32) == 2 * 512 * 32 * 4


def test_long_prompt_is_truncated_with_a_warning(split_stages: dict[str, WanStages],
                                                 demo_model_dir: pathlib.Path) -> None:
    spec = VideoSpec(height=64, width=64, num_frames=5, num_inference_steps=2, guidance_scale=2.0,
                     max_sequence_length=8)
    prompt = "A robot walks through a futuristic city with glass towers and flying cars at night."
    with pytest.warns(UserWarning, match="truncated to max_sequence_length 8"):
        video = _render(split_stages, prompt, None, 5, spec)
    _assert_close_video(video, reference_video(demo_model_dir, prompt, None, 5, spec))


def test_each_stage_loads_only_what_it_needs(split_stages: dict[str, WanStages]) -> None:
    loaded = {name: {attr for attr in ("tokenizer", "text_encoder", "transformer", "transformer_2", "vae")
                     if getattr(stages, attr) is not None} for name, stages in split_stages.items()}
    assert loaded == {"encode": {"tokenizer", "text_encoder"}, "denoise": {"transformer"}, "decode": {"vae"}}
    with pytest.raises(RuntimeError, match="not 'encode'"):
        split_stages["decode"].encode("a cat", None, SPEC_CFG)


def test_shapes_helpers_match_tensors(split_stages: dict[str, WanStages], demo_model_dir: pathlib.Path) -> None:
    shapes = read_shapes(demo_model_dir, SPEC_WIDE_CFG)
    assert shapes == WanShapes(text_seq_len=512, text_dim=32, latent_channels=16, latent_frames=3, latent_height=6,
                               latent_width=10, vae_scale_factor_spatial=8, vae_scale_factor_temporal=4,
                               patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, num_embeds=2)
    noise = split_stages["denoise"].initial_latents(3, SPEC_WIDE_CFG)
    assert tuple(noise.shape) == shapes.latents_shape
    assert shapes.latents_nbytes() == noise.numel() * 4
    assert shapes.num_video_tokens == 3 * 3 * 5
    assert shapes.video_nbytes() == 9 * 48 * 80 * 3


def test_free_drops_components(demo_model_dir: pathlib.Path) -> None:
    stages = WanStages(demo_model_dir, ["decode"])
    stages.free()
    assert stages.vae is None
    with pytest.raises(RuntimeError):
        stages.decode(torch.zeros(1, 16, 1, 2, 2))


# ---- two-expert (Wan2.2 A14B layout) and per-token timesteps (Wan2.2 TI2V) variants of the demo model ----------


def _variant(demo_model_dir: pathlib.Path, tmp_path: pathlib.Path, **index_changes: object) -> pathlib.Path:
    model_dir = tmp_path / "variant"
    shutil.copytree(demo_model_dir, model_dir)
    index_path = model_dir / "model_index.json"
    index = json.loads(index_path.read_text())
    index.update(index_changes)
    index_path.write_text(json.dumps(index, indent=2))
    return model_dir


def test_two_expert_dir_switches_like_the_pipeline(demo_model_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    from diffusers import WanTransformer3DModel

    model_dir = _variant(demo_model_dir, tmp_path, transformer_2=["diffusers", "WanTransformer3DModel"],
                         boundary_ratio=0.6)
    torch.manual_seed(99)  # a different low-noise expert
    config = WanTransformer3DModel.load_config(model_dir / "transformer")
    WanTransformer3DModel.from_config(config).save_pretrained(model_dir / "transformer_2")
    spec = VideoSpec(height=64, width=64, num_frames=9, num_inference_steps=4, guidance_scale=4.0,
                     guidance_scale_2=2.0)
    stages = WanStages(model_dir, {"encode", "denoise", "decode"})
    assert stages.transformer is not None and stages.transformer_2 is not None
    prompt = "A panda eats bamboo in a green forest."
    video = stages.decode(stages.denoise(stages.encode(prompt, "ugly", spec), 11, spec))
    _assert_close_video(video, reference_video(model_dir, prompt, "ugly", 11, spec))
    single = WanStages(demo_model_dir, {"denoise"})  # the switch matters: one expert gives other latents
    embeds = stages.encode(prompt, "ugly", spec)
    assert not torch.equal(single.denoise(embeds, 11, SPEC_CFG), stages.denoise(embeds, 11, spec))


def test_expand_timesteps_dir_matches_the_pipeline(demo_model_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    model_dir = _variant(demo_model_dir, tmp_path, expand_timesteps=True)
    stages = WanStages(model_dir, {"encode", "denoise", "decode"})
    prompt = "A hot air balloon rises above the fields."
    video = stages.decode(stages.denoise(stages.encode(prompt, None, SPEC_NO_CFG), 21, SPEC_NO_CFG))
    _assert_close_video(video, reference_video(model_dir, prompt, None, 21, SPEC_NO_CFG))


# ---- user errors ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("changes, message", [
    (dict(height=72), r"height 72 is not a multiple of 16"),
    (dict(width=100), r"width 100 is not a multiple of 16"),
    (dict(num_frames=8), r"num_frames 8 must be 4k\+1 .* try 5 or 9"),
    (dict(guidance_scale_2=3.0), r"guidance_scale_2 is only supported by two-expert"),
])
def test_read_shapes_rejects_bad_specs(demo_model_dir: pathlib.Path, changes: dict, message: str) -> None:
    spec = VideoSpec(**{**SPEC_CFG.__dict__, **changes})
    with pytest.raises(UserError, match=message):
        read_shapes(demo_model_dir, spec)


def test_video_spec_rejects_nonsense() -> None:
    with pytest.raises(UserError, match="height must be a positive integer"):
        VideoSpec(height=-64, width=64, num_frames=9, num_inference_steps=4, guidance_scale=5.0)
    with pytest.raises(UserError, match="guidance_scale must be a finite number"):
        VideoSpec(height=64, width=64, num_frames=9, num_inference_steps=4, guidance_scale=float("nan"))


def test_missing_and_foreign_model_dirs(demo_model_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(UserError, match=f"model directory {missing} does not exist"):
        read_shapes(missing, SPEC_CFG)
    with pytest.raises(UserError, match="does not exist"):
        WanStages(missing, {"decode"})
    with pytest.raises(UserError, match="not a diffusers pipeline directory.*model_index.json not found"):
        read_shapes(tmp_path, SPEC_CFG)
    other = _variant(demo_model_dir, tmp_path, _class_name="FluxPipeline")
    with pytest.raises(UserError, match="holds a 'FluxPipeline' pipeline; only WanPipeline"):
        read_shapes(other, SPEC_CFG)


def test_missing_component_is_named(demo_model_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    model_dir = _variant(demo_model_dir, tmp_path)
    shutil.rmtree(model_dir / "vae")
    with pytest.raises(UserError, match=f"component directory {model_dir / 'vae'} is missing"):
        WanStages(model_dir, {"decode"})
    with pytest.raises(UserError, match="component 'vae'.*config.json not found"):
        read_shapes(model_dir, SPEC_CFG)
    assert WanStages(model_dir, {"encode"}).text_encoder is not None  # stages that do not need it still load
    with pytest.raises(ValueError, match=r"stages must be a non-empty subset"):
        WanStages(model_dir, {"render"})
