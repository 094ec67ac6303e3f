"""The loop of a time-shared rank (``RolePlan.time_shared``): every stage on one GPU, one stage's components at a time.

A cycle: take up to ``stage_batch`` items from the batch's shared queue; move the encode stage's components to
the device and encode them all (their embeddings kept in host memory); move the DiT there and denoise them all
(final latents kept in host memory); move the VAE there, decode each and hand the video to the rank's
:class:`~spmd_diff.runtime.loops.Finisher`, which writes it (in the background) as the other loops do. Repeat
until the queue is empty. Each move is a ``"move"`` event (stage, components, bytes, seconds); each stage of each
item is the same ``"stage"`` span as in the other loops, so the timings, the re-planner and the report see them.

Near the end of the queue a rank takes at most ``ceil(remaining / ranks)`` items, so the ranks finish together.
A failed item is recorded failed and the others go on. On a stop request the item in hand is finished and the
rank stops: items taken but not written stay pending (a rerun renders them). No warm-up (``speed.warmup``): the
first cycle pays it.
"""

from __future__ import annotations

import time
from typing import Iterator

import torch

from spmd_diff.comm.work_queue import BatchQueue
from spmd_diff.io.inputs import Item
from spmd_diff.runtime.loops import Finisher, RankContext, _failure, denoise_item, encode_item


def take_cycle(queue: BatchQueue, pending: list[Item], stage_batch: int, num_ranks: int) -> list[Item]:
    """Up to ``stage_batch`` items from ``queue`` (indices into ``pending``); at most ``ceil(remaining /
    num_ranks)`` of them, ``remaining`` counted from the first index taken. Empty once the queue is."""
    first = queue.take()
    if first is None:
        return []
    remaining = len(pending) - first
    limit = max(1, min(stage_batch, -(-remaining // num_ranks)))
    taken = [first]
    while len(taken) < limit and (index := queue.take()) is not None:
        taken.append(index)
    return [pending[i] for i in taken]


def move(ctx: RankContext, stage: str) -> None:
    """Put ``stage``'s components on the rank's device (a ``move`` event when anything moved)."""
    t0 = time.time()
    moved = ctx.stages.use(stage)
    if moved is not None:
        ctx.events.emit("move", stage=stage, components=moved["components"], bytes=moved["bytes"],
                        seconds=round(moved["seconds"], 6), dropped=moved["dropped"], t0=t0, t1=time.time())


def _to_host(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: tensor.to("cpu") for key, tensor in tensors.items()}


def decode_item(ctx: RankContext, item: Item, latents: torch.Tensor) -> tuple[dict, dict]:
    """Decode one item on the rank's thread: ``({}, {"video": [F, H, W, 3] uint8 on the device})`` for the
    finisher to write, or its failure record."""
    try:
        with ctx.span("decode", item, gpu=True):
            return {}, {"video": ctx.stages.decode_uint8(latents)}
    except Exception as exc:  # noqa: BLE001 - one bad item must not stop the job
        return {"failed": _failure("decode", exc)}, {}


def _in_turn(ctx: RankContext, work: list) -> Iterator:
    """``work``'s entries one by one until a stop is requested (the entry in hand is finished first)."""
    for entry in work:
        if ctx.stop.requested:
            return
        yield entry


def time_shared_loop(ctx: RankContext, queue: BatchQueue, pending: list[Item], stage_batch: int,
                     num_ranks: int) -> None:
    """Cycles of ``stage_batch`` items (see the module docstring) until ``queue`` is empty or a stop is
    requested; ``num_ranks``: the ranks pulling from ``queue``."""
    finisher = Finisher(ctx)
    while not ctx.stop.requested:
        cycle = take_cycle(queue, pending, stage_batch, num_ranks)
        if not cycle:
            break
        move(ctx, "encode")
        encoded = []
        for item in _in_turn(ctx, cycle):
            meta, tensors = encode_item(ctx, item)
            encoded.append((item, meta, _to_host(tensors)))
        if any("failed" not in meta for _, meta, _ in encoded):
            move(ctx, "denoise")
        denoised = []
        for item, meta, tensors in _in_turn(ctx, encoded):
            if "failed" not in meta:
                meta, tensors = denoise_item(ctx, item, tensors)
            denoised.append((item, meta, _to_host(tensors)))
        if any("failed" not in meta for _, meta, _ in denoised):
            move(ctx, "decode")
        for item, meta, tensors in _in_turn(ctx, denoised):
            if "failed" not in meta:
                meta, tensors = decode_item(ctx, item, tensors["latents"])
            finisher.submit(item, meta, tensors)
    finisher.close()
