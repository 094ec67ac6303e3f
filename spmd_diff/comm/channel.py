"""The double-ring channel (DESIGN.md, "The double-ring channel") on any ``Transport``.

One channel per producer -> consumer edge. In the symmetric heap:

- the consumer owns the data ring: ``N`` slots (a ``HEADER_BYTES`` header, then ``slot_bytes`` of payload)
  and ``N`` int64 sequence words;
- the producer owns one int64 credit word: the number of messages the consumer has taken.

Protocol invariants (message ``k`` = the ``k``-th message on the channel, from 0):

- the producer writes message ``k`` only when ``k - credit < N``, so it never overwrites a slot the consumer
  has not taken; it puts header and payload into slot ``k mod N``, then sets that slot's sequence word to
  ``k + 1``, ordered after the payload (``put_signal``);
- the consumer takes message ``k`` only when its sequence word of slot ``k mod N`` is ``k + 1``, copies it out,
  then sets the producer's credit word to ``k + 1``;
- each side writes only the other's memory and waits only on its own; every wait has a deadline.

All words start at zero (the transport zeroes its heap; ``HeapLayout.clear_local`` re-zeroes a layout).
"""

from __future__ import annotations

import json
import struct
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Optional, Sequence, Union

import torch

from spmd_diff.comm.transport import SIGNAL_BYTES, Backoff, Transport, as_byte_tensor, round_up
from spmd_diff.errors import StageTimeout

HEADER_BYTES = 4096
"""Fixed size of a slot's header: the fixed fields below, then the JSON description of the message."""
ALIGN = 64
"""Alignment of heap blocks and of each tensor inside a slot's payload."""
_MAGIC = b"SPMDCH01"
_FIXED = struct.Struct("<8sIIqQ")  # magic, kind, json length, message index k, payload bytes
_KIND_DATA = 1
_KIND_END = 2
MAX_DESCRIPTION_BYTES = HEADER_BYTES - _FIXED.size
"""Largest JSON description (meta + tensor names, dtypes, shapes, offsets) a header holds."""


@dataclass(frozen=True)
class RingSpec:
    """Shape of one channel's ring."""

    num_slots: int
    """N: messages the producer may run ahead of the consumer."""
    slot_bytes: int
    """Largest payload of one message: its tensors' bytes, each rounded up to ``ALIGN``."""

    def __post_init__(self) -> None:
        if self.num_slots < 1:
            raise ValueError(f"RingSpec.num_slots must be >= 1, got {self.num_slots}")
        if self.slot_bytes < 0:
            raise ValueError(f"RingSpec.slot_bytes must be >= 0, got {self.slot_bytes}")

    @property
    def slot_stride(self) -> int:
        """Bytes of one slot in the heap: header plus aligned payload area."""
        return HEADER_BYTES + round_up(self.slot_bytes, ALIGN)

    @property
    def ring_bytes(self) -> int:
        """Bytes of the whole ring (all slots) on the consumer."""
        return self.num_slots * self.slot_stride


@dataclass(frozen=True)
class ChannelEdge:
    """One producer -> consumer channel of a plan."""

    producer: int
    consumer: int
    spec: RingSpec
    name: str
    """Unique among the plan's edges; used in error messages."""


@dataclass(frozen=True)
class EdgeLayout:
    """Where one channel lives in the heap."""

    name: str
    producer: int
    consumer: int
    spec: RingSpec
    seq_offset: int
    """On the consumer: ``num_slots`` int64 sequence words."""
    ring_offset: int
    """On the consumer: ``num_slots`` slots of ``spec.slot_stride`` bytes."""
    credit_offset: int
    """On the producer: one int64 credit word."""

    def seq_word_offset(self, slot: int) -> int:
        return self.seq_offset + slot * SIGNAL_BYTES

    def header_offset(self, slot: int) -> int:
        return self.ring_offset + slot * self.spec.slot_stride

    def payload_offset(self, slot: int) -> int:
        return self.header_offset(slot) + HEADER_BYTES


EdgeLike = Union[ChannelEdge, tuple]


