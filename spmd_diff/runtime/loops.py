"""Role loops: what an encoder, a DiT rank, a decoder (or a single rank doing everything) does with items.

Items flow encoder -> DiT -> decoder through double-ring channels; every stage works on a different item at
the same time. A producer hands each item to the consumer with the most free slots, so a slow consumer gets
fewer items and nothing waits behind it. A failing item is passed on as a failure record (no tensors) and
written by whoever would have written the video; the job goes on.
"""

from __future__ import annotations

import errno
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
import torch

from spmd_diff.comm.channel import ChannelReceiver, ChannelSender, Message
from spmd_diff.comm.transport import Backoff
from spmd_diff.errors import StageTimeout, StoreFull
from spmd_diff.io.inputs import Item
from spmd_diff.io.store import VideoStore
from spmd_diff.runtime.signals import StopFlag


@dataclass
class RankContext:
    """Everything a role loop needs; built by the engine."""

    rank: int
    items: dict[int, Item]
    stages: Any  # spmd_diff.models.wan.WanStages (only the stages this role needs are loaded)
    spec: Any  # spmd_diff.models.wan.VideoSpec
    default_negative: str
    store: VideoStore
    events: Any  # spmd_diff.observe.events.EventLog
    stop: StopFlag
    timeout_s: float
    attrs: Callable[[Item], dict]
    report: Callable[[int, int, float], None] = lambda done, failed, busy_s: None
    """Called after each written item: cumulative (done, failed, busy seconds) of this rank."""
    next_sender: int = 0
    """Round-robin start among equally free consumers, so ties spread items instead of favouring the first."""
    num_done: int = 0
    num_failed: int = 0
    busy_s: float = 0.0
    stage_s: dict[str, float] = field(default_factory=dict)
    """Busy seconds of this rank per stage (encode, denoise, decode, write), cumulative: what re-planning reads."""
    stage_items: dict[str, int] = field(default_factory=dict)
    """Items per stage this rank finished (ok or not), cumulative."""
    hooks: Any = None
    """``spmd_diff.runtime.faults.TestHooks`` (fault injection for tests), or None."""
    sp: Any = None
    """``spmd_diff.parallel.group_denoise.SPDenoiser`` when this rank is in a DiT group of more than one rank."""
    group: Any = None
    """The DiT group (``spmd_diff.comm.collectives.Group``; position 0 is the leader) when ``sp`` is set."""

    def deadline(self) -> float:
        return time.monotonic() + self.timeout_s

    def span(self, stage: str, item: Item):
        return _Span(self, stage, item)

    def negative_of(self, item: Item) -> str:
        return item.negative_prompt if item.negative_prompt is not None else self.default_negative


class _Span:
    def __init__(self, ctx: RankContext, stage: str, item: Item) -> None:
        self.ctx, self.stage, self.item = ctx, stage, item

    def __enter__(self):
        self.t0 = time.time()
        self.action = self.ctx.hooks.at(self.stage, self.item.id) if self.ctx.hooks else None
        return self

    def __exit__(self, *exc) -> None:
        t1 = time.time()
        self.ctx.busy_s += t1 - self.t0
        self.ctx.stage_s[self.stage] = self.ctx.stage_s.get(self.stage, 0.0) + (t1 - self.t0)
        self.ctx.stage_items[self.stage] = self.ctx.stage_items.get(self.stage, 0) + 1
        self.ctx.events.emit("stage", stage=self.stage, item=self.item.id, t0=self.t0, t1=t1,
                             ok=exc[0] is None)
        self.ctx.report(self.ctx.num_done, self.ctx.num_failed, self.ctx.busy_s)


def _failure(stage: str, exc: BaseException) -> dict:
    text = f"{type(exc).__name__}: {exc}"
    return {"stage": stage, "error": text,
            "traceback": "".join(traceback.format_exception(exc, limit=6))[-2000:]}


# -- the stage functions, with failure capture --------------------------------------------------------------------

def encode_item(ctx: RankContext, item: Item) -> tuple[dict, dict[str, torch.Tensor]]:
    try:
        with ctx.span("encode", item):
            return {}, ctx.stages.encode(item.prompt, ctx.negative_of(item), ctx.spec)
    except Exception as exc:  # noqa: BLE001 - one bad item must not stop the job
        return {"failed": _failure("encode", exc)}, {}


