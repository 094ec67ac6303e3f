"""One collective operation as its two implementations see it (``Operation``), and the interface they share
(``Exchange``): the host-driven rounds (``host_exchange``) and the one-kernel all-to-all (``fused_exchange``).

``Group`` (``spmd_diff.comm.collectives``) builds an ``Operation``, advances the pair epochs, and offers it to the
fused implementation first (device heaps, ``all_to_all_into``), then to the host-driven one, which always runs it.
The protocol both follow is in ``spmd_diff.comm.collective_layout``.
"""

from __future__ import annotations

import abc
from typing import Any

import torch

from spmd_diff.comm.collective_layout import as_bytes, chunk_split, encode_header


class Operation:
    """One operation: ``sends[p]`` goes to group position ``p``; ``recvs[p]`` receives from ``p`` (a tensor of
    the right size, or None when a header says what comes).

    ``group`` is a ``spmd_diff.comm.collectives.Group`` (its ``coll``, ``ranks``, ``rank_in_group``, ``name``,
    ``size`` are read). After ``prepare``: ``peers``, ``outgoing`` and ``incoming``; implementations fill
    ``results`` (by group position).
    """

    def __init__(self, group: Any, op: str, sends: dict, recvs: dict, deadline: float) -> None:
        coll = group.coll
        self.group, self.coll, self.transport, self.layout = group, coll, coll.transport, coll.layout
        self.op, self.deadline = op, deadline
        self.me = group.rank_in_group
        self.headers = op != "all_to_all_into" or not coll.on_device
        """Whether messages carry a slot header (receivers that do not know the size; host heaps always)."""
        device = self.transport.device
        for what, tensors in (("send", sends), ("out", recvs)):
            for p, t in tensors.items():
                if t is not None and t.device != device and not (t.device.type == device.type == "cuda"
                                                                  and t.device.index in (None, device.index)):
                    raise ValueError(f"{group.name} {op}: {what}[{p}] is on {t.device}, the transport's heap on "
                                     f"{device}")
        self.sends, self.recvs = sends, recvs
        self.results: list = [None] * group.size
        self.peers: list = []
        self.outgoing: dict = {}
        self.incoming: dict = {}
        self.fused_launch: Any = None
        """Set by the one-kernel implementation when it ran the operation: a launch the group may replay."""

    def what(self, p: int, doing: str, epoch: int) -> str:
        return (f"{self.group.name} {self.op}: rank {self.coll.rank} waiting for {doing} rank "
                f"{self.group.ranks[p]} (epoch {epoch})")

    def prepare(self) -> tuple[list, dict, dict]:
        """``(peers, outgoing, incoming)``: positions this rank exchanges with, and per peer the bytes and
        chunk split of what goes there / comes here (receives of unknown size get theirs from the header)."""
        me, max_chunk = self.me, self.layout.chunk_bytes
        mine, into = self.sends.get(me), self.recvs.get(me)
        if mine is not None and into is not None and as_bytes(mine).numel() != as_bytes(into).numel():
            raise ValueError(f"{self.group.name} {self.op}: out[{me}] has {as_bytes(into).numel()} bytes, "
                             f"send[{me}] {as_bytes(mine).numel()}")  # before any epoch moves
        peers = sorted((set(self.sends) | set(self.recvs)) - {me})
        outgoing = {}
        for p, tensor in self.sends.items():
            if p != me:
                data = as_bytes(tensor)
                num, chunk = chunk_split(data.numel(), max_chunk)
                header = encode_header(tensor, chunk) if self.headers else None
                outgoing[p] = (data, num, chunk, header)
        incoming = {}
        for p, out in self.recvs.items():
            if p != me:
                if out is None:
                    incoming[p] = [None, None, None, None]
                else:
                    data = as_bytes(out)
                    incoming[p] = [out, data, *chunk_split(data.numel(), max_chunk)]
        self.peers, self.outgoing, self.incoming = peers, outgoing, incoming
        return peers, outgoing, incoming

    @property
    def has_self(self) -> bool:
        """Whether this rank sends to and receives from itself in this operation."""
        return self.me in self.sends and self.me in self.recvs

    def copy_self(self) -> torch.Tensor:
        """This rank's own block (sizes were checked by ``prepare``)."""
        send, out = self.sends[self.me], self.recvs[self.me]
        if out is None:
            return send.detach().clone()
        as_bytes(out).copy_(as_bytes(send))
        return out


class Exchange(abc.ABC):
    """An implementation of collective operations over the heap words of ``collective_layout``."""

    @abc.abstractmethod
    def run(self, operation: Operation, epochs: dict[int, int]) -> bool:
        """Run (on the host) or enqueue (device heaps) ``operation`` after ``prepare``, with ``epochs[p]`` the
        pair epoch with position ``p`` already advanced and shifted (``epoch << EPOCH_SHIFT``); fill
        ``operation.results``. Returns False, having done nothing, where this implementation cannot run it."""
