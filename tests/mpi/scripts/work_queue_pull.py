"""Several ranks pull from one WorkQueue, at uneven speeds; rank 0 writes what each took as JSON (argv[1])."""

import json
import sys
import time

from mpi4py import MPI

from spmd_diff.comm.work_queue import WorkQueue

NUM_ITEMS = 200
comm = MPI.COMM_WORLD
rank = comm.Get_rank()
queue = WorkQueue(comm, NUM_ITEMS)
taken = []
while (index := queue.take()) is not None:
    taken.append(index)
    time.sleep(0.002 * (rank + 1) ** 2)  # rank 3 is 16x slower than rank 0: it should take fewer items
after = [queue.take() for _ in range(3)]  # exhausted stays exhausted
everyone = comm.gather({"rank": rank, "taken": taken, "after": after}, root=0)
queue.free()
if rank == 0:
    with open(sys.argv[1], "w") as f:
        json.dump(everyone, f)
