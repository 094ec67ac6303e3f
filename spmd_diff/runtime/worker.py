"""A bounded background worker: one thread running submitted jobs in order, so a rank's own thread never waits
for the disk (the writer) or for the VAE (decode overlapping the next denoise).

``Worker(name, capacity)``: ``submit(job)`` queues a callable, blocking while ``capacity`` jobs wait (with a
deadline); ``join()`` waits until every job ran and stops the thread. The first job that raises stops the work:
later jobs are dropped, and the exception is raised again, in the caller's thread, by the next ``submit`` or by
``join`` (a full disk in the writer thus stops the rank like a full disk in the rank's own thread). With
``capacity == 0`` there is no thread: ``submit`` runs the job at once in the caller's thread.
"""

from __future__ import annotations

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