class HeapLayout:
    """Pure, deterministic placement of channels in the symmetric heap; every rank computes the same one.

    Edges are placed in order of name (so the input order does not matter), each block ``ALIGN``-aligned,
    per rank from ``base_offset`` up. ``heap_bytes`` is the largest end over ranks: the heap every rank must
    allocate. To re-target channels in a heap allocated once: drain the old channels, barrier,
    ``clear_local`` the new layout on every rank, barrier, then build the new endpoints.

    Args:
        num_ranks: ranks sharing the heap (edges are validated against it).
        edges: ``ChannelEdge`` or ``(producer, consumer, RingSpec, name)`` tuples.
        base_offset: first heap byte the layout may use (lets other users own the bytes below).
    """

    def __init__(self, num_ranks: int, edges: Iterable[EdgeLike], base_offset: int = 0) -> None:
        if num_ranks < 1:
            raise ValueError(f"num_ranks must be >= 1, got {num_ranks}")
        if base_offset < 0 or base_offset % ALIGN:
            raise ValueError(f"base_offset must be a non-negative multiple of {ALIGN}, got {base_offset}")
        edges = [edge if isinstance(edge, ChannelEdge) else ChannelEdge(*edge) for edge in edges]
        names = [edge.name for edge in edges]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"channel names must be unique, repeated: {duplicates}")
        for edge in edges:
            if not isinstance(edge.spec, RingSpec):
                raise ValueError(f"channel {edge.name!r}: spec must be a RingSpec, got {edge.spec!r}")
            for role, rank in (("producer", edge.producer), ("consumer", edge.consumer)):
                if not 0 <= rank < num_ranks:
                    raise ValueError(f"channel {edge.name!r}: {role} rank {rank} is outside [0, {num_ranks})")
        ends = [base_offset] * num_ranks

        def allocate(rank: int, nbytes: int) -> int:
            offset = ends[rank]
            ends[rank] = offset + round_up(nbytes, ALIGN)
            return offset

        placed = {}
        for edge in sorted(edges, key=lambda e: e.name):
            seq_offset = allocate(edge.consumer, edge.spec.num_slots * SIGNAL_BYTES)
            ring_offset = allocate(edge.consumer, edge.spec.ring_bytes)
            credit_offset = allocate(edge.producer, SIGNAL_BYTES)
            placed[edge.name] = EdgeLayout(edge.name, edge.producer, edge.consumer, edge.spec,
                                           seq_offset, ring_offset, credit_offset)
        self.num_ranks = num_ranks
        self.base_offset = base_offset
        self.edges: tuple[EdgeLayout, ...] = tuple(placed[name] for name in sorted(placed))
        self.rank_bytes: tuple[int, ...] = tuple(ends)
        """Per rank: end of the bytes this layout uses on that rank."""
        self.heap_bytes: int = max(ends)
        """The heap size every rank needs for this layout."""

    @staticmethod
    def bytes_needed(inbound: Sequence[RingSpec], num_outbound: int, base_offset: int = 0) -> int:
        """Heap end on a rank with these inbound rings and ``num_outbound`` credit words.

        The maximum of this over the plans a job may switch between sizes a heap allocated once.
        """
        total = base_offset + num_outbound * round_up(SIGNAL_BYTES, ALIGN)
        for spec in inbound:
            total += round_up(spec.num_slots * SIGNAL_BYTES, ALIGN) + spec.ring_bytes
        return total

    def __getitem__(self, name: str) -> EdgeLayout:
        for edge in self.edges:
            if edge.name == name:
                return edge
        raise KeyError(f"no channel named {name!r} in this layout")

    def __iter__(self) -> Iterator[EdgeLayout]:
        return iter(self.edges)

    def __len__(self) -> int:
        return len(self.edges)

    def inbound(self, rank: int) -> list[EdgeLayout]:
        """Channels whose consumer is ``rank``, by name."""
        return [edge for edge in self.edges if edge.consumer == rank]

    def outbound(self, rank: int) -> list[EdgeLayout]:
        """Channels whose producer is ``rank``, by name."""
        return [edge for edge in self.edges if edge.producer == rank]

    def regions(self, rank: int) -> list[tuple[int, int, str]]:
        """``(offset, nbytes, label)`` of every block this layout places on ``rank``, by offset."""
        blocks = []
        for edge in self.edges:
            if edge.consumer == rank:
                blocks.append((edge.seq_offset, edge.spec.num_slots * SIGNAL_BYTES, f"{edge.name}/seq"))
                blocks.append((edge.ring_offset, edge.spec.ring_bytes, f"{edge.name}/ring"))
            if edge.producer == rank:
                blocks.append((edge.credit_offset, SIGNAL_BYTES, f"{edge.name}/credit"))
        return sorted(blocks)

    def clear_local(self, transport: Transport) -> None:
        """Zero this rank's sequence and credit words of the layout (see the class docstring for when)."""
        for offset, nbytes, label in self.regions(transport.rank):
            if not label.endswith("/ring"):
                transport.zero_local(offset, nbytes)


