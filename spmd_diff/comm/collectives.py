"""The group resource (``GroupCollectives``: one region of the symmetric heap, the pair epochs, CUDA streams and
completion tracking) and its API (``Group``: all-to-all, all-gather, broadcast and barrier over any ordered list
of ranks, formed locally, with no communicator creation), on any ``Transport``.

The heap words, chunking and protocol are in ``spmd_diff.comm.collective_layout``; an operation runs through one
of two implementations of ``spmd_diff.comm.exchange.Exchange``: the one-kernel all-to-all
(``fused_exchange``, device heaps) or the host-driven rounds (``host_exchange``, everything else).

On device heaps everything is enqueued on CUDA streams and the host does not wait, except to read headers;
deadlines are enforced when the host next synchronizes (``Group.synchronize``, or when more than
``max_inflight`` operations are queued), naming the group, the peer and the epoch.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any, Optional, Sequence

import torch

from spmd_diff.comm.collective_layout import ALIGN, EPOCH_SHIFT, CollectiveLayout
from spmd_diff.comm.exchange import Operation
from spmd_diff.comm.fused_exchange import FusedExchange, FusedLaunch
from spmd_diff.comm.host_exchange import HostExchange
from spmd_diff.comm.transport import SIGNAL_BYTES, Transport, round_up
from spmd_diff.errors import StageTimeout

TRACK_EVERY = 8
"""Device heaps: replayed one-kernel operations record a completion event every this many (deadline checks)."""


def current_raw_stream(device: torch.device) -> int:
    """The ``cudaStream_t`` of ``device``'s current stream, cheaply (no ``torch.cuda.Stream`` object)."""
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    return raw(device.index) if raw is not None else torch.cuda.current_stream(device).cuda_stream


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
        kernel: which one-kernel all-to-all: "cuda", "triton" or "off" (the job's ``dataplane.p2p_kernel``).
        a2a_blocks: ``(send_blocks, recv_blocks)`` per peer of the CUDA kernel, or None: chosen by message size
            (the job's ``dataplane.a2a_blocks``).
    """

    def __init__(self, transport: Transport, base_offset: int, region_bytes: int, max_ranks: int = 8,
                 chunk_bytes: Optional[int] = None, timeout_s: float = 600.0, max_inflight: int = 16,
                 barrier: bool = True, fused: bool = True, kernel: str = "cuda",
                 a2a_blocks: Optional[tuple[int, int]] = None) -> None:
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
        self._untracked: Any = None
        self.fused = FusedExchange(self, kernel, a2a_blocks, enabled=fused)
        """The one-kernel implementation (device heaps); its kernel is loaded on first use."""
        self.host = HostExchange()
        """The host-driven implementation (every operation the fused one declines)."""
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

    def rewind_epochs(self, peers: Sequence[int]) -> None:
        """Take back one epoch with each of ``peers``: an operation whose launch enqueued nothing."""
        for peer in peers:
            self._epochs[peer] -= 1

    def set_fused(self, enabled: bool) -> None:
        """Allow (device heaps with mapped peers) or forbid the one-kernel path; local, between operations."""
        self.fused.set_enabled(enabled)

    def use_kernel(self, kernel: str, a2a_blocks: Optional[tuple[int, int]] = None) -> None:
        """Pick the one-kernel all-to-all ("cuda", "triton"; "off": the host-driven rounds) for the next
        operations, loaded again on first use; local, between operations."""
        self.fused.select(kernel, a2a_blocks)
        self.fused.set_enabled(kernel != "off")

    def fused_kernel(self) -> Any:
        """The one-kernel all-to-all launcher, or None where it cannot run (no CuPy nor Triton, host heap,
        disabled)."""
        return self.fused.kernel()

    def check_kernel(self, sync: bool = False) -> None:
        """Raise StageTimeout if a one-kernel operation gave up waiting for a peer (see ``FusedExchange.check``)."""
        self.fused.check(sync)

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
        self.fused.check(sync=True)

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
        if coll.fused.allowed and len(send) == len(out) == self.size:
            key = tuple((t.data_ptr(), t.nbytes, t.is_contiguous()) for t in send) + tuple(
                (t.data_ptr(), t.nbytes, t.is_contiguous()) for t in out)
            launch = coll.fused.launch_for(self, key)
            if launch is not None:
                return launch.replay(send, out, deadline)
        self._check_list(send, "send")
        self._check_list(out, "out")
        operation = self._operation("all_to_all_into", dict(enumerate(send)), dict(enumerate(out)), deadline)
        result = self._execute(operation)
        if key is not None and operation.fused_launch is not None:
            coll.fused.keep_launch(self, key, operation.fused_launch)
        return result

    def all_to_all_init(self, send: Sequence[torch.Tensor], out: Sequence[torch.Tensor]) -> Any:
        """A persistent ``all_to_all_into`` with these very buffers (as ``MPI_Alltoall_init``): local, nothing
        moves until ``start()``, which costs one kernel launch where the one-kernel path runs. The buffers must
        stay alive and in place while it is used; every rank of the group starts it the same number of times, in
        the same order as its other operations."""
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

    def _operation(self, op: str, sends: dict, recvs: dict, deadline: Optional[float]) -> Operation:
        deadline = time.monotonic() + self.coll.timeout_s if deadline is None else deadline
        return Operation(self, op, sends, recvs, deadline)

    def _execute(self, operation: Operation) -> list:
        """Prepare ``operation``, advance the pair epochs, and run it: one kernel where the fused implementation
        takes it, else the host-driven rounds (with the same epochs)."""
        coll = self.coll
        peers = operation.prepare()[0]
        epochs = {p: coll.next_epoch(self.ranks[p]) << EPOCH_SHIFT for p in peers}
        if not coll.fused.run(operation, epochs):
            coll.host.run(operation, epochs)
        return operation.results

    def _run(self, op: str, sends: dict, recvs: dict, deadline: Optional[float]) -> list:
        return self._execute(self._operation(op, sends, recvs, deadline))


class PersistentAllToAll:
    """What ``Group.all_to_all_init`` returns: ``start()`` runs the all-to-all again (device heaps: one kernel
    launch with the pair epochs as arguments; elsewhere, or where the kernel cannot run, ``all_to_all_into``)."""

    def __init__(self, group: Group, send: list, out: list) -> None:
        self.group, self.send, self.out = group, send, out
        self._launch: Optional[FusedLaunch] = None
        fused = group.coll.fused
        if fused.allowed:
            operation = Operation(group, "all_to_all_into", dict(enumerate(send)), dict(enumerate(out)), 0.0)
            operation.prepare()
            self._launch = fused.prepare_launch(operation)

    def start(self, deadline: Optional[float] = None) -> list[torch.Tensor]:
        """Enqueue one all-to-all; returns ``out`` (complete in stream order)."""
        if self._launch is None or not self._launch.current:
            return self.group.all_to_all_into(self.send, self.out, deadline)
        return self._launch.replay(self.send, self.out, deadline)
