"""Role loops: what an encoder, a DiT rank, a decoder (or a single rank doing everything) does with items.

Items flow encoder -> DiT -> decoder through double-ring channels; every stage works on a different item at
the same time. A producer hands each item to the consumer with the most free slots, so a slow consumer gets
fewer items and nothing waits behind it. A failing item is passed on as a failure record (no tensors) and
written by whoever would have written the video; the job goes on.

A rank that decodes hands its items to a :class:`Finisher`: decode on a second thread and CUDA stream (so the
next item's encode and denoise overlap it) and writes on a background thread (so the GPU never waits for the
disk); tensors stay on the rank's device from encode to the uint8 video, which alone crosses to the host.
Every GPU stage records its GPU time (CUDA events on its stream, ``gpu_s``) beside its wall time.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import errno
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
import torch

from spmd_diff.comm.channel import ChannelReceiver, ChannelSender, ReceiverPoller, pick_sender
from spmd_diff.comm.wire import Message
from spmd_diff.comm.transport import Backoff
from spmd_diff.errors import StageTimeout, StoreFull
from spmd_diff.io.frames import is_encoded, stored_form
from spmd_diff.io.images import load_image
from spmd_diff.io.inputs import Item
from spmd_diff.io.store import VideoStore
from spmd_diff.runtime.signals import StopFlag
from spmd_diff.runtime.worker import CpuMeter, Worker


@dataclass
class RankContext:
    """Everything a role loop needs; built by the engine."""

    rank: int
    items: dict[int, Item]
    stages: Any  # spmd_diff.models.wan.WanStages (only the stages this role needs are loaded)
    spec_of: Callable[[Item], Any]
    """item -> its ``spmd_diff.models.shapes.VideoSpec`` (the job's ``[video]`` with the item's own settings)."""
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
    group_decode: bool = False
    """With ``sp``: the group decodes each item together right after denoising it (:func:`decode_in_group`;
    ``RolePlan.group_decode``), and the leader's finisher only writes."""
    decoder_group: Any = None
    """A decoder rank with ``roles.group_decode``: the ``spmd_diff.parallel.decoder_group.DecoderGroup`` of every
    decoder rank, which decodes each item together (its loop: ``spmd_diff.runtime.decoder_rounds``)."""
    overlap_decode: bool = False
    """Decode on a second thread (and CUDA stream) while this rank's thread goes on (``speed.overlap_decode``)."""
    write_queue: int = 0
    """Videos the background writer may hold (``speed.write_queue``); 0 = write in the rank's thread."""
    warmup: bool = False
    """Run :meth:`WanStages.warmup` before the first item (``speed.warmup``)."""
    warmup_spec: Any = None
    """The ``VideoSpec`` the warm-up runs (the first pending item's)."""
    warmed: Any = None
    """The components the warm-up last ran on: once per loaded components, not once per batch."""
    lock: threading.Lock = field(default_factory=threading.Lock)
    """Guards ``busy_s`` (spans end on the finisher's threads too)."""

    def deadline(self) -> float:
        return time.monotonic() + self.timeout_s

    def span(self, stage: str, item: Item | None, gpu: bool = False, cpu: bool = False,
             fields: dict | None = None):
        """Time a stage: a ``stage`` event with wall ``t0``/``t1`` and, with ``gpu`` on a CUDA rank, ``gpu_s``
        (CUDA events around the stage on the thread's current stream; the span ends once that work is done);
        with ``cpu``, ``cpu_s`` (worker.CpuMeter: this thread's and the threads it starts, e.g. the encoder's);
        ``fields``: more fields of the event (e.g. a split decode's ``bands``)."""
        return _Span(self, stage, item, gpu, cpu, fields)

    @property
    def cuda_device(self) -> torch.device | None:
        device = getattr(self.stages, "device", None)
        return device if isinstance(device, torch.device) and device.type == "cuda" else None

    def negative_of(self, item: Item) -> str:
        return item.negative_prompt if item.negative_prompt is not None else self.default_negative


