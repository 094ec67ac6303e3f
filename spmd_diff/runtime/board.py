"""The progress board: every rank publishes (done, failed, busy ms) into its own three words of rank 0's heap
with one-sided signals; a thread on rank 0 reads them locally and drives the progress display. No collective,
no message to receive: a rank that is busy for minutes costs rank 0 nothing."""

from __future__ import annotations

import threading
import time

import numpy as np

from spmd_diff.comm.transport import round_up
from spmd_diff.plan.roles import RolePlan

_WORDS = 3  # done, failed, busy milliseconds


class ProgressBoard:
    """Rank 0's board. ``transport`` None = one rank, the board is local memory."""

    def __init__(self, transport, rank: int, size: int, min_interval_s: float = 1.0) -> None:
        self.transport, self.rank, self.size = transport, rank, size
        self._local = np.zeros(size * _WORDS, dtype=np.int64)
        self._last = (0, 0, 0)
        self._last_time = 0.0
        self.min_interval_s = min_interval_s

    @staticmethod
    def bytes_needed(size: int) -> int:
        return round_up(size * _WORDS * 8, 64)

    def publish(self, done: int, failed: int, busy_s: float, force: bool = False) -> None:
        """Publish this rank's counters. Busy time alone is sent at most once per ``min_interval_s`` (each
        signal is a flushed one-sided write to rank 0); a change of done/failed always goes out."""
        values = (done, failed, int(busy_s * 1000))
        now = time.monotonic()
        if not force and values[:2] == self._last[:2] and now - self._last_time < self.min_interval_s:
            return
        self._last, self._last_time = values, now
        if self.transport is None:
            self._local[self.rank * _WORDS: (self.rank + 1) * _WORDS] = values
            return
        for k, value in enumerate(values):
            self.transport.signal(0, (self.rank * _WORDS + k) * 8, value)

    def read(self) -> np.ndarray:
        """Rank 0 only: int64 [size, 3] (done, failed, busy ms) as last published."""
        if self.transport is None:
            return self._local.reshape(self.size, _WORDS).copy()
        view = self.transport.local_view(0, self.size * _WORDS * 8)
        return np.frombuffer(view.tobytes(), dtype=np.int64).reshape(self.size, _WORDS)

    def start_monitor(self, total: int, plan: RolePlan, interval_s: float) -> "Monitor":
        return Monitor(self, total, plan, interval_s)


class Monitor:
    """Thread on rank 0 feeding ``spmd_diff.observe.progress.Progress`` once a second."""

    def __init__(self, board: ProgressBoard, total: int, plan: RolePlan, interval_s: float) -> None:
        from spmd_diff.observe.progress import Progress

        self.board, self.plan = board, plan
        self.started = time.time()
        self.progress = Progress(total, interval_s=interval_s)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="spmd-diff-progress", daemon=True)
        self._thread.start()

    def _roles(self) -> dict[str, list[int]]:
        roles: dict[str, list[int]] = {}
        for rank in range(self.plan.num_ranks):
            roles.setdefault(self.plan.role_of(rank), []).append(rank)
        return roles

    def _update(self) -> None:
        table = self.board.read()
        elapsed = max(1e-6, time.time() - self.started)
        busy = {role: float(table[ranks, 2].sum()) / 1000.0 / (elapsed * len(ranks))
                for role, ranks in self._roles().items()}
        self.progress.update(int(table[:, 0].sum()), int(table[:, 1].sum()), busy)

    def _loop(self) -> None:
        while not self._stop.wait(1.0):
            self._update()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._update()
        self.progress.close()
