"""Per-item SP degree (``dit.per_item_degree``): which ranks render which item, in which order. Pure Python.

Every rank computes the same schedule from the same inputs (the pending items' work classes, the DiT ranks per
node, the cost model, the allowed degrees), so no rank has to tell another which group to join: the schedule is
a list-scheduling run over predicted time.

Order: items start longest first (``LONGEST_FIRST``): by predicted encode + denoise at the smallest allowed
degree, longest first, ties in prompts-file order. A job's makespan is set by its tail; started last, one long
item (a 720p 50-step render: 245 s on one H200) runs alone for minutes while the other ranks idle, and started
first it overlaps the rest of the job, the short items filling the ranks at the end. Output does not depend on
the order (a video depends only on its own prompt, seed and settings; the store is per item). ``FILE_ORDER``
keeps the prompts file's order (the simulator's comparison).

When an item starts, ``plan.degree.pick_degree`` chooses its degree and node from the ranks free at that
(predicted) moment, the work still queued and the ranks still busy; its group is that many free ranks of that
node, the lowest first (the leader). The group is busy for the item's encode plus its denoise at that degree;
the leader then decodes and writes it (on its own threads, beside its next item, but on the same GPU: the
schedule counts that time on the leader).

Running it (``loops.item_group_loop``): each rank takes part in its own assignments in schedule order, forming
each group with ``GroupCollectives.group`` (local, microseconds). The assignments are one total order, and
every rank follows its share of it in that order, so every group's collectives find all its members, however
far the real times drift from the predicted ones (a rank ahead of time waits in its next group's first
collective, under the usual deadline): no deadlock, exactly the schedule's groups.

Pulled instead (:func:`runs_pulled`): a schedule that runs every item at the job's fixed degree (``dit.sp_degree``,
:func:`widens_any`) is not run: the plan's own DiT groups of that degree pull the items from the shared queue in
the same order (not with ``dit.compile`` at degree 1 on GPUs, where the per-item path compiles every item and the
fixed path would not: other bf16 rounding, another recorded ``dit_compile``). A
schedule is fixed before the job, so a rank whose items run a few percent long ends late while others idle;
pulled items absorb that (up to 6% of makespan at 512 GPUs, perf/results/simulate-degree-2026-12-03*.md).

Cost: ``pick_degree`` is asked with one node per free-rank count while the item can start narrow now (nodes
alike but for their index); only where it would wait or widen (a job's tail) with, per degree, the one node that
seats it soonest (the same choice as over every node). 10^5 items on 4,096 ranks: about 10 s on a 2-core VM
(perf/results/simulate-degree-2026-12-03.md).
"""

from __future__ import annotations

import bisect
import heapq
from dataclasses import dataclass
from typing import Sequence

from spmd_diff.plan.degree import OVERDUE_S, DegreeRequest, allowed_degrees, pick_degree
from spmd_diff.plan.topology import Topology
from spmd_diff.plan.workload import WorkClass

LONGEST_FIRST = "longest_first"
FILE_ORDER = "file"
ORDERS = (LONGEST_FIRST, FILE_ORDER)


@dataclass(frozen=True)
class ItemGroup:
    """One item's group: ``ranks`` (world ranks, the leader first) render item ``item`` (its ``Item.index``)."""

    item: int
    ranks: tuple[int, ...]
    start_s: float
    """Predicted start, seconds from the job's start."""
    seconds: float
    """Predicted busy seconds of the group (encode + denoise at this degree)."""
    leader_s: float = 0.0
    """Predicted seconds the leader then spends on the item's decode and write."""

    @property
    def degree(self) -> int:
        return len(self.ranks)


def start_order(items: Sequence[tuple[int, WorkClass]], cost, degree: int, order: str = LONGEST_FIRST) -> list[int]:
    """Positions in ``items`` in the order they start: ``LONGEST_FIRST`` by predicted encode + denoise at
    ``degree`` (the smallest allowed), longest first, ties in the given order; ``FILE_ORDER`` as given."""
    if order not in ORDERS:
        raise ValueError(f"unknown item order {order!r} (one of {ORDERS})")
    if order == FILE_ORDER:
        return list(range(len(items)))
    seconds: dict[WorkClass, float] = {}
    for _, work_class in items:
        if work_class not in seconds:
            seconds[work_class] = cost.seconds("encode", work_class, 1) + cost.seconds("denoise", work_class, degree)
    return sorted(range(len(items)), key=lambda k: -seconds[items[k][1]])  # stable: ties keep their order


