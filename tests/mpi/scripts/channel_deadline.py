"""A producer that never produces: its consumer raises StageTimeout at the deadline and the job aborts.

Channels 0->2, 1->2 and 1->3. Rank 0 hangs outside MPI (as a stuck GPU kernel would). Rank 1's items still
reach ranks 2 and 3 (no head-of-line blocking); rank 2 then times out waiting on rank 0, prints the error and
calls ``MPI_Abort`` with ``StageTimeout.exit_code``, so mpirun exits non-zero instead of hanging. With ``--result
PATH`` rank 2 writes there, before it raises: ``{"rank", "items_taken", "waited_s", "error"}``.

    mpirun -n 4 python tests/mpi/scripts/channel_deadline.py --deadline 2 [--result PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from mpi4py import MPI

from spmd_diff.comm import ChannelReceiver, ChannelSender, HeapLayout, Message, ReceiverPoller, RingSpec
from spmd_diff.comm.mpi_rma import MpiRmaTransport
from spmd_diff.errors import StageTimeout


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--deadline", type=float, default=2.0, help="seconds a consumer waits for a message")
    parser.add_argument("--items", type=int, default=10)
    parser.add_argument("--result", help="JSON file the consumer that times out writes to")
    options = parser.parse_args()
    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    if comm.Get_size() != 4:
        raise SystemExit("run with 4 ranks")
    spec = RingSpec(2, 4096)
    layout = HeapLayout(4, [(0, 2, spec, "enc0->dit2"), (1, 2, spec, "enc1->dit2"), (1, 3, spec, "enc1->dit3")])
    transport = MpiRmaTransport(comm, layout.heap_bytes)
    try:
        if rank == 0:
            time.sleep(120)  # hung, and not in MPI: only MPI_Abort from another rank ends this
        elif rank == 1:
            for edge in layout.outbound(1):
                sender = ChannelSender(transport, edge)
                for item in range(options.items):
                    sender.put(Message({"item": item}, {"x": torch.full((64,), item)}), time.monotonic() + 30)
                sender.close(time.monotonic() + 30)
        else:
            poller = ReceiverPoller([ChannelReceiver(transport, edge) for edge in layout.inbound(rank)])
            taken = 0
            while True:
                started = time.monotonic()
                try:
                    receiver = poller.wait(started + options.deadline, f"consumer rank {rank}")
                except StageTimeout as error:
                    waited = time.monotonic() - started
                    print(f"rank {rank}: took {taken} items, then waited {waited:.2f} s", flush=True)
                    if options.result:
                        with open(options.result, "w") as f:
                            f.write(json.dumps({"rank": rank, "items_taken": taken, "waited_s": waited,
                                                "error": f"{type(error).__name__}: {error}"}) + "\n")
                    raise
                if receiver is None:
                    break
                message = receiver.take(time.monotonic() + options.deadline)
                taken += not message.end_of_stream
            print(f"rank {rank}: took {taken} items, all channels closed", flush=True)
        transport.barrier()  # ranks 1 and 3 wait here for the others, inside MPI
    except Exception as error:
        print(f"rank {rank}: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
        comm.Abort(getattr(error, "exit_code", 1))
    transport.free()
    return 0


if __name__ == "__main__":
    sys.exit(main())
