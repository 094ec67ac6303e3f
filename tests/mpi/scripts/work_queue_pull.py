"""Several ranks pull two batches from one WorkQueue, at uneven speeds, each going on to the second batch as soon as
the first is empty (no barrier between); rank 0 writes what each took as JSON (argv[1])."""

import json
import sys
import time

from mpi4py import MPI

from spmd_diff.comm.work_queue import WorkQueue

BATCH_ITEMS = (200, 50)
comm = MPI.COMM_WORLD
rank = comm.Get_rank()
queue = WorkQueue(comm, len(BATCH_ITEMS))
taken, after = [], []
for number, num_items in enumerate(BATCH_ITEMS):
    batch = queue.batch(number, num_items)
    taken.append([])
    while (index := batch.take()) is not None:
        taken[-1].append(index)
        time.sleep(0.002 * (rank + 1) ** 2)  # rank 3 is 16x slower than rank 0: it should take fewer items
    after.append([batch.take() for _ in range(3)])  # exhausted stays exhausted
everyone = comm.gather({"rank": rank, "taken": taken, "after": after}, root=0)
queue.free()
if rank == 0:
    with open(sys.argv[1], "w") as f:
        json.dump(everyone, f)