def schedule_item_groups(items: Sequence[tuple[int, WorkClass]], ranks_by_node: Sequence[Sequence[int]], cost,
                         degrees: Sequence[int], order: str = LONGEST_FIRST) -> list[ItemGroup]:
    """The groups of ``items`` (``(Item.index, work class)`` in prompts-file order) on the DiT ranks
    ``ranks_by_node``.

    Args:
        cost: ``seconds(stage, work_class, sp_degree)`` (a ``CostModel``): encode and denoise are scheduled on
            the group, decode and write on its leader.
        degrees: the allowed degrees (``plan.degree.allowed_degrees``); each must fit some node.
        order: ``LONGEST_FIRST`` or ``FILE_ORDER`` (:func:`start_order`).

    Returns:
        One :class:`ItemGroup` per item, in the order the items start (a total order every rank shares).
    """
    nodes = [sorted(ranks) for ranks in ranks_by_node]
    if not degrees or min(degrees) > max(len(ranks) for ranks in nodes):
        raise ValueError(f"no node has {min(degrees or [0])} DiT ranks (nodes: {[len(r) for r in nodes]})")
    pool = sum(len(ranks) for ranks in nodes)
    base = min(degrees)
    cost = _Remembered(cost)
    free = [list(ranks) for ranks in nodes]
    counts = [len(f) for f in free]
    by_count: list[list[int]] = [[] for _ in range(max(counts) + 1)]  # heaps of nodes by free ranks (stale kept)
    for node, n in enumerate(counts):
        heapq.heappush(by_count[n], node)

    def lowest_with(n: int) -> int | None:
        """The lowest node with ``n`` free ranks (stale heap entries dropped as met)."""
        heap = by_count[n]
        while heap and counts[heap[0]] != n:
            heapq.heappop(heap)
        return heap[0] if heap else None

    def set_free(node: int, ranks: list[int]) -> None:
        free[node] = ranks
        counts[node] = len(ranks)
        heapq.heappush(by_count[len(ranks)], node)

    busy: list[tuple[float, int, int, tuple[int, ...]]] = []  # (ends at, seq, node, ranks)
    node_ends: list[list[float]] = [[] for _ in nodes]  # per node, the busy ranks' ends, sorted
    allowed = sorted(set(degrees))
    busy_rank_s, busy_ranks = 0.0, 0  # over ``busy``: sum of ranks x end, and the ranks
    now, seq = 0.0, 0
    per_class: dict[WorkClass, tuple[float, float, float]] = {}  # (own rank-seconds, encode, decode + write)
    for _, work_class in items:
        if work_class not in per_class:
            per_class[work_class] = (base * cost.seconds("denoise", work_class, base),
                                     cost.seconds("encode", work_class, 1),
                                     cost.seconds("decode", work_class, 1) + cost.seconds("write", work_class, 1))
    remaining = sum(per_class[wc][0] for _, wc in items)
    schedule: list[ItemGroup] = []
    for position in start_order(items, cost, base, order):
        index, work_class = items[position]
        own, encode_s, leader_s = per_class[work_class]
        remaining -= own
        queued = max(0.0, remaining)
        while True:
            choice = None
            # Nodes with as many free ranks are alike while the busy ranks' ends are left out: the lowest of each.
            alike = sorted((node, n) for n in range(base, len(by_count))
                           for node in (lowest_with(n),) if node is not None)
            if alike:
                running_s = max(0.0, busy_rank_s - now * busy_ranks)
                quick = pick_degree(cost, DegreeRequest(work_class, tuple(n for _, n in alike), pool, queued,
                                                        running_s), degrees)
                if quick.degree == base and not quick.waits and quick.seconds <= quick.finish_s * (1 + 1e-9):
                    choice = (base, alike[quick.node][0], quick.seconds)  # what the full view picks as well
                else:
                    # The full view, cut to the node that seats each degree soonest (fewest free ranks, then
                    # lowest: pick_degree's own tie order): pick_degree chooses the same among those alone.
                    best: dict[int, tuple[float, int, int]] = {}
                    for node, n in enumerate(counts):
                        ends = node_ends[node]
                        for degree in allowed:
                            if n >= degree:
                                wait = 0.0
                            elif n + len(ends) >= degree:
                                wait = max(OVERDUE_S, ends[degree - n - 1] - now)
                            else:
                                continue
                            if degree not in best or (wait, n, node) < best[degree]:
                                best[degree] = (wait, n, node)
                    seats = sorted({node for _, _, node in best.values()})
                    full = pick_degree(cost, DegreeRequest(
                        work_class, tuple(counts[node] for node in seats), pool, queued, running_s,
                        tuple(tuple(end - now for end in node_ends[node]) for node in seats)), degrees)
                    if not full.waits:
                        choice = (full.degree, seats[full.node], full.seconds)
            if choice is not None:
                break
            if not busy:  # all ranks free and still no seat: allowed_degrees let a degree no node has through
                raise ValueError(f"no group of the degrees {tuple(degrees)} fits the nodes {[len(r) for r in nodes]}")
            now = max(now, busy[0][0])  # on to the next group's end: it, and any ending with it, free their ranks
            while busy and busy[0][0] <= now:
                end, _, node, ranks = heapq.heappop(busy)
                busy_rank_s -= end * len(ranks)
                busy_ranks -= len(ranks)
                for _ in ranks:
                    node_ends[node].remove(end)
                set_free(node, sorted(free[node] + list(ranks)))
            if not busy:
                busy_rank_s, busy_ranks = 0.0, 0  # no drift left over from the sums
        degree, node, denoise_s = choice
        ranks = tuple(free[node][:degree])
        set_free(node, free[node][degree:])
        seconds = encode_s + denoise_s
        for held, end in ((ranks[1:], now + seconds), (ranks[:1], now + seconds + leader_s)):
            if held:
                heapq.heappush(busy, (end, seq, node, held))
                for _ in held:
                    bisect.insort(node_ends[node], end)
                busy_rank_s += end * len(held)
                busy_ranks += len(held)
                seq += 1
        schedule.append(ItemGroup(index, ranks, now, seconds, leader_s))
    return schedule