@dataclass
class Message:
    """What a channel carries: small JSON metadata and named tensors (any dtype and shape).

    Tensors travel from wherever they are to the transport's heap (host memory for MPI, GPU memory for NVSHMEM:
    a CPU tensor is copied up, a GPU tensor copied down for a host heap); the receiver gets them on the
    transport's device (``transport.device``).
    """

    meta: dict[str, Any] = field(default_factory=dict)
    """JSON-serialisable; the key ``"item"``, if present, names the item in error messages."""
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    end_of_stream: bool = False
    """Set on the message ``ChannelSender.close`` sends."""

    @property
    def item(self) -> Any:
        return self.meta.get("item")

    def payload_bytes(self) -> int:
        """Slot payload bytes this message needs: each tensor's bytes rounded up to ``ALIGN``."""
        return sum(round_up(t.numel() * t.element_size(), ALIGN) for t in self.tensors.values())


def _dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise RuntimeError(f"channel header names an unknown dtype {name!r}")
    return dtype


class ChannelSender:
    """Producer end of one channel. Construct on the producer rank (no communication happens).

    ``sent`` counts messages put so far, end-of-stream included.
    """

    def __init__(self, transport: Transport, edge: EdgeLayout) -> None:
        if transport.rank != edge.producer:
            raise ValueError(f"channel {edge.name!r}: sender built on rank {transport.rank}, "
                             f"but its producer is rank {edge.producer}")
        _check_fits(transport, edge)
        self.transport = transport
        self.edge = edge
        self.sent = 0
        self.closed = False

    @property
    def name(self) -> str:
        return self.edge.name

    @property
    def peer(self) -> int:
        """The consumer rank."""
        return self.edge.consumer

    def free_slots(self) -> int:
        """Slots the producer may fill now without waiting (a local read of the credit word)."""
        credit = self.transport.read_signal(self.edge.credit_offset)
        free = self.edge.spec.num_slots - (self.sent - credit)
        assert 0 <= free <= self.edge.spec.num_slots, (self.name, self.sent, credit)
        if free == 0:
            self.transport.progress()
        return free

    def put(self, message: Message, deadline: float) -> None:
        """Send ``message``: wait for a free slot, put header and payload, then the sequence word.

        Returns when the message is complete in the consumer's memory; its tensors may be reused.

        Raises:
            ValueError: on a closed channel, a message larger than the slot or a header too large, bad meta.
            StageTimeout: if no slot frees up before ``deadline`` (``time.monotonic()``).
        """
        if self.closed:
            raise ValueError(f"channel {self.name!r}: put after close")
        if message.end_of_stream:
            raise ValueError(f"channel {self.name!r}: send end-of-stream with close(), not put()")
        self._send(_KIND_DATA, message, deadline)

    def close(self, deadline: float, meta: Optional[dict[str, Any]] = None) -> None:
        """Send the end-of-stream message (with optional ``meta``); no more puts afterwards."""
        if self.closed:
            raise ValueError(f"channel {self.name!r}: closed twice")
        self._send(_KIND_END, Message(meta=dict(meta or {})), deadline)
        self.closed = True

    def flush(self, deadline: float) -> None:
        """Wait until the consumer has taken every message sent (credit == sent)."""
        self.transport.wait_signal(
            self.edge.credit_offset, self.sent, deadline,
            f"channel {self.name!r}: producer rank {self.edge.producer} waiting for consumer rank "
            f"{self.peer} to take all {self.sent} messages")

    def _send(self, kind: int, message: Message, deadline: float) -> None:
        edge, k = self.edge, self.sent
        device = self.transport.device
        tensors = {name: _to_device(t, device, edge.name, name) for name, t in message.tensors.items()}
        header, placements = _encode(edge, kind, k, message.meta, tensors)
        num_slots = edge.spec.num_slots
        if k - num_slots + 1 > 0:
            self.transport.wait_signal(
                edge.credit_offset, k - num_slots + 1, deadline,
                f"channel {edge.name!r}: producer rank {edge.producer} waiting for a free slot from consumer "
                f"rank {edge.consumer} to send item {message.item} as message {k} (sequence word {k + 1}, "
                f"ring of {num_slots})")
        slot = k % num_slots
        for offset, tensor in placements:
            self.transport.put(edge.consumer, edge.payload_offset(slot) + offset, tensor)
        self.transport.put_signal(edge.consumer, edge.header_offset(slot), header,
                                  edge.seq_word_offset(slot), k + 1)
        self.sent = k + 1


