"""Per-item sequence-parallel degree: how many DiT ranks one item's group gets when it starts. Pure Python.

Throughput is best at the smallest degree (a group of S ranks runs at ``sp_efficiency(S)`` < 1 per rank), so an
item runs wide only where narrow would leave ranks idle: at the end of a job (or of a pass), an item that would
still be running long after the others have finished -- its degree-1 time is above what the pool as a whole has
left -- holds the job up, and a wider group finishes it sooner. The policy (:func:`pick_degree`):

1. the degrees open now: the allowed ones (:func:`allowed_degrees`: the model's head count, ranks per node, the
   memory minimum) that the free ranks of one node can seat;
2. the pool's fluid finish: ``(rank-seconds queued + running + this item's at the smallest degree) / pool ranks``
   -- when everything would end if the pool shared the work perfectly;
3. the smallest open degree at which the item ends within that finish (its ``seconds(degree)``; the leftover work
   can then fill the other ranks); if none does, the open degree at which it ends soonest.

Every input is the same on every rank (the queue and the free ranks come from the group-free collectives, the
cost model from allgathered timings), so every rank picks the same degree. With ``degrees`` of one value this is
a fixed degree (``dit.sp_degree``) and the item waits until that many ranks of one node are free.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

from spmd_diff.plan.workload import WorkClass


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

    def __post_init__(self) -> None:
        if self.pool_ranks < 1 or any(n < 0 for n in self.free_ranks) or sum(self.free_ranks) > self.pool_ranks:
            raise ValueError(f"bad degree request: free {self.free_ranks} of a pool of {self.pool_ranks}")
        if self.queued_s < 0 or self.running_s < 0:
            raise ValueError(f"negative work in a degree request: queued {self.queued_s}, running {self.running_s}")


@dataclass(frozen=True)
class DegreeChoice:
    degree: int
    """The group's size (0: no allowed degree fits the free ranks of any node: the item waits)."""
    node: int
    """The node whose free ranks form the group (the one with the fewest free ranks that seat it; -1 if waiting)."""
    seconds: float
    """Predicted denoise wall time of the item at ``degree``."""
    finish_s: float
    """The pool's fluid finish the choice was measured against (seconds from now)."""

    @property
    def waits(self) -> bool:
        return self.degree == 0


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
    most_free = max(request.free_ranks, default=0)
    open_now = [d for d in allowed if d <= most_free]
    if not open_now:
        return DegreeChoice(0, -1, 0.0, finish)
    timed = [(d, cost.seconds(stage, request.work_class, d)) for d in open_now]
    within = [(d, s) for d, s in timed if s <= finish * (1 + 1e-9)]
    degree, seconds = within[0] if within else min(timed, key=lambda ds: (ds[1], ds[0]))
    node = min((n for n, free in enumerate(request.free_ranks) if free >= degree),
               key=lambda n: (request.free_ranks[n], n))
    return DegreeChoice(degree, node, seconds, finish)


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
