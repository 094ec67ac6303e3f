"""Where the double-ring channels live in the symmetric heap: ring shapes, edges and their placement (pure).

One channel per producer -> consumer edge. In the symmetric heap:

- the consumer owns the data ring: ``N`` slots (a ``HEADER_BYTES`` header, then ``slot_bytes`` of payload)
  and ``N`` int64 sequence words;
- the producer owns one int64 credit word: the number of messages the consumer has taken.

Every rank computes the same placement from the same edges, with no communication and no transport.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence, Union

from spmd_diff.comm.transport import SIGNAL_BYTES, Transport, round_up

HEADER_BYTES = 4096
"""Fixed size of a slot's header (the wire format's fixed fields, then the JSON description of the message)."""
ALIGN = 64
"""Alignment of heap blocks and of each tensor inside a slot's payload."""


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
