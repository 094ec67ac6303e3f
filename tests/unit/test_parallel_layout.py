"""One resolved parallel layout: each DiT group's own SP layout from the nodes its ranks landed on (pure)."""

import pytest

from spmd_diff.errors import UserError
from spmd_diff.parallel.layout import resolve_group_layout
from spmd_diff.plan.parallel_layout import resolve_parallel_layout
from spmd_diff.plan.roles import RolePlan, plan_roles, summarize_layouts
from spmd_diff.plan.topology import Topology

# Node 0 holds a whole group of 4; the second group is 2 ranks on each of nodes 1 and 2 (a 2 x 2 grid); the
# third has 3 ranks on node 3 and 1 on node 4 (no grid); ranks 12 and 13 encode and decode.
MIXED = Topology((0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 3, 4, 4, 4))
GROUPS = ((0, 1, 2, 3), (4, 5, 6, 7), (8, 9, 10, 11))


def mixed_plan(requested="auto", cfg_parallel=False):
    layout, shape = summarize_layouts(MIXED, GROUPS, requested)
    return RolePlan(14, (12,), GROUPS, (13,), layout, shape, cfg_parallel=cfg_parallel)


def test_each_group_runs_the_layout_of_where_it_landed():
    plan = mixed_plan()
    assert plan.sp_layout == "mixed"  # before: one group off-grid put every group on ring
    layout = resolve_parallel_layout(plan, MIXED, "auto", 12)
    got = [(g.sp.name, g.sp.outer, g.sp.inner) for g in layout.groups]
    assert got == [("ulysses", 1, 4), ("torus", 2, 2), ("ring", 4, 1)]
    assert [g.nodes for g in layout.groups] == [(0,), (1, 2), (3, 4)]
    assert layout.group_of_rank(5) is layout.groups[1] and layout.group_of_rank(12) is None
    assert layout.layout_counts() == {"ulysses 1x4": 1, "torus 2x2": 1, "ring 4x1": 1}
    text = layout.describe()
    assert "group 0: [0, 1, 2, 3] on node(s) [0]: ulysses over 4" in text and "torus 2x2" in text
    assert layout.to_dict()["layouts"] == layout.layout_counts()


def test_auto_balances_heads_per_group():
    """12 heads on 8 ranks of one node: a 2 x 4 grid (3 heads per rank), not Ulysses over 8 (1 or 2 heads)."""
    topo = Topology.uniform(1, 8, 8)
    plan = plan_roles(Topology.uniform(1, 8, 8), 0, 0, sp_degree=8)
    assert plan.sp_layout == "ulysses"
    (group,) = resolve_parallel_layout(plan, topo, "auto", 12).groups
    assert (group.sp.name, group.sp.outer, group.sp.inner) == ("torus", 2, 4)
    (group,) = resolve_parallel_layout(plan, topo, "auto", 40).groups
    assert (group.sp.name, group.sp.outer, group.sp.inner) == ("ulysses", 1, 8)
    # An explicit layout is taken as asked (uneven heads and all).
    (group,) = resolve_parallel_layout(plan, topo, "ulysses", 12).groups
    assert (group.sp.name, group.sp.inner) == ("ulysses", 8)


def test_cfg_halves_get_their_own_grid():
    plan = mixed_plan(cfg_parallel=True)
    layout = resolve_parallel_layout(plan, MIXED, "auto", 12)
    got = [(g.sp.name, g.sp.outer, g.sp.inner) for g in layout.groups]
    # halves: 2 ranks of node 0; 2 ranks of one node (each half one node of the 2 x 2); no grid -> ring over 2
    assert got == [("ulysses", 1, 2), ("ulysses", 1, 2), ("ring", 2, 1)]
    assert all(g.cfg_parallel for g in layout.groups)


def test_torus_asked_of_a_group_that_is_no_grid_is_an_error():
    with pytest.raises(UserError, match="torus"):
        mixed_plan("torus")
    with pytest.raises(UserError, match="torus"):
        resolve_parallel_layout(mixed_plan(), MIXED, "torus", 12)
    # The groups that are grids alone are fine.
    assert resolve_group_layout("torus", MIXED.node_of_rank, GROUPS[1], 12).torus_shape == (2, 2)


def test_uniform_plans_summarize_as_before():
    plan = plan_roles(Topology.uniform(2, 4, 4), 1, 1, sp_degree=2)
    assert (plan.sp_layout, plan.torus_shape) == ("ulysses", (1, 2))
    plan = plan_roles(Topology.uniform(3, 2), 1, 1, sp_degree=4)
    assert (plan.sp_layout, plan.torus_shape) == ("torus", (2, 2))
    layout = resolve_parallel_layout(plan, Topology.uniform(3, 2), "auto", 12)
    assert [(g.sp.name, g.sp.torus_shape) for g in layout.groups] == [("torus", (2, 2))]
