"""The double-ring channel's two endpoints (``ChannelSender``, ``ChannelReceiver``) and the polling helpers the
role loops use to pick a ready receiver or the freest sender, on any ``Transport``.

Protocol invariants (message ``k`` = the ``k``-th message on the channel, from 0; the heap placement is
``spmd_diff.comm.heap_layout``, the slot contents ``spmd_diff.comm.wire``):

- the producer writes message ``k`` only when ``k - credit < N``, so it never overwrites a slot the consumer
  has not taken; it puts header and payload into slot ``k mod N``, then sets that slot's sequence word to
  ``k + 1``, ordered after the payload (``put_signal``);
- the consumer takes message ``k`` only when its sequence word of slot ``k mod N`` is ``k + 1``, copies it out,
  then sets the producer's credit word to ``k + 1``;
- each side writes only the other's memory and waits only on its own; every wait has a deadline.

All words start at zero (the transport zeroes its heap; ``HeapLayout.clear_local`` re-zeroes a layout).
"""

from __future__ import annotations

import time
from typing import Any, Optional, Sequence

from spmd_diff.comm.heap_layout import EdgeLayout
from spmd_diff.comm.transport import SIGNAL_BYTES, Backoff, Transport
from spmd_diff.comm.wire import KIND_DATA, KIND_END, Message, decode_message, encode_message, to_heap_device
from spmd_diff.errors import StageTimeout


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
        self._send(KIND_DATA, message, deadline)

    def close(self, deadline: float, meta: Optional[dict[str, Any]] = None) -> None:
        """Send the end-of-stream message (with optional ``meta``); no more puts afterwards."""
        if self.closed:
            raise ValueError(f"channel {self.name!r}: closed twice")
        self._send(KIND_END, Message(meta=dict(meta or {})), deadline)
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
        tensors = {name: to_heap_device(t, device, edge.name, name) for name, t in message.tensors.items()}
        header, placements = encode_message(edge, kind, k, message.meta, tensors)
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
        message = decode_message(self.transport, edge, slot, k)
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
