"""Dedicated decoder ranks decoding as one group: each video's VAE decode split in bands over all of them
(:func:`~spmd_diff.parallel.vae_decode.decode_split`), whichever member received its latents.

Items reach decoder ranks one by one, each through that rank's own channels (a DiT rank hands an item to one
decoder), so the members of a group hold different items at different times. The group works in rounds
(:meth:`DecoderGroup.round`, collective): every member offers at most one item it holds (its latents) or says
it will offer nothing more, in one all-gather of a small header; then for each offered item, in group-rank
order, its holder broadcasts the latents, the group decodes them together and the holder receives the video
(``[frames, height, width, 3]`` uint8, as :meth:`WanStages.decode_uint8`). A video with fewer latent rows than
the group has members is decoded by its holder alone (every member knows it from the header). A round in which
nobody offered anything returns at once; the caller waits a little and polls again. :func:`run_rounds` is that
loop over two callables (what a member holds next; what to do with a decoded video), for a decoder rank's loop.

The result equals the one-rank decode within one uint8 level (the bands' floating-point reassociation only).
No MPI here: the group's communication comes in as a :class:`~spmd_diff.parallel.seq_comm.SeqComm`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch

from spmd_diff.parallel.seq_comm import SeqComm
from spmd_diff.parallel.vae_decode import decode_split

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_HEADER = 8  # offered, closed, item index, C, F, H, W, dtype code


@dataclass
class RoundResult:
    videos: list[tuple[int, torch.Tensor]]
    """``(item index, video)`` for each item this member offered in the round."""
    num_offered: int
    """Items the whole group decoded in the round."""
    all_closed: bool
    """Every member said it will offer nothing more: the group is done."""


class DecoderGroup:
    """A group of decoder ranks (``comm``, every member the same VAE) decoding each video together.

    Args:
        stages: this rank's ``WanStages`` with the decode stage.
        comm: the decoder ranks of the group, in band order.
        span: ``span(item index, bands) -> context manager`` around each decode this member takes part in
            (``bands``: the members that decoded it, 1 when its holder decoded it alone), e.g. a timed stage
            event; ``None``: none.
    """

    def __init__(self, stages: Any, comm: SeqComm,
                 span: Callable[[int, int], AbstractContextManager] | None = None) -> None:
        self.stages = stages
        self.comm = comm
        self.span = span or (lambda index, bands: contextlib.nullcontext())

    def round(self, offer: tuple[int, torch.Tensor] | None, closed: bool) -> RoundResult:
        """One round (collective over the group).

        Args:
            offer: ``(item index, latents [1, C, F, H, W])`` this member holds and decodes with the group now,
                or ``None``.
            closed: this member will offer nothing after this round.
        """
        comm, device = self.comm, self.stages.device
        header = torch.zeros(_HEADER, dtype=torch.int64)
        header[1] = int(closed)
        if offer is not None:
            index, latents = offer
            if latents.ndim != 5 or latents.dtype not in _DTYPES:
                raise ValueError(f"decoder group: latents must be [1, C, F, H, W] in one of {_DTYPES}, got "
                                 f"{tuple(latents.shape)} {latents.dtype}")
            header[0], header[2] = 1, int(index)
            header[3:7] = torch.tensor(latents.shape[1:])
            header[7] = _DTYPES.index(latents.dtype)
        headers = [h.cpu() for h in comm.all_gather(header, [(_HEADER,)] * comm.size)]
        videos = []
        offered = [holder for holder in range(comm.size) if int(headers[holder][0])]
        for holder in offered:
            h = headers[holder]
            shape = (1, *(int(x) for x in h[3:7]))
            if holder == comm.rank:
                latents = offer[1].to(device)
            else:
                latents = torch.empty(shape, dtype=_DTYPES[int(h[7])], device=device)
            alone = shape[3] < comm.size  # too few latent rows for a band each
            if not alone:
                latents = comm.broadcast(latents, holder)
                with self.span(int(h[2]), comm.size):
                    video = decode_split(self.stages, comm, latents, leader=holder)
            elif holder == comm.rank:
                with self.span(int(h[2]), 1):
                    video = self.stages.decode_uint8(latents)
            if holder == comm.rank:
                videos.append((int(h[2]), video))
        return RoundResult(videos, len(offered), all(int(h[1]) for h in headers))


def run_rounds(group: DecoderGroup, next_offer: Callable[[], tuple[tuple[int, torch.Tensor] | None, bool]],
               on_video: Callable[[int, torch.Tensor], None], pause: Callable[[], None],
               on_round: Callable[[RoundResult], None] | None = None) -> int:
    """Rounds until every member is closed; returns the number of videos this member received.

    Args:
        next_offer: ``() -> (offer, closed)``: an item this member holds now (without waiting for one), or
            ``None``; and whether it will hold no more (its producers have all closed).
        on_video: ``(item index, video)`` for each of this member's items once decoded (e.g. to its writer).
        pause: called after a round in which nobody offered anything (a back-off).
        on_round: called after every round with its result, before its videos are handed on (e.g. to
            enforce a deadline on rounds without work); ``None``: nothing.
    """
    received, closed = 0, False
    while True:
        offer = None
        if not closed:
            offer, closed = next_offer()
        result = group.round(offer, closed and offer is None)
        if on_round is not None:
            on_round(result)
        for index, video in result.videos:
            on_video(index, video)
            received += 1
        if result.all_closed:
            return received
        if result.num_offered == 0:
            pause()