_GO, _END = 1, 0


def _control(ctx: RankContext, word: int, item_index: int) -> torch.Tensor:
    """The leader's per-item announcement [GO|END, item index], on the device of the group's heap."""
    return torch.tensor([word, item_index], dtype=torch.int64, device=ctx.group.coll.transport.device)


def denoise_item(ctx: RankContext, item: Item, embeds: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    try:
        with ctx.span("denoise", item) as span:
            if ctx.sp is not None:  # the group leader: tell the members which item, then denoise together
                ctx.group.broadcast(_control(ctx, _GO, item.index), 0, ctx.deadline())
                latents = ctx.sp.denoise(embeds, item.seed, ctx.spec)
            else:
                latents = ctx.stages.denoise(embeds, item.seed, ctx.spec)
            if span.action == "nan":
                latents = latents * float("nan")
    except (StageTimeout, StoreFull):
        raise
    except ValueError as exc:  # with a group: raised on every member alike (unusable inputs), still in step
        return {"failed": _failure("denoise", exc)}, {}
    except Exception as exc:  # noqa: BLE001
        if ctx.sp is not None:
            raise  # members may be inside a collective: abort the job rather than let the group fall out of step
        return {"failed": _failure("denoise", exc)}, {}
    if not torch.isfinite(latents).all():
        return {"failed": _failure("denoise", FloatingPointError("non-finite values in the final latents"))}, {}
    return {}, {"latents": latents.cpu()}


def finish_item(ctx: RankContext, item: Item, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Decode and write the item, or record its failure."""
    failed = meta.get("failed")
    if failed is None:
        try:
            with ctx.span("decode", item):
                video = ctx.stages.decode(tensors["latents"])
            with ctx.span("write", item):
                ctx.store.write_item(item.id, np.ascontiguousarray(video), ctx.attrs(item))
            ctx.num_done += 1
        except OSError as exc:
            _raise_if_disk_full(ctx, item, exc)
            failed = _failure("write", exc)
        except Exception as exc:  # noqa: BLE001
            failed = _failure("decode", exc)
    if failed is not None:
        try:
            ctx.store.write_failure(item.id, failed["stage"], failed["error"], item.prompt)
        except OSError as exc:
            _raise_if_disk_full(ctx, item, exc)
            raise
        ctx.events.emit("failure", item=item.id, stage=failed["stage"], error=failed["error"])
        ctx.num_failed += 1
    ctx.report(ctx.num_done, ctx.num_failed, ctx.busy_s)


def _raise_if_disk_full(ctx: RankContext, item: Item, exc: OSError) -> None:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        raise StoreFull(f"rank {ctx.rank}: cannot write item {item.id!r} to {ctx.store.root}: {exc.strerror}. "
                        f"{ctx.num_done} item(s) written by this rank are complete; free space, then rerun the "
                        "same command to render the rest") from exc


# -- handing items on ------------------------------------------------------------------------------------------

def send(ctx: RankContext, senders: list[ChannelSender], item: Item, meta: dict, tensors: dict) -> None:
    """Put the item into the channel with the most free slots, waiting (with deadline) while all are full."""
    deadline, backoff, t0 = ctx.deadline(), Backoff(), time.time()
    while True:
        start = ctx.next_sender % len(senders)
        order = senders[start:] + senders[:start]
        best = max(order, key=lambda s: s.free_slots())
        if best.free_slots() > 0:
            ctx.next_sender = senders.index(best) + 1
            break
        if time.monotonic() > deadline:
            raise StageTimeout(f"rank {ctx.rank}: no consumer freed a slot for item {item.id!r} in "
                               f"{ctx.timeout_s:.0f} s (channels {[s.name for s in senders]})")
        backoff.pause()
    t1 = time.time()
    if t1 - t0 > 1e-3:
        ctx.events.emit("wait", channel=best.name, what="credit", t0=t0, t1=t1)
    message = Message({"item": item.index, "id": item.id, **meta}, tensors)
    best.put(message, deadline)
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    ctx.events.emit("handoff", channel=best.name, src=ctx.rank, dst=best.peer, item=item.id, bytes=nbytes,
                    t0=t1, t1=time.time())


def receive(ctx: RankContext, receivers: list[ChannelReceiver]):
    """Yield (item, meta, tensors) from any open receiver, fairly, until every producer has closed."""
    open_receivers = list(receivers)
    start = 0
    while open_receivers:
        deadline, backoff, t0 = ctx.deadline(), Backoff(), time.time()
        chosen = None
        while chosen is None:
            for k in range(len(open_receivers)):
                candidate = open_receivers[(start + k) % len(open_receivers)]
                if candidate.ready():
                    chosen = candidate
                    start = (start + k + 1) % max(1, len(open_receivers))
                    break
            else:
                if time.monotonic() > deadline:
                    waiting = "; ".join(r.describe_wait() for r in open_receivers)
                    raise StageTimeout(f"rank {ctx.rank}: nothing arrived for {ctx.timeout_s:.0f} s on {waiting}")
                backoff.pause()
        t1 = time.time()
        if t1 - t0 > 1e-3:
            ctx.events.emit("wait", channel=chosen.name, what="data", t0=t0, t1=t1)
        message = chosen.take(deadline)
        if chosen.closed:
            open_receivers.remove(chosen)
            continue
        yield ctx.items[message.meta["item"]], message.meta, message.tensors


def close_all(ctx: RankContext, senders: list[ChannelSender]) -> None:
    for sender in senders:
        sender.close(ctx.deadline())


# -- the loops ------------------------------------------------------------------------------------------------

def encoder_loop(ctx: RankContext, my_items: Iterable[Item], to_dit: list[ChannelSender]) -> None:
    # No close on an exception: the job aborts, and a close would only wait out another deadline first.
    for item in my_items:
        if ctx.stop.requested:
            break
        meta, tensors = encode_item(ctx, item)
        send(ctx, to_dit, item, meta, tensors)
    close_all(ctx, to_dit)


def dit_loop(ctx: RankContext, my_items: Iterable[Item] | None, from_encoders: list[ChannelReceiver],
             to_decoders: list[ChannelSender]) -> None:
    """``my_items`` set: this rank encodes its own items. ``to_decoders`` empty: it decodes and writes them."""

    def source():
        if my_items is not None:
            for item in my_items:
                if ctx.stop.requested:
                    return
                yield (item, *encode_item(ctx, item))
        else:
            for item, meta, tensors in receive(ctx, from_encoders):
                if ctx.stop.requested:
                    continue  # drain without work so producers can close; the item stays pending
                yield item, meta, tensors

    for item, meta, tensors in source():
        if "failed" not in meta:
            meta, tensors = denoise_item(ctx, item, tensors)
        if to_decoders:
            send(ctx, to_decoders, item, meta, tensors)
        else:
            finish_item(ctx, item, meta, tensors)
    close_all(ctx, to_decoders)  # (not on an exception: the job aborts; see encoder_loop)
    if ctx.sp is not None:
        ctx.group.broadcast(_control(ctx, _END, -1), 0, ctx.deadline())


def dit_member_loop(ctx: RankContext) -> None:
    """A DiT group member other than the leader: denoise whatever item the leader announces, until it says end."""
    while True:
        # The leader may legitimately spend a wait for credit, a wait for data and an encode between items.
        deadline = time.monotonic() + 3 * ctx.timeout_s
        control = ctx.group.broadcast(_control(ctx, _END, -1), 0, deadline).cpu()
        if int(control[0]) == _END:
            return
        item = ctx.items[int(control[1])]
        try:
            with ctx.span("denoise", item):
                ctx.sp.denoise(None, None, ctx.spec)
        except ValueError:
            pass  # the leader's inputs were unusable: every member raised, the leader records the failure


def decoder_loop(ctx: RankContext, from_dit: list[ChannelReceiver]) -> None:
    for item, meta, tensors in receive(ctx, from_dit):
        finish_item(ctx, item, meta, tensors)


def solo_loop(ctx: RankContext, my_items: Iterable[Item]) -> None:
    """One rank, every stage."""
    dit_loop(ctx, my_items, [], [])
