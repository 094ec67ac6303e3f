"""The batch rule of roles.policy = "auto" (runtime/rebalance.py): batches double while the plan and the kind of item
hold, start short again after a re-plan or at a new kind, hold one kind, the last takes what is left, and every
rank cuts the same batches from the same values."""

from __future__ import annotations

from spmd_diff.runtime.rebalance import batch_length, batches_since_change, next_batch


def one_kind(item):
    return "k"


def cut_all(pending, base_items, switches_after, kind=one_kind):
    """The engine's loop over the batches (engine._run_rank), with a re-plan after the batch numbers in
    ``switches_after``; the bases the policy gives are ``base_items(batch number)``."""
    batches, start, number, since = [], 0, 0, 0
    while True:
        batch = next_batch(pending, start, base_items(number), since, kind)
        batches.append(batch)
        start += len(batch)
        if start >= len(pending):
            return batches
        since = batches_since_change(pending, start, since, number in switches_after, kind)
        number += 1


def test_batches_double_while_the_plan_holds():
    assert [batch_length(5, k) for k in range(5)] == [5, 10, 20, 40, 80]
    batches = cut_all(list(range(100)), lambda _: 4, switches_after=())
    assert [len(b) for b in batches] == [4, 8, 16, 32, 40]  # the last takes the rest: 5 drains, not 25


def test_a_replan_starts_short_batches_again():
    batches = cut_all(list(range(100)), lambda _: 4, switches_after={1})
    assert [len(b) for b in batches] == [4, 8, 4, 8, 16, 32, 28]


def test_a_new_plan_s_base_applies_from_the_batch_after_the_replan():
    batches = cut_all(list(range(60)), lambda number: 4 if number < 2 else 6, switches_after={1})
    assert [len(b) for b in batches] == [4, 8, 6, 12, 24, 6]


def test_a_batch_holds_one_kind_and_a_new_kind_starts_short_batches_again():
    pending = [("long", i) for i in range(30)] + [("short", i) for i in range(50)]
    batches = cut_all(pending, lambda _: 4, switches_after=(), kind=lambda item: item[0])
    assert [len(b) for b in batches] == [4, 8, 16, 2, 4, 8, 16, 22]
    assert all(len({kind for kind, _ in batch}) == 1 for batch in batches)


def test_every_item_once_in_order_and_the_same_cut_on_every_rank():
    pending = [(i // 300, i) for i in range(1000)]
    per_rank = [cut_all(list(pending), lambda n: 3 + n % 2, switches_after={2, 3, 7}, kind=lambda item: item[0])
                for _ in range(4)]
    assert all(cuts == per_rank[0] for cuts in per_rank)
    assert [item for batch in per_rank[0] for item in batch] == pending


def test_edges():
    assert next_batch([], 0, 4, 0, one_kind) == []  # an empty job runs one empty batch
    assert next_batch(list(range(3)), 0, 0, 0, one_kind) == [0]  # at least one item
    assert len(next_batch(list(range(10 ** 6)), 0, 2, 10 ** 6, one_kind)) == 10 ** 6  # the rest, no overflow
    assert next_batch(list(range(10)), 8, 4, 0, one_kind) == [8, 9]


def test_the_first_batch_gives_every_pipeline_the_same_whole_number_of_items():
    from spmd_diff.runtime.rebalance import batch_size_for

    assert batch_size_for(300.0, 62.5, 64, minimum=128) == 5 * 64  # 4.8 items each: 5 each, not 308 in all
    assert batch_size_for(300.0, 60.0, 8, minimum=16) == 5 * 8  # exactly 5 each: not 6
    assert batch_size_for(0.5, 62.5, 4, minimum=8) == 8  # at least the minimum


def test_auto_sizes_a_kind_s_first_batch_by_that_kind_s_cost_and_only_re_planning_or_time_sharing_cuts_kinds():
    """A 4-step kind's first batch holds ~12x the items of a 50-step kind's (each about roles.batch_s of its own
    work), not the job's class's count; "auto" and time-shared plans hold one kind per batch, a static plan of
    dedicated or co-located stages runs every kind in one batch (no drain between kinds)."""
    import dataclasses

    from spmd_diff.plan.cost_model import AnalyticPrior, CostModel
    from spmd_diff.plan.for_job import JobPlanning
    from spmd_diff.plan.memory import MemoryModel
    from spmd_diff.plan.model_sizes import WAN21_T2V_1_3B
    from spmd_diff.plan.planner import PlanInputs, PlannerSettings
    from spmd_diff.plan.roles import plan_roles
    from spmd_diff.plan.topology import Topology
    from spmd_diff.plan.workload import WorkClass
    from spmd_diff.runtime.rebalance import AutoPolicy, FixedPolicy

    fifty, four = WorkClass(480, 832, 81, 50, True), WorkClass(480, 832, 81, 4, True)
    topology = Topology.uniform(1, 8, 8)
    inputs = PlanInputs(topology, MemoryModel.for_model(WAN21_T2V_1_3B), 141 << 30, PlannerSettings())
    cost = CostModel(AnalyticPrior(WAN21_T2V_1_3B))
    policy = AutoPolicy(JobPlanning(inputs, fifty, cost, WAN21_T2V_1_3B), 1000, batch_s=300.0)
    plan = policy.plan
    groups = len(plan.dit_groups)
    per_item = {c: max(cost.item_seconds(c, plan.sp_degree).values()) for c in (fifty, four)}
    for work_class in (fifty, four):  # the same whole number per group: ceil(300 s / its slowest stage)
        expected = max(2, -(-300.0 // per_item[work_class])) * groups
        assert policy.batch_items(plan, 1000, work_class) == expected, work_class
    assert policy.batch_items(plan, 1000, four) >= 8 * policy.batch_items(plan, 1000, fifty)
    assert policy.one_kind_per_batch(plan)
    static, shared = plan_roles(topology, 0, 0, 1), dataclasses.replace(plan_roles(topology, 0, 0, 1),
                                                                         time_shared=True, stage_batch=8)
    assert FixedPolicy().batch_items(static, 1000, fifty) == 1000
    assert not FixedPolicy().one_kind_per_batch(static) and FixedPolicy().one_kind_per_batch(shared)
