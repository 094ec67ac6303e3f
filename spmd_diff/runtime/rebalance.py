"""Batches and re-planning: the job runs in batches; between two, every rank's per-stage busy seconds are combined
with one MPI collective and a policy chooses the plan of the next batch.

Where stages hand items between ranks, a batch ends when its items are through every stage (the channels drain and
close), so a plan can change roles, channels and DiT groups without leaving an item half-way. Where every rank
renders whole items alone (``RolePlan.ranks_independent``), a rank that finished its share of a batch posts its
timings and goes on to the next batch (:class:`BatchCut`); the timings are read one batch later, and a re-plan
from them drains that batch first. Batches are cut as they start (:func:`next_batch`):
each after one that kept the plan is twice as long, so a plan that holds pays few drains, and a batch holds one
kind of item where the policy re-plans (or ranks are time-shared). A policy that never changes the plan makes the
whole job one batch (time-shared ranks: one per kind): no drain, no collective, exactly the pipeline of a fixed
plan.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Hashable, Protocol, Sequence

from spmd_diff.errors import StageTimeout
from spmd_diff.io.inputs import Item
from spmd_diff.plan.for_job import JobPlanning
from spmd_diff.plan.planner import plan_auto
from spmd_diff.plan.replan import Rebalancer, Replan
from spmd_diff.plan.roles import RolePlan
from spmd_diff.plan.timings import TIMED_STAGES, RankTimings, StageSample
from spmd_diff.plan.workload import WorkClass


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

    def since_mark(self, rank: int, class_key: str, sp_degree: int) -> RankTimings:
        """This rank's batch as the planner reads it (every item of the batch is of class ``class_key``: a batch
        holds one kind of item)."""
        samples = []
        for stage in TIMED_STAGES:
            busy = self.ctx.stage_s.get(stage, 0.0) - self.stage_s.get(stage, 0.0)
            items = self.ctx.stage_items.get(stage, 0) - self.stage_items.get(stage, 0)
            if items > 0:
                samples.append(StageSample(stage, class_key, sp_degree if stage == "denoise" else 1, items, busy))
        elapsed = time.monotonic() - self.t0
        busy_total = sum(s.busy_s for s in samples)
        return RankTimings(rank, tuple(samples), idle_s=max(0.0, elapsed - busy_total), elapsed_s=elapsed)


class BatchCut:
    """Every rank's timings of one batch (and whether any rank was asked to stop), gathered with one non-blocking
    allgather of :data:`~spmd_diff.plan.timings.VECTOR_LENGTH` floats per rank.

    Each rank posts its cut when it has finished its share of the batch and goes on; :meth:`wait` returns once every
    rank has posted. Between drained batches that is at once (a drain: the ranks wait for each other); between
    batches whose ranks are independent (``RolePlan.ranks_independent``) a rank reads the cut one batch later, when
    the other ranks have long posted it, so no rank waits for another at a batch's end. Every rank posts every cut
    in the same order, so the collective is matched.
    """

    def __init__(self, comm: Any, mine: RankTimings, stop: bool, class_key: str, sp_degree: int) -> None:
        import numpy as np

        self.class_key, self.sp_degree = class_key, sp_degree
        self._send = np.array([1.0 if stop else 0.0, *mine.to_vector()], dtype=np.float64)
        self._recv = np.empty(comm.Get_size() * self._send.size, dtype=np.float64)
        self._request = comm.Iallgather(self._send, self._recv)
        self._read: tuple[list[RankTimings], bool] | None = None

    def wait(self, timeout_s: float | None = None) -> tuple[list[RankTimings], bool]:
        """Every rank's timings in rank order, and whether any rank was asked to stop (blocks until all posted;
        :func:`wait_for_all` with ``timeout_s``)."""
        if self._read is None:
            wait_for_all(self._request, timeout_s, "their share of the batch")
            rows = self._recv.reshape(-1, self._send.size)
            timings = [RankTimings.from_vector(rank, row[1:], self.class_key, self.sp_degree)
                       for rank, row in enumerate(rows)]
            self._read = timings, bool(rows[:, 0].any())
        return self._read


def wait_for_all(request: Any, timeout_s: float | None, what: str) -> None:
    """Complete a non-blocking collective ``request`` (mpi4py). With ``timeout_s``: raise :class:`StageTimeout` if
    the other ranks have not all reached it that many seconds after this rank did -- where ranks render whole items
    alone no channel wait would notice a stuck or lost rank, and every other rank would wait for it forever."""
    if timeout_s is None:
        request.Wait()
        return
    from spmd_diff.comm.transport import Backoff  # here: it imports torch, which start-up must not

    deadline, backoff = time.monotonic() + timeout_s, Backoff(max_sleep_s=0.05)
    while not request.Test():
        if time.monotonic() > deadline:
            raise StageTimeout(f"the other ranks did not all finish {what} within {timeout_s:.0f} s of this rank "
                               "(a rank is stuck or lost); the job stops, and a rerun renders what is not written")
        backoff.pause()


def finish_together(comm: Any, timeout_s: float | None) -> None:
    """Collective, at the end of this rank's last batch: wait until every rank is done (:func:`wait_for_all`)."""
    wait_for_all(comm.Ibarrier(), timeout_s, "their items")


