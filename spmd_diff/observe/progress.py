"""Job progress on rank 0: a live bar on a terminal, plain parseable lines in a log file.

Line format (non-terminal output, e.g. a Slurm log), one line per report, space-separated ``key=value`` tokens
after the word ``progress``::

    progress time=2026-11-22T12:34:56 done=12/40 failed=0 rate=35.2/h eta=00:47:10 elapsed=00:20:31 util.encoder=0.05 util.dit=0.97 util.decoder=0.31

- ``time``: local wall-clock time of the line (ISO 8601, seconds).
- ``done=D/T``: items written / items in the job (including those already done by an earlier run).
- ``failed``: items that failed for good.
- ``rate``: videos per hour written by this run so far, ``?`` before the first one.
- ``eta``: ``H:MM:SS`` (hours may exceed 24) until every item is done or failed, ``?`` while unknown.
- ``elapsed``: ``H:MM:SS`` since this run started.
- ``util.<role>``: fraction 0..1 of that role's time spent busy, as passed to :meth:`Progress.update`.
- the last line of a job carries ``final=1``.

Tokens may be added later; :func:`parse_progress_line` ignores tokens it does not know and text before
``progress`` (e.g. an ``srun --label`` prefix ``0:``).
"""

from __future__ import annotations

import datetime as _dt
import re
import sys
import time
from typing import IO, Any, Callable

__all__ = ["Progress", "parse_progress_line", "format_duration", "parse_duration"]

_ROLE_SHORT = {"encoder": "enc", "dit": "dit", "decoder": "dec"}
_LINE_RE = re.compile(r"(?:^|\s)progress(?=\s)(.*)$")


def format_duration(seconds: float | None) -> str:
    """``H:MM:SS`` (zero-padded hours: ``00:47:10``, ``123:04:05``); ``?`` for None or negative."""
    if seconds is None or seconds < 0 or seconds != seconds or seconds == float("inf"):
        return "?"
    s = int(round(seconds))
    return f"{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def parse_duration(text: str) -> float | None:
    """Inverse of :func:`format_duration`: seconds, or None for ``?``."""
    if text == "?":
        return None
    h, m, s = text.split(":")
    return int(h) * 3600 + int(m) * 60 + float(s)


def parse_progress_line(line: str) -> dict[str, Any]:
    """Parse one progress line (see the module docstring) into a dict.

    Returns ``{"time": str, "done": int, "total": int, "failed": int, "rate_per_h": float | None,
    "eta_s": float | None, "elapsed_s": float | None, "util": {role: float}, "final": bool}`` plus any
    unknown ``key=value`` token as a string. Raises ``ValueError`` if the line is not a progress line.
    """
    m = _LINE_RE.search(line.rstrip("\r\n"))
    if m is None:
        raise ValueError(f"not a progress line: {line!r}")
    out: dict[str, Any] = {"util": {}, "final": False, "rate_per_h": None, "eta_s": None, "elapsed_s": None}
    for token in m.group(1).split():
        key, sep, value = token.partition("=")
        if not sep:
            continue
        if key == "done":
            done, _, total = value.partition("/")
            out["done"], out["total"] = int(done), int(total)
        elif key == "failed":
            out["failed"] = int(value)
        elif key == "rate":
            v = value.removesuffix("/h")
            out["rate_per_h"] = None if v == "?" else float(v)
        elif key == "eta":
            out["eta_s"] = parse_duration(value)
        elif key == "elapsed":
            out["elapsed_s"] = parse_duration(value)
        elif key.startswith("util."):
            out["util"][key[5:]] = float(value)
        elif key == "final":
            out["final"] = value == "1"
        else:
            out[key] = value
    if "done" not in out:
        raise ValueError(f"progress line without done=D/T: {line!r}")
    return out


