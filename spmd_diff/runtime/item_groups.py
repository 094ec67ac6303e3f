"""Per-item SP degree (``dit.per_item_degree``): which ranks render which item, in which order. Pure Python.

Every rank computes the same schedule from the same inputs (the pending items' work classes, the DiT ranks per
node, the cost model, the allowed degrees), so no rank has to tell another which group to join: the schedule is
a list-scheduling run over predicted time. Items start in prompts-file order; when an item starts,
``plan.degree.pick_degree`` chooses its degree and node from the ranks free at that (predicted) moment, the
work still queued and the ranks still busy; its group is that many free ranks of that node, the lowest first
(the leader). A group is busy for the item's encode plus its denoise at that degree (the leader decodes on its
own thread, beside what it does next).

Running it (``loops.item_group_loop``): each rank takes part in its own assignments in schedule order, forming
each group with ``GroupCollectives.group`` (local, microseconds). The assignments are one total order, and
every rank follows its share of it in that order, so every group's collectives find all its members, however
far the real times drift from the predicted ones (a rank ahead of time waits in its next group's first
collective, under the usual deadline): no deadlock, exactly the schedule's groups.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Sequence

from spmd_diff.plan.degree import DegreeRequest, allowed_degrees, pick_degree, queued_rank_seconds
from spmd_diff.plan.topology import Topology
from spmd_diff.plan.workload import WorkClass


@dataclass(frozen=True)
class ItemGroup:
    """One item's group: ``ranks`` (world ranks, the leader first) render item ``item`` (its ``Item.index``)."""

    item: int
    ranks: tuple[int, ...]
    start_s: float
    """Predicted start, seconds from the job's start."""
    seconds: float
    """Predicted busy seconds of the group (encode + denoise at this degree)."""

    @property
    def degree(self) -> int:
        return len(self.ranks)


def schedule_item_groups(items: Sequence[tuple[int, WorkClass]], ranks_by_node: Sequence[Sequence[int]], cost,
                         degrees: Sequence[int]) -> list[ItemGroup]:
    """The groups of ``items`` (``(Item.index, work class)`` in start order) on the DiT ranks ``ranks_by_node``.

    Args:
        cost: ``seconds(stage, work_class, sp_degree)`` (a ``CostModel``): encode and denoise are scheduled.
        degrees: the allowed degrees (``plan.degree.allowed_degrees``); each must fit some node.

    Returns:
        One :class:`ItemGroup` per item, in the order the items start (a total order every rank shares).
    """
    nodes = [sorted(ranks) for ranks in ranks_by_node]
    if not degrees or min(degrees) > max(len(ranks) for ranks in nodes):
        raise ValueError(f"no node has {min(degrees or [0])} DiT ranks (nodes: {[len(r) for r in nodes]})")
    pool = sum(len(ranks) for ranks in nodes)
    base = min(degrees)
    free = [list(ranks) for ranks in nodes]
    busy: list[tuple[float, int, int, tuple[int, ...]]] = []  # (ends at, seq, node, ranks)
    now, seq = 0.0, 0
    remaining = queued_rank_seconds(cost, (wc for _, wc in items), base)
    schedule: list[ItemGroup] = []
    for index, work_class in items:
        own = base * cost.seconds("denoise", work_class, base)
        remaining -= own
        while True:
            busy_until = tuple(tuple(end - now for end, _, n, ranks in busy if n == node for _ in ranks)
                               for node in range(len(nodes)))
            running_s = sum(len(ranks) * max(0.0, end - now) for end, _, _, ranks in busy)
            request = DegreeRequest(work_class, tuple(len(f) for f in free), pool, max(0.0, remaining), running_s,
                                    busy_until)
            choice = pick_degree(cost, request, degrees)
            if not choice.waits:
                break
            if not busy:  # all ranks free and still no seat: allowed_degrees let a degree no node has through
                raise ValueError(f"no group of the degrees {tuple(degrees)} fits the nodes {[len(r) for r in nodes]}")
            now = max(now, busy[0][0])  # on to the next group's end: it, and any ending with it, free their ranks
            while busy and busy[0][0] <= now:
                _, _, node, ranks = heapq.heappop(busy)
                free[node] = sorted(free[node] + list(ranks))
        ranks = tuple(free[choice.node][:choice.degree])
        free[choice.node] = free[choice.node][choice.degree:]
        seconds = cost.seconds("encode", work_class, 1) + choice.seconds
        heapq.heappush(busy, (now + seconds, seq, choice.node, ranks))
        schedule.append(ItemGroup(index, ranks, now, seconds))
        seq += 1
    return schedule


def assignments_of(schedule: Sequence[ItemGroup], rank: int) -> list[ItemGroup]:
    """``rank``'s share of ``schedule``, in schedule order."""
    return [group for group in schedule if rank in group.ranks]


def job_item_groups(job, items: Sequence, dit_ranks: Sequence[int], topology: Topology, cost,
                    num_heads: int) -> list[ItemGroup]:
    """The schedule of ``items`` (``io.inputs.Item``, in start order) for ``job`` (a ``JobConfig``): degrees
    ``dit.sp_degree`` and its doublings within a node that split ``num_heads`` evenly
    (``plan.degree.allowed_degrees``), on the DiT ranks ``dit_ranks`` of ``topology``. What the engine runs and
    ``spmd-diff plan --prompts`` prints."""
    ranks = set(dit_ranks)
    ranks_by_node = [[r for r in topology.ranks_on_node(n) if r in ranks] for n in range(topology.num_nodes)]
    degrees = allowed_degrees(num_heads, max(len(r) for r in ranks_by_node), len(ranks), job.dit.sp_degree)
    work = [(item.index, WorkClass.of_video(job.video.for_item(item))) for item in items]
    return schedule_item_groups(work, ranks_by_node, cost, degrees)


def describe_item_groups(schedule: Sequence[ItemGroup], items: Sequence, job) -> str:
    """Lines for ``spmd-diff plan --prompts``: items per degree for each work class, and the predicted end."""
    by_index = {item.index: item for item in items}
    rows: dict[str, dict[int, int]] = {}
    for group in schedule:
        key = WorkClass.of_video(job.video.for_item(by_index[group.item])).key
        rows.setdefault(key, {})
        rows[key][group.degree] = rows[key].get(group.degree, 0) + 1
    end = max((g.start_s + g.seconds for g in schedule), default=0.0)
    lines = [f"per-item SP degree: {len(schedule)} item(s), predicted denoise makespan {end:,.1f} s"]
    for key in sorted(rows):
        shown = ", ".join(f"{n} at degree {d}" for d, n in sorted(rows[key].items()))
        lines.append(f"  {key}: {shown}")
    return "\n".join(lines)