class _Remembered:
    """``cost.seconds`` remembered per (stage, class, degree): the schedule asks the same few many times."""

    def __init__(self, cost) -> None:
        self._cost, self._seen = cost, {}

    def seconds(self, stage: str, work_class: WorkClass, sp_degree: int = 1) -> float:
        key = (stage, work_class, sp_degree)
        if key not in self._seen:
            self._seen[key] = self._cost.seconds(stage, work_class, sp_degree)
        return self._seen[key]


def assignments_of(schedule: Sequence[ItemGroup], rank: int) -> list[ItemGroup]:
    """``rank``'s share of ``schedule``, in schedule order."""
    return [group for group in schedule if rank in group.ranks]


def job_item_groups(job, items: Sequence, dit_ranks: Sequence[int], topology: Topology, cost,
                    num_heads: int) -> list[ItemGroup]:
    """The schedule of ``items`` (``io.inputs.Item``, in prompts-file order; they start longest first) for
    ``job`` (a ``JobConfig``): degrees ``dit.sp_degree`` and its doublings within a node that split
    ``num_heads`` evenly (``plan.degree.allowed_degrees``), on the DiT ranks ``dit_ranks`` of ``topology``. What
    the engine runs and ``spmd-diff plan --prompts`` prints."""
    ranks = set(dit_ranks)
    ranks_by_node = [[r for r in topology.ranks_on_node(n) if r in ranks] for n in range(topology.num_nodes)]
    degrees = allowed_degrees(num_heads, max(len(r) for r in ranks_by_node), len(ranks), job.dit.sp_degree)
    work = [(item.index, WorkClass.of_video(job.video.for_item(item))) for item in items]
    return schedule_item_groups(work, ranks_by_node, cost, degrees)


def widens_any(schedule: Sequence[ItemGroup], fixed_degree: int) -> bool:
    """Whether ``schedule`` runs any item at another degree than ``fixed_degree`` (``dit.sp_degree``); if not, the
    job's DiT groups of that degree pull the items instead (see the module docstring)."""
    return any(group.degree != fixed_degree for group in schedule)


def runs_pulled(schedule: Sequence[ItemGroup], job, on_gpu: bool) -> bool:
    """Whether the engine runs ``schedule`` (``dit.per_item_degree``) as the job's fixed-degree DiT groups pulling
    the items instead (see the module docstring): it widens no item, and the fixed path renders the same videos."""
    compiled_only_per_item = on_gpu and job.dit.compile and job.dit.sp_degree == 1
    return bool(schedule) and not widens_any(schedule, job.dit.sp_degree) and not compiled_only_per_item


def describe_item_groups(schedule: Sequence[ItemGroup], items: Sequence, job, on_gpu: bool) -> str:
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
    if runs_pulled(schedule, job, on_gpu):
        lines.append(f"  every item at dit.sp_degree = {job.dit.sp_degree}: the DiT groups pull them from the "
                     f"shared queue (no precomputed schedule)")
    return "\n".join(lines)
