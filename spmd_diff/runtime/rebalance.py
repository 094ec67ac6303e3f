"""Batches and re-planning: the job runs in batches; between two, every rank's per-stage busy seconds are combined
with one MPI collective and a policy chooses the plan of the next batch.

A batch ends when its items are through every stage (the channels drain and close), so a plan can change roles,
channels and DiT groups without leaving an item half-way. A policy that never changes the plan makes the whole
job one batch: no drain, no collective, exactly the pipeline of a fixed plan.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

from spmd_diff.io.inputs import Item
from spmd_diff.plan.roles import RolePlan

STAGES = ("encode", "denoise", "decode", "write")


@dataclass(frozen=True)
class RankTimings:
    """What one rank did during one batch."""

    rank: int
    role: str
    wall_s: float
    """Seconds from the batch's start to this rank's end of it."""
    stage_s: dict[str, float] = field(default_factory=dict)
    """Busy seconds per stage in this batch."""
    stage_items: dict[str, int] = field(default_factory=dict)
    """Items per stage finished in this batch."""

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "role": self.role, "wall_s": round(self.wall_s, 4),
                "stage_s": {k: round(v, 4) for k, v in self.stage_s.items()}, "stage_items": dict(self.stage_items)}


class StageCounters:
    """Snapshots of a rank's cumulative per-stage counters (``RankContext.stage_s`` / ``stage_items``), so a batch's
    own share can be taken when it ends."""

    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx
        self.mark()

    def mark(self) -> None:
        self.t0 = time.monotonic()
        self.stage_s = dict(self.ctx.stage_s)
        self.stage_items = dict(self.ctx.stage_items)

    def since_mark(self, rank: int, role: str) -> RankTimings:
        stage_s = {k: v - self.stage_s.get(k, 0.0) for k, v in self.ctx.stage_s.items()
                   if v - self.stage_s.get(k, 0.0) > 0}
        stage_items = {k: v - self.stage_items.get(k, 0) for k, v in self.ctx.stage_items.items()
                       if v - self.stage_items.get(k, 0) > 0}
        return RankTimings(rank, role, time.monotonic() - self.t0, stage_s, stage_items)


def gather_timings(comm: Any, mine: RankTimings) -> list[RankTimings]:
    """Collective: every rank's timings of the batch, in rank order (one ``allgather``)."""
    return sorted(comm.allgather(mine), key=lambda t: t.rank)


class Policy(Protocol):
    """How plans change between batches. Pure: the same inputs give the same answer on every rank."""

    def candidates(self, plan: RolePlan) -> Sequence[RolePlan]:
        """Every plan this policy may switch to from ``plan`` (``plan`` included): the heap is sized for all."""

    def decide(self, plan: RolePlan, timings: Sequence[RankTimings], num_remaining: int) -> "Replan | None":
        """The plan for the next batch, or None to keep ``plan``."""

    def batch_items(self, plan: RolePlan, num_pending: int) -> int:
        """Items per batch (``num_pending`` or more: one batch)."""


@dataclass(frozen=True)
class Replan:
    """A decision to switch plans, with what it was based on (the ``replan`` event)."""

    plan: RolePlan
    reason: str
    predicted_gain: float
    """Predicted throughput of the new plan over the old one's, e.g. 1.4."""
    details: dict[str, Any] = field(default_factory=dict)


class FixedPolicy:
    """``roles.policy = "static"``: the plan of the job's fixed counts, for the whole job (one batch)."""

    def candidates(self, plan: RolePlan) -> Sequence[RolePlan]:
        return [plan]

    def decide(self, plan: RolePlan, timings: Sequence[RankTimings], num_remaining: int) -> Replan | None:
        return None

    def batch_items(self, plan: RolePlan, num_pending: int) -> int:
        return max(1, num_pending)


def split_batches(pending: Sequence[Item], batch_items: int) -> list[list[Item]]:
    """``pending`` in order, cut into batches of ``batch_items`` (the last may be shorter)."""
    size = max(1, batch_items)
    return [list(pending[i: i + size]) for i in range(0, len(pending), size)] or [[]]


def batch_size_for(seconds_per_batch: float, seconds_per_item: float, num_parallel: int, minimum: int) -> int:
    """Items that keep ``num_parallel`` pipelines busy for about ``seconds_per_batch``, at least ``minimum``."""
    per_pipeline = seconds_per_batch / max(seconds_per_item, 1e-6)
    return max(minimum, math.ceil(per_pipeline * max(1, num_parallel)))