class Policy(Protocol):
    """How plans change between batches. The same inputs give the same answer on every rank."""

    def candidates(self, plan: RolePlan) -> Sequence[RolePlan]:
        """Every plan this policy may switch to from ``plan`` (``plan`` included): the heap is sized for all."""

    def decide(self, plan: RolePlan, timings: Sequence[RankTimings], num_remaining: int) -> Replan | None:
        """The decision after a batch (``.switch``, ``.best``, ``.to_event()``), or None to keep ``plan``."""

    def batch_items(self, plan: RolePlan, num_pending: int, work_class: WorkClass) -> int:
        """Items of the job's first batch, and of the first after a re-plan or at a new kind of item
        (``work_class``: the kind the batch holds), ``num_pending`` or more for one batch; later batches grow from
        it (:func:`batch_length`)."""

    def one_kind_per_batch(self, plan: RolePlan) -> bool:
        """Whether a batch holds one kind of item (:func:`next_batch`): where its timings feed a re-plan (they
        then describe one work class) or ranks are time-shared (a cycle of equal counts is then one of equal
        work). Otherwise kinds flow through one batch, with no drain between them."""

    def decline(self, plan: RolePlan) -> None:
        """The runtime could not switch (the new plan's channels do not fit the heap): ``plan`` stays."""


class FixedPolicy:
    """``roles.policy = "static"``: the plan of the job's fixed counts, for the whole job (one batch)."""

    def candidates(self, plan: RolePlan) -> Sequence[RolePlan]:
        return [plan]

    def decide(self, plan: RolePlan, timings: Sequence[RankTimings], num_remaining: int) -> Replan | None:
        return None

    def batch_items(self, plan: RolePlan, num_pending: int, work_class: WorkClass) -> int:
        return max(1, num_pending)

    def one_kind_per_batch(self, plan: RolePlan) -> bool:
        return plan.time_shared

    def decline(self, plan: RolePlan) -> None:
        pass


