"""Per-rank event logs (``OUT/events/rank-NNNNN.jsonl``) and their merge into ``OUT/events.jsonl``.

Every record is one JSON object on one line with at least ``t`` (unix time, ``time.time()``), ``rank`` and
``ev``; the kinds the runtime writes are ``job_start``/``job_end``, ``rank_start``/``rank_end``, ``stage`` (one
stage of one item, from :meth:`EventLog.span`), ``handoff``, ``wait``, ``warmup``, ``replan``/``replan_declined``,
``move`` (a time-shared rank's components of one stage moved to its GPU), ``batch_end`` (a rank's share of a
batch done) and ``failure``, each with the fields its caller passes to :meth:`EventLog.emit`. Writing a record costs one
``json.dumps`` and one buffered ``write``; the buffer is flushed at most every ``flush_interval_s`` or
``flush_every`` records and on ``close()``, so a killed rank loses at most that much, and may leave a
truncated last line, which :func:`merge_event_logs` skips.

A resumed job appends to the same per-rank files. Each rank starts a run with a ``rank_start`` record and
rank 0 with a ``job_start`` record; the merge gives every record a ``run`` field (0, 1, ...) so the runs
can be told apart.
"""

from __future__ import annotations

import bisect
import heapq
import json
import logging
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator

__all__ = ["EventLog", "merge_event_logs", "read_events", "rank_log_path", "EVENTS_DIR", "MERGED_NAME"]

log = logging.getLogger(__name__)

EVENTS_DIR = "events"
MERGED_NAME = "events.jsonl"
_REORDER_WINDOW = 4096  # records a per-rank stream may be out of time order by (threads) and still merge sorted


def rank_log_path(out_dir: str | os.PathLike[str], rank: int, tag: str = "") -> Path:
    """``OUT/events/rank-{rank:05d}[.{tag}].jsonl`` (``tag`` keeps job-array tasks sharing OUT apart)."""
    return Path(out_dir) / EVENTS_DIR / (f"rank-{rank:05d}.{tag}.jsonl" if tag else f"rank-{rank:05d}.jsonl")


