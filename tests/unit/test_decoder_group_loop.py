"""The decoder ranks' group loop (runtime.decoder_rounds) over stand-in channels and a stand-in group (no model,
no MPI): it offers one received item per round, writes failures it receives without offering them,
writes the videos the group hands back, ends when its producers closed and the group is done, and raises
StageTimeout when the group has had nothing to decode for the rank's deadline."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from spmd_diff.comm.wire import Message
from spmd_diff.errors import StageTimeout
from spmd_diff.io.inputs import Item
from spmd_diff.parallel.decoder_group import RoundResult
from spmd_diff.runtime import loops
from spmd_diff.runtime.decoder_rounds import decoder_group_loop
from spmd_diff.runtime.signals import StopFlag


class _Receiver:
    """A channel end: ``script`` is what each ``ready()`` poll finds (None: nothing yet), then a close."""

    def __init__(self, name: str, script: list) -> None:
        self.name, self.script, self.closed = name, list(script), False
        self.polls = 0

    def ready(self) -> bool:
        self.polls += 1
        if self.closed:
            return False
        if self.script and self.script[0] is None:
            self.script.pop(0)
            return False
        return True  # a message or the close

    def take(self, deadline: float) -> Message:
        if not self.script:
            self.closed = True
            return Message({"closed": True})
        return self.script.pop(0)

    def describe_wait(self) -> str:
        return f"{self.name} (waiting for its producer)"


class _Group:
    """A group whose other member stays idle and closed: each round decodes what this member offers."""

    class comm:  # noqa: N801 - the attribute DecoderGroup has
        size = 2

    def __init__(self) -> None:
        self.offers: list = []

    def round(self, offer, closed):
        self.offers.append(None if offer is None else offer[0])
        videos = [] if offer is None else [(offer[0], torch.full((1, 4, 4, 3), offer[0], dtype=torch.uint8))]
        return RoundResult(videos, len(videos), closed)


class _Store:
    root = "OUT"

    def __init__(self) -> None:
        self.videos, self.failures = {}, {}

    def write_item(self, item_id, video, attrs) -> None:
        self.videos[item_id] = video

    def write_failure(self, item_id, stage, error, prompt) -> None:
        self.failures[item_id] = (stage, error)


class _Events:
    def __init__(self) -> None:
        self.records: list = []

    def emit(self, ev, **fields) -> None:
        self.records.append((ev, fields))


def _context(timeout_s: float = 60.0) -> loops.RankContext:
    items = {i: Item(i, f"item-{i}", f"prompt {i}", None, i) for i in range(4)}
    ctx = loops.RankContext(1, items, stages=None, spec_of=lambda item: None, default_negative="", store=_Store(),
                            events=_Events(), stop=StopFlag(), timeout_s=timeout_s, attrs=lambda item: {})
    ctx.decoder_group = _Group()
    return ctx


def _latents(index: int) -> Message:
    return Message({"item": index, "id": f"item-{index}"}, {"latents": torch.zeros(1, 16, 1, 2, 2)})


def test_one_offer_per_round_failures_written_directly() -> None:
    ctx = _context()
    failed = Message({"item": 1, "id": "item-1", "failed": {"stage": "encode", "error": "bad prompt"}})
    first = _Receiver("dit0->dec1", [_latents(0), failed, None, _latents(2)])
    second = _Receiver("dit1->dec1", [None, None, _latents(3)])
    decoder_group_loop(ctx, [first, second])
    offered = [index for index in ctx.decoder_group.offers if index is not None]
    assert sorted(offered) == [0, 2, 3]  # the failed item is never offered
    assert sorted(ctx.store.videos) == ["item-0", "item-2", "item-3"]
    for index in (0, 2, 3):
        assert np.all(ctx.store.videos[f"item-{index}"] == index)
    assert ctx.store.failures == {"item-1": ("encode", "bad prompt")}
    assert (ctx.num_done, ctx.num_failed) == (3, 1)
    assert first.closed and second.closed
    assert ctx.decoder_group.offers[-1] is None  # the last round: closed, nothing offered


def test_a_group_without_work_times_out() -> None:
    ctx = _context(timeout_s=0.2)
    silent = _Receiver("dit0->dec1", [None] * 10**6)
    t0 = time.monotonic()
    with pytest.raises(StageTimeout, match=r"rank 1: the decoder group \(2 ranks\) had nothing to decode for 0 s; "
                                           r"this rank waits on dit0->dec1 \(waiting for its producer\)"):
        decoder_group_loop(ctx, [silent])
    assert time.monotonic() - t0 < 5.0
