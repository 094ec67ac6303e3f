"""Which sequence-parallel layout a DiT group uses, from what the job got. Pure Python.

A layout is a grid of ``outer x inner`` ranks (group rank ``o * inner + i``) with two axes: Ulysses all-to-all
along the *inner* axis (the ``inner`` ranks sharing ``o``: inside a node), K/V exchange with log-sum-exp merging
along the *outer* axis (the ``outer`` ranks sharing ``i``: across nodes):

- ``ulysses`` is ``1 x S``; ``ring`` is ``S x 1``; ``torus`` is ``outer x inner`` with both > 1.

``auto`` keeps Ulysses inside a node and the torus across nodes (the planner's ``torus_shape``), and when the head
count does not divide the Ulysses degree it moves the factor that does not divide into the K/V-exchange axis
(Wan2.1-1.3B's 12 heads on 8 ranks of one node: a 2 x 4 grid, 3 heads per rank, instead of 2 heads on some ranks
and 1 on others). Explicit layouts are taken as asked: uneven head splits still work, only slower.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from spmd_diff.errors import UserError

LAYOUTS = ("auto", "ulysses", "ring", "torus")


@dataclass(frozen=True)
class SPLayout:
    """A resolved layout: the grid and how to exchange along each axis."""

    name: str
    """"none" (one rank), "ulysses", "ring" or "torus"."""
    outer: int
    """A: ranks along the K/V-exchange axis (across nodes)."""
    inner: int
    """B: ranks along the Ulysses axis (inside a node)."""
    num_chunks: int = 2
    """Torus: pieces each rank's K/V is cut into for the exchange along A (attention runs on the pieces that
    have landed while the next ones travel)."""

    def __post_init__(self) -> None:
        if self.outer < 1 or self.inner < 1 or self.num_chunks < 1:
            raise ValueError(f"bad layout {self}")
        expected = {"none": (1, 1)}.get(self.name)
        if expected is not None and (self.outer, self.inner) != expected:
            raise ValueError(f"layout 'none' is 1 x 1, got {self.outer} x {self.inner}")
        if self.name == "ulysses" and self.outer != 1 or self.name == "ring" and self.inner != 1:
            raise ValueError(f"layout {self.name!r} cannot be {self.outer} x {self.inner}")
        if self.name not in ("none", "ulysses", "ring", "torus"):
            raise ValueError(f"unknown layout {self.name!r}")

    @property
    def degree(self) -> int:
        return self.outer * self.inner

    @property
    def torus_shape(self) -> tuple[int, int]:
        return (self.outer, self.inner)

    def describe(self) -> str:
        if self.name in ("torus",):
            return f"torus {self.outer}x{self.inner} (Ulysses over {self.inner}, K/V exchange over {self.outer})"
        return f"{self.name} over {self.degree}"


def resolve_layout(requested: str, sp_degree: int, num_heads: int,
                   torus_shape: tuple[int, int] | None = None, num_chunks: int = 2) -> SPLayout:
    """The layout a group of ``sp_degree`` ranks uses for a model with ``num_heads`` attention heads.

    Args:
        requested: ``"auto"``, ``"ulysses"``, ``"ring"`` or ``"torus"`` (``dit.sp_layout``; the role plan's
            resolved ``sp_layout`` is fine too, and ``"none"`` means one rank).
        sp_degree: ranks in the group (``S``).
        num_heads: attention heads of the transformer (``H``).
        torus_shape: ``(nodes, ranks per node)`` of the group (``RolePlan.torus_shape``): the most the outer and
            the inner axis can be; ``None`` or ``(1, S)`` for a group inside one node. Required for ``"torus"``.
        num_chunks: torus K/V pieces per rank (see :class:`SPLayout`).

    Raises:
        UserError: for an unknown layout or a torus shape that does not multiply to ``sp_degree``.
    """
    if sp_degree < 1 or num_heads < 1:
        raise UserError(f"sp_degree and num_heads must be >= 1, got {sp_degree}, {num_heads}")
    if requested == "none" or sp_degree == 1:
        return SPLayout("none", 1, 1, num_chunks)
    if requested not in LAYOUTS:
        raise UserError(f"dit.sp_layout must be one of {', '.join(LAYOUTS)}, got {requested!r}")
    if torus_shape is not None:
        a, b = (int(x) for x in torus_shape)
        if a < 1 or b < 1 or a * b != sp_degree:
            raise UserError(f"torus shape {a} x {b} does not match dit.sp_degree={sp_degree}: A (nodes) x B "
                            f"(ranks per node) = {a} x {b} = {a * b}")
    else:
        a, b = 1, sp_degree
    if requested == "ulysses":
        return SPLayout("ulysses", 1, sp_degree, num_chunks)
    if requested == "ring":
        return SPLayout("ring", sp_degree, 1, num_chunks)
    if requested == "torus":
        if torus_shape is None:
            raise UserError("dit.sp_layout='torus' needs the grid (A nodes x B ranks per node); on one machine set "
                            "a virtual topology, e.g. --set world.ranks_per_node=2")
        return _grid(a, b, num_chunks)
    # auto: Ulysses over the in-node ranks, as far as the heads divide; the rest joins the exchange axis.
    inner = max(d for d in _divisors(b) if num_heads % d == 0)
    return _grid(a * (b // inner), inner, num_chunks)


def group_grid(node_of_rank: Sequence[int], group: Sequence[int]) -> tuple[int, int] | None:
    """``(A, B)``: the nodes a group's ranks sit on and its ranks on each, when every such node holds equally
    many of them (``(1, S)`` inside one node); ``None`` for an uneven spread (no grid)."""
    counts: dict[int, int] = {}
    for rank in group:
        node = node_of_rank[rank]
        counts[node] = counts.get(node, 0) + 1
    if len(set(counts.values())) != 1:
        return None
    return len(counts), next(iter(counts.values()))


def cfg_half_torus(torus_shape: tuple[int, int] | None, degree: int) -> tuple[int, int] | None:
    """The grid of one CFG half (ranks ``[0, k)`` or ``[k, 2k)`` of a node-major group of ``2k``): whole nodes
    when the group spans an even number of nodes, half of each node's ranks inside one node, else no grid."""
    if torus_shape is None:
        return None
    nodes, per_node = (int(x) for x in torus_shape)
    if nodes * per_node != degree:
        return None
    if nodes % 2 == 0:
        return (nodes // 2, per_node)
    if nodes == 1:
        return (1, per_node // 2)
    return None


def resolve_group_layout(requested: str, node_of_rank: Sequence[int], group: Sequence[int],
                         num_heads: int | None, cfg_parallel: bool = False, num_chunks: int = 2) -> SPLayout:
    """The layout one DiT group uses, from where its own ranks landed (``node_of_rank``: the topology's).

    The ranks that split the sequence are the group's, or with ``cfg_parallel`` each half of it (the halves'
    grid: :func:`cfg_half_torus`). ``"auto"``: Ulysses inside a node, the torus on a grid across nodes, ring
    across nodes without a grid -- each group by itself, so one group that spans nodes unevenly puts only
    itself on ring; with ``num_heads`` the head count is balanced as :func:`resolve_layout` does (``None``:
    the grid as it is, for summaries that do not know the model). Explicit layouts as asked; ``"torus"`` on a
    group (or CFG half) that is no grid is a :class:`UserError`.
    """
    degree = len(group)
    grid = group_grid(node_of_rank, group)
    if cfg_parallel:
        if degree % 2:
            raise UserError(f"CFG parallel needs DiT groups of an even size, got {degree}")
        grid = cfg_half_torus(grid, degree)
        degree //= 2
    if degree == 1 or requested == "none":
        return SPLayout("none", 1, 1, num_chunks)
    if requested == "torus" and grid is None:
        raise UserError("dit.sp_layout='torus' needs every DiT group to be an A x B grid (A nodes with B ranks "
                        "each); this allocation gives uneven groups. Use 'ring' or 'ulysses', or change the "
                        "ranks per node.")
    if requested == "auto" and grid is None:
        return SPLayout("ring", degree, 1, num_chunks)
    if requested == "auto" and num_heads is None:
        return _grid(grid[0], grid[1], num_chunks)
    return resolve_layout(requested, degree, num_heads or degree, grid, num_chunks)


def _grid(outer: int, inner: int, num_chunks: int) -> SPLayout:
    if outer == 1:
        return SPLayout("ulysses", 1, inner, num_chunks)
    if inner == 1:
        return SPLayout("ring", outer, 1, num_chunks)
    return SPLayout("torus", outer, inner, num_chunks)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def head_balance(num_heads: int, ulysses_degree: int) -> float:
    """Fraction of attention work the busiest rank does over the average (1.0: even); 12 heads on 8: 0.75."""
    return num_heads / (ulysses_degree * math.ceil(num_heads / ulysses_degree))
