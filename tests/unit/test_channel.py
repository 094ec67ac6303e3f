"""Double-ring channel and transports, with ranks as threads over LocalTransport (no MPI)."""

from __future__ import annotations

import random
import threading
import time

import numpy as np
import pytest
import torch

from spmd_diff.comm import (
    HEADER_BYTES,
    ChannelReceiver,
    ChannelSender,
    HeapLayout,
    LocalTransport,
    LocalWorld,
    Message,
    ReceiverPoller,
    RingSpec,
    pick_sender,
    run_local,
    select_ready,
)
from spmd_diff.errors import StageTimeout

LONG = 20.0  # seconds: deadlines of waits that must succeed


def soon(seconds: float = LONG) -> float:
    return time.monotonic() + seconds


def item_tensor(item: int, numel: int = 37) -> torch.Tensor:
    """Content that differs per item, to detect overwritten or mixed-up slots."""
    return torch.arange(numel, dtype=torch.float32) * 1000.0 + item


def pipe(spec: RingSpec, produce, consume, num_ranks: int = 2):
    """Run a 0 -> 1 channel named 'enc->dit' with the given producer and consumer bodies."""
    layout = HeapLayout(num_ranks, [(0, 1, spec, "enc->dit")])

    def body(transport):
        if transport.rank == 0:
            return produce(ChannelSender(transport, layout["enc->dit"]))
        if transport.rank == 1:
            return consume(ChannelReceiver(transport, layout["enc->dit"]))
        return None

    return run_local(num_ranks, layout.heap_bytes, body, timeout_s=60)


def drain(receiver: ChannelReceiver) -> list[Message]:
    messages = []
    while True:
        message = receiver.take(soon())
        if message.end_of_stream:
            return messages
        messages.append(message)


@pytest.mark.parametrize("num_slots, num_items", [(4, 150), (2, 60), (3, 61), (1, 20)])
def test_order_content_and_wraparound(num_slots, num_items):
    def produce(sender):
        for item in range(num_items):
            sender.put(Message({"item": item}, {"x": item_tensor(item)}), soon())
        sender.close(soon())
        return sender.sent

    def consume(receiver):
        messages = drain(receiver)
        assert receiver.closed
        return [(m.meta["item"], bool(torch.equal(m.tensors["x"], item_tensor(m.meta["item"])))) for m in messages]

    sent, received = pipe(RingSpec(num_slots, 4096), produce, consume)
    assert sent == num_items + 1
    assert received == [(item, True) for item in range(num_items)]


class RecordingTransport(LocalTransport):
    """Logs, before doing it, every write into remote memory: ('data', target, offset) and ('signal', ...)."""

    def __init__(self, world, rank, log, lock):
        super().__init__(world, rank)
        self._log, self._lock = log, lock

    def put(self, target_rank, target_offset, src):
        with self._lock:
            self._log.append(("data", self.rank, target_rank, target_offset))
        super().put(target_rank, target_offset, src)

    def put_signal(self, target_rank, target_offset, src, signal_offset, signal_value):
        with self._lock:
            self._log.append(("data", self.rank, target_rank, target_offset))
        super().put(target_rank, target_offset, src)
        with self._lock:
            self._log.append(("signal", self.rank, target_rank, signal_value))
        super().signal(target_rank, signal_offset, signal_value)

    def signal(self, target_rank, signal_offset, value):
        with self._lock:
            self._log.append(("signal", self.rank, target_rank, value))
        super().signal(target_rank, signal_offset, value)


