"""A bounded background worker: one thread running submitted jobs in order, so a rank's own thread never waits
for the disk (the writer) or for the VAE (decode overlapping the next denoise).

``Worker(name, capacity)``: ``submit(job)`` queues a callable, blocking while ``capacity`` jobs wait (with a
deadline); ``join()`` waits until every job ran and stops the thread. The first job that raises stops the work:
later jobs are dropped, and the exception is raised again, in the caller's thread, by the next ``submit`` or by
``join`` (a full disk in the writer thus stops the rank like a full disk in the rank's own thread). With
``capacity == 0`` there is no thread: ``submit`` runs the job at once in the caller's thread.

:class:`CpuMeter` measures the CPU time of a job: its thread's and that of the threads it starts (FFmpeg's encoder
threads), not that of the rank's other threads.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from typing import Callable

from spmd_diff.errors import StageTimeout

_STOP = object()


class Worker:
    """One daemon thread and a queue of at most ``capacity`` jobs (0: run jobs inline, no thread).

    ``on_start`` runs first in the thread (e.g. ``torch.cuda.set_device``: the current device is per thread).
    """

    def __init__(self, name: str, capacity: int, on_start: Callable[[], None] | None = None) -> None:
        self.name = name
        self.capacity = int(capacity)
        self.error: BaseException | None = None
        self._thread: threading.Thread | None = None
        if self.capacity > 0:
            self._queue: queue.Queue = queue.Queue(maxsize=self.capacity)
            self._thread = threading.Thread(target=self._run, args=(on_start,), name=name, daemon=True)
            self._thread.start()

    def _run(self, on_start: Callable[[], None] | None) -> None:
        try:
            if on_start is not None:
                on_start()
        except BaseException as exc:  # noqa: BLE001 - reported to the owner by submit/join
            self.error = exc
        while True:
            job = self._queue.get()
            if job is _STOP:
                return
            if self.error is None:
                try:
                    job()
                except BaseException as exc:  # noqa: BLE001 - reported to the owner by submit/join
                    self.error = exc

    def submit(self, job: Callable[[], None], timeout_s: float) -> None:
        """Queue ``job`` (or run it now, without a thread); raises the error of an earlier job, if any, or
        :class:`StageTimeout` if no slot frees within ``timeout_s``."""
        self.raise_error()
        if self._thread is None:
            job()
            return
        try:
            self._queue.put(job, timeout=timeout_s)
        except queue.Full:
            self.raise_error()
            raise StageTimeout(f"{self.name}: no job finished in {timeout_s:.0f} s ({self.capacity} waiting)") from None

    def raise_error(self) -> None:
        if self.error is not None:
            raise self.error

    def join(self, timeout_s: float) -> None:
        """Run every queued job, stop the thread, raise the first error. Idempotent."""
        if self._thread is not None:
            deadline = time.monotonic() + timeout_s
            try:
                self._queue.put(_STOP, timeout=timeout_s)
            except queue.Full:
                self.raise_error()
                raise StageTimeout(f"{self.name}: queue still full after {timeout_s:.0f} s") from None
            self._thread.join(max(0.0, deadline - time.monotonic()))
            if self._thread.is_alive():
                raise StageTimeout(f"{self.name}: jobs still running after {timeout_s:.0f} s")
            self._thread = None
        self.raise_error()


def _other_threads_cpu_s(own_tid: int) -> dict[int, float] | None:
    """CPU seconds (user + system) of each thread of this process but ``own_tid``, from /proc; None without it."""
    try:
        tids = os.listdir("/proc/self/task")
        tick = float(os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError):
        return None
    times = {}
    for tid in tids:
        if int(tid) == own_tid:
            continue
        try:
            with open(f"/proc/self/task/{tid}/stat", "rb") as fh:
                fields = fh.read().rsplit(b")", 1)[1].split()
            times[int(tid)] = (int(fields[11]) + int(fields[12])) / tick  # utime, stime (fields 14, 15)
        except (OSError, ValueError, IndexError):
            continue  # the thread ended meanwhile
    return times


class CpuMeter:
    """``with CpuMeter() as meter: ...`` then ``meter.cpu_s``: CPU seconds spent by the calling thread and by the
    threads that started (and, typically, ended) inside the block, i.e. the process's CPU time over the block
    minus what the threads that were already running used. Resolution: the kernel's clock tick (10 ms) per
    thread running meanwhile. Without /proc: the calling thread's own CPU time."""

    def __enter__(self) -> "CpuMeter":
        self._tid = threading.get_native_id()
        self._others = _other_threads_cpu_s(self._tid)
        self._process0, self._thread0 = time.process_time(), time.thread_time()
        self.cpu_s = 0.0
        return self

    def __exit__(self, *exc) -> None:
        process1, thread1 = time.process_time(), time.thread_time()
        own = thread1 - self._thread0
        others = _other_threads_cpu_s(self._tid) if self._others is not None else None
        if others is None:
            self.cpu_s = own
            return
        busy_elsewhere = sum(others[t] - self._others[t] for t in others.keys() & self._others.keys())
        self.cpu_s = max(own, process1 - self._process0 - busy_elsewhere)
