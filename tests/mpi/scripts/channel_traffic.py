"""Many-to-many channel traffic over MpiRmaTransport; exits non-zero on any lost, duplicated or corrupt item.

Ranks ``[0, num_producers)`` produce, the rest consume; one channel per producer -> consumer pair, rings of
2 or 3 slots (so they wrap many times). Producers route each item to the channel with the most free slots;
consumer rank ``size - 1`` is slow, so back-pressure and re-routing happen. Every item's tensors are a pure
function of the item id, so consumers check them bit-exactly; at the end all ranks check that every item
arrived exactly once. With ``--result PATH`` rank 0 writes ``{"num_ranks", "num_producers", "items_per_producer",
"items_per_consumer": [...], "num_received", "errors": [...], "elapsed_s"}`` there.

    mpirun -n 4 python tests/mpi/scripts/channel_traffic.py --items 60 [--result PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from mpi4py import MPI

from spmd_diff.comm import ChannelReceiver, ChannelSender, HeapLayout, Message, ReceiverPoller, RingSpec, pick_sender
from spmd_diff.comm.mpi_rma import MpiRmaTransport


def item_tensors(item: int) -> dict[str, torch.Tensor]:
    """Deterministic content of item ``item``: bf16 latents of varying length, an int64 index, f32 stats."""
    generator = torch.Generator().manual_seed(item)
    frames = 1 + item % 5
    return {
        "latents_BCFHW": torch.randn(1, 4, frames, 8, 8, generator=generator).to(torch.bfloat16),
        "index": torch.tensor([item, -item], dtype=torch.int64),
        "stats": torch.rand(3, generator=generator, dtype=torch.float32),
    }


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and bytes(a.reshape(-1).view(torch.uint8).numpy()) == bytes(
        b.reshape(-1).view(torch.uint8).numpy())


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--items", type=int, default=60, help="items per producer")
    parser.add_argument("--producers", type=int, default=2)
    parser.add_argument("--heap-mib", type=int, default=0, help="heap size; 0: what the layout needs")
    parser.add_argument("--slow-ms", type=float, default=3.0, help="per-take delay of the last consumer")
    parser.add_argument("--timeout", type=float, default=30.0, help="deadline of each wait")
    parser.add_argument("--result", help="JSON file rank 0 writes the outcome to")
    options = parser.parse_args()

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    producers = list(range(options.producers))
    consumers = list(range(options.producers, size))
    edges = [(p, c, RingSpec(2 + (p + c) % 2, 16 << 10), f"p{p}->c{c}") for p in producers for c in consumers]
    layout = HeapLayout(size, edges)
    transport = MpiRmaTransport(comm, max(layout.heap_bytes, options.heap_mib << 20))
    errors: list[str] = []
    received: list[int] = []
    start = time.monotonic()
    try:
        if rank in producers:
            senders = [ChannelSender(transport, edge) for edge in layout.outbound(rank)]
            for index in range(options.items):
                item = rank * options.items + index
                deadline = time.monotonic() + options.timeout
                # The emptiest ring; if all are full, wait (with the deadline) on one in turn.
                sender = pick_sender(senders, start=index) or senders[index % len(senders)]
                sender.put(Message({"item": item, "producer": rank}, item_tensors(item)), deadline)
            for sender in senders:
                sender.close(time.monotonic() + options.timeout)
            for sender in senders:
                sender.flush(time.monotonic() + options.timeout)
        else:
            poller = ReceiverPoller([ChannelReceiver(transport, edge) for edge in layout.inbound(rank)])
            while (receiver := poller.wait(time.monotonic() + options.timeout, f"consumer rank {rank}")) is not None:
                if rank == consumers[-1]:
                    time.sleep(options.slow_ms / 1000)
                message = receiver.take(time.monotonic() + options.timeout)
                if message.end_of_stream:
                    continue
                item = message.meta["item"]
                if message.meta["producer"] != receiver.peer:
                    errors.append(f"item {item} came on {receiver.name} but says producer {message.meta['producer']}")
                expected = item_tensors(item)
                if list(message.tensors) != list(expected) or not all(
                        same_bits(message.tensors[name], tensor) for name, tensor in expected.items()):
                    errors.append(f"item {item} on {receiver.name}: content mismatch")
                received.append(item)
    except Exception as error:  # report, then make every rank stop (others may wait on us)
        print(f"rank {rank}: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
        comm.Abort(getattr(error, "exit_code", 1))
    elapsed = time.monotonic() - start
    transport.barrier()
    transport.free()

    everything = sorted(item for part in comm.allgather(received) for item in part)
    counts = comm.gather(len(received), root=0)
    all_errors = [e for part in comm.allgather(errors) for e in part]
    if rank == 0:
        expected_items = list(range(len(producers) * options.items))
        if everything != expected_items:
            missing = sorted(set(expected_items) - set(everything))
            all_errors.append(f"items lost or duplicated: {len(everything)} received, missing {missing[:10]}")
        print(f"items per consumer {counts[len(producers):]}, {elapsed:.2f} s, errors {len(all_errors)}", flush=True)
        if options.result:
            result = {"num_ranks": size, "num_producers": len(producers), "items_per_producer": options.items,
                      "items_per_consumer": counts[len(producers):], "num_received": len(everything),
                      "errors": all_errors, "elapsed_s": elapsed}
            with open(options.result, "w") as f:
                f.write(json.dumps(result, indent=1) + "\n")
        for error in all_errors[:20]:
            print(error, file=sys.stderr, flush=True)
    return 1 if all_errors else 0


if __name__ == "__main__":
    sys.exit(main())
