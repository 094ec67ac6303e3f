"""What each rank measured in one batch: the record every rank contributes to one MPI allgather. Pure Python.

The wire form (:meth:`RankTimings.to_wire`) is plain tuples, numbers and strings, so ``comm.allgather`` pickles it
small (a few hundred bytes per rank) and every rank rebuilds the same list of :class:`RankTimings`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

TIMED_STAGES = ("encode", "denoise", "decode", "write")


@dataclass(frozen=True)
class StageSample:
    """``num_items`` items of one class went through ``stage`` on this rank, busy for ``busy_s`` in total.

    For ``denoise`` every member of a DiT group of ``sp_degree`` ranks reports the group's wall time.
    """

    stage: str
    class_key: str
    sp_degree: int
    num_items: int
    busy_s: float

    def __post_init__(self) -> None:
        assert self.stage in TIMED_STAGES, self.stage
        assert self.num_items >= 0 and self.busy_s >= 0 and self.sp_degree >= 1, self


@dataclass(frozen=True)
class RankTimings:
    """One rank's batch: per-stage busy time, idle time (nothing to pull), wait time (blocked on a peer: a full
    ring, a group barrier), the batch's wall time on this rank, and activation peaks it measured."""

    rank: int
    samples: tuple[StageSample, ...] = ()
    idle_s: float = 0.0
    wait_s: float = 0.0
    elapsed_s: float = 0.0
    peaks: tuple[tuple[str, str, int, int], ...] = ()
    """(stage, class key, SP degree, activation peak bytes) measured on this rank, if any."""

    @property
    def busy_s(self) -> float:
        return sum(s.busy_s for s in self.samples)

    def to_wire(self) -> tuple:
        return (self.rank, tuple((s.stage, s.class_key, s.sp_degree, s.num_items, s.busy_s) for s in self.samples),
                self.idle_s, self.wait_s, self.elapsed_s, self.peaks)

    @staticmethod
    def from_wire(wire: Sequence) -> "RankTimings":
        rank, samples, idle_s, wait_s, elapsed_s, peaks = wire
        return RankTimings(int(rank), tuple(StageSample(*s) for s in samples), float(idle_s), float(wait_s),
                           float(elapsed_s), tuple(tuple(p) for p in peaks))


def summarize(timings: Sequence[RankTimings]) -> dict:
    """Totals over ranks for a ``replan`` event: per stage items and busy seconds; idle, wait and wall seconds."""
    items: dict[str, float] = {}
    busy: dict[str, float] = {}
    for rank in timings:
        for s in rank.samples:
            items[s.stage] = items.get(s.stage, 0.0) + (s.num_items / s.sp_degree if s.stage == "denoise"
                                                         else s.num_items)
            busy[s.stage] = busy.get(s.stage, 0.0) + s.busy_s
    stages = {k: {"items": round(items[k], 3), "busy_s": round(busy[k], 3)} for k in sorted(items)}
    return {"ranks": len(timings), "stages": stages,
            "idle_s": round(sum(t.idle_s for t in timings), 3), "wait_s": round(sum(t.wait_s for t in timings), 3),
            "elapsed_s": round(sum(t.elapsed_s for t in timings), 3)}
