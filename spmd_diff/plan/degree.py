"""Per-item sequence-parallel degree: how many DiT ranks one item's group gets when it starts. Pure Python.

Throughput is best at the smallest degree (a group of S ranks runs at ``sp_efficiency(S)`` < 1 per rank), so an
item runs wide only where narrow would leave ranks idle: at the end of a job (or of a pass), an item that would
still be running long after the others have finished -- its degree-1 time is above what the pool as a whole has
left -- holds the job up, and a wider group finishes it sooner. The policy (:func:`pick_degree`):

1. the pool's fluid finish: ``(rank-seconds queued + running + this item's at the smallest degree) / pool ranks``
   -- when everything would end if the pool shared the work perfectly;
2. for each allowed degree (:func:`allowed_degrees`: the model's head count, ranks per node, the memory minimum)
   and node, when the item would end: the wait until that node has that many ranks free (0 if they are free
   now; else from the busy ranks' predicted ends) plus ``seconds(degree)``;
3. the smallest degree that ends within the fluid finish (the other work can then fill the other ranks), the
   earliest such start first; if none does, the degree and node at which the item ends soonest. Starting now
   at a narrow degree is never preferred to a short wait for a wide one when narrow would end later: at the end
   of a job that is what keeps one long item from running alone for minutes on one rank.

A choice with ``wait_s > 0`` (or no seat at all) means: do not start yet; ask again when ranks free up.

Every input is the same on every rank (the queue and the free ranks come from the group-free collectives, the
cost model from allgathered timings), so every rank picks the same degree. With ``degrees`` of one value this is
a fixed degree (``dit.sp_degree``) and the item waits until that many ranks of one node are free.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

from spmd_diff.plan.workload import WorkClass

OVERDUE_S = 1e-3
"""The wait counted for a busy rank already past its predicted end."""


def allowed_degrees(num_heads: int, ranks_per_node: int, num_ranks: int, min_degree: int = 1,
                    max_degree: int = 0) -> tuple[int, ...]:
    """Degrees a per-item group may take: ``min_degree`` (what memory needs; ``dit.sp_degree``) and its doublings,
    up to the ranks of one node (per-item groups stay inside a node: Ulysses over NVLink) and ``num_ranks``
    (``max_degree`` > 0 caps it further), keeping those whose Ulysses split divides the ``num_heads`` heads evenly
    (12 heads: 1, 2, 4 -- 8 would give some ranks 2 heads and others 1). ``min_degree`` itself always stays
    (a fixed choice is honoured even where it splits heads unevenly)."""
    if num_heads < 1 or ranks_per_node < 1 or num_ranks < 1 or min_degree < 1:
        raise ValueError(f"allowed_degrees needs positive counts, got heads={num_heads}, "
                         f"ranks_per_node={ranks_per_node}, num_ranks={num_ranks}, min_degree={min_degree}")
    limit = min(ranks_per_node, num_ranks)
    if max_degree > 0:
        limit = min(limit, max_degree)
    degrees = [min_degree]
    degree = 2 * min_degree
    while degree <= limit:
        if num_heads % degree == 0:
            degrees.append(degree)
        degree *= 2
    return tuple(degrees)


@dataclass(frozen=True)
class DegreeRequest:
    """What the policy sees when one item is about to start.

    Rank-seconds are seconds at speed 1.0 times ranks (the cost model's unit): a degree-2 denoise of 10 s is 20.
    """

    work_class: WorkClass
    """The item's own settings (height, width, num_frames, steps, guidance)."""
    free_ranks: tuple[int, ...]
    """DiT ranks free now, per node (a group is formed from one node's free ranks)."""
    pool_ranks: int
    """DiT ranks of the job in all (free and busy)."""
    queued_s: float = 0.0
    """Rank-seconds of the items waiting behind this one, each at the smallest allowed degree
    (:func:`queued_rank_seconds`)."""
    running_s: float = 0.0
    """Rank-seconds still to run of the items the busy ranks hold."""
    busy_until: tuple[tuple[float, ...], ...] = ()
    """Per node (as ``free_ranks``), the predicted seconds from now until each of its busy DiT ranks is free (any
    order; empty: unknown, only free ranks are considered)."""

    def __post_init__(self) -> None:
        if self.pool_ranks < 1 or any(n < 0 for n in self.free_ranks) or sum(self.free_ranks) > self.pool_ranks:
            raise ValueError(f"bad degree request: free {self.free_ranks} of a pool of {self.pool_ranks}")
        if self.queued_s < 0 or self.running_s < 0:
            raise ValueError(f"negative work in a degree request: queued {self.queued_s}, running {self.running_s}")
        if self.busy_until and len(self.busy_until) != len(self.free_ranks):
            raise ValueError(f"busy_until has {len(self.busy_until)} nodes, free_ranks {len(self.free_ranks)}")


@dataclass(frozen=True)
class DegreeChoice:
    degree: int
    """The group's size (0: no allowed degree can ever be seated: the item waits for free ranks)."""
    node: int
    """The node whose ranks form the group (of those that seat it soonest, the one with the fewest free ranks;
    -1 with degree 0)."""
    seconds: float
    """Predicted denoise wall time of the item at ``degree``."""
    finish_s: float
    """The pool's fluid finish the choice was measured against (seconds from now)."""
    wait_s: float = 0.0
    """Predicted seconds until ``node`` has ``degree`` ranks free (0: they are free now)."""

    @property
    def waits(self) -> bool:
        """Do not start the item now (ask again when ranks free up)."""
        return self.degree == 0 or self.wait_s > 0


def pick_degree(cost, request: DegreeRequest, degrees: Sequence[int], stage: str = "denoise") -> DegreeChoice:
    """The degree ``request``'s item starts at (see the module docstring).

    Args:
        cost: anything with ``seconds(stage, work_class, sp_degree)`` (a fitted ``CostModel``; group wall time).
        request: the item, the free ranks per node, the work queued and running.
        degrees: the allowed degrees (:func:`allowed_degrees`), any order; the smallest is what queued work is
            counted at.
        stage: the stage whose time the degree changes.
    """
    if not degrees or min(degrees) < 1:
        raise ValueError(f"pick_degree needs allowed degrees >= 1, got {tuple(degrees)}")
    allowed = sorted(set(degrees))
    base = allowed[0]
    own = base * cost.seconds(stage, request.work_class, base)
    finish = (request.queued_s + request.running_s + own) / request.pool_ranks
    options = []  # (ends at, wait, degree, free ranks on the node, node)
    for degree in allowed:
        seconds = cost.seconds(stage, request.work_class, degree)
        for node, free in enumerate(request.free_ranks):
            wait = _wait_for(degree, free, request.busy_until[node] if request.busy_until else ())
            if wait is not None:
                options.append((wait + seconds, wait, degree, free, node, seconds))
    if not options:
        return DegreeChoice(0, -1, 0.0, finish)
    within = [o for o in options if o[0] <= finish * (1 + 1e-9)]
    if within:
        _, wait, degree, _, node, seconds = min(within, key=lambda o: (o[2], o[1], o[3], o[4]))
    else:
        _, wait, degree, _, node, seconds = min(options, key=lambda o: (o[0], o[2], o[3], o[4]))
    return DegreeChoice(degree, node, seconds, finish, wait)


def _wait_for(degree: int, free: int, busy_until: Sequence[float]) -> float | None:
    """Seconds until ``degree`` ranks of a node are free (None: the node never has that many); a rank past its
    predicted end is still busy: at least ``OVERDUE_S``."""
    if free >= degree:
        return 0.0
    if free + len(busy_until) < degree:
        return None
    return max(OVERDUE_S, sorted(busy_until)[degree - free - 1])


def queued_rank_seconds(cost, classes: Iterable[WorkClass], degree: int = 1, stage: str = "denoise") -> float:
    """Rank-seconds of ``classes`` (one entry per item) in ``stage`` at ``degree``: a :class:`DegreeRequest`'s
    ``queued_s``."""
    cache: dict[WorkClass, float] = {}
    total = 0.0
    for work_class in classes:
        if work_class not in cache:
            cache[work_class] = degree * cost.seconds(stage, work_class, degree)
        total += cache[work_class]
    return total
