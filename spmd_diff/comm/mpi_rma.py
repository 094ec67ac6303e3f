"""Transport over MPI-3 RMA: one ``MPI.Win.Allocate`` window, passive target, ``Lock_all`` for its lifetime.

Works with whichever one-sided component Open MPI picks: ``osc/sm`` (the window is plain shared memory),
``osc/rdma`` (priority 101, so Open MPI 4.1 prefers it to osc/sm even on one node; without an RDMA btl it
runs over btl/vader or btl/tcp and may need the target's progress), ``osc/ucx`` and ``osc/pt2pt`` (needs an
MPI thread level below ``MPI_THREAD_MULTIPLE``). Hence:

- ordering comes from explicit ``Win_flush`` calls, never from the hardware: payload, ``Win_flush(target)``,
  then the signal as an atomic ``Accumulate(REPLACE)`` of one int64, then ``Win_flush(target)``;
- local reads of the window go through ``Win_sync`` (the window must be ``MPI_WIN_UNIFIED``);
- waits drive MPI progress (``Win_sync`` and ``Iprobe`` on a private communicator), because without hardware
  RMA a passive target only applies incoming puts and accumulates when it enters the MPI library.

Limit: ``put_signal`` and ``signal`` return only once the target has applied them, inside ``Win_flush``, which
no deadline can interrupt. Where that needs the target's progress (osc/pt2pt, btl/tcp without RDMA), a
target busy outside MPI for a long time (one long kernel, no polling) holds the writer that long; it does not
deadlock, since the target progresses at its next wait. Across nodes over TCP, Open MPI's
``--mca btl_tcp_progress_thread 1`` is meant to remove the dependency (not tested here).
"""

from __future__ import annotations

from mpi4py import MPI
import numpy as np

from spmd_diff.comm.transport import SIGNAL_BYTES, Source, Transport, as_byte_array, round_up

_MAX_PUT_BYTES = 1 << 30
"""Largest single MPI_Put: counts are C ints in MPI-3, so big puts are split."""


class MpiRmaTransport(Transport):
    """Symmetric heap of ``heap_bytes`` per rank in an MPI window over ``comm``.

    Construction is collective over ``comm`` (duplicates it, allocates and zeroes the window, barrier).
    ``free`` is collective too. Only one thread per rank may use the object.

    Args:
        comm: the communicator whose ranks share the heap (``rank``/``size`` are taken from it).
        heap_bytes: bytes per rank, the same on every rank; rounded up to a multiple of 8.

    Raises:
        ValueError: identically on every rank, if ``heap_bytes`` is not positive or differs between ranks.
        RuntimeError: if the window's memory model is not ``MPI_WIN_UNIFIED``.
    """

    def __init__(self, comm: MPI.Comm, heap_bytes: int) -> None:
        heap_bytes = round_up(int(heap_bytes), SIGNAL_BYTES)
        smallest = comm.allreduce(heap_bytes, op=MPI.MIN)
        largest = comm.allreduce(heap_bytes, op=MPI.MAX)
        if smallest != largest:
            raise ValueError(f"heap_bytes must be the same on every rank, got values from {smallest} to {largest}")
        if heap_bytes <= 0:
            raise ValueError(f"heap_bytes must be positive, got {heap_bytes}")
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        self.heap_bytes = heap_bytes
        self._comm = comm.Dup()
        self._win = MPI.Win.Allocate(heap_bytes, 1, MPI.INFO_NULL, self._comm)
        if self._win.model != MPI.WIN_UNIFIED:
            self._win.Free()
            self._comm.Free()
            raise RuntimeError("MpiRmaTransport needs an MPI_WIN_UNIFIED window; this MPI gave MPI_WIN_SEPARATE")
        self._heap = np.frombuffer(self._win.tomemory(), dtype=np.uint8)
        assert self._heap.size == heap_bytes
        self._words = self._heap.view(np.int64)
        self._pending: dict[int, list[np.ndarray]] = {}
        self._freed = False
        self._win.Lock_all(MPI.MODE_NOCHECK)
        self._heap[:] = 0
        self._win.Sync()
        self._comm.Barrier()

    # ---- one-sided writes -------------------------------------------------------------------------------
    def put(self, target_rank: int, target_offset: int, src: Source) -> None:
        data = as_byte_array(src)
        self._check_rank(target_rank)
        self._check_range(target_offset, data.size)
        for start in range(0, data.size, _MAX_PUT_BYTES):
            chunk = data[start:start + _MAX_PUT_BYTES]
            self._win.Put([chunk, MPI.BYTE], target_rank, target=(target_offset + start, chunk.size, MPI.BYTE))
        if data.size:
            self._pending.setdefault(target_rank, []).append(data)

    def put_signal(self, target_rank: int, target_offset: int, src: Source,
                   signal_offset: int, signal_value: int) -> None:
        self._check_signal(signal_offset)
        self.put(target_rank, target_offset, src)
        self._win.Flush(target_rank)
        self._pending.pop(target_rank, None)
        self._accumulate_word(target_rank, signal_offset, signal_value)

    def signal(self, target_rank: int, signal_offset: int, value: int) -> None:
        self._check_rank(target_rank)
        self._check_signal(signal_offset)
        if self._pending.pop(target_rank, None) is not None:
            self._win.Flush(target_rank)
        self._accumulate_word(target_rank, signal_offset, value)

    def _accumulate_word(self, target_rank: int, offset: int, value: int) -> None:
        word = np.array([value], dtype=np.int64)
        self._win.Accumulate([word, MPI.INT64_T], target_rank, target=(offset, 1, MPI.INT64_T), op=MPI.REPLACE)
        self._win.Flush(target_rank)

    # ---- local side ---------------------------------------------------------------------------------------
    def read_signal(self, offset: int) -> int:
        self._check_signal(offset)
        self._win.Sync()
        value = int(self._words[offset // SIGNAL_BYTES])
        self._win.Sync()  # acquire: payload reads after this see what was written before the signal
        return value

    def progress(self) -> None:
        self._comm.Iprobe(MPI.ANY_SOURCE, MPI.ANY_TAG)

    def local_view(self, offset: int, nbytes: int) -> np.ndarray:
        self._check_range(offset, nbytes)
        view = self._heap[offset:offset + nbytes]
        view.flags.writeable = False
        return view

    def zero_local(self, offset: int, nbytes: int) -> None:
        self._check_range(offset, nbytes)
        self._heap[offset:offset + nbytes] = 0
        self._win.Sync()

    # ---- completion and collectives -----------------------------------------------------------------------
    def quiet(self) -> None:
        self._win.Flush_all()
        self._pending.clear()

    def barrier(self) -> None:
        self.quiet()
        self._comm.Barrier()
        self._win.Sync()

    def free(self) -> None:
        if self._freed:
            return
        self._freed = True
        self.quiet()
        self._win.Unlock_all()
        del self._words, self._heap
        self._win.Free()
        self._comm.Free()
