"""A shared work counter: whoever is free takes the next item (MPI_Fetch_and_op on one word of rank 0's window).

Items are pulled, not assigned: a fast rank takes more, a slow or busy one fewer, so uneven item costs and
stragglers balance themselves without any rank knowing the others' speed. One atomic per item, passive target:
rank 0's CPU is not involved (inside a node the window is shared memory; across nodes the MPI library's RMA
progresses it, as for the channels).
"""

from __future__ import annotations

from typing import Any


class WorkQueue:
    """``take()`` returns the next index of ``0 .. num_items - 1`` exactly once over all callers, then None.

    Collective constructor over ``comm`` (an mpi4py communicator); ``free()`` is collective too. Any subset of
    ranks may call ``take``, any number of times, in any order.
    """

    def __init__(self, comm: Any, num_items: int) -> None:
        from mpi4py import MPI

        self._MPI = MPI
        self.comm = comm
        self.num_items = int(num_items)
        nbytes = 8 if comm.Get_rank() == 0 else 0
        self._win = MPI.Win.Allocate(nbytes, 8, comm=comm)
        if comm.Get_rank() == 0:
            import numpy as np

            np.frombuffer(self._win.tomemory(), dtype=np.int64, count=1)[0] = 0
        comm.Barrier()
        self._win.Lock_all()
        self._one = bytearray((1).to_bytes(8, "little", signed=True))
        self._result = bytearray(8)
        self._exhausted = False

    def take(self) -> int | None:
        """The next item index, or None once every index has been handed out."""
        if self._exhausted:
            return None
        MPI = self._MPI
        self._win.Fetch_and_op([self._one, MPI.INT64_T], [self._result, MPI.INT64_T], 0, 0, MPI.SUM)
        self._win.Flush(0)
        index = int.from_bytes(self._result, "little", signed=True)
        if index >= self.num_items:
            self._exhausted = True
            return None
        return index

    def free(self) -> None:
        """Collective: release the window."""
        if self._win is not None:
            self._win.Unlock_all()
            self._win.Free()
            self._win = None
