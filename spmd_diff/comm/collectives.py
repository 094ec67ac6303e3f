"""Group-free collectives on any ``Transport``: all-to-all, all-gather, broadcast and barrier over any ordered
list of ranks, with no communicator creation.

A ``GroupCollectives`` owns one region of the symmetric heap (allocated once, with everything else, at start):

- ``grant[r]`` (one int64 per world rank): written by rank ``r``: how far this rank may write into ``r``'s slots;
- ``arrive[r]`` (one int64 per world rank): written by rank ``r``: which of its chunks have landed here;
- ``max_ranks`` slots, one per *group position* of a source: a 128-byte header and two chunk buffers.

Forming a group (``GroupCollectives.group(ranks)``) is local and takes microseconds: the group is its rank list.
Every pair of ranks keeps an *epoch*, the count of operations the two have done together (in any group), on both
sides, without communicating: both call the same operations in the same order (as with MPI or NCCL, collectives
on groups that share ranks must be called in one order on the shared ranks). Signal values carry the epoch in
their high bits, ``epoch << EPOCH_SHIFT | k``, so a word written in an earlier operation (or another group) can
never satisfy a wait of a later one, and slots are reused safely across groups and calls.

Protocol of one operation between a sender ``s`` and a receiver ``r`` (chunk ``k`` of a message, from 0):

1. ``r`` grants ``s`` chunks ``< 2`` (``grant[r]`` on ``s`` := ``e << 20 | 2``) once it is in the operation, so
   ``s`` never writes into a slot that ``r`` is still reading for an earlier operation;
2. ``s`` waits for ``grant >= e << 20 | k + 1``, puts chunk ``k`` into buffer ``k % 2`` of its slot on ``r``
   (chunk 0 with the header when the receiver does not know the size), then ``arrive[s]`` := ``e << 20 | k + 1``,
   ordered after the payload (``put_signal``);
3. ``r`` waits for ``arrive[s] >= e << 20 | k + 1``, copies the chunk out, and grants chunk ``k + 2``.

On device heaps, operations involving the same pair of ranks must run in the order they were called: issue them on
one CUDA stream (or order the streams), since epochs are counted in call order. ``all_to_all_into`` among GPUs that
map each other's heaps runs as one kernel (CUDA C in ``spmd_diff.kernels.p2p_cuda``, else Triton in
``spmd_diff.kernels.p2p_all_to_all``) that follows this very protocol; other operations are driven from the host.

Operations run in rounds (round ``k``: every chunk ``k`` is sent, then every chunk ``k`` is received), so on one
CUDA stream or on the host no wait depends on a later step: deadlock-free by induction over rounds. On device
heaps everything is enqueued on CUDA streams (one per peer and direction for large messages) and the host does
not wait, except to read headers; deadlines are enforced when the host next synchronizes (``Group.synchronize``,
or when more than ``max_inflight`` operations are queued), naming the group, the peer and the epoch.
"""

from __future__ import annotations

import logging
import math
import os
import struct
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from spmd_diff.comm.transport import SIGNAL_BYTES, Transport, as_byte_tensor, round_up
from spmd_diff.errors import StageTimeout

EPOCH_SHIFT = 20
"""Low bits of a signal value: the chunk count; high bits: the pair's epoch."""
SLOT_HEADER_BYTES = 128
"""Per slot: what the receiver needs when it does not know the message (dtype, shape, bytes, chunk size)."""
ALIGN = 256
"""Alignment of every block of the region, and granularity of chunk sizes."""
SINGLE_CHUNK_BYTES = 2 << 20
"""Messages up to this size go in one chunk (no pipelining: latency first)."""
TARGET_CHUNK_BYTES = 16 << 20
"""Larger messages are cut into chunks of about this size (at least two, so copy-out overlaps transfer)."""
TRACK_EVERY = 8
"""Device heaps: replayed one-kernel operations record a completion event every this many (deadline checks)."""
SIDE_STREAM_BYTES = 1 << 20
"""On a device heap, operations moving at least this many bytes use one CUDA stream per peer and direction."""
FUSED_MAX_PEERS = 8
"""Device heaps: ``all_to_all_into`` with up to this many peers, all P2P-mapped, runs as one kernel (CUDA C through
CuPy, else Triton)."""