class Progress:
    """Progress of a job, shown on ``stream`` (rank 0 only).

    ``total`` items in the job, ``done`` of them already written before this run started. On a terminal
    (``tty=None`` asks ``stream.isatty()``) a tqdm bar is redrawn at most every ``min(interval_s, 1 s)``
    (default 0.5 s); otherwise one line in the format of the module docstring is written on the first update,
    then at most every ``interval_s`` (default 30 s), and on :meth:`close`. ``clock`` (monotonic seconds) is for tests.
    """

    def __init__(
        self,
        total: int,
        done: int = 0,
        stream: IO[str] | None = None,
        interval_s: float | None = None,
        tty: bool | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        if tty is None:
            isatty = getattr(self.stream, "isatty", None)
            tty = bool(isatty()) if callable(isatty) else False
        self.tty = tty
        if tty:  # a bar redraws often; interval_s (often the log-line period) only ever makes it redraw sooner
            self.interval_s = 0.5 if interval_s is None else min(float(interval_s), 1.0)
        else:
            self.interval_s = 30.0 if interval_s is None else float(interval_s)
        self.total = int(total)
        self.done = self.done0 = int(done)
        self.failed = self.failed0 = 0
        self.busy: dict[str, float] = {}
        self._clock = clock
        self._t_start = clock()
        self._last_out: float | None = None
        self._closed = False
        self._bar: Any = None
        if tty:
            self._bar = self._make_bar()

    # ------------------------------------------------------------------ numbers

    def elapsed_s(self) -> float:
        """Seconds since this run started."""
        return max(0.0, self._clock() - self._t_start)

    def rate_per_h(self) -> float | None:
        """Videos per hour written by this run; None before the first."""
        new, elapsed = self.done - self.done0, self.elapsed_s()
        return new * 3600.0 / elapsed if new > 0 and elapsed > 0 else None

    def eta_s(self) -> float | None:
        """Seconds until every item is done or failed, at this run's pace; None while unknown."""
        remaining = self.total - self.done - self.failed
        if remaining <= 0:
            return 0.0
        finished, elapsed = (self.done - self.done0) + (self.failed - self.failed0), self.elapsed_s()
        return remaining * elapsed / finished if finished > 0 and elapsed > 0 else None

    def line(self, final: bool = False) -> str:
        """The plain progress line for the current state (module docstring format)."""
        rate = self.rate_per_h()
        parts = [
            "progress",
            f"time={_dt.datetime.now().replace(microsecond=0).isoformat()}",
            f"done={self.done}/{self.total}",
            f"failed={self.failed}",
            f"rate={'?' if rate is None else f'{rate:.1f}'}/h",
            f"eta={format_duration(self.eta_s())}",
            f"elapsed={format_duration(self.elapsed_s())}",
        ]
        parts += [f"util.{_token(role)}={frac:.2f}" for role, frac in self.busy.items()]
        if final:
            parts.append("final=1")
        return " ".join(parts)

    # ------------------------------------------------------------------ output

    def update(self, done: int, failed: int = 0, busy: dict[str, float] | None = None) -> None:
        """Report the state: ``done`` items written (in the whole job), ``failed`` items, ``busy`` role -> 0..1."""
        if self._closed:
            return
        self.done, self.failed = int(done), int(failed)
        if busy is not None:
            self.busy = {str(k): min(1.0, max(0.0, float(v))) for k, v in busy.items()}
        now = self._clock()
        if self._last_out is not None and now - self._last_out < self.interval_s:
            return
        self._last_out = now
        self._show(final=False)

    def close(self) -> None:
        """Show the final state (a last line with ``final=1``, or the finished bar); idempotent."""
        if self._closed:
            return
        self._closed = True
        self._show(final=True)
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _show(self, final: bool) -> None:
        try:
            if self._bar is not None:
                self._bar.n = self.done
                self._bar.set_postfix_str(self._postfix(), refresh=False)
                self._bar.refresh()
            else:
                self.stream.write(self.line(final=final) + "\n")
                self.stream.flush()
        except (OSError, ValueError):  # a closed or broken stream must not stop the job
            pass

    def _make_bar(self) -> Any:
        try:
            from tqdm import tqdm
        except ImportError:  # plain lines still work everywhere
            self.tty = False
            self.interval_s = 30.0
            return None
        return tqdm(
            total=self.total,
            initial=self.done,
            file=self.stream,
            unit="video",
            dynamic_ncols=True,
            mininterval=self.interval_s,
            bar_format="{percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} videos{postfix}",  # tqdm puts ", " before the postfix
        )

    def _postfix(self) -> str:
        rate = self.rate_per_h()
        text = (
            f"{'?' if rate is None else f'{rate:.1f}'} videos/h, ETA {format_duration(self.eta_s())}, "
            f"elapsed {format_duration(self.elapsed_s())}, failed {self.failed}"
        )
        if self.busy:
            text += " | busy " + " ".join(f"{_ROLE_SHORT.get(r, r)} {f:.0%}" for r, f in self.busy.items())
        return text


def _token(text: str) -> str:
    """A role name usable inside a ``key=value`` token (no spaces or '=')."""
    return re.sub(r"[\s=]+", "_", text) or "_"
