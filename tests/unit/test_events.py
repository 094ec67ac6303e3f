"""Per-rank event logs: emit, span, flush, failure handling; merge with truncated lines and resumed runs."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from spmd_diff.observe.events import EventLog, merge_event_logs, rank_log_path, read_events


def test_emit_and_span(tmp_path: Path) -> None:
    with EventLog(tmp_path, 3) as log:
        log.emit("rank_start", role="dit", host="h1")
        with log.span("denoise", "item-1", role="dit"):
            pass
        log.emit("handoff", channel="dit3->dec4", src=3, dst=4, item="item-1", bytes=123, t0=1.0, t1=2.0,
                 extra=object())  # not JSON: written as str
    assert log.path == tmp_path / "events" / "rank-00003.jsonl"
    recs = read_events(log.path)
    assert [r["ev"] for r in recs] == ["rank_start", "stage", "handoff"]
    assert all(r["rank"] == 3 and isinstance(r["t"], float) for r in recs)
    stage = recs[1]
    assert stage["stage"] == "denoise" and stage["item"] == "item-1" and stage["role"] == "dit"
    assert stage["t"] == stage["t1"] >= stage["t0"]
    assert recs[2]["extra"].startswith("<object")
    log.emit("after_close")  # no-op, no error
    assert len(read_events(log.path)) == 3


def test_span_records_error_and_reraises(tmp_path: Path) -> None:
    log = EventLog(tmp_path, 0)
    with pytest.raises(ZeroDivisionError):
        with log.span("decode", "x"):
            1 / 0
    log.close()
    [rec] = read_events(log.path)
    assert rec["stage"] == "decode" and "ZeroDivisionError" in rec["error"]


def test_disabled_is_noop(tmp_path: Path) -> None:
    log = EventLog(tmp_path, 0, enabled=False)
    log.emit("x", a=1)
    with log.span("encode", "i"):
        pass
    log.close()
    assert not log.enabled and not (tmp_path / "events").exists()


def test_flush_interval_makes_records_visible(tmp_path: Path) -> None:
    log = EventLog(tmp_path, 0, flush_interval_s=0.0, flush_every=10_000)
    log.emit("a")
    log.emit("b")  # the interval has passed: flushed
    assert len(read_events(log.path)) == 2
    log.close()


def test_write_error_warns_once_and_disables(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    class FullDisk:
        def write(self, _: str) -> int:
            raise OSError(28, "No space left on device")

        def flush(self) -> None:
            raise OSError(28, "No space left on device")

        def close(self) -> None:
            pass

    log = EventLog(tmp_path, 1)
    log._file.close()  # type: ignore[union-attr]
    log._file = FullDisk()  # type: ignore[assignment]
    with caplog.at_level(logging.WARNING):
        for _ in range(5):
            log.emit("stage", stage="encode")
    assert not log.enabled and "No space left" in (log.disabled_reason or "")
    assert len([r for r in caplog.records if "event log disabled" in r.getMessage()]) == 1
    log.close()


def test_unwritable_dir_does_not_raise(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with caplog.at_level(logging.WARNING):
        log = EventLog(blocker, 0)
    log.emit("x")
    log.close()
    assert not log.enabled and "cannot open" in (log.disabled_reason or "")


def _write(out: Path, rank: int, records: list[dict], tail: str = "") -> None:
    path = rank_log_path(out, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps({"rank": rank, **r}) + "\n")
        f.write(tail)


def test_merge_sorts_and_skips_truncated_line(tmp_path: Path) -> None:
    _write(tmp_path, 0, [{"t": 10.0, "ev": "job_start"}, {"t": 10.1, "ev": "rank_start"}, {"t": 13.0, "ev": "x"}])
    _write(tmp_path, 1, [{"t": 10.2, "ev": "rank_start"}, {"t": 12.0, "ev": "y"}], tail='{"t": 14.0, "rank": 1, "ev')
    path = merge_event_logs(tmp_path)
    assert path == tmp_path / "events.jsonl"
    recs = read_events(path)
    assert [r["t"] for r in recs] == [10.0, 10.1, 10.2, 12.0, 13.0]
    assert {r["run"] for r in recs} == {0}
    again = merge_event_logs(tmp_path)  # idempotent
    assert read_events(again) == recs
    assert not list(tmp_path.glob(".events.jsonl.tmp*"))


def test_merge_two_runs_after_a_killed_rank(tmp_path: Path) -> None:
    """Run 0 is killed (rank 1 mid-line); the resumed run 1 appends to the same files through EventLog."""
    _write(tmp_path, 0, [{"t": 100.0, "ev": "job_start"}, {"t": 100.1, "ev": "rank_start"},
                         {"t": 105.0, "ev": "stage", "stage": "encode", "item": "a", "t0": 104.0, "t1": 105.0}])
    _write(tmp_path, 1, [{"t": 100.2, "ev": "rank_start"}], tail='{"t": 106.0, "rank": 1, "ev": "sta')
    for rank in (0, 1):
        log = EventLog(tmp_path, rank)
        if rank == 0:
            log.emit("job_start", t=500.0)
        log.emit("rank_start", t=500.1 + rank)
        log.emit("stage", t=510.0 + rank, stage="denoise", item="b", t0=505.0, t1=510.0 + rank)
        log.close()
    recs = read_events(merge_event_logs(tmp_path))
    by_run = {k: [(r["rank"], r["ev"]) for r in recs if r["run"] == k] for k in (0, 1)}
    assert by_run[0] == [(0, "job_start"), (0, "rank_start"), (1, "rank_start"), (0, "stage")]
    assert by_run[1] == [(0, "job_start"), (0, "rank_start"), (1, "rank_start"), (0, "stage"), (1, "stage")]
    # EventLog started its records on a fresh line after the truncated one: nothing of run 1 was lost
    assert rank_log_path(tmp_path, 1).read_text().count("\n") == 4


def test_merge_without_rank_files_keeps_existing(tmp_path: Path) -> None:
    (tmp_path / "events.jsonl").write_text('{"t": 1.0, "rank": 0, "ev": "x"}\n')
    assert read_events(merge_event_logs(tmp_path)) == [{"t": 1.0, "rank": 0, "ev": "x"}]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert read_events(merge_event_logs(empty)) == []


def test_merge_tolerates_slight_disorder_within_a_rank(tmp_path: Path) -> None:
    """Two threads of a rank may write records a little out of time order."""
    _write(tmp_path, 0, [{"t": float(t), "ev": "x"} for t in (1, 3, 2, 5, 4)])
    _write(tmp_path, 1, [{"t": float(t), "ev": "x"} for t in (0.5, 2.5, 4.5)])
    ts = [r["t"] for r in read_events(merge_event_logs(tmp_path))]
    assert ts == sorted(ts) and len(ts) == 8


def test_many_ranks_merge(tmp_path: Path) -> None:
    for rank in range(64):
        with EventLog(tmp_path, rank) as log:
            for k in range(20):
                log.emit("stage", t=1000.0 + k + rank / 100, stage="denoise", item=f"{rank}-{k}", t0=0.0, t1=1.0)
    recs = read_events(merge_event_logs(tmp_path))
    assert len(recs) == 64 * 20 and [r["t"] for r in recs] == sorted(r["t"] for r in recs)
    assert os.path.getsize(tmp_path / "events.jsonl") > 0