class EventLog:
    """Append-only JSON-lines event log of one rank.

    ``EventLog(out_dir, rank)`` opens ``OUT/events/rank-{rank:05d}.jsonl`` for appending. ``emit(ev, **fields)``
    writes ``{"t": time.time(), "rank": rank, "ev": ev, **fields}``; ``span(stage, item, **fields)`` times a
    block and writes one ``stage`` record with ``t0``/``t1`` (``t == t1``). Fields that JSON cannot encode
    are written as ``str(value)``. Thread-safe.

    An I/O error (full disk, vanished file system) never propagates: the log warns once through
    ``logging`` and disables itself (``disabled_reason`` says why). ``enabled=False`` makes every method a no-op.
    Call ``close()`` (or use it as a context manager) to flush; there is no ``__del__``.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        rank: int,
        enabled: bool = True,
        *,
        flush_interval_s: float = 1.0,
        flush_every: int = 1000,
        tag: str = "",
    ) -> None:
        self.rank = int(rank)
        self.path = rank_log_path(out_dir, self.rank, tag)
        self.flush_interval_s = float(flush_interval_s)
        self.flush_every = int(flush_every)
        self.num_emitted = 0
        self.disabled_reason: str | None = None if enabled else "disabled by configuration"
        self._lock = threading.Lock()
        self._file: IO[str] | None = None
        self._pending = 0
        self._last_flush = time.monotonic()
        self._encoder = json.JSONEncoder(separators=(",", ":"), default=str)
        if enabled:
            try:
                self._file = self._open()
            except OSError as exc:
                self._fail("cannot open", exc)

    @property
    def enabled(self) -> bool:
        """True while records are being written."""
        return self._file is not None

    def _open(self) -> IO[str]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        needs_newline = False
        if self.path.exists() and self.path.stat().st_size > 0:
            # A rank killed mid-write leaves a line without its newline; start our records on a fresh line.
            with open(self.path, "rb") as b:
                b.seek(-1, os.SEEK_END)
                needs_newline = b.read(1) != b"\n"
        f = open(self.path, "a", encoding="utf-8", buffering=1 << 16)
        if needs_newline:
            f.write("\n")
        return f

    def _fail(self, what: str, exc: BaseException) -> None:
        self.disabled_reason = f"{what} {self.path}: {exc}"
        log.warning("rank %d: event log disabled (%s); the job continues without events", self.rank, self.disabled_reason)
        f, self._file = self._file, None
        if f is not None:
            try:
                f.close()
            except OSError:
                pass

    def emit(self, ev: str, **fields: Any) -> None:
        """Write one record ``{"t", "rank", "ev", **fields}``; ``t`` defaults to ``time.time()``."""
        if self._file is None:
            return
        record: dict[str, Any] = {"t": time.time(), "rank": self.rank, "ev": ev}
        record.update(fields)
        try:
            line = self._encoder.encode(record)
        except (TypeError, ValueError) as exc:  # e.g. a circular structure: drop the record, not the job
            log.warning("rank %d: event %r not logged: %s", self.rank, ev, exc)
            return
        with self._lock:
            f = self._file
            if f is None:
                return
            try:
                f.write(line)
                f.write("\n")
                self.num_emitted += 1
                self._pending += 1
                if self._pending >= self.flush_every:
                    self._flush_locked(f)
                elif time.monotonic() - self._last_flush >= self.flush_interval_s:
                    self._flush_locked(f)
            except OSError as exc:
                self._fail("cannot write", exc)

    def _flush_locked(self, f: IO[str]) -> None:
        f.flush()
        self._pending = 0
        self._last_flush = time.monotonic()

    def flush(self) -> None:
        """Push buffered records to the file (not fsync)."""
        with self._lock:
            if self._file is not None:
                try:
                    self._flush_locked(self._file)
                except OSError as exc:
                    self._fail("cannot flush", exc)

    def tick(self) -> None:
        """Flush if records are pending and ``flush_interval_s`` has passed; call from idle loops (cheap)."""
        if self._file is not None and self._pending and time.monotonic() - self._last_flush >= self.flush_interval_s:
            self.flush()

    @contextmanager
    def span(self, stage: str, item: str, **fields: Any) -> Iterator[None]:
        """Time the block and emit ``{"ev": "stage", "stage", "item", "t0", "t1", **fields}`` with ``t == t1``.

        If the block raises, the record also carries ``"error": repr(exc)`` and the exception propagates.
        """
        if self._file is None:
            yield
            return
        t0 = time.time()
        try:
            yield
        except BaseException as exc:
            t1 = time.time()
            self.emit("stage", t=t1, stage=stage, item=item, t0=t0, t1=t1, error=repr(exc)[:500], **fields)
            raise
        t1 = time.time()
        self.emit("stage", t=t1, stage=stage, item=item, t0=t0, t1=t1, **fields)

    def close(self) -> None:
        """Flush and close; idempotent. Later ``emit`` calls are no-ops."""
        with self._lock:
            f, self._file = self._file, None
            if f is None:
                return
            try:
                f.close()
            except OSError as exc:
                self.disabled_reason = f"cannot close {self.path}: {exc}"
                log.warning("rank %d: event log: %s", self.rank, self.disabled_reason)

    def __enter__(self) -> "EventLog":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _parse_lines(path: Path) -> Iterator[tuple[dict[str, Any], str]]:
    """(record, stripped line) of one JSON-lines file; skips lines that are not a JSON object with a numeric ``t``."""
    with open(path, "r", encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # truncated (killed rank) or torn line
            if isinstance(rec, dict) and isinstance(rec.get("t"), (int, float)):
                yield rec, line


def read_events(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """All valid records of a JSON-lines event file, in file order (bad lines skipped)."""
    return [rec for rec, _ in _parse_lines(Path(path))]


def _job_start_times(files: list[Path]) -> list[float]:
    """Times of all ``job_start`` records (normally all in rank 0's file), sorted."""
    times = []
    for path in files:
        with open(path, "r", encoding="utf-8", errors="replace") as f:
            for line in f:
                if '"job_start"' not in line:
                    continue
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if isinstance(rec, dict) and rec.get("ev") == "job_start" and isinstance(rec.get("t"), (int, float)):
                    times.append(float(rec["t"]))
    return sorted(times)


def _nearest_run(t: float, starts: list[float]) -> int:
    """Index of the job start nearest to ``t`` (ties to the earlier); 0 without any."""
    i = bisect.bisect_left(starts, t)
    if i == 0:
        return 0
    if i == len(starts) or t - starts[i - 1] <= starts[i] - t:
        return i - 1
    return i


def _rank_stream(path: Path, file_index: int, starts: list[float]) -> Iterator[tuple[float, int, int, str]]:
    """(t, file index, seq, line with ``run``) for one rank file, time-sorted within a reorder window.

    A new segment starts at each ``rank_start`` or ``job_start`` record (rank 0 writes ``job_start`` first);
    a segment's run is the job start nearest its first record. ``"run"`` is spliced into the original text (records are JSON objects ending in ``}``).
    """
    heap: list[tuple[float, int, int, str]] = []
    run_suffix = ""
    for seq, (rec, line) in enumerate(_parse_lines(path)):
        t = float(rec["t"])
        if rec.get("ev") in ("rank_start", "job_start") or not run_suffix:
            run_suffix = f',"run":{_nearest_run(t, starts)}}}'
        heapq.heappush(heap, (t, file_index, seq, line[:-1] + run_suffix))
        if len(heap) > _REORDER_WINDOW:
            yield heapq.heappop(heap)
    while heap:
        yield heapq.heappop(heap)


def merge_event_logs(out_dir: str | os.PathLike[str]) -> Path:
    """Merge ``OUT/events/rank-*.jsonl`` into ``OUT/events.jsonl``, sorted by ``t``; returns its path.

    Lines that do not parse (a killed rank's truncated last line) are skipped. Every record gets a ``run``
    field: the index of the ``job_start`` nearest in time to the start of the record's per-rank segment
    (segments begin at ``rank_start`` and ``job_start``), so a resumed job's runs stay apart. Memory stays bounded: the
    per-rank files are streamed through a k-way merge. The output is written to a temporary file and
    renamed, and rebuilt from the per-rank files each time (idempotent). Without per-rank files an existing
    ``events.jsonl`` is left as it is; without either, an empty one is written.
    """
    out = Path(out_dir)
    merged = out / MERGED_NAME
    files = sorted((out / EVENTS_DIR).glob("rank-*.jsonl"))
    if not files and merged.exists():
        return merged
    starts = _job_start_times(files)
    streams = [_rank_stream(p, i, starts) for i, p in enumerate(files)]
    tmp = merged.with_name(f".{MERGED_NAME}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8", buffering=1 << 20) as f:
            for _, _, _, line in heapq.merge(*streams):
                f.write(line)
                f.write("\n")
        os.replace(tmp, merged)
    finally:
        if tmp.exists():
            tmp.unlink()
    return merged