class _Span:
    def __init__(self, ctx: RankContext, stage: str, item: Item | None, gpu: bool, cpu: bool = False,
                 fields: dict | None = None) -> None:
        self.ctx, self.stage, self.item = ctx, stage, item
        self.fields = fields or {}
        self.device = ctx.cuda_device if gpu else None
        self.start = None
        self.meter = CpuMeter() if cpu else None

    def __enter__(self):
        if self.meter is not None:
            self.meter.__enter__()
        self.t0 = time.time()
        if self.device is not None:
            self.start = torch.cuda.Event(enable_timing=True)
            self.start.record()
        item_id = self.item.id if self.item is not None else ""
        self.action = self.ctx.hooks.at(self.stage, item_id) if self.ctx.hooks and self.item is not None else None
        return self

    def __exit__(self, *exc) -> None:
        gpu_s = None
        if self.start is not None:
            try:
                end = torch.cuda.Event(enable_timing=True)
                end.record()
                end.synchronize()
                gpu_s = round(self.start.elapsed_time(end) / 1e3, 6)
            except RuntimeError:
                if exc[0] is None:
                    raise
        t1 = time.time()
        if self.meter is not None:
            self.meter.__exit__(*exc)
        with self.ctx.lock:
            self.ctx.busy_s += t1 - self.t0
            self.ctx.stage_s[self.stage] = self.ctx.stage_s.get(self.stage, 0.0) + (t1 - self.t0)
            self.ctx.stage_items[self.stage] = self.ctx.stage_items.get(self.stage, 0) + 1
        extra = dict(self.fields) if gpu_s is None else {**self.fields, "gpu_s": gpu_s}
        if self.meter is not None:
            extra["cpu_s"] = round(self.meter.cpu_s, 4)
        self.ctx.events.emit("stage", stage=self.stage, item=self.item.id if self.item is not None else None,
                             t0=self.t0, t1=t1, ok=exc[0] is None, **extra)
        if threading.current_thread() is threading.main_thread():  # the board is the rank thread's (MPI)
            self.ctx.report(self.ctx.num_done, self.ctx.num_failed, self.ctx.busy_s)


def _failure(stage: str, exc: BaseException) -> dict:
    text = f"{type(exc).__name__}: {exc}"
    return {"stage": stage, "error": text,
            "traceback": "".join(traceback.format_exception(exc, limit=6))[-2000:]}


# -- the stage functions, with failure capture --------------------------------------------------------------------

def encode_item(ctx: RankContext, item: Item) -> tuple[dict, dict[str, torch.Tensor]]:
    try:
        with ctx.span("encode", item, gpu=True):
            if item.image is None:
                return {}, ctx.stages.encode(item.prompt, ctx.negative_of(item), ctx.spec_of(item))
            image = load_image(item.image, ctx.attrs(item)["image_sha256"])  # the bytes its identity names
            return {}, ctx.stages.encode(item.prompt, ctx.negative_of(item), ctx.spec_of(item), image=image)
    except Exception as exc:  # noqa: BLE001 - one bad item must not stop the job
        return {"failed": _failure("encode", exc)}, {}


_GO, _END, _SKIP = 1, 0, 2
_CONTROL_WORDS = 7


def _control(ctx: RankContext, word: int, item: Item | None = None) -> torch.Tensor:
    """The leader's per-item announcement, on the device of the group's heap: ``[GO|END, item index, height,
    width, num_frames, num_inference_steps, guidance_scale (float64 bits)]`` of the item's own spec (zeros after
    END), so every member renders the item at the shape the leader renders it."""
    words = [word, -1, 0, 0, 0, 0, 0]
    if item is not None:
        spec = ctx.spec_of(item)
        guidance_bits = int(torch.tensor([spec.guidance_scale], dtype=torch.float64).view(torch.int64)[0])
        words = [word, item.index, spec.height, spec.width, spec.num_frames, spec.num_inference_steps, guidance_bits]
    return torch.tensor(words, dtype=torch.int64, device=ctx.group.coll.transport.device)


def _announced(ctx: RankContext, control: torch.Tensor) -> tuple[Item, Any]:
    """A member: the item and its spec from the leader's announcement (:func:`_control`). The spec is the one
    the group sent; it must be the one this rank derives from the same prompts file and job."""
    words = [int(w) for w in control.tolist()]
    item = ctx.items[words[1]]
    guidance = float(torch.tensor([words[6]], dtype=torch.int64).view(torch.float64)[0])
    spec = dataclasses.replace(ctx.spec_of(item), height=words[2], width=words[3], num_frames=words[4],
                               num_inference_steps=words[5], guidance_scale=guidance)
    if spec != ctx.spec_of(item):  # every rank parsed the same files: a difference is a bug, never an item error
        raise AssertionError(f"rank {ctx.rank}: the group leader renders item {item.id!r} as {spec}, this rank "
                             f"reads {ctx.spec_of(item)}")
    return item, spec