class ChannelReceiver:
    """Consumer end of one channel. Construct on the consumer rank (no communication happens).

    ``taken`` counts messages taken; ``closed`` becomes true once the end-of-stream message is taken.
    """

    def __init__(self, transport: Transport, edge: EdgeLayout) -> None:
        if transport.rank != edge.consumer:
            raise ValueError(f"channel {edge.name!r}: receiver built on rank {transport.rank}, "
                             f"but its consumer is rank {edge.consumer}")
        _check_fits(transport, edge)
        self.transport = transport
        self.edge = edge
        self.taken = 0
        self.closed = False
        self.last_item: Any = None

    @property
    def name(self) -> str:
        return self.edge.name

    @property
    def peer(self) -> int:
        """The producer rank."""
        return self.edge.producer

    def ready(self) -> bool:
        """Whether the next message has arrived (a local read of one sequence word); false once closed."""
        if self.closed:
            return False
        slot = self.taken % self.edge.spec.num_slots
        if self.transport.read_signal(self.edge.seq_word_offset(slot)) >= self.taken + 1:
            return True
        self.transport.progress()
        return False

    def describe_wait(self) -> str:
        k = self.taken
        return (f"channel {self.name!r}: consumer rank {self.edge.consumer} waiting for message {k} "
                f"(sequence word {k + 1} in slot {k % self.edge.spec.num_slots}) from producer rank {self.peer}, "
                f"last item taken: {self.last_item}")

    def take(self, deadline: Optional[float] = None) -> Message:
        """Wait for the next message until ``deadline`` (``None``: do not wait), copy it out, return credit.

        Returns:
            the message, with new tensors (the slot is reused afterwards); ``end_of_stream`` set on the last.

        Raises:
            ValueError: if the channel is already closed.
            StageTimeout: if the message has not arrived by ``deadline``.
        """
        if self.closed:
            raise ValueError(f"channel {self.name!r}: take after end-of-stream")
        edge, k = self.edge, self.taken
        slot = k % edge.spec.num_slots
        seq = self.transport.wait_signal(edge.seq_word_offset(slot), k + 1,
                                         time.monotonic() if deadline is None else deadline, self.describe_wait())
        if seq != k + 1:
            raise RuntimeError(f"channel {self.name!r}: protocol violation, slot {slot} holds sequence word {seq} "
                               f"while message {k} (sequence word {k + 1}) was expected")
        message = _decode(self.transport, edge, slot, k)
        self.transport.signal(edge.producer, edge.credit_offset, k + 1)
        self.taken = k + 1
        if message.end_of_stream:
            self.closed = True
        elif message.item is not None:
            self.last_item = message.item
        return message


def _check_fits(transport: Transport, edge: EdgeLayout) -> None:
    end = max(edge.ring_offset + edge.spec.ring_bytes, edge.credit_offset + SIGNAL_BYTES)
    if end > transport.heap_bytes:
        raise ValueError(f"channel {edge.name!r} needs heap bytes up to {end}, "
                         f"but the transport's heap has {transport.heap_bytes}")


def _encode(edge: EdgeLayout, kind: int, k: int, meta: dict[str, Any],
            tensors: dict[str, torch.Tensor]) -> tuple[bytes, list[tuple[int, torch.Tensor]]]:
    """Header bytes and ``(payload offset, tensor)`` placements of message ``k``; validates sizes."""
    descriptors, placements, offset = [], [], 0
    for name, tensor in tensors.items():
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise ValueError(f"channel {edge.name!r}: tensors must map str to torch.Tensor, got {name!r}: "
                             f"{type(tensor).__name__}")
        nbytes = tensor.numel() * tensor.element_size()
        descriptors.append([name, str(tensor.dtype).removeprefix("torch."), list(tensor.shape), offset, nbytes])
        placements.append((offset, tensor))
        offset += round_up(nbytes, ALIGN)
    if offset > edge.spec.slot_bytes:
        listing = ", ".join(f"{d[0]} {d[1]}{tuple(d[2])} {d[4]} B" for d in descriptors)
        raise ValueError(f"channel {edge.name!r} (rank {edge.producer} -> rank {edge.consumer}): message needs "
                         f"{offset} payload bytes ({listing}; each rounded up to {ALIGN}), more than the ring's "
                         f"slot_bytes={edge.spec.slot_bytes}")
    try:
        description = json.dumps({"meta": meta, "tensors": descriptors}, separators=(",", ":")).encode()
    except (TypeError, ValueError) as error:
        raise ValueError(f"channel {edge.name!r}: message meta is not JSON-serialisable: {error}") from error
    if len(description) > MAX_DESCRIPTION_BYTES:
        raise ValueError(f"channel {edge.name!r}: message header needs {len(description)} bytes of JSON (meta and "
                         f"{len(descriptors)} tensor descriptors), more than the {MAX_DESCRIPTION_BYTES} a "
                         f"{HEADER_BYTES}-byte header holds; keep meta small")
    header = _FIXED.pack(_MAGIC, kind, len(description), k, offset) + description
    return header, [(off, t) for off, t in placements if t.numel()]