_HEADER = struct.Struct("<IIIIQQ8q")  # magic, dtype code, ndim, pad, nbytes, chunk bytes, shape[8]
_MAGIC = 0x53504347  # "SPCG"
_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.uint8, torch.int8, torch.int16,
           torch.int32, torch.int64, torch.bool, torch.complex64, torch.complex128]
_DTYPES += [getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2", "uint16", "uint32", "uint64")
            if isinstance(getattr(torch, name, None), torch.dtype)]
_DTYPE_CODE = {dtype: code for code, dtype in enumerate(_DTYPES)}


def current_raw_stream(device: torch.device) -> int:
    """The ``cudaStream_t`` of ``device``'s current stream, cheaply (no ``torch.cuda.Stream`` object)."""
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    return raw(device.index) if raw is not None else torch.cuda.current_stream(device).cuda_stream


def chunk_plan(nbytes: int, max_chunk_bytes: int) -> tuple[int, int]:
    """``(num_chunks, chunk_bytes)`` of a message; a pure function both ends compute alike.

    One chunk up to ``SINGLE_CHUNK_BYTES`` (if it fits a buffer), else chunks of about ``TARGET_CHUNK_BYTES``,
    at least two, none larger than ``max_chunk_bytes``. A message of 0 bytes is one empty chunk.
    """
    if nbytes <= min(SINGLE_CHUNK_BYTES, max_chunk_bytes):
        return 1, max(nbytes, 0)
    target = min(TARGET_CHUNK_BYTES, max_chunk_bytes)
    num_chunks = max(2, -(-nbytes // target))
    chunk = round_up(-(-nbytes // num_chunks), ALIGN)
    return -(-nbytes // chunk), chunk


def as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """Flat uint8 view ``(nbytes,)`` of a contiguous tensor of any dtype (bf16, bool and 0-dim included)."""
    try:
        return as_byte_tensor(tensor)
    except ValueError as error:
        raise ValueError(f"collectives: {error}") from None


@dataclass(frozen=True)
class CollectiveLayout:
    """Where a ``GroupCollectives`` region lives in the heap; the same on every rank."""

    base_offset: int
    world_size: int
    max_ranks: int
    chunk_bytes: int
    """Bytes of one chunk buffer (two per slot)."""

    def __post_init__(self) -> None:
        if self.base_offset < 0 or self.base_offset % ALIGN:
            raise ValueError(f"base_offset must be a non-negative multiple of {ALIGN}, got {self.base_offset}")
        if self.max_ranks < 1 or self.world_size < 1:
            raise ValueError(f"max_ranks and world_size must be >= 1, got {self.max_ranks}, {self.world_size}")
        if self.chunk_bytes < ALIGN or self.chunk_bytes % ALIGN:
            raise ValueError(f"chunk_bytes must be a positive multiple of {ALIGN}, got {self.chunk_bytes}")

    @property
    def grant_offset(self) -> int:
        return self.base_offset

    @property
    def arrive_offset(self) -> int:
        return self.base_offset + round_up(self.world_size * SIGNAL_BYTES, ALIGN)

    @property
    def header_offset(self) -> int:
        return self.arrive_offset + round_up(self.world_size * SIGNAL_BYTES, ALIGN)

    @property
    def data_offset(self) -> int:
        return self.header_offset + round_up(self.max_ranks * SLOT_HEADER_BYTES, ALIGN)

    @property
    def end(self) -> int:
        """First heap byte after the region."""
        return self.data_offset + 2 * self.max_ranks * self.chunk_bytes

    def buffer_offset(self, slot: int, chunk: int) -> int:
        return self.data_offset + (2 * slot + chunk % 2) * self.chunk_bytes

    @staticmethod
    def bytes_needed(world_size: int, max_ranks: int, chunk_bytes: int) -> int:
        """Region bytes for these sizes (add to ``base_offset`` for the heap end)."""
        return CollectiveLayout(0, world_size, max_ranks, round_up(chunk_bytes, ALIGN)).end

    @classmethod
    def fit(cls, base_offset: int, region_bytes: int, world_size: int, max_ranks: int) -> "CollectiveLayout":
        """The layout with the largest chunk buffers that fits ``region_bytes``."""
        control = cls(base_offset, world_size, max_ranks, ALIGN).data_offset - base_offset
        chunk = (region_bytes - control) // (2 * max_ranks) // ALIGN * ALIGN
        if chunk < ALIGN:
            raise ValueError(f"a collectives region of {region_bytes} bytes is too small for {world_size} ranks and "
                             f"groups of up to {max_ranks}: it needs at least {control + 2 * max_ranks * ALIGN}")
        return cls(base_offset, world_size, max_ranks, chunk)


class GroupCollectives:
    """Collectives for groups formed on the fly, in one region of ``transport``'s heap.

    Construction zeroes this rank's region and, with ``barrier=True``, is collective over the transport (every
    rank builds one with the same arguments before any rank uses it). ``free`` releases host resources only; the
    heap belongs to the transport.

    Args:
        transport: the heap (host or device); tensors passed to collectives must live on ``transport.device``.
        base_offset: first byte of the region (a multiple of 256).
        region_bytes: bytes the region may use; chunk buffers take what the signal words and headers leave.
        max_ranks: largest group that will be formed.
        chunk_bytes: fix the chunk buffer size instead (must fit ``region_bytes``); small values test chunking.
        timeout_s: default deadline of an operation, from its call.
        max_inflight: device heaps: operations queued on streams before the host waits for the oldest one.
        barrier: zero the region on every rank and barrier (set False when the heap is fresh and a barrier
            follows anyway).
        fused: device heaps: run ``all_to_all_into`` among P2P-mapped GPUs as one kernel (CUDA C through CuPy,
            else Triton; same protocol and heap words). Its launches share per-row completion counters: issue
            one object's operations on one stream at a time.
    """

    def __init__(self, transport: Transport, base_offset: int, region_bytes: int, max_ranks: int = 8,
                 chunk_bytes: Optional[int] = None, timeout_s: float = 600.0, max_inflight: int = 16,
                 barrier: bool = True, fused: bool = True) -> None:
        if chunk_bytes is None:
            layout = CollectiveLayout.fit(base_offset, region_bytes, transport.size, max_ranks)
        else:
            layout = CollectiveLayout(base_offset, transport.size, max_ranks, round_up(chunk_bytes, ALIGN))
            if layout.end - base_offset > region_bytes:
                raise ValueError(f"chunk_bytes={chunk_bytes} needs a region of {layout.end - base_offset} bytes, "
                                 f"more than region_bytes={region_bytes}")
        if layout.end > transport.heap_bytes:
            raise ValueError(f"the collectives region ends at heap byte {layout.end}, past the transport's heap of "
                             f"{transport.heap_bytes} bytes")
        self.transport = transport
        self.layout = layout
        self.rank = transport.rank
        self.timeout_s = timeout_s
        self.max_inflight = max_inflight
        self.on_device = transport.device.type == "cuda"
        self._epochs = [0] * transport.size  # a list: this is on every operation's host path
        self._inflight: deque = deque()
        self._streams: list = []
        self._fused: Any = None
        self._plans: dict = {}
        self._untracked: Any = None
        self.set_fused(fused)
        if self.on_device:
            self._streams = [(torch.cuda.Stream(transport.device), torch.cuda.Stream(transport.device))
                             for _ in range(max_ranks)]
        transport.zero_local(layout.base_offset, layout.end - layout.base_offset)
        if barrier:
            transport.barrier()

    def group(self, ranks: Sequence[int], name: Optional[str] = None) -> "Group":
        """The group of ``ranks`` (in this order; this rank among them). Local: no communication."""
        return Group(self, ranks, name)

    def next_epoch(self, peer: int) -> int:
        """Advance and return the epoch of the pair (this rank, ``peer``)."""
        epoch = self._epochs[peer] + 1
        self._epochs[peer] = epoch
        return epoch

    def epoch(self, peer: int) -> int:
        """Operations done so far with ``peer``."""
        return self._epochs[peer]

    def stream_pair(self, position: int):
        """(send, receive) CUDA streams for the peer at group ``position`` (device heaps)."""
        return self._streams[position]

    def set_fused(self, enabled: bool) -> None:
        """Allow (device heaps with Triton) or forbid the one-kernel path; local, between operations."""
        self._fused_allowed = bool(enabled) and self.on_device and hasattr(self.transport, "address")
        self._plans.clear()

    def fused_kernel(self) -> Any:
        """The one-kernel all-to-all launcher, or None where it cannot run (no Triton, host heap, disabled)."""
        if not self._fused_allowed:
            return None
        if self._fused is None:
            try:
                from spmd_diff.comm.exchange import load_kernel_module

                cuda = load_kernel_module("p2p_cuda")
                if cuda.available():
                    self._fused = cuda.CudaP2P(self.transport.device, self.layout.chunk_bytes,
                                               timeout_s=self.timeout_s)
            except Exception as error:  # noqa: BLE001 - NVRTC or CuPy trouble: the Triton kernel is next
                logging.getLogger("spmd_diff").warning("CUDA data-plane kernels unavailable (%s: %s)",
                                                       type(error).__name__, error)
            if self._fused is None and os.environ.get("SPMD_DIFF_P2P_KERNEL", "cuda") != "off":
                try:
                    module = load_kernel_module("p2p_all_to_all")
                    self._fused = module.P2PAllToAll(self.transport.device, self.layout.chunk_bytes,
                                                     max_spins=int(self.timeout_s * 1e6))
                except (ImportError, RuntimeError):
                    pass
            self._fused = self._fused or False
        return self._fused or None

    def plan_for(self, group: "Group", key: tuple) -> Any:
        """A one-kernel all-to-all already run by ``group`` with the buffers of ``key``, or None."""
        plan = self._plans.get((group.ranks, key))
        return plan if plan is not None and plan.current else None

    def keep_plan(self, group: "Group", key: tuple, plan: Any) -> None:
        if len(self._plans) >= 512:
            self._plans.clear()
        self._plans[(group.ranks, key)] = plan

    def track_lazily(self, description: str, checks: Any, deadline: float) -> None:
        """Device heaps: remember an operation just enqueued on the current stream, recording an event for
        every ``TRACK_EVERY``-th only (an event costs microseconds, a small all-to-all not many more); the
        others are covered by a later event on the same stream, or by one ``synchronize`` records."""
        stream = current_raw_stream(self.transport.device)
        if self._untracked is not None and self._untracked[0] != stream:
            self._record_untracked()
        count = 1 if self._untracked is None else self._untracked[1] + 1
        self._untracked = (stream, count, description, checks, deadline)
        if count >= TRACK_EVERY:
            self._record_untracked()

    def _record_untracked(self) -> None:
        stream, _, description, checks, deadline = self._untracked
        self._untracked = None
        device = self.transport.device
        default = torch.cuda.default_stream(device)
        # ExternalStream(0) would be a fresh pool stream (torch reads 0 as "none given"), and an event recorded
        # there completes at once: the default stream must be named as itself.
        on = default if stream == default.cuda_stream else torch.cuda.ExternalStream(stream, device=device)
        event = torch.cuda.Event()
        event.record(on)
        self.track(event, description, checks, deadline)

    def track(self, event, description: str, checks: list, deadline: float) -> None:
        """Device heaps: remember an enqueued operation; wait for old ones beyond ``max_inflight``."""
        self._inflight.append((event, description, checks))
        while len(self._inflight) > self.max_inflight:
            self._wait_oldest(deadline)

    def synchronize(self, deadline: Optional[float] = None) -> None:
        """Wait for every enqueued operation; StageTimeout names the group, peer and epoch that did not arrive."""
        deadline = time.monotonic() + self.timeout_s if deadline is None else deadline
        if self._untracked is not None:
            self._record_untracked()
        while self._inflight:
            self._wait_oldest(deadline)
        self.check_kernel(sync=True)

    def check_kernel(self, sync: bool = False) -> None:
        """Raise StageTimeout if a one-kernel operation gave up waiting for a peer. The CUDA kernels report
        through pinned host memory (no synchronization); the Triton kernel only when ``sync``."""
        kernel = self._fused
        if not kernel:
            return
        if hasattr(kernel, "failure"):
            word = kernel.failure()
            if word:
                raise StageTimeout(f"rank {self.rank}: a one-kernel all-to-all gave up after {self.timeout_s:.0f} s "
                                   f"waiting for {self._describe_word(word)}")
        elif sync and kernel.failed_row():
            raise StageTimeout(f"rank {self.rank}: a one-kernel all-to-all gave up waiting for a peer (descriptor "
                               f"row {kernel.failed_row() - 1}) after ~{self.timeout_s:.0f} s of spinning")

    def _describe_word(self, address: int) -> str:
        """What a wait on the local heap word at device ``address`` was waiting for."""
        offset = address - self.transport.address(self.rank, 0)
        lay = self.layout
        if lay.grant_offset <= offset < lay.arrive_offset:
            return f"a grant from rank {(offset - lay.grant_offset) // SIGNAL_BYTES} (is it in the operation?)"
        if lay.arrive_offset <= offset < lay.header_offset:
            return f"a chunk from rank {(offset - lay.arrive_offset) // SIGNAL_BYTES}"
        return f"the heap word at offset {offset}"

    def _wait_oldest(self, deadline: float) -> None:
        event, description, checks = self._inflight[0]
        spins = 0
        while not event.query():
            spins += 1
            if spins > 1000:  # about a millisecond of polling, then 50 us naps
                time.sleep(50e-6)
            if time.monotonic() >= deadline:
                if isinstance(checks, tuple):  # (function, argument): the list is only built when needed
                    checks = checks[0](checks[1])
                missing = [what for offset, minimum, what in checks
                           if self.transport.read_signal(offset) < minimum]
                detail = "; ".join(missing[:4]) or "signals all arrived, the stream is busy with other work"
                raise StageTimeout(f"{description}: not complete by the deadline on rank {self.rank}: {detail}")
        self._inflight.popleft()

    def free(self) -> None:
        """Wait for queued operations (with the default deadline) and drop streams. Not collective."""
        if self.on_device:
            self.synchronize()
        self._streams = []


class Group:
    """An ordered list of ranks that this rank belongs to; collectives among them.

    Every rank of ``ranks`` must call the same operations on groups with the same rank list, in the same order.
    Tensors must be contiguous and on ``transport.device``.
    """

    def __init__(self, coll: GroupCollectives, ranks: Sequence[int], name: Optional[str] = None) -> None:
        ranks = tuple(int(r) for r in ranks)
        world = coll.transport.size
        if len(set(ranks)) != len(ranks):
            raise ValueError(f"group ranks must be distinct, got {list(ranks)}")
        if not ranks or any(not 0 <= r < world for r in ranks):
            raise ValueError(f"group ranks must be non-empty and in [0, {world}), got {list(ranks)}")
        if len(ranks) > coll.layout.max_ranks:
            raise ValueError(f"group of {len(ranks)} ranks, but the collectives region was laid out for at most "
                             f"{coll.layout.max_ranks} (GroupCollectives(max_ranks=...))")
        if coll.rank not in ranks:
            raise ValueError(f"rank {coll.rank} forms group {list(ranks)} without being in it")
        self.coll = coll
        self.ranks = ranks
        self.size = len(ranks)
        self.rank_in_group = ranks.index(coll.rank)
        self.name = name or "group" + str(list(ranks)).replace(" ", "")

    def __repr__(self) -> str:
        return f"Group({self.name}, rank_in_group={self.rank_in_group})"

    # ---- public operations -------------------------------------------------------------------------------
    def all_to_all(self, send: Sequence[torch.Tensor], deadline: Optional[float] = None) -> list[torch.Tensor]:
        """``send[i]`` goes to ``ranks[i]``; returns what each rank sent here, in group order.

        Sizes, shapes and dtypes may differ per pair (each message carries a header). Returned tensors are new
        (``out[rank_in_group]`` is a copy of ``send[rank_in_group]``), on ``transport.device``.
        """
        self._check_list(send, "send")
        sends = {p: t for p, t in enumerate(send)}
        return self._run("all_to_all", sends, {p: None for p in range(self.size)}, deadline)

    def all_to_all_into(self, send: Sequence[torch.Tensor], out: Sequence[torch.Tensor],
                        deadline: Optional[float] = None) -> list[torch.Tensor]:
        """Hot path: like ``all_to_all`` into preallocated ``out`` (``out[i]`` receives from ``ranks[i]``).

        Every rank of the group calls ``all_to_all_into`` for this step, and ``out[i]`` on this rank has exactly
        the bytes of ``send[j]`` on ``ranks[i]`` (dtypes may differ; bytes are copied). On device heaps no host
        synchronization happens. Returns ``out``.
        """
        coll = self.coll
        key = None
        if coll.on_device and coll._fused_allowed and len(send) == len(out) == self.size:
            key = tuple((t.data_ptr(), t.nbytes, t.is_contiguous()) for t in send) + tuple(
                (t.data_ptr(), t.nbytes, t.is_contiguous()) for t in out)
            plan = coll.plan_for(self, key)
            if plan is not None:
                return plan.replay(send, out, deadline)
        self._check_list(send, "send")
        self._check_list(out, "out")
        from spmd_diff.comm.exchange import Exchange

        deadline = time.monotonic() + coll.timeout_s if deadline is None else deadline
        exchange = Exchange(self, "all_to_all_into", dict(enumerate(send)), dict(enumerate(out)), deadline)
        result = exchange.run()
        if key is not None and exchange.plan is not None:
            coll.keep_plan(self, key, exchange.plan)
        return result

    def all_to_all_init(self, send: Sequence[torch.Tensor], out: Sequence[torch.Tensor]) -> Any:
        """A persistent ``all_to_all_into`` with these very buffers (as ``MPI_Alltoall_init``): local, nothing
        moves until ``start()``, which costs one kernel launch where the one-kernel path runs. The buffers must
        stay alive and in place while it is used; every rank of the group starts it the same number of times, in
        the same order as its other operations."""
        from spmd_diff.comm.exchange import PersistentAllToAll

        self._check_list(send, "send")
        self._check_list(out, "out")
        return PersistentAllToAll(self, list(send), list(out))

    def all_gather(self, tensor: torch.Tensor, deadline: Optional[float] = None) -> list[torch.Tensor]:
        """Every rank's ``tensor`` (shapes may differ), in group order."""
        return self._run("all_gather", {p: tensor for p in range(self.size)},
                         {p: None for p in range(self.size)}, deadline)

    def broadcast(self, tensor: Optional[torch.Tensor], root: int = 0,
                  deadline: Optional[float] = None) -> torch.Tensor:
        """``root``'s tensor on every rank (``root`` is a position in the group, ``0 <= root < size``).

        On the root, ``tensor`` is sent and returned. Elsewhere, a tensor of the root's shape and dtype is filled
        in place and returned; ``None`` gets a new one.
        """
        if not 0 <= root < self.size:
            raise ValueError(f"{self.name}: broadcast root {root} must be a position in the group [0, {self.size})")
        if self.rank_in_group == root:
            if tensor is None:
                raise ValueError(f"{self.name}: the broadcast root must pass a tensor")
            self._run("broadcast", {p: tensor for p in range(self.size) if p != root}, {}, deadline)
            return tensor
        received = self._run("broadcast", {}, {root: None}, deadline)[root]
        if tensor is None:
            return received
        if tensor.shape != received.shape or tensor.dtype != received.dtype:
            raise ValueError(f"{self.name}: broadcast from position {root} sent {received.dtype}"
                             f"{tuple(received.shape)}, this rank passed {tensor.dtype}{tuple(tensor.shape)}")
        tensor.copy_(received)
        return tensor

    def barrier(self, deadline: Optional[float] = None) -> None:
        """Return once every rank of the group has entered the barrier (device heaps: host-synchronous)."""
        coll, transport, layout = self.coll, self.coll.transport, self.coll.layout
        deadline = time.monotonic() + coll.timeout_s if deadline is None else deadline
        if coll.on_device:
            coll.synchronize(deadline)
        peers = [p for p in range(self.size) if p != self.rank_in_group]
        epochs = {p: coll.next_epoch(self.ranks[p]) for p in peers}
        for p in peers:
            transport.signal(self.ranks[p], layout.arrive_offset + coll.rank * SIGNAL_BYTES,
                             epochs[p] << EPOCH_SHIFT | 1)
        for p in peers:
            transport.wait_signal(layout.arrive_offset + self.ranks[p] * SIGNAL_BYTES, epochs[p] << EPOCH_SHIFT | 1,
                                  deadline, f"{self.name} barrier: rank {coll.rank} waiting for rank "
                                            f"{self.ranks[p]} (epoch {epochs[p]})")

    def synchronize(self, deadline: Optional[float] = None) -> None:
        """Device heaps: wait until every operation enqueued so far is complete (deadline enforced)."""
        self.coll.synchronize(deadline)

    # ---- the engine ------------------------------------------------------------------------------------------
    def _check_list(self, tensors: Sequence[torch.Tensor], what: str) -> None:
        if len(tensors) != self.size:
            raise ValueError(f"{self.name}: {what} has {len(tensors)} tensors for a group of {self.size}")

    def _run(self, op: str, sends: dict, recvs: dict, deadline: Optional[float]) -> list:
        from spmd_diff.comm.exchange import Exchange  # the engine of every operation; imports this module

        deadline = time.monotonic() + self.coll.timeout_s if deadline is None else deadline
        return Exchange(self, op, sends, recvs, deadline).run()


def encode_header(tensor: torch.Tensor, chunk_bytes: int) -> bytes:
    """The slot header describing ``tensor`` (at most 8 dimensions)."""
    if tensor.dim() > 8:
        raise ValueError(f"collectives carry tensors of up to 8 dimensions, got {tensor.dim()}")
    code = _DTYPE_CODE.get(tensor.dtype)
    if code is None:
        raise ValueError(f"collectives do not carry dtype {tensor.dtype}")
    shape = list(tensor.shape) + [0] * (8 - tensor.dim())
    nbytes = tensor.numel() * tensor.element_size()
    return _HEADER.pack(_MAGIC, code, tensor.dim(), 0, nbytes, chunk_bytes, *shape)


def decode_header(raw: bytes, what: str) -> tuple[torch.dtype, tuple[int, ...], int, int]:
    """``(dtype, shape, nbytes, chunk_bytes)`` from a slot header."""
    magic, code, ndim, _, nbytes, chunk_bytes, *shape = _HEADER.unpack(raw[:_HEADER.size])
    if magic != _MAGIC or code >= len(_DTYPES) or ndim > 8:
        raise RuntimeError(f"{what}: corrupt slot header (magic {magic:#x}, dtype code {code}, ndim {ndim}); "
                           "did every rank call the same collective?")
    shape = tuple(shape[:ndim])
    dtype = _DTYPES[code]
    if math.prod(shape) * torch.empty(0, dtype=dtype).element_size() != nbytes:
        raise RuntimeError(f"{what}: slot header says {nbytes} bytes for {dtype}{shape}")
    return dtype, shape, nbytes, chunk_bytes