def denoise_item(ctx: RankContext, item: Item, embeds: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    try:
        with ctx.span("denoise", item, gpu=True) as span:
            if ctx.sp is not None:  # the group leader: tell the members which item, then denoise together
                ctx.group.broadcast(_control(ctx, _GO, item), 0, ctx.deadline())
                latents = ctx.sp.denoise(embeds, item.seed, ctx.spec_of(item), every_rank=ctx.group_decode)
            else:
                latents = ctx.stages.denoise(embeds, item.seed, ctx.spec_of(item))
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
    video = decode_in_group(ctx, item, latents) if ctx.group_decode else None  # the members decode with us
    if not torch.isfinite(latents).all():
        return {"failed": _failure("denoise", FloatingPointError("non-finite values in the final latents"))}, {}
    if video is not None:
        return {}, {"video": video}
    return {}, {"latents": latents}  # on the rank's device: a channel moves it, a local decode uses it there


def decode_in_group(ctx: RankContext, item: Item, latents: torch.Tensor) -> torch.Tensor | None:
    """The DiT group decodes ``item`` together, every member a band of rows (collective: each member calls it
    right after the group denoised the item; ``spmd_diff.parallel.vae_decode``). The leader gets the uint8 video
    ``[F, H, W, 3]`` on its device, the others ``None``; every member gets ``None`` when the latents have fewer
    rows than the group has ranks (the leader's finisher then decodes alone)."""
    from spmd_diff.parallel.vae_decode import decode_split

    if latents.shape[3] < ctx.sp.comm.size:
        return None
    with ctx.span("decode", item, gpu=True, fields={"bands": ctx.sp.comm.size}):
        return decode_split(ctx.stages, ctx.sp.comm, latents)


class Finisher:
    """Decode and write a rank's items: :meth:`submit` each item (or its failure record), :meth:`close` at the end.

    Decode runs on a second thread with its own CUDA stream when ``ctx.overlap_decode`` (else in the caller's
    thread); the uint8 video is copied to pinned host memory on that stream, and the write (for h264/hevc output
    first the mp4 encode, an ``encode_video`` stage with its CPU seconds; then HDF5 image, fsync, rename) runs on
    a background thread when ``ctx.write_queue > 0``. Outcomes (done / failed) come back to the
    rank's thread, which updates the counters and the progress board. A full disk in either thread stops the rank
    with :class:`StoreFull` at its next ``submit`` or at ``close``; the item being written is never half visible
    (the store writes aside and renames), and nothing queued after it is written.
    """

    def __init__(self, ctx: RankContext) -> None:
        self.ctx = ctx
        device = ctx.cuda_device
        on_start = (lambda: torch.cuda.set_device(device)) if device is not None else None
        self.stream = torch.cuda.Stream(device) if device is not None and ctx.overlap_decode else None
        self.writer = Worker(f"rank {ctx.rank} writer", ctx.write_queue, on_start)
        self.decoder = Worker(f"rank {ctx.rank} decoder", 1 if ctx.overlap_decode else 0, on_start)
        self._outcomes: collections.deque = collections.deque()
        self.encode_threads = torch.get_num_threads()  # run.threads: the rank's CPU threads

    def submit(self, item: Item, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
        """Hand over an item from denoise (or a channel): ``tensors["latents"]`` ``[1, C, F, H, W]`` on any device,
        or the video its DiT group decoded, ``tensors["video"]`` (then only written), or ``meta["failed"]``."""
        ready = None
        latents = tensors.get("latents")
        video = tensors.get("video")
        source = latents if latents is not None else video
        if self.stream is not None and source is not None and source.is_cuda:
            ready = torch.cuda.Event()
            ready.record()  # the latents are complete on the producing stream at this point
            source.record_stream(self.stream)
        self.decoder.submit(lambda: self._decode(item, meta, latents, ready, video), self.ctx.timeout_s)
        self._drain()

    def close(self) -> None:
        """Wait for every submitted item; raises what stopped the decoder or the writer (e.g. StoreFull)."""
        try:
            self.decoder.join(self.ctx.timeout_s)
        finally:
            self.writer.join(self.ctx.timeout_s)
            self._drain()

    def _decode(self, item: Item, meta: dict, latents: torch.Tensor | None, ready: Any,
                video: torch.Tensor | None = None) -> None:
        failed, host = meta.get("failed"), None
        if failed is None:
            try:
                host = self._decode_to_host(item, latents, ready, video)
            except Exception as exc:  # noqa: BLE001 - one bad item must not stop the job
                failed = _failure("decode", exc)
        self.writer.submit(lambda: self._write(item, host, failed), self.ctx.timeout_s)

    def _decode_to_host(self, item: Item, latents: torch.Tensor, ready: Any,
                        video: torch.Tensor | None = None) -> np.ndarray:
        ctx = self.ctx
        with torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext():
            if ready is not None:
                self.stream.wait_event(ready)
            with ctx.span("decode", item, gpu=True) if video is None else contextlib.nullcontext():
                if video is None:
                    video = ctx.stages.decode_uint8(latents)  # [F, H, W, 3] uint8 on the rank's device
                if video.is_cuda:  # pinned, on this stream: the span ends when the copy is done
                    host = torch.empty(video.shape, dtype=video.dtype, pin_memory=True)
                    host.copy_(video, non_blocking=True)
                else:
                    host = video
        return host.numpy()

    def _write(self, item: Item, video: np.ndarray | None, failed: dict | None) -> None:
        ctx = self.ctx
        if failed is None:
            stage = "write"
            try:
                attrs = ctx.attrs(item)
                stored, extra = video, {}
                if is_encoded(attrs):  # on this (writer) thread: the GPU never waits for the encoder
                    stage = "encode_video"
                    with ctx.span(stage, item, cpu=True):
                        stored, extra = stored_form(video, attrs, threads=self.encode_threads, metadata=attrs)
                    stage = "write"
                with ctx.span(stage, item, cpu=True):
                    ctx.store.write_item(item.id, np.ascontiguousarray(stored), {**attrs, **extra})
                self._outcomes.append((item, None))
                return
            except OSError as exc:
                _raise_if_disk_full(ctx, item, exc)
                failed = _failure(stage, exc)
            except Exception as exc:  # noqa: BLE001
                failed = _failure(stage, exc)
        try:
            ctx.store.write_failure(item.id, failed["stage"], failed["error"], item.prompt)
        except OSError as exc:
            _raise_if_disk_full(ctx, item, exc)
            raise
        self._outcomes.append((item, failed))

    def _drain(self) -> None:
        ctx = self.ctx
        while self._outcomes:
            item, failed = self._outcomes.popleft()
            if failed is None:
                ctx.num_done += 1
            else:
                ctx.events.emit("failure", item=item.id, stage=failed["stage"], error=failed["error"])
                ctx.num_failed += 1
            ctx.report(ctx.num_done, ctx.num_failed, ctx.busy_s)


def warm_up(ctx: RankContext) -> None:
    """``speed.warmup``: the stages' one-step warm-up before the first item on newly loaded components, logged as
    a ``warmup`` event (not a stage: it renders no item). Skipped in DiT groups (their denoise is collective)."""
    if not ctx.warmup or ctx.sp is not None or ctx.group is not None or ctx.warmed is ctx.stages:
        return
    t0 = time.time()
    ctx.stages.warmup(ctx.warmup_spec)
    ctx.warmed = ctx.stages
    ctx.events.emit("warmup", t0=t0, t1=time.time(), stages=sorted(ctx.stages.stages))


def _raise_if_disk_full(ctx: RankContext, item: Item, exc: OSError) -> None:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        raise StoreFull(f"rank {ctx.rank}: cannot write item {item.id!r} to {ctx.store.root}: {exc.strerror}. "
                        f"{ctx.num_done} item(s) written by this rank are complete; free space, then rerun the "
                        "same command to render the rest") from exc


# -- handing items on ------------------------------------------------------------------------------------------

def send(ctx: RankContext, senders: list[ChannelSender], item: Item, meta: dict, tensors: dict) -> None:
    """Put the item into the channel with the most free slots, waiting (with deadline) while all are full."""
    deadline, backoff, t0 = ctx.deadline(), Backoff(), time.time()
    while (best := pick_sender(senders, ctx.next_sender % len(senders))) is None:
        if time.monotonic() > deadline:
            raise StageTimeout(f"rank {ctx.rank}: no consumer freed a slot for item {item.id!r} in "
                               f"{ctx.timeout_s:.0f} s (channels {[s.name for s in senders]})")
        backoff.pause()
    ctx.next_sender = senders.index(best) + 1
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
    poller = ReceiverPoller(receivers)
    while not poller.all_closed:
        deadline, backoff, t0 = ctx.deadline(), Backoff(), time.time()
        while (chosen := poller.poll()) is None:
            if time.monotonic() > deadline:
                waiting = "; ".join(r.describe_wait() for r in receivers if not r.closed)
                raise StageTimeout(f"rank {ctx.rank}: nothing arrived for {ctx.timeout_s:.0f} s on {waiting}")
            backoff.pause()
        t1 = time.time()
        if t1 - t0 > 1e-3:
            ctx.events.emit("wait", channel=chosen.name, what="data", t0=t0, t1=t1)
        message = chosen.take(deadline)
        if chosen.closed:
            continue
        yield ctx.items[message.meta["item"]], message.meta, message.tensors


def close_all(ctx: RankContext, senders: list[ChannelSender]) -> None:
    for sender in senders:
        sender.close(ctx.deadline())


# -- the loops ------------------------------------------------------------------------------------------------

def encoder_loop(ctx: RankContext, my_items: Iterable[Item], to_dit: list[ChannelSender]) -> None:
    # No close on an exception: the job aborts, and a close would only wait out another deadline first.
    warm_up(ctx)
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

    warm_up(ctx)
    finisher = None if to_decoders else Finisher(ctx)
    for item, meta, tensors in source():
        if "failed" not in meta:
            meta, tensors = denoise_item(ctx, item, tensors)
        if to_decoders:
            send(ctx, to_decoders, item, meta, tensors)
        else:
            finisher.submit(item, meta, tensors)
    if finisher is not None:
        finisher.close()
    close_all(ctx, to_decoders)  # (not on an exception: the job aborts; see encoder_loop)
    if ctx.sp is not None:
        ctx.group.broadcast(_control(ctx, _END), 0, ctx.deadline())


def dit_member_loop(ctx: RankContext) -> None:
    """A DiT group member other than the leader: denoise whatever item the leader announces, until it says end."""
    while True:
        # The leader may legitimately spend a wait for credit, a wait for data and an encode between items.
        deadline = time.monotonic() + 3 * ctx.timeout_s
        control = ctx.group.broadcast(_control(ctx, _END), 0, deadline).cpu()
        if int(control[0]) == _END:
            return
        _member_item(ctx, control)


def _member_item(ctx: RankContext, control: torch.Tensor) -> None:
    """A member's part in the item the leader announced with ``control`` (GO)."""
    item, spec = _announced(ctx, control)
    try:
        with ctx.span("denoise", item, gpu=True):
            latents = ctx.sp.denoise(None, None, spec, every_rank=ctx.group_decode)
    except ValueError:
        return  # the leader's inputs were unusable: every member raised, the leader records the failure
    if ctx.group_decode:
        decode_in_group(ctx, item, latents)


def item_group_loop(ctx: RankContext, assignments: Iterable[Any], join: Callable[[tuple[int, ...]], None]) -> None:
    """``dit.per_item_degree``: this rank's share of the job's item groups (``item_groups.ItemGroup``), in the
    schedule's order. ``join(ranks)`` sets ``ctx.group`` / ``ctx.sp`` for a group (None for one rank). The
    leader of each item encodes it, announces it to its group (GO with its spec, or SKIP when it failed to encode
    or a stop was requested: the members then go on to their next item), denoises it with the group and decodes
    and writes it on its own :class:`Finisher`; the other members denoise with it."""
    warm_up(ctx)
    finisher = Finisher(ctx)
    for assignment in assignments:
        join(assignment.ranks)
        item = ctx.items[assignment.item]
        leader = assignment.ranks[0] == ctx.rank
        if not leader:
            deadline = time.monotonic() + 3 * ctx.timeout_s  # the leader may still finish an earlier item
            control = ctx.group.broadcast(_control(ctx, _SKIP), 0, deadline).cpu()
            if int(control[0]) == _GO:
                _member_item(ctx, control)
            continue
        if ctx.stop.requested:
            if ctx.group is not None:
                ctx.group.broadcast(_control(ctx, _SKIP), 0, ctx.deadline())
            continue  # the item stays pending
        ctx.events.emit("item_group", item=item.id, degree=len(assignment.ranks), ranks=list(assignment.ranks),
                        predicted_start_s=round(assignment.start_s, 3))
        meta, tensors = encode_item(ctx, item)
        if "failed" in meta:
            if ctx.group is not None:
                ctx.group.broadcast(_control(ctx, _SKIP), 0, ctx.deadline())
        else:
            meta, tensors = denoise_item(ctx, item, tensors)  # announces GO to the group
        finisher.submit(item, meta, tensors)
    finisher.close()


def decoder_loop(ctx: RankContext, from_dit: list[ChannelReceiver]) -> None:
    warm_up(ctx)
    finisher = Finisher(ctx)
    for item, meta, tensors in receive(ctx, from_dit):
        finisher.submit(item, meta, tensors)
    finisher.close()


def solo_loop(ctx: RankContext, my_items: Iterable[Item]) -> None:
    """One rank, every stage."""
    dit_loop(ctx, my_items, [], [])
