"""CFG parallel on threads (CPU): a DiT group of 2k ranks, the cond branch on one half and the uncond branch on
the other, each half sequence-parallel (none, Ulysses, ring, torus 2 x 2); 27 latent tokens and 3 attention heads
(a demo-model variant). The latents equal the one-rank denoise and the videos the one-rank videos within one
uint8 level; one case also decodes the video over the whole group (``decode_split``)."""

from __future__ import annotations

import copy
import json
import pathlib
import shutil

import numpy as np
import pytest
import torch

from spmd_diff.models.shapes import VideoSpec
from spmd_diff.models.wan import WanStages
from spmd_diff.parallel.seq_comm import GroupSeqComm
from spmd_diff.parallel.group_denoise import SPDenoiser, cfg_half_torus
from spmd_diff.parallel.vae_decode import decode_split
from tests.unit._sp_threads import run_ranks

pytestmark = pytest.mark.usefixtures("one_thread")

SPEC = VideoSpec(height=48, width=48, num_frames=9, num_inference_steps=2, guidance_scale=4.0)  # 3 x 3 x 3 tokens
PROMPT, NEGATIVE, SEED = "A lighthouse on a cliff at dusk.", "blurry", 31


@pytest.fixture(scope="module")
def three_heads(demo_model_dir: pathlib.Path, tmp_path_factory) -> pathlib.Path:
    """The demo model with its 24-wide attention as 3 heads of 8 (same weights): an odd head count."""
    model_dir = tmp_path_factory.mktemp("heads3") / "model"
    shutil.copytree(demo_model_dir, model_dir)
    path = model_dir / "transformer" / "config.json"
    config = json.loads(path.read_text())
    assert config["num_attention_heads"] * config["attention_head_dim"] == 24
    config.update(num_attention_heads=3, attention_head_dim=8)
    path.write_text(json.dumps(config, indent=2))
    return model_dir


@pytest.fixture(scope="module")
def reference(three_heads: pathlib.Path):
    embeds = WanStages(three_heads, {"encode"}).encode(PROMPT, NEGATIVE, SPEC)
    single = WanStages(three_heads, {"denoise", "decode"})
    assert single.shapes(SPEC).num_video_tokens == 27
    latents = single.denoise(embeds, SEED, SPEC)
    return embeds, latents, single.decode(latents), single


CASES = {  # name: (group size, layout of the group, torus shape of the group)
    "2x1": (2, "auto", None),
    "2x2-ulysses": (4, "ulysses", None),
    "2x2-ring": (4, "ring", None),
    "2x(2x2)-torus": (8, "torus", (4, 2)),  # a virtual topology of 4 nodes x 2 ranks: each half a 2 x 2 torus
}


@pytest.mark.parametrize("name", list(CASES))
def test_cfg_parallel_equals_one_rank(name: str, three_heads: pathlib.Path, reference) -> None:
    embeds, ref_latents, ref_video, single = reference
    size, layout_name, torus = CASES[name]
    stages = [WanStages(three_heads, {"denoise"}) for _ in range(size)]
    decode_together = name == "2x2-ulysses"
    vaes = [_own_vae(single) for _ in range(size)] if decode_together else []

    def rank_fn(rank, world):
        coll = world.collectives(rank)
        group = coll.group(list(range(size)))
        denoiser = SPDenoiser.from_group(stages[rank], group, coll.group, layout_name, torus, cfg_parallel=True)
        try:
            leader = rank == 0
            latents = denoiser.denoise(embeds if leader else None, SEED if leader else None, SPEC, every_rank=True)
            video = decode_split(vaes[rank], GroupSeqComm(group), latents) if decode_together else None
            return latents, video, denoiser.layout.describe(), denoiser.cfg.branch
        finally:
            denoiser.remove()

    results = run_ranks(size, rank_fn, timeout_s=300)
    assert [r[3] for r in results] == ["cond"] * (size // 2) + ["uncond"] * (size // 2)
    expected_layout = {"2x1": "none", "2x2-ulysses": "ulysses over 2", "2x2-ring": "ring over 2",
                       "2x(2x2)-torus": "torus 2x2"}[name]
    assert results[0][2].startswith(expected_layout), results[0][2]
    for latents, *_ in results:  # every rank took the same steps
        assert torch.equal(latents, results[0][0])
    torch.testing.assert_close(results[0][0], ref_latents, rtol=1e-5, atol=1e-5)
    video = single.decode(results[0][0])
    assert int(np.abs(video.astype(np.int16) - ref_video.astype(np.int16)).max()) <= 1
    if decode_together:
        assert all(r[1] is None for r in results[1:])
        together = results[0][1].numpy()
        assert int(np.abs(together.astype(np.int16) - ref_video.astype(np.int16)).max()) <= 1


def test_cfg_half_grids() -> None:
    assert cfg_half_torus((2, 4), 8) == (1, 4)  # one node per half
    assert cfg_half_torus((4, 2), 8) == (2, 2)
    assert cfg_half_torus((1, 4), 4) == (1, 2)
    assert cfg_half_torus((3, 2), 6) is None
    assert cfg_half_torus(None, 4) is None


def _own_vae(stages: WanStages) -> WanStages:
    mine = copy.copy(stages)
    mine.vae = copy.deepcopy(stages.vae)
    return mine
