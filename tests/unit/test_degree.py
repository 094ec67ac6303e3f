"""The per-item degree policy (spmd_diff.plan.degree) on synthetic costs: pure Python."""

import pytest

from spmd_diff.plan.cost_model import CostModel, TablePrior, sp_efficiency
from spmd_diff.plan.degree import DegreeRequest, allowed_degrees, pick_degree, queued_rank_seconds
from spmd_diff.plan.workload import WorkClass

SMALL = WorkClass(480, 832, 81, 4, True)
LARGE = WorkClass(720, 1280, 81, 50, True)
COST = CostModel(TablePrior((
    (("denoise", SMALL.key, 1), 5.0),
    (("denoise", LARGE.key, 1), 245.0),
)))
"""Denoise seconds at degree 1; wider groups at 0.94 efficiency per doubling (TablePrior)."""


def test_allowed_degrees_follow_heads_node_and_minimum():
    assert allowed_degrees(12, 8, 64) == (1, 2, 4)  # 8 does not divide 12 heads
    assert allowed_degrees(40, 8, 64) == (1, 2, 4, 8)
    assert allowed_degrees(40, 8, 2) == (1, 2)  # no wider than the job
    assert allowed_degrees(40, 4, 64) == (1, 2, 4)  # no wider than a node
    assert allowed_degrees(40, 8, 64, min_degree=2) == (2, 4, 8)
    assert allowed_degrees(12, 8, 64, max_degree=2) == (1, 2)
    assert allowed_degrees(12, 8, 64, min_degree=3) == (3, 6)
    with pytest.raises(ValueError):
        allowed_degrees(0, 8, 8)


def test_long_queue_keeps_items_narrow():
    """Plenty of work behind the item: every rank is needed, so the most efficient degree (the smallest)."""
    queued = queued_rank_seconds(COST, [LARGE] * 40 + [SMALL] * 40)
    for item in (SMALL, LARGE):
        choice = pick_degree(COST, DegreeRequest(item, (8, 8), 16, queued_s=queued), (1, 2, 4, 8))
        assert choice.degree == 1, choice
        assert choice.seconds == pytest.approx(COST.seconds("denoise", item, 1))


def test_tail_item_runs_wide_enough_to_end_with_the_rest():
    """Little left: a large item at degree 1 would end long after the pool's fluid finish; it takes the smallest
    degree that ends within it, not the widest."""
    queued = queued_rank_seconds(COST, [SMALL] * 20)  # 100 rank-seconds
    request = DegreeRequest(LARGE, (8,), 8, queued_s=queued, running_s=0.0)
    choice = pick_degree(COST, request, (1, 2, 4, 8))
    finish = (100 + 245) / 8
    assert choice.finish_s == pytest.approx(finish)
    assert 245 / (8 * sp_efficiency(8)) <= finish < 245 / (4 * sp_efficiency(4))
    assert choice.degree == 8
    # A larger pool with more running work: a narrower group suffices.
    request = DegreeRequest(LARGE, (8, 8), 16, queued_s=queued, running_s=16 * 60.0)
    choice = pick_degree(COST, request, (1, 2, 4, 8))
    finish = (100 + 16 * 60 + 245) / 16
    assert choice.degree == 4 and 245 / (4 * sp_efficiency(4)) <= finish < 245 / (2 * sp_efficiency(2))


def test_last_item_takes_the_widest_open_degree():
    choice = pick_degree(COST, DegreeRequest(SMALL, (3, 4), 8), (1, 2, 4, 8))
    assert (choice.degree, choice.node) == (4, 1)  # 8 not free on one node; 4 fits node 1 only


def test_group_is_seated_on_the_tightest_node_that_fits():
    choice = pick_degree(COST, DegreeRequest(LARGE, (6, 2, 4), 16), (1, 2))
    assert (choice.degree, choice.node) == (2, 1)


def test_fixed_degree_waits_for_free_ranks():
    choice = pick_degree(COST, DegreeRequest(SMALL, (1, 1), 8, queued_s=1000.0), (2,))
    assert choice.waits and choice.node == -1
    choice = pick_degree(COST, DegreeRequest(SMALL, (1, 2), 8, queued_s=1000.0), (2,))
    assert (choice.degree, choice.node) == (2, 1)


def test_narrowest_open_degree_when_the_minimum_is_not_free():
    """Degree 1 is allowed but nothing is free: wait; degrees above the free count are never picked."""
    assert pick_degree(COST, DegreeRequest(SMALL, (0, 0), 8, running_s=80.0), (1, 2)).waits
    choice = pick_degree(COST, DegreeRequest(LARGE, (1,), 8, running_s=7 * 10.0), (1, 2, 4))
    assert choice.degree == 1


def test_bad_requests_are_refused():
    with pytest.raises(ValueError):
        DegreeRequest(SMALL, (9,), 8)
    with pytest.raises(ValueError):
        DegreeRequest(SMALL, (1,), 8, queued_s=-1.0)
    with pytest.raises(ValueError):
        pick_degree(COST, DegreeRequest(SMALL, (1,), 8), ())


def test_a_long_item_at_the_end_waits_briefly_for_a_wider_group():
    """One rank free now, three more on the node within 2 s: the last large item starts on 4 ranks in 2 s
    (ends at ~71 s) rather than on 1 rank now (245 s)."""
    request = DegreeRequest(LARGE, (1,), 4, running_s=6.0, busy_until=((2.0, 1.0, 0.5),))
    choice = pick_degree(COST, request, (1, 2, 4))
    assert choice.waits and (choice.degree, choice.node) == (4, 0)
    assert choice.wait_s == pytest.approx(2.0)
    assert choice.seconds == pytest.approx(245 / (4 * sp_efficiency(4)))
    # The same with much work left: degree 1 ends within the pool's finish, so it starts now.
    busy = DegreeRequest(LARGE, (1,), 4, queued_s=4000.0, busy_until=((2.0, 1.0, 0.5),))
    choice = pick_degree(COST, busy, (1, 2, 4))
    assert (choice.degree, choice.waits) == (1, False)


def test_an_overdue_rank_still_counts_as_busy():
    request = DegreeRequest(LARGE, (0,), 1, busy_until=((0.0,),))
    choice = pick_degree(COST, request, (1,))
    assert choice.waits and choice.degree == 1 and choice.wait_s > 0
    with pytest.raises(ValueError):
        DegreeRequest(LARGE, (0, 1), 4, busy_until=((1.0,),))
