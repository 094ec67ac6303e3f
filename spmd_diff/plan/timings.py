"""What each rank measured in one batch: the record every rank contributes to one MPI allgather. Pure Python.

The wire form (:meth:`RankTimings.to_vector`) is a fixed number of floats (a batch holds one kind of item), so the
allgather can be a non-blocking one of a plain buffer and every rank rebuilds the same list of :class:`RankTimings`.
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

    def to_vector(self) -> list[float]:
        """The batch as :data:`VECTOR_LENGTH` floats (idle, wait and wall seconds, then per stage of
        :data:`TIMED_STAGES` items and busy seconds): the fixed-size buffer every rank contributes to one
        (non-blocking) allgather. The samples must be of one work class and one SP degree (a batch holds one kind of
        item, on one plan), which :meth:`from_vector` is told; no peaks."""
        assert len({s.class_key for s in self.samples}) <= 1 and not self.peaks \
            and all(s.sp_degree == 1 for s in self.samples if s.stage != "denoise"), self
        per_stage = {s.stage: s for s in self.samples}
        values = [self.idle_s, self.wait_s, self.elapsed_s]
        for stage in TIMED_STAGES:
            sample = per_stage.get(stage)
            values += [sample.num_items, sample.busy_s] if sample else [0.0, 0.0]
        return values

    @staticmethod
    def from_vector(rank: int, values: Sequence[float], class_key: str, sp_degree: int) -> "RankTimings":
        """The inverse of :meth:`to_vector` for ``rank``, whose samples are of ``class_key`` (denoise at
        ``sp_degree``)."""
        idle_s, wait_s, elapsed_s = (float(v) for v in values[:3])
        samples = []
        for i, stage in enumerate(TIMED_STAGES):
            items, busy_s = values[3 + 2 * i], values[4 + 2 * i]
            if items > 0:
                samples.append(StageSample(stage, class_key, sp_degree if stage == "denoise" else 1, int(round(items)),
                                           float(busy_s)))
        return RankTimings(int(rank), tuple(samples), idle_s, wait_s, elapsed_s)


VECTOR_LENGTH = 3 + 2 * len(TIMED_STAGES)
"""Floats of :meth:`RankTimings.to_vector`."""


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
