"""In-process transport for unit tests: several ranks as threads, one zeroed numpy heap per rank.

Same semantics as the MPI transport (puts complete immediately, which is one of the orders the interface
allows). ``run_local`` runs a function on every rank in its own thread and returns the results, so unit
tests can exercise channels and collectives without MPI.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, TypeVar

import numpy as np

from spmd_diff.comm.transport import SIGNAL_BYTES, Source, Transport, as_byte_array, round_up

T = TypeVar("T")


class LocalWorld:
    """The shared state of ``num_ranks`` in-process ranks: their heaps, a lock for signal words, a barrier.

    Args:
        num_ranks: number of ranks (threads).
        heap_bytes: heap bytes per rank, rounded up to a multiple of 8.
        barrier_timeout_s: a barrier that does not complete in this time breaks (``BrokenBarrierError``)
            instead of hanging the test.
    """

    def __init__(self, num_ranks: int, heap_bytes: int, barrier_timeout_s: float = 60.0) -> None:
        if num_ranks < 1:
            raise ValueError(f"num_ranks must be >= 1, got {num_ranks}")
        heap_bytes = round_up(int(heap_bytes), SIGNAL_BYTES)
        if heap_bytes <= 0:
            raise ValueError(f"heap_bytes must be positive, got {heap_bytes}")
        self.num_ranks = num_ranks
        self.heap_bytes = heap_bytes
        self.heaps = [np.zeros(heap_bytes, dtype=np.uint8) for _ in range(num_ranks)]
        self.words = [heap.view(np.int64) for heap in self.heaps]
        self.signal_lock = threading.Lock()
        self.barrier = threading.Barrier(num_ranks, timeout=barrier_timeout_s)

    def transport(self, rank: int) -> "LocalTransport":
        """The transport of ``rank`` (call once per rank, from that rank's thread)."""
        return LocalTransport(self, rank)

    def abort(self) -> None:
        """Break the barrier so that ranks waiting in it raise instead of hanging (one rank failed)."""
        self.barrier.abort()


class LocalTransport(Transport):
    """One rank's view of a ``LocalWorld``. Used by one thread."""

    def __init__(self, world: LocalWorld, rank: int) -> None:
        if not 0 <= rank < world.num_ranks:
            raise ValueError(f"rank {rank} is outside [0, {world.num_ranks})")
        self.rank = rank
        self.size = world.num_ranks
        self.heap_bytes = world.heap_bytes
        self._world = world
        self._freed = False

    def put(self, target_rank: int, target_offset: int, src: Source) -> None:
        data = as_byte_array(src)
        self._check_rank(target_rank)
        self._check_range(target_offset, data.size)
        self._world.heaps[target_rank][target_offset:target_offset + data.size] = data

    def put_signal(self, target_rank: int, target_offset: int, src: Source,
                   signal_offset: int, signal_value: int) -> None:
        self._check_signal(signal_offset)
        self.put(target_rank, target_offset, src)
        self.signal(target_rank, signal_offset, signal_value)

    def signal(self, target_rank: int, signal_offset: int, value: int) -> None:
        self._check_rank(target_rank)
        self._check_signal(signal_offset)
        with self._world.signal_lock:
            self._world.words[target_rank][signal_offset // SIGNAL_BYTES] = value

    def read_signal(self, offset: int) -> int:
        self._check_signal(offset)
        with self._world.signal_lock:
            return int(self._world.words[self.rank][offset // SIGNAL_BYTES])

    def local_view(self, offset: int, nbytes: int) -> np.ndarray:
        self._check_range(offset, nbytes)
        view = self._world.heaps[self.rank][offset:offset + nbytes]
        view.flags.writeable = False
        return view

    def zero_local(self, offset: int, nbytes: int) -> None:
        self._check_range(offset, nbytes)
        self._world.heaps[self.rank][offset:offset + nbytes] = 0

    def quiet(self) -> None:
        pass

    def barrier(self) -> None:
        self._world.barrier.wait()

    def free(self) -> None:
        if not self._freed:
            self._freed = True
            self._world.barrier.wait()


def run_local(num_ranks: int, heap_bytes: int, fn: Callable[[Transport], T], timeout_s: float = 60.0) -> list[T]:
    """Run ``fn(transport)`` on ``num_ranks`` threads sharing one ``LocalWorld``; return results by rank.

    ``fn`` should not call ``free`` (``run_local`` owns the world). If a rank raises, the barrier is broken
    so the others do not hang, and the first failure (lowest rank) is re-raised here.

    Raises:
        TimeoutError: if some rank is still running after ``timeout_s``.
    """
    world = LocalWorld(num_ranks, heap_bytes, barrier_timeout_s=timeout_s)
    results: list = [None] * num_ranks
    errors: list[BaseException | None] = [None] * num_ranks

    def body(rank: int) -> None:
        try:
            results[rank] = fn(world.transport(rank))
        except BaseException as error:  # re-raised in the caller's thread
            errors[rank] = error
            world.abort()

    threads = [threading.Thread(target=body, args=(rank,), name=f"local-rank-{rank}", daemon=True)
               for rank in range(num_ranks)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout_s
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    stuck = [rank for rank, thread in enumerate(threads) if thread.is_alive()]
    if stuck:
        world.abort()
        raise TimeoutError(f"ranks {stuck} still running after {timeout_s} s")
    first_bad = [error for error in errors if error is not None and not isinstance(error, threading.BrokenBarrierError)]
    first_bad = first_bad or [error for error in errors if error is not None]
    if first_bad:
        raise first_bad[0]
    return results
