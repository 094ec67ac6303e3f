"""Progress: parseable periodic lines in a log file, a live bar on a terminal."""

from __future__ import annotations

import io

import pytest

from spmd_diff.observe.progress import Progress, format_duration, parse_duration, parse_progress_line


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_lines_in_a_log_file_are_periodic_and_parse() -> None:
    clock, out = FakeClock(), io.StringIO()
    p = Progress(40, done=4, stream=out, clock=clock)  # not a TTY: lines every 30 s by default
    assert not p.tty and p.interval_s == 30.0
    busy = {"encoder": 0.05, "dit": 0.97, "decoder": 0.31}
    for step in range(1, 61):  # one update a second for a minute
        clock.now += 1.0
        p.update(4 + step // 5, failed=step // 30, busy=busy)
    clock.now += 1.0
    p.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 3  # first update (t=1 s), t=31 s, final (t=61 s)
    parsed = [parse_progress_line(line) for line in lines]
    last = parsed[-1]
    assert last["final"] and not parsed[0]["final"]
    assert last["done"] == 16 and last["total"] == 40 and last["failed"] == 2
    assert last["util"] == {"encoder": 0.05, "dit": 0.97, "decoder": 0.31}
    assert last["elapsed_s"] == 61
    assert last["rate_per_h"] == pytest.approx(12 * 3600 / 61, rel=1e-3)  # this run's 12 videos
    assert last["eta_s"] == pytest.approx(22 * 61 / 14, abs=1)  # 22 left at 14 finished per 61 s
    assert parsed[0]["rate_per_h"] is None or parsed[0]["rate_per_h"] >= 0
    for line in lines:
        assert line.startswith("progress ") and "\r" not in line and "\x1b" not in line


def test_unknown_eta_and_srun_label_prefix() -> None:
    out = io.StringIO()
    p = Progress(10, stream=out, tty=False, clock=FakeClock())
    p.update(0, 0, {})
    line = out.getvalue().strip()
    assert "rate=?/h" in line and "eta=?" in line
    parsed = parse_progress_line("0: " + line + " newkey=7")
    assert parsed["rate_per_h"] is None and parsed["eta_s"] is None and parsed["newkey"] == "7"
    with pytest.raises(ValueError):
        parse_progress_line("spmd-diff: 3 item(s) to render")


def test_example_line_from_the_docs() -> None:
    line = ("progress time=2026-11-22T12:34:56 done=12/40 failed=0 rate=35.2/h eta=00:47:10 elapsed=00:20:31 "
            "util.encoder=0.05 util.dit=0.97 util.decoder=0.31")
    d = parse_progress_line(line)
    assert (d["done"], d["total"], d["failed"], d["rate_per_h"]) == (12, 40, 0, 35.2)
    assert d["eta_s"] == 47 * 60 + 10 and d["elapsed_s"] == 20 * 60 + 31 and d["time"] == "2026-11-22T12:34:56"


def test_duration_format_roundtrip() -> None:
    for s in (0, 59, 61, 3599, 3600, 86400 * 5 + 7):
        assert parse_duration(format_duration(s)) == s
    assert format_duration(None) == "?" and format_duration(float("nan")) == "?"
    assert format_duration(123 * 3600 + 4 * 60 + 5) == "123:04:05"


def test_tty_bar_does_not_crash() -> None:
    clock, out = FakeClock(), FakeTTY()
    p = Progress(5, done=1, stream=out, clock=clock)
    assert p.tty
    for k in range(2, 6):
        clock.now += 1.0
        p.update(k, failed=0, busy={"dit": 0.9, "decoder": 0.4})
    p.close()
    p.close()  # idempotent
    text = out.getvalue()
    assert "5/5" in text and "videos/h" in text and "dit 90%" in text


def test_closed_stream_does_not_stop_the_job() -> None:
    out = io.StringIO()
    p = Progress(3, stream=out, tty=False)
    out.close()
    p.update(1, 0, {"all": 1.0})
    p.close()
