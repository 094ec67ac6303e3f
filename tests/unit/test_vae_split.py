"""The VAE decode of one video split over 2 and 4 ranks (threads, the demo VAE, float32) against the one-rank
decode: bands of latent rows that do not divide evenly, the same uint8 video within one level."""

from __future__ import annotations

import copy
import pathlib

import pytest
import torch

from spmd_diff.models.wan import WanStages
from spmd_diff.parallel.seq_comm import GroupSeqComm
from spmd_diff.parallel.vae_decode import band_rows, decode_split, split_decoder
from tests.unit._sp_threads import run_ranks


@pytest.fixture(scope="module")
def stages(demo_model_dir: pathlib.Path) -> WanStages:
    return WanStages(demo_model_dir, {"decode"})


def _own_vae(stages: WanStages) -> WanStages:
    mine = copy.copy(stages)
    mine.vae = copy.deepcopy(stages.vae)
    return mine


def _latents(stages: WanStages, latent_height: int, latent_width: int, frames: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(1, stages.vae.config.z_dim, frames, latent_height, latent_width, generator=gen)


@pytest.mark.parametrize("ranks, latent_hw, frames", [(2, (5, 6), 3), (4, (7, 5), 2), (4, (4, 3), 3)])
def test_split_decode_equals_one_rank(stages: WanStages, ranks: int, latent_hw: tuple[int, int],
                                      frames: int) -> None:
    latents = _latents(stages, *latent_hw, frames, seed=ranks + latent_hw[0])
    reference = stages.decode_uint8(latents)

    copies = [_own_vae(stages) for _ in range(ranks)]  # threads: each rank its own VAE (feature cache, hooks)

    def rank_fn(rank, world):
        comm = GroupSeqComm(world.collectives(rank).group(list(range(ranks))))
        return decode_split(copies[rank], comm, latents)

    videos = run_ranks(ranks, rank_fn)
    assert all(v is None for v in videos[1:])
    video = videos[0]
    assert video.shape == reference.shape and video.dtype == torch.uint8
    diff = (video.to(torch.int16) - reference.to(torch.int16)).abs()
    assert int(diff.max()) <= 1, f"max diff {int(diff.max())} levels"
    assert float((diff > 0).float().mean()) < 0.01
    # the VAE is restored afterwards
    assert torch.equal(stages.decode_uint8(latents), reference)


def test_bands_cover_the_rows_and_need_one_row_each() -> None:
    assert band_rows(7, 4) == [2, 2, 2, 1]
    with pytest.raises(ValueError, match="cannot split 3 latent rows over 4"):
        band_rows(3, 4)


def test_unknown_decoder_layers_are_refused(stages: WanStages) -> None:
    vae = stages.vae
    original = vae.decoder.norm_out
    vae.decoder.norm_out = torch.nn.GroupNorm(1, 1)
    try:
        comm = GroupSeqComm(_OneRank())
        with pytest.raises(ValueError, match="GroupNorm"):
            with split_decoder(vae, comm, [4]):
                pass
    finally:
        vae.decoder.norm_out = original


class _OneRank:
    ranks = (0,)
    rank_in_group = 0


class _VaeOnly:
    """What ``decode_split`` needs of ``WanStages``, over a bare VAE (no un-normalisation)."""

    def __init__(self, vae) -> None:
        self.vae = vae

    @torch.no_grad()
    def decode_uint8(self, latents: torch.Tensor) -> torch.Tensor:
        from spmd_diff.models.speed import frames_to_uint8

        return frames_to_uint8(self.vae.decode(latents, return_dict=False)[0])


@pytest.mark.parametrize("ranks", [2, 3])
def test_wan22_style_decoder_splits_too(ranks: int) -> None:
    """Residual up blocks (DupUp3D shortcuts) and a patch-2 unpatchify, as in the Wan2.2 VAE (tiny, random)."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=16, decoder_base_dim=16, z_dim=8, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                           temperal_downsample=[False, True, True], is_residual=True, patch_size=2, in_channels=12,
                           out_channels=12, scale_factor_spatial=16, latents_mean=[0.0] * 8,
                           latents_std=[1.0] * 8).eval()
    latents = torch.randn(1, 8, 3, 5, 4, generator=torch.Generator().manual_seed(1))
    reference = _VaeOnly(vae).decode_uint8(latents)
    copies = [_VaeOnly(copy.deepcopy(vae)) for _ in range(ranks)]

    def rank_fn(rank, world):
        return decode_split(copies[rank], GroupSeqComm(world.collectives(rank).group(list(range(ranks)))), latents)

    video = run_ranks(ranks, rank_fn)[0]
    assert video.shape == reference.shape == (9, 80, 64, 3)
    assert int((video.to(torch.int16) - reference.to(torch.int16)).abs().max()) <= 1
