"""How much of a K/V exchange attention hides: transfer and compute intervals, and a worker thread for host heaps.

:class:`OverlapProbe` collects the intervals torus attention reports while it runs: wall-clock spans
(``time.perf_counter``) on CPU ranks and for host heaps' exchanges, CUDA event pairs (resolved at
:meth:`OverlapProbe.summary`) for work queued on a GPU and device heaps' exchanges. Both kinds can meet in one
probe (a host heap's exchange, timed on the wall clock, against attention queued on the GPU), so CUDA times are
placed on the wall clock through one anchor: an event recorded, with the stream idle, at the first CUDA span,
and the ``perf_counter`` reading taken when it completed. The hidden fraction is the time the union of transfer intervals overlaps the union of compute
intervals, over the transfer time: 1.0 when every transfer ran entirely under attention, 0.0 when none did.

:class:`ComputeWorker` runs attention blocks, in order, on one background thread, so that a rank whose exchange
blocks its own thread (a host heap: only the main thread may call MPI) still computes while it exchanges.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch


class OverlapProbe:
    """Intervals of transfers and of compute; :meth:`summary` gives their totals and the hidden fraction."""

    def __init__(self) -> None:
        self.wall: dict[str, list[tuple[float, float]]] = {"transfer": [], "compute": []}
        self.events: dict[str, list[tuple[Any, Any]]] = {"transfer": [], "compute": []}
        self._anchor: tuple[Any, float] | None = None  # (CUDA event, perf_counter seconds at its completion)
        self._lock = threading.Lock()

    def _anchor_cuda(self, device: torch.device | None = None) -> None:
        """Fix the CUDA clock against the wall clock once (waits for the current stream to drain)."""
        if self._anchor is not None:
            return
        stream = torch.cuda.current_stream(device)
        stream.synchronize()
        event = torch.cuda.Event(enable_timing=True)
        event.record(stream)
        event.synchronize()
        wall = time.perf_counter()
        with self._lock:
            if self._anchor is None:
                self._anchor = (event, wall)

    @contextlib.contextmanager
    def span(self, kind: str, device: torch.device | None = None) -> Iterator[None]:
        """Time the enclosed work as ``kind`` ("transfer" or "compute"): CUDA events on the current stream of
        ``device`` when it is a GPU, else the wall clock."""
        if device is not None and device.type == "cuda":
            self._anchor_cuda(device)
            began = torch.cuda.Event(enable_timing=True)
            began.record()
            yield
            ended = torch.cuda.Event(enable_timing=True)
            ended.record()
            self.add_events(kind, began, ended)
            return
        began_s = time.perf_counter()
        yield
        with self._lock:
            self.wall[kind].append((began_s, time.perf_counter()))

    def add_events(self, kind: str, began: Any, ended: Any) -> None:
        """Record a CUDA event pair (timing enabled) recorded elsewhere, e.g. on an exchange's stream."""
        self._anchor_cuda()
        with self._lock:
            self.events[kind].append((began, ended))

    def intervals(self, kind: str) -> list[tuple[float, float]]:
        """``perf_counter`` seconds; CUDA intervals are placed through the anchor (waits for their events)."""
        out = list(self.wall[kind])
        if self.events[kind]:
            assert self._anchor is not None
            anchor, wall = self._anchor
            for began, ended in self.events[kind]:
                ended.synchronize()
                out.append((wall + anchor.elapsed_time(began) / 1e3, wall + anchor.elapsed_time(ended) / 1e3))
        return out

    def summary(self) -> dict[str, float]:
        """``transfer_s`` (union of transfer intervals), ``compute_s``, ``hidden_s`` (their intersection) and
        ``hidden_fraction`` (hidden / transfer; 0 without transfers)."""
        transfer = _union(self.intervals("transfer"))
        compute = _union(self.intervals("compute"))
        transfer_s = sum(b - a for a, b in transfer)
        hidden_s = _intersection(transfer, compute)
        return {"transfer_s": transfer_s, "compute_s": sum(b - a for a, b in compute), "hidden_s": hidden_s,
                "hidden_fraction": hidden_s / transfer_s if transfer_s > 0 else 0.0}


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def _intersection(xs: list[tuple[float, float]], ys: list[tuple[float, float]]) -> float:
    total, i, j = 0.0, 0, 0
    while i < len(xs) and j < len(ys):
        lo, hi = max(xs[i][0], ys[j][0]), min(xs[i][1], ys[j][1])
        total += max(0.0, hi - lo)
        if xs[i][1] < ys[j][1]:
            i += 1
        else:
            j += 1
    return total


class ComputeWorker:
    """Runs submitted functions in order on one background thread (on the caller's CUDA device and stream);
    :meth:`join` waits for all and re-raises the first failure."""

    def __init__(self, device: torch.device) -> None:
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        self._error: BaseException | None = None
        stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
        self._thread = threading.Thread(target=self._run, args=(device, stream), daemon=True)
        self._thread.start()

    def _run(self, device: torch.device, stream: Any) -> None:
        context = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
        if stream is not None:
            torch.cuda.set_device(device)
        with context, torch.no_grad():
            while (task := self._tasks.get()) is not None:
                if self._error is None:
                    try:
                        task()
                    except BaseException as exc:  # noqa: BLE001 - re-raised by join
                        self._error = exc

    def submit(self, task: Callable[[], None]) -> None:
        self._tasks.put(task)

    def join(self, raise_error: bool = True) -> None:
        self._tasks.put(None)
        self._thread.join()
        if self._error is not None and raise_error:
            raise self._error