def test_back_pressure_never_overwrites_unread_slot():
    """Slow consumer: the producer blocks on credit, and never writes a slot before it is taken."""
    num_slots, num_items = 2, 25
    layout = HeapLayout(2, [(0, 1, RingSpec(num_slots, 8192), "enc->dit")])
    world = LocalWorld(2, layout.heap_bytes)
    log, lock = [], threading.Lock()
    results = {}

    def producer():
        sender = ChannelSender(RecordingTransport(world, 0, log, lock), layout["enc->dit"])
        blocked = 0
        for item in range(num_items):
            blocked += sender.free_slots() == 0
            sender.put(Message({"item": item}, {"x": item_tensor(item, 1000)}), soon())
        sender.close(soon())
        results["blocked"] = blocked

    def consumer():
        receiver = ChannelReceiver(RecordingTransport(world, 1, log, lock), layout["enc->dit"])
        ok = []
        for _ in range(num_items):
            time.sleep(0.004)
            message = receiver.take(soon())
            ok.append(torch.equal(message.tensors["x"], item_tensor(message.meta["item"], 1000)))
        assert receiver.take(soon()).end_of_stream
        results["ok"] = ok

    threads = [threading.Thread(target=producer), threading.Thread(target=consumer)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert results["ok"] == [True] * num_items
    assert results["blocked"] >= num_items // 2  # the producer really waited on the slow consumer
    # Protocol check on the log: message k's first write comes after credit >= k - N + 1 was written.
    credit, message_index, first_write_of_message = 0, 0, True
    for kind, source, target, value in log:
        if source == 1 and kind == "signal":
            credit = value
        elif source == 0 and kind == "data":
            if first_write_of_message:
                assert credit >= message_index - num_slots + 1, (message_index, credit)
                first_write_of_message = False
        elif source == 0 and kind == "signal":
            assert value == message_index + 1
            message_index += 1
            first_write_of_message = True
    assert message_index == num_items + 1


def test_consumer_without_producer_times_out_naming_channel_peer_and_sequence():
    def consume(receiver):
        start = time.monotonic()
        with pytest.raises(StageTimeout) as caught:
            receiver.take(time.monotonic() + 0.2)
        elapsed = time.monotonic() - start
        return str(caught.value), elapsed

    (_, (message, elapsed)) = pipe(RingSpec(2, 64), lambda sender: None, consume)
    assert 0.2 <= elapsed < 1.0
    for expected in ("'enc->dit'", "consumer rank 1", "producer rank 0", "message 0", "sequence word 1", "slot 0"):
        assert expected in message, message


def test_take_without_deadline_does_not_wait():
    def consume(receiver):
        start = time.monotonic()
        with pytest.raises(StageTimeout):
            receiver.take()
        return time.monotonic() - start

    assert pipe(RingSpec(2, 64), lambda sender: None, consume)[1] < 0.1


def test_producer_with_full_ring_and_dead_consumer_times_out():
    def produce(sender):
        for item in range(2):
            sender.put(Message({"item": item}), soon())
        assert sender.free_slots() == 0
        with pytest.raises(StageTimeout) as caught:
            sender.put(Message({"item": 7}), time.monotonic() + 0.2)
        assert sender.sent == 2
        return str(caught.value)

    message = pipe(RingSpec(2, 64), produce, lambda receiver: None)[0]
    for expected in ("'enc->dit'", "producer rank 0", "consumer rank 1", "item 7", "message 2", "to reach 1, it is 0"):
        assert expected in message, message


def random_bits(shape, dtype) -> torch.Tensor:
    """Random bytes reinterpreted as ``dtype`` (NaN payloads and subnormals included)."""
    nbytes = int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()
    raw = torch.from_numpy(np.random.default_rng(nbytes).integers(0, 256, nbytes, dtype=np.uint8))
    return raw.view(dtype).reshape(shape) if nbytes else torch.empty(shape, dtype=dtype)


def bits(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""


def test_dtypes_round_trip_bit_exact():
    tensors = {
        "bf16_BCFHW": random_bits((1, 16, 3, 6, 10), torch.bfloat16),
        "f32": random_bits((5, 7), torch.float32),
        "f16": random_bits((9,), torch.float16),
        "i64": torch.tensor([-(2**63), 2**63 - 1, 0, 42], dtype=torch.int64),
        "u8": random_bits((3, 3), torch.uint8),
        "mask": torch.tensor([True, False, True]),
        "c64": random_bits((4,), torch.complex64),
        "scalar": torch.tensor(3.5, dtype=torch.float64),
        "empty": torch.empty((0, 4), dtype=torch.bfloat16),
        "transposed": torch.arange(12, dtype=torch.int32).reshape(3, 4).t(),
    }

    def produce(sender):
        sender.put(Message({"item": "x", "seed": 3, "status": "ok"}, tensors), soon())

    def consume(receiver):
        return receiver.take(soon())

    message = pipe(RingSpec(1, 1 << 16), produce, consume)[1]
    assert message.meta == {"item": "x", "seed": 3, "status": "ok"}
    assert list(message.tensors) == list(tensors)
    for name, sent in tensors.items():
        got = message.tensors[name]
        assert got.dtype == sent.dtype and got.shape == sent.shape, name
        assert bits(got) == bits(sent), name


def test_oversize_and_bad_messages_raise_value_error_without_using_a_slot():
    def produce(sender):
        errors = []
        for message in (
            Message({"item": 1}, {"x": torch.zeros(300, dtype=torch.float32)}),  # 1200 B > 1024
            Message({"blob": "y" * HEADER_BYTES}),
            Message({"bad": object()}),
        ):
            with pytest.raises(ValueError) as caught:
                sender.put(message, soon())
            errors.append(str(caught.value))
        assert sender.sent == 0
        sender.put(Message({"item": 2}, {"x": torch.zeros(256, dtype=torch.float32)}), soon())  # exactly fits
        sender.close(soon())
        return errors

    errors, messages = pipe(RingSpec(2, 1024), produce, drain)
    assert "'enc->dit'" in errors[0] and "1216" in errors[0] and "slot_bytes=1024" in errors[0], errors[0]
    assert "header" in errors[1] and "'enc->dit'" in errors[1]
    assert "JSON" in errors[2]
    assert [m.meta["item"] for m in messages] == [2]


def test_end_of_stream():
    def produce(sender):
        sender.put(Message({"item": 0}), soon())
        sender.close(soon(), meta={"reason": "done"})
        with pytest.raises(ValueError):
            sender.put(Message({"item": 1}), soon())
        sender.flush(soon())  # the consumer took both

    def consume(receiver):
        first = receiver.take(soon())
        assert not receiver.closed
        last = receiver.take(soon())
        assert receiver.closed and last.end_of_stream and last.meta == {"reason": "done"} and not last.tensors
        assert not receiver.ready()
        with pytest.raises(ValueError):
            receiver.take(soon())
        return first.meta, receiver.last_item

    assert pipe(RingSpec(2, 64), produce, consume)[1] == ({"item": 0}, 0)


def test_heap_layout_is_pure_and_non_overlapping():
    spec_a, spec_b = RingSpec(3, 5000), RingSpec(2, 100)
    edges = [(p, c, spec_a if (p + c) % 2 else spec_b, f"{p}->{c}") for p in range(3) for c in range(3, 6)]
    edges.append((2, 2, spec_b, "self"))
    first = HeapLayout(6, edges, base_offset=128)
    shuffled = list(edges)
    random.Random(0).shuffle(shuffled)
    second = HeapLayout(6, shuffled, base_offset=128)
    assert first.edges == second.edges and first.heap_bytes == second.heap_bytes
    assert first.heap_bytes == max(first.rank_bytes)
    for rank in range(6):
        blocks = first.regions(rank)
        for (offset, nbytes, label), (next_offset, _, next_label) in zip(blocks, blocks[1:]):
            assert offset >= 128 and offset + nbytes <= next_offset, (label, next_label)
        if blocks:
            assert blocks[-1][0] + blocks[-1][1] <= first.rank_bytes[rank]
        inbound = [edge.spec for edge in first.inbound(rank)]
        assert HeapLayout.bytes_needed(inbound, len(first.outbound(rank)), 128) == first.rank_bytes[rank]
    for edge in first:
        assert edge.seq_offset % 64 == 0 and edge.ring_offset % 64 == 0 and edge.credit_offset % 8 == 0
        assert edge.payload_offset(edge.spec.num_slots - 1) + edge.spec.slot_bytes <= first.rank_bytes[edge.consumer]


def test_heap_layout_rejects_bad_edges():
    spec = RingSpec(2, 64)
    with pytest.raises(ValueError, match="unique"):
        HeapLayout(2, [(0, 1, spec, "a"), (1, 0, spec, "a")])
    with pytest.raises(ValueError, match="consumer rank 2"):
        HeapLayout(2, [(0, 2, spec, "a")])
    with pytest.raises(ValueError):
        RingSpec(0, 64)
    with pytest.raises(ValueError, match="heap"):
        ChannelSender(LocalWorld(2, 64).transport(0), HeapLayout(2, [(0, 1, spec, "a")])["a"])
    with pytest.raises(ValueError, match="producer is rank 0"):
        ChannelSender(LocalWorld(2, 1 << 16).transport(1), HeapLayout(2, [(0, 1, spec, "a")])["a"])


def test_stalled_producer_does_not_block_the_other():
    """Producers 0 and 1 feed consumer 2; 0 stalls after one message, 1's 30 messages all flow meanwhile."""
    spec = RingSpec(2, 1024)
    layout = HeapLayout(3, [(0, 2, spec, "p0"), (1, 2, spec, "p1")])
    release = threading.Event()

    def body(transport):
        if transport.rank < 2:
            sender = ChannelSender(transport, layout[f"p{transport.rank}"])
            count = 3 if transport.rank == 0 else 30
            for item in range(count):
                if transport.rank == 0 and item == 1:
                    assert release.wait(LONG)
                sender.put(Message({"item": item, "from": transport.rank}, {"x": item_tensor(item)}), soon())
            sender.close(soon())
            return None
        poller = ReceiverPoller([ChannelReceiver(transport, edge) for edge in layout.inbound(2)])
        order = []
        while (receiver := poller.wait(soon())) is not None:
            message = receiver.take(soon())
            if message.end_of_stream:
                continue
            assert torch.equal(message.tensors["x"], item_tensor(message.meta["item"]))
            order.append((message.meta["from"], message.meta["item"]))
            if order.count((1, 29)) and not release.is_set():
                release.set()
        return order

    order = run_local(3, layout.heap_bytes, body)[2]
    assert order.index((1, 29)) < order.index((0, 1))  # all of 1's items arrived while 0 was stalled
    assert sorted(order) == [(0, i) for i in range(3)] + [(1, i) for i in range(30)]


def test_round_robin_polling_and_pick_sender():
    spec = RingSpec(4, 64)
    layout = HeapLayout(3, [(0, 2, spec, "a"), (1, 2, spec, "b"), (2, 0, spec, "c"), (2, 1, spec, "d")])

    def body(transport):
        if transport.rank < 2:
            sender = ChannelSender(transport, layout["ab"[transport.rank]])
            for item in range(3):
                sender.put(Message({"item": item}), soon())
            transport.barrier()  # all queued before the consumer polls
            transport.barrier()  # consumer finished
            return None
        transport.barrier()
        receivers = [ChannelReceiver(transport, edge) for edge in layout.inbound(2)]
        poller = ReceiverPoller(receivers)
        names = []
        for _ in range(6):
            receiver = poller.poll()
            receiver.take(soon())
            names.append(receiver.name)
        assert poller.poll() is None and select_ready(receivers) is None
        senders = [ChannelSender(transport, edge) for edge in layout.outbound(2)]
        senders[0].put(Message(), soon())
        picked = [pick_sender(senders).name, pick_sender(senders, start=1).name]
        senders[1].put(Message(), soon())
        picked.append(pick_sender(senders, start=1).name)  # a tie: the first from index 1
        transport.barrier()
        return names, picked

    names, picked = run_local(3, layout.heap_bytes, body)[2]
    assert names == ["a", "b"] * 3
    assert picked == ["d", "d", "d"]


def test_replan_in_the_same_heap():
    """Drain, barrier, clear_local the new layout, barrier: channels re-targeted without a new heap."""
    first = HeapLayout(2, [(0, 1, RingSpec(2, 256), "fwd")])
    # Rings of 8 hold all 5 messages and the close, so both ranks can send before receiving.
    second = HeapLayout(2, [(1, 0, RingSpec(8, 256), "back"), (0, 1, RingSpec(8, 128), "fwd2")])
    heap_bytes = max(first.heap_bytes, second.heap_bytes)

    def body(transport):
        got = []
        for layout, producer_edges in ((first, ["fwd"]), (second, ["back", "fwd2"])):
            senders = [ChannelSender(transport, e) for e in layout.outbound(transport.rank)]
            receivers = [ChannelReceiver(transport, e) for e in layout.inbound(transport.rank)]
            for sender in senders:
                for item in range(5):
                    sender.put(Message({"item": item}, {"x": item_tensor(item, 8)}), soon())
                sender.close(soon())
            for receiver in receivers:
                got.append((receiver.name, [m.meta["item"] for m in drain(receiver)]))
            for sender in senders:
                sender.flush(soon())
            transport.barrier()
            second.clear_local(transport)
            transport.barrier()
        return got

    results = run_local(2, heap_bytes, body)
    assert results[0] == [("back", list(range(5)))]
    assert results[1] == [("fwd", list(range(5))), ("fwd2", list(range(5)))]


def test_transport_argument_checks_and_wait_timeout_message():
    transport = LocalWorld(2, 1024).transport(0)
    with pytest.raises(ValueError, match="contiguous"):
        transport.put(1, 0, torch.zeros(4, 4).t())
    with pytest.raises(ValueError, match="outside the heap"):
        transport.put(1, 1000, np.zeros(100, dtype=np.uint8))
    with pytest.raises(ValueError, match="aligned"):
        transport.signal(1, 12, 1)
    with pytest.raises(ValueError, match="target rank"):
        transport.signal(2, 8, 1)
    transport.put_signal(0, 64, b"hello", 8, 5)
    assert transport.read_signal(8) == 5 and transport.local_view(64, 5).tobytes() == b"hello"
    assert transport.wait_signal(8, 5, time.monotonic(), "now") == 5
    with pytest.raises(StageTimeout, match=r"someone waits: .* offset 16 to reach 2, it is 0"):
        transport.wait_signal(16, 2, time.monotonic() + 0.05, "someone waits")


class LazyTransport(LocalTransport):
    """Completes plain puts as late as the interface allows (at the next signal to that target, or quiet),
    in reverse order, with a copy of the source taken at completion time, not at the call."""

    def __init__(self, world, rank):
        super().__init__(world, rank)
        self._pending = {}

    def put(self, target_rank, target_offset, src):
        self._pending.setdefault(target_rank, []).append((target_offset, src))

    def _complete(self, target_rank):
        for offset, src in reversed(self._pending.pop(target_rank, [])):
            super().put(target_rank, offset, src)

    def put_signal(self, target_rank, target_offset, src, signal_offset, signal_value):
        self.put(target_rank, target_offset, src)
        self._complete(target_rank)
        super().signal(target_rank, signal_offset, signal_value)

    def signal(self, target_rank, signal_offset, value):
        self._complete(target_rank)
        super().signal(target_rank, signal_offset, value)

    def quiet(self):
        for target_rank in list(self._pending):
            self._complete(target_rank)


def test_channel_relies_only_on_the_interface_ordering():
    """With puts completing late and out of order, messages still arrive whole and in order."""
    layout = HeapLayout(2, [(0, 1, RingSpec(2, 4096), "lazy")])
    world = LocalWorld(2, layout.heap_bytes)
    results = {}

    def producer():
        sender = ChannelSender(LazyTransport(world, 0), layout["lazy"])
        for item in range(30):
            sender.put(Message({"item": item}, {"x": item_tensor(item), "y": item_tensor(-item, 5)}), soon())
        sender.close(soon())

    def consumer():
        receiver = ChannelReceiver(LazyTransport(world, 1), layout["lazy"])
        results["got"] = [(m.meta["item"], torch.equal(m.tensors["x"], item_tensor(m.meta["item"])),
                           torch.equal(m.tensors["y"], item_tensor(-m.meta["item"], 5))) for m in drain(receiver)]

    threads = [threading.Thread(target=producer), threading.Thread(target=consumer)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert results["got"] == [(item, True, True) for item in range(30)]