def _to_device(tensor: Any, device: torch.device, channel: str, name: str) -> torch.Tensor:
    """``tensor`` contiguous on the heap's device (a host heap takes CPU tensors; a GPU heap its own GPU's)."""
    if not isinstance(tensor, torch.Tensor):
        return tensor  # _encode reports it
    tensor = tensor.detach()
    if device.type == "cpu":
        tensor = tensor.cpu()
    elif tensor.device.type == "cpu":
        tensor = tensor.to(device, non_blocking=tensor.is_pinned())
    elif tensor.device != device:
        raise ValueError(f"channel {channel!r}: tensor {name!r} is on {tensor.device}, the heap on {device}")
    return tensor.contiguous()


def _decode(transport: Transport, edge: EdgeLayout, slot: int, k: int) -> Message:
    """Copy message ``k`` out of ``slot`` of this rank's ring into new tensors."""
    fixed = transport.local_view(edge.header_offset(slot), _FIXED.size).tobytes()
    magic, kind, description_bytes, index, payload_bytes = _FIXED.unpack(fixed)
    if (magic != _MAGIC or kind not in (_KIND_DATA, _KIND_END) or index != k
            or description_bytes > MAX_DESCRIPTION_BYTES or payload_bytes > edge.spec.slot_bytes):
        raise RuntimeError(f"channel {edge.name!r}: corrupt header in slot {slot} for message {k}: "
                           f"magic {magic!r}, kind {kind}, message {index}, description {description_bytes} B, "
                           f"payload {payload_bytes} B")
    raw = transport.local_view(edge.header_offset(slot) + _FIXED.size, description_bytes).tobytes()
    description = json.loads(raw)
    tensors = {}
    for name, dtype_name, shape, offset, nbytes in description["tensors"]:
        tensor = torch.empty(shape, dtype=_dtype_from_name(dtype_name), device=transport.device)
        if tensor.numel() * tensor.element_size() != nbytes or offset + nbytes > payload_bytes:
            raise RuntimeError(f"channel {edge.name!r}: corrupt descriptor of tensor {name!r} in message {k}")
        if nbytes:
            as_byte_tensor(tensor).copy_(transport.local_tensor(edge.payload_offset(slot) + offset, nbytes))
        tensors[name] = tensor
    return Message(meta=description["meta"], tensors=tensors, end_of_stream=kind == _KIND_END)


def select_ready(receivers: Sequence[ChannelReceiver], start: int = 0) -> Optional[ChannelReceiver]:
    """The first receiver with a message ready, scanning from index ``start`` round the list; else None."""
    count = len(receivers)
    for step in range(count):
        receiver = receivers[(start + step) % count]
        if receiver.ready():
            return receiver
    return None


class ReceiverPoller:
    """Fair (round-robin) polling of several receivers, so no producer starves another."""

    def __init__(self, receivers: Sequence[ChannelReceiver]) -> None:
        self.receivers = list(receivers)
        self._cursor = 0

    @property
    def all_closed(self) -> bool:
        return all(receiver.closed for receiver in self.receivers)

    def poll(self) -> Optional[ChannelReceiver]:
        """A receiver with a message ready, the scan starting after the last one returned; else None."""
        if not self.receivers:
            return None
        receiver = select_ready(self.receivers, self._cursor)
        if receiver is not None:
            self._cursor = (self.receivers.index(receiver) + 1) % len(self.receivers)
        return receiver

    def wait(self, deadline: float, what: str = "") -> Optional[ChannelReceiver]:
        """Wait for any receiver to be ready; None once all are closed.

        Raises:
            StageTimeout: at ``deadline``, naming every open channel, its producer and awaited message.
        """
        backoff = Backoff()
        while not self.all_closed:
            receiver = self.poll()
            if receiver is not None:
                return receiver
            if time.monotonic() >= deadline:
                waits = "; ".join(r.describe_wait() for r in self.receivers if not r.closed)
                raise StageTimeout(f"{what + ': ' if what else ''}timed out waiting for any of: {waits}")
            backoff.pause()
        return None


def pick_sender(senders: Sequence[ChannelSender], start: int = 0) -> Optional[ChannelSender]:
    """The open sender with the most free slots (ties: first from index ``start``); None if all are full."""
    best, best_free = None, 0
    count = len(senders)
    for step in range(count):
        sender = senders[(start + step) % count]
        if sender.closed:
            continue
        free = sender.free_slots()
        if free > best_free:
            best, best_free = sender, free
    return best
