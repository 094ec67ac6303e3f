"""Dedicated decoder ranks decoding as a group of 2 (threads, the demo VAE, float32) against the one-rank decode:
items offered by either member, in the same round or alone, latent heights that do not divide evenly (and one
too short to split), members closing at different times; every video within one uint8 level of the one-rank
decode and delivered to the member that held it."""

from __future__ import annotations

import copy
import pathlib

import pytest
import torch

from spmd_diff.models.wan import WanStages
from spmd_diff.parallel.seq_comm import GroupSeqComm
from spmd_diff.parallel.decoder_group import DecoderGroup, run_rounds
from tests.unit._sp_threads import run_ranks


@pytest.fixture(scope="module")
def stages(demo_model_dir: pathlib.Path) -> WanStages:
    return WanStages(demo_model_dir, {"decode"})


def _latents(stages: WanStages, latent_h: int, latent_w: int, frames: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(1, stages.vae.config.z_dim, frames, latent_h, latent_w, generator=gen)


def test_decoder_group_of_two_equals_one_rank(stages: WanStages) -> None:
    # item index -> latents; member 0 holds items 0, 2, 3 and member 1 holds item 1, arriving at different polls
    items = {0: _latents(stages, 5, 6, 2, seed=1), 1: _latents(stages, 7, 5, 3, seed=2),
             2: _latents(stages, 1, 4, 2, seed=3), 3: _latents(stages, 3, 3, 2, seed=4)}
    arrivals = {0: [[0], [], [2], [], [3]], 1: [[], [1]]}  # per member, per poll: what has arrived by then
    references = {index: stages.decode_uint8(latents) for index, latents in items.items()}
    copies = []
    for _ in range(2):  # threads: each rank its own VAE (feature cache, swapped forwards)
        mine = copy.copy(stages)
        mine.vae = copy.deepcopy(stages.vae)
        copies.append(mine)

    def rank_fn(rank, world):
        comm = GroupSeqComm(world.collectives(rank).group([0, 1]))
        group = DecoderGroup(copies[rank], comm)
        polls = list(arrivals[rank])
        held: list[int] = []
        got: dict[int, torch.Tensor] = {}
        pauses = []

        def next_offer():
            if polls:
                held.extend(polls.pop(0))
            offer = (held[0], items[held.pop(0)]) if held else None
            return offer, not polls and not held

        count = run_rounds(group, next_offer, got.__setitem__, lambda: pauses.append(1))
        return count, got, len(pauses)

    results = run_ranks(2, rank_fn)
    assert sorted(results[0][1]) == [0, 2, 3] and sorted(results[1][1]) == [1]
    assert results[0][0] == 3 and results[1][0] == 1
    assert results[0][2] >= 1  # the rounds where nobody held anything backed off
    for member in (0, 1):
        for index, video in results[member][1].items():
            reference = references[index]
            assert video.shape == reference.shape and video.dtype == torch.uint8, index
            diff = (video.to(torch.int16) - reference.to(torch.int16)).abs()
            assert int(diff.max()) <= 1, f"item {index}: max diff {int(diff.max())} levels"
    # the VAE is restored afterwards
    assert torch.equal(copies[0].decode_uint8(items[1]), references[1])


def test_bad_latents_are_refused(stages: WanStages) -> None:
    class _OneRank:
        ranks = (0,)
        rank_in_group = 0

    group = DecoderGroup(stages, GroupSeqComm(_OneRank()))
    with pytest.raises(ValueError, match="latents must be"):
        group.round((0, torch.zeros(1, 16, 2, 3)), closed=False)
