"""The whole parallel layout as one resolved value: the role plan, and for each DiT group its ranks, the nodes
they landed on and the sequence-parallel layout it runs (its own: a group inside a node runs Ulysses while one
across nodes runs the torus or ring; the model's head count balanced). Pure Python, built by
:func:`resolve_parallel_layout`; the engine attaches each group's layout from it and ``spmd-diff plan`` prints it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from spmd_diff.parallel.layout import SPLayout, head_balance, resolve_group_layout
from spmd_diff.plan.roles import RolePlan
from spmd_diff.plan.topology import Topology


@dataclass(frozen=True)
class GroupLayout:
    """One DiT group."""

    ranks: tuple[int, ...]
    """Leader first, as in ``RolePlan.dit_groups``."""
    nodes: tuple[int, ...]
    """The nodes its ranks sit on, in increasing order."""
    sp: SPLayout
    """The layout of the ranks that split the sequence: the whole group, or each CFG half of it."""
    cfg_parallel: bool = False

    @property
    def degree(self) -> int:
        return len(self.ranks)

    def describe(self, num_heads: int) -> str:
        layout = self.sp.describe()
        if self.cfg_parallel:
            layout += " per CFG half"
        balance = head_balance(num_heads, self.sp.inner) if self.sp.name in ("ulysses", "torus") else 1.0
        heads = f", heads {num_heads} / {self.sp.inner}" + (f" (uneven: {balance:.2f})" if balance < 1 else "") \
            if self.sp.name in ("ulysses", "torus") else ""
        return f"{list(self.ranks)} on node(s) {list(self.nodes)}: {layout}{heads}"

    def to_dict(self) -> dict:
        return {"ranks": list(self.ranks), "nodes": list(self.nodes), "layout": self.sp.name,
                "grid": [self.sp.outer, self.sp.inner], "cfg_parallel": self.cfg_parallel}


@dataclass(frozen=True)
class ParallelLayout:
    """Roles, DiT groups and each group's SP layout, from the topology each group actually got."""

    plan: RolePlan
    groups: tuple[GroupLayout, ...]
    requested: str
    """``dit.sp_layout``."""
    num_heads: int

    @cached_property
    def _of_rank(self) -> dict[int, GroupLayout]:
        return {rank: group for group in self.groups for rank in group.ranks}

    def group_of_rank(self, rank: int) -> GroupLayout | None:
        """The DiT group ``rank`` belongs to (None for a rank outside every group)."""
        return self._of_rank.get(rank)

    def layout_counts(self) -> dict[str, int]:
        """Groups per resolved layout, e.g. ``{"ulysses 1x4": 3, "torus 2x2": 1}``."""
        counts: dict[str, int] = {}
        for group in self.groups:
            key = f"{group.sp.name} {group.sp.outer}x{group.sp.inner}"
            counts[key] = counts.get(key, 0) + 1
        return counts

    def describe(self, max_groups: int = 8) -> str:
        counts = ", ".join(f"{n} x {k}" for k, n in sorted(self.layout_counts().items()))
        lines = [f"parallel layout (dit.sp_layout={self.requested!r}, {self.num_heads} heads): {counts}"]
        shown: set[str] = set()
        for index, group in enumerate(self.groups):
            key = f"{group.sp.name} {group.sp.outer}x{group.sp.inner}"
            if index < max_groups or key not in shown:
                lines.append(f"  group {index}: {group.describe(self.num_heads)}")
            shown.add(key)
        if len(self.groups) > len(lines) - 1:
            lines.append(f"  ... {len(self.groups) - (len(lines) - 1)} more groups")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"requested": self.requested, "num_heads": self.num_heads, "layouts": self.layout_counts(),
                "groups": [g.to_dict() for g in self.groups[:64]], "num_groups": len(self.groups)}


def resolve_parallel_layout(plan: RolePlan, topology: Topology, requested: str, num_heads: int) -> ParallelLayout:
    """Each of ``plan``'s DiT groups with the layout it runs (``parallel.layout.resolve_group_layout``: from its
    own ranks' nodes in ``topology``, ``dit.sp_layout`` = ``requested``, ``num_heads`` balanced, CFG halves when
    ``plan.cfg_parallel``). Raises ``UserError`` where a group cannot run what was asked."""
    if plan.num_ranks != topology.num_ranks:
        raise ValueError(f"a plan of {plan.num_ranks} ranks on a topology of {topology.num_ranks}")
    node = topology.node_of_rank
    groups = tuple(GroupLayout(tuple(g), tuple(sorted({node[r] for r in g})),
                               resolve_group_layout(requested, node, g, num_heads,
                                                    plan.cfg_parallel and len(g) % 2 == 0),
                               plan.cfg_parallel)
                   for g in plan.dit_groups)
    return ParallelLayout(plan, groups, requested, num_heads)