class AutoPolicy:
    """``roles.policy = "auto"``: the planner's plan (``spmd_diff.plan.planner``), re-planned between batches
    from the gathered timings with hysteresis and the switch cost counted (``spmd_diff.plan.replan``).

    The first batch (and the first after a re-plan or at a new kind of item) lasts about ``batch_s`` seconds of
    that kind's predicted work (at least two items per pipeline): long enough that draining the pipeline at its
    end costs little, short enough to follow a change in the work; each batch after one that kept the plan is
    twice as long (:func:`batch_length`).
    """

    def __init__(self, planning: JobPlanning, num_pending: int, batch_s: float) -> None:
        self.planning = planning
        self.balancer = Rebalancer.start(planning.inputs, planning.workload(num_pending), planning.cost)
        self.batch_s = batch_s

    @property
    def plan(self) -> RolePlan:
        return self.balancer.plan

    def candidates(self, plan: RolePlan) -> Sequence[RolePlan]:
        """``plan`` and the plans the planner picks when one stage costs 16x more or less than predicted: the
        switches a re-plan may make, so the heap is sized for them once (a switch beyond is declined)."""
        out = [plan]
        inputs, base = self.planning.inputs, self.planning.cost
        workload = self.planning.workload(100 * inputs.topology.num_ranks)
        for stage in ("encode", "denoise", "decode"):
            for factor in (16.0, 1 / 16):
                out.append(plan_auto(inputs, workload, base.scaled(stage, factor), current=plan))
        return out

    def decide(self, plan: RolePlan, timings: Sequence[RankTimings], num_remaining: int) -> Replan | None:
        self.balancer, decision = self.balancer.after_batch(timings, self.planning.workload(num_remaining))
        return decision

    def decline(self, plan: RolePlan) -> None:
        self.balancer = dataclasses.replace(self.balancer, plan=plan)

    def batch_items(self, plan: RolePlan, num_pending: int, work_class: WorkClass) -> int:
        seconds = self.planning.cost.item_seconds(work_class, plan.sp_degree)
        per_item = max(seconds.values()) if seconds else 1.0
        return batch_size_for(self.batch_s, per_item, len(plan.dit_groups), minimum=2 * len(plan.dit_groups))

    def one_kind_per_batch(self, plan: RolePlan) -> bool:
        return True


def next_batch(pending: Sequence[Item], start: int, base_items: int, since_change: int,
               kind: Callable[[Item], Hashable]) -> list[Item]:
    """The batch that starts at ``pending[start]``: :func:`batch_length` items, at most the rest of the job (the
    last batch takes what is left), and none of another ``kind`` (an item's video settings) than the first: the
    render order keeps each kind together, so a batch holds one kind and its timings describe it (and a
    time-shared rank's cycles of equal counts are cycles of equal work). A pure function of values every rank holds
    alike (the broadcast pending list, the items done, the policy's decisions): every rank cuts the same batch."""
    batch = pending[start: start + batch_length(base_items, since_change)]
    if batch:
        first = kind(batch[0])
        batch = batch[:next((i for i, item in enumerate(batch) if kind(item) != first), len(batch))]
    return list(batch)


def batch_length(base_items: int, since_change: int) -> int:
    """Items of a batch: ``base_items`` (the policy's ``batch_items``) for the job's first batch and the first after
    a change (a re-plan, or a new kind of item), twice the previous batch's for every batch since
    (``since_change`` batches). A plan that holds then drains its pipeline about log2(items / first batch) times,
    not once per ``base_items``; a change starts short batches again, to follow the work closely while it changes."""
    return max(1, base_items) << min(max(0, since_change), 48)


def batches_since_change(pending: Sequence[Item], start: int, since_change: int, switched: bool,
                         kind: Callable[[Item], Hashable]) -> int:
    """``since_change`` for the batch that starts at ``pending[start]`` (the last one ended just before): 0 after
    a re-plan (``switched``) or where the kind of item changes, one more otherwise."""
    if switched or (0 < start < len(pending) and kind(pending[start]) != kind(pending[start - 1])):
        return 0
    return since_change + 1


def batch_size_for(seconds_per_batch: float, seconds_per_item: float, num_parallel: int, minimum: int) -> int:
    """Items that keep ``num_parallel`` pipelines busy for about ``seconds_per_batch``, at least ``minimum``: the
    same whole number of items for every pipeline, so the drain at the batch's end waits for no partial round."""
    per_pipeline = math.ceil(seconds_per_batch / max(seconds_per_item, 1e-6) - 1e-9)
    return max(minimum, per_pipeline * max(1, num_parallel))
