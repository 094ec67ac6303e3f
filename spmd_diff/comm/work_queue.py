"""Shared work counters: whoever is free takes the next item (MPI_Fetch_and_op on one word of rank 0's window).

Items are pulled, not assigned: a fast rank takes more, a slow or busy one fewer, so uneven item costs and
stragglers balance themselves without any rank knowing the others' speed. One atomic per item, passive target:
rank 0's CPU is not involved (inside a node the window is shared memory; across nodes the MPI library's RMA
progresses it, as for the channels).

The window holds one counter per batch of the job, allocated once: a rank that has emptied one batch's counter
can start on the next batch's while other ranks still finish the first, with no collective between.
"""

from __future__ import annotations

from typing import Any


class WorkQueue:
    """Counters for up to ``num_batches`` batches; :meth:`batch` hands out one batch's items.

    Collective constructor over ``comm`` (an mpi4py communicator); ``free()`` is collective too.
    """

    def __init__(self, comm: Any, num_batches: int) -> None:
        from mpi4py import MPI

        self._MPI = MPI
        self.comm = comm
        self.num_batches = max(1, int(num_batches))
        nbytes = 8 * self.num_batches if comm.Get_rank() == 0 else 0
        self._win = MPI.Win.Allocate(nbytes, 8, comm=comm)
        if comm.Get_rank() == 0:
            import numpy as np

            np.frombuffer(self._win.tomemory(), dtype=np.int64, count=self.num_batches)[:] = 0
        comm.Barrier()
        self._win.Lock_all()

    def batch(self, number: int, num_items: int) -> "BatchQueue":
        """Batch ``number``'s items ``0 .. num_items - 1`` (every rank passes the same ``num_items``)."""
        if not 0 <= number < self.num_batches:
            raise ValueError(f"batch {number} is outside the {self.num_batches} this queue was allocated for")
        return BatchQueue(self, number, num_items)

    def _fetch_add(self, counter: int, one: bytearray, result: bytearray) -> int:
        MPI = self._MPI
        self._win.Fetch_and_op([one, MPI.INT64_T], [result, MPI.INT64_T], 0, counter, MPI.SUM)
        self._win.Flush(0)
        return int.from_bytes(result, "little", signed=True)

    def free(self) -> None:
        """Collective: release the window."""
        if self._win is not None:
            self._win.Unlock_all()
            self._win.Free()
            self._win = None


class BatchQueue:
    """``take()`` returns the next index of ``0 .. num_items - 1`` exactly once over all callers, then None. Any
    subset of ranks may call it, any number of times, in any order."""

    def __init__(self, queue: WorkQueue, number: int, num_items: int) -> None:
        self.queue, self.number, self.num_items = queue, number, int(num_items)
        self._one = bytearray((1).to_bytes(8, "little", signed=True))
        self._result = bytearray(8)
        self._exhausted = False

    def take(self) -> int | None:
        """The next item index, or None once every index has been handed out."""
        if self._exhausted:
            return None
        index = self.queue._fetch_add(self.number, self._one, self._result)
        if index >= self.num_items:
            self._exhausted = True
            return None
        return index
