"""The cost model fitted from timings, and re-planning with hysteresis: pure, synthetic timings, no MPI."""

import json

import pytest

from _plan_synth import synthetic_timings
from spmd_diff.plan.cost_model import AnalyticPrior, CostModel, TablePrior
from spmd_diff.plan.memory import GIB, H200_USABLE_BYTES, MemoryModel
from spmd_diff.plan.model_sizes import WAN21_T2V_1_3B
from spmd_diff.plan.planner import PlanInputs, PlannerSettings, plan_auto
from spmd_diff.plan.replan import Rebalancer, SwitchCostModel, replan
from spmd_diff.plan.roles import RolePlan, place_ranks
from spmd_diff.plan.timings import VECTOR_LENGTH, RankTimings, StageSample, summarize
from spmd_diff.plan.topology import Topology
from spmd_diff.plan.workload import WorkClass, Workload, horizon, runs_of

C480 = WorkClass(480, 832, 81, 4, True)
C480_50 = WorkClass(480, 832, 81, 50, True)
C720 = WorkClass(720, 1280, 81, 4, True)
MEMORY = MemoryModel.for_model(WAN21_T2V_1_3B)
TRUE_S = {"encode": 0.09, "denoise": 5.03, "decode": 3.5, "write": 0.34}


def truth(stage, work_class, degree=1):
    seconds = TRUE_S[stage] * (12.5 if stage == "denoise" and work_class.num_steps == 50 else 1.0)
    return seconds / degree


def table(fn, classes=(C480, C480_50)):
    return CostModel(TablePrior(tuple(((s, c.key, 1), fn(s, c, 1)) for c in classes for s in TRUE_S)))


def memcap_inputs(num_nodes=8, per_node=8):
    """No co-location, and time-sharing off: re-planning between shapes of ranks with dedicated stages
    (test_time_share.py re-plans to and from time-shared ranks)."""
    return PlanInputs(Topology.uniform(num_nodes, per_node, per_node), MEMORY, 14 * GIB,
                      PlannerSettings(time_share=False))


def test_refit_recovers_stage_costs_and_rank_speeds():
    inputs = PlanInputs(Topology.uniform(8, 8, 8), MEMORY, H200_USABLE_BYTES)
    cost = CostModel(AnalyticPrior(WAN21_T2V_1_3B))
    plan = plan_auto(inputs, Workload.uniform(C480, 640), cost)
    speeds = [0.5 if r < 8 else 1.0 for r in range(64)]
    for batch in range(3):
        cost = cost.refit(synthetic_timings(plan, truth, Workload.uniform(C480, 640), speeds, 0.05, batch))
    fast = cost.speed(63)
    for stage, seconds in TRUE_S.items():  # at the fast ranks' speed
        assert cost.seconds(stage, C480) / fast == pytest.approx(seconds, rel=0.03), stage
    assert all(cost.speed(r) / fast == pytest.approx(0.5, rel=0.05) for r in range(8))
    # A class never measured: the prior scaled by what was learnt on the measured one.
    prior = AnalyticPrior(WAN21_T2V_1_3B)
    assert cost.seconds("decode", C720) == pytest.approx(
        prior.seconds("decode", C720) * cost.seconds("decode", C480) / prior.seconds("decode", C480), rel=1e-6)


def test_slow_node_is_told_from_a_slow_stage_once_a_rank_links_them():
    # Dedicated roles: batch 1 has every denoise on the slow node, so "slow node" and "slow denoise" look alike;
    # after a re-plan moves one fast rank to denoise, the history links the two and the slow node stands out.
    inputs = memcap_inputs(2, 4)
    cost = table(truth, (C480,))
    speeds = [0.5] * 4 + [1.0] * 4
    plan = _node_blocks(plan_auto(inputs, Workload.uniform(C480, 80), cost), inputs.topology)
    assert {r for g in plan.dit_groups for r in g} <= set(range(4))
    balancer = Rebalancer(inputs, cost, plan)
    for batch in range(6):
        timings = synthetic_timings(balancer.plan, truth, Workload.uniform(C480, 32), speeds, 0.03, batch)
        balancer, _ = balancer.after_batch(timings, Workload.uniform(C480, 400))
    ratio = balancer.cost.speed(0) / balancer.cost.speed(7)
    assert ratio == pytest.approx(0.5, rel=0.1)


def _node_blocks(plan, topology):
    """``plan``'s role counts with non-DiT ranks taken in whole node blocks from the last node (what
    ``roles.place_ranks`` does), not spread over the nodes as a first auto plan is."""
    aux = [r for r in range(plan.num_ranks) if "denoise" not in plan.stages_of(r)]
    chosen, groups = place_ranks(topology, len(aux), 1)
    stages = [plan.stages_of(plan.dit_groups[0][0])] * plan.num_ranks
    for rank, old in zip(chosen, aux):
        stages[rank] = plan.stages_of(old)
    return RolePlan(plan.num_ranks, tuple(sorted(r for r in chosen if "encode" in stages[r])), tuple(groups),
                    tuple(sorted(r for r in chosen if "decode" in stages[r])), "none", (1, 1), tuple(stages), "auto")


def test_first_plan_spreads_stages_over_nodes_so_one_batch_finds_a_slow_node():
    """Every stage runs on both nodes from the first plan, so after one batch the slow node's ranks are fitted
    at half the speed of the fast node's ranks of the same stage (comparing speeds across stages needs a rank
    that held both: the test above)."""
    inputs = memcap_inputs(2, 4)
    cost = table(truth, (C480,))
    speeds = [0.5] * 4 + [1.0] * 4
    plan = plan_auto(inputs, Workload.uniform(C480, 80), cost)
    node = inputs.topology.node_of_rank
    for stage in ("denoise", "decode"):
        assert {node[r] for r in plan.ranks_with(stage)} == {0, 1}, stage
    timings = synthetic_timings(plan, truth, Workload.uniform(C480, 32), speeds, 0.03, 0)
    balancer, _ = Rebalancer(inputs, cost, plan).after_batch(timings, Workload.uniform(C480, 400))
    for stage in ("denoise", "decode"):
        slow = [balancer.cost.speed(r) for r in plan.ranks_with(stage) if node[r] == 0]
        fast = [balancer.cost.speed(r) for r in plan.ranks_with(stage) if node[r] == 1]
        assert max(slow) / min(fast) == pytest.approx(0.5, rel=0.1), stage
        assert min(slow) / max(fast) == pytest.approx(0.5, rel=0.1), stage


def test_planner_given_measured_timings_converges_to_the_right_split():
    # The prior thinks decoding is twice as fast as it is: the first plan has too few decoders.
    inputs = memcap_inputs()
    wrong = table(lambda s, c, d: truth(s, c, d) * (0.5 if s == "decode" else 1.0))
    workload = Workload.uniform(C480, 6400)
    right = plan_auto(inputs, workload, table(truth))
    balancer = Rebalancer.start(inputs, workload, wrong)
    assert len(balancer.plan.decoders) < len(right.decoders) - 5
    plans = [balancer.plan]
    for batch in range(8):
        timings = synthetic_timings(balancer.plan, truth, Workload.uniform(C480, 128), None, 0.05, batch)
        workload = Workload.uniform(C480, 6400 - 128 * (batch + 1))
        balancer, decision = balancer.after_batch(timings, workload)
        plans.append(balancer.plan)
    assert abs(len(balancer.plan.decoders) - len(right.decoders)) <= 1, (balancer.plan.role_counts(), right)
    assert balancer.num_switches <= 2


def _flip_flops(plans):
    distinct = [plans[0]]
    for plan in plans[1:]:
        if not plan.same_roles(distinct[-1]):
            distinct.append(plan)
    return sum(1 for i, p in enumerate(distinct) for q in distinct[:max(0, i - 1)] if p.same_roles(q))


@pytest.mark.parametrize("noise", [0.1, 0.3])
def test_hysteresis_never_flip_flops_under_noisy_timings(noise):
    inputs = memcap_inputs()
    remaining = 6400
    balancer = Rebalancer.start(inputs, Workload.uniform(C480, remaining), table(truth))
    loose = Rebalancer(PlanInputs(inputs.topology, inputs.memory, inputs.gpu_bytes,
                                  PlannerSettings(min_gain_fraction=0.0, switch_cost_factor=0.0,
                                                  persist_batches=1 << 30, time_share=False)), balancer.cost,
                          balancer.plan)
    plans, loose_plans = [balancer.plan], [loose.plan]
    for batch in range(30):
        remaining -= 128
        workload = Workload.uniform(C480, remaining)
        timings = synthetic_timings(balancer.plan, truth, Workload.uniform(C480, 128), None, noise, batch)
        balancer, _ = balancer.after_batch(timings, workload)
        plans.append(balancer.plan)
        timings = synthetic_timings(loose.plan, truth, Workload.uniform(C480, 128), None, noise, batch)
        loose, _ = loose.after_batch(timings, workload)
        loose_plans.append(loose.plan)
    assert balancer.num_switches <= 1 and _flip_flops(plans) == 0, [p.role_counts() for p in plans]
    assert loose.num_switches > balancer.num_switches  # the noise is real: without hysteresis plans do move


def test_a_new_pass_of_50_step_items_switches_to_more_denoising():
    inputs = memcap_inputs()
    runs = runs_of([C480] * 640 + [C480_50] * 640)
    cost = table(truth)
    balancer = Rebalancer.start(inputs, horizon(runs, 128), cost)
    first = balancer.plan
    assert horizon(runs, 128) == Workload.uniform(C480, 640)
    timings = synthetic_timings(first, truth, Workload.uniform(C480, 128))
    balancer, decision = balancer.after_batch(timings, horizon(runs_of([C480] * 100 + [C480_50] * 640), 128))
    assert decision.switch and "gain" in decision.reason
    assert len(balancer.plan.dit_ranks) > len(first.dit_ranks) + 10
    event = json.loads(json.dumps(decision.to_event()))
    assert event["switch"] and event["old_plan"]["policy"] == "auto" and event["gain_s"] > event["threshold_s"]
    assert event["workload"] == {C480.key: 100, C480_50.key: 640}
    assert set(event["timings"]["stages"]) == {"encode", "denoise", "decode", "write"}


def test_a_switch_that_does_not_pay_for_itself_is_not_taken():
    inputs = memcap_inputs()
    cost = table(truth)
    current = plan_auto(inputs, Workload.uniform(C480, 6400), cost)
    fifty = Workload.uniform(C480_50, 2)  # two items left: the better plan for them gains less than it costs
    decision = replan(inputs, current, fifty, cost, SwitchCostModel(rolling=False))
    assert not decision.switch and decision.plan is current and decision.gain_s < decision.threshold_s


def test_a_plan_that_no_longer_fits_is_replaced_whatever_the_gain():
    cost = table(truth)
    roomy = PlanInputs(Topology.uniform(1, 8, 8), MEMORY, H200_USABLE_BYTES)
    current = plan_auto(roomy, Workload.uniform(C480, 800), cost)
    tight = PlanInputs(roomy.topology, MEMORY, 14 * GIB, PlannerSettings(time_share=False))
    decision = replan(tight, current, Workload.uniform(C480, 800), cost)
    assert decision.switch and "GiB" in decision.reason
    assert all(len(decision.plan.stages_of(r)) == 1 for r in range(8))


def test_switch_cost_rolling_counts_only_the_ranks_that_change():
    inputs = memcap_inputs()
    cost = table(truth)
    a = plan_auto(inputs, Workload.uniform(C480, 6400), cost)
    b = plan_auto(inputs, Workload.uniform(C480_50, 6400), cost)
    changed = sum(1 for r in range(64) if a.stages_of(r) != b.stages_of(r))
    rolling = SwitchCostModel(measured_load_s=(("denoise", 1.0), ("decode", 0.5), ("encode", 5.0)))
    seconds = rolling.seconds(a, b, MEMORY, 60.0)
    assert 0 < changed and seconds == pytest.approx(
        sum(2.0 + (1.0 if "denoise" in b.stages_of(r) else 0.5) + 0.5 * 60.0 for r in range(64)
            if a.stages_of(r) != b.stages_of(r)) / 64)
    barrier = SwitchCostModel(rolling=False, measured_load_s=rolling.measured_load_s)
    assert barrier.seconds(a, b, MEMORY, 60.0) == pytest.approx(2.0 + 30.0 + 1.0)
    assert rolling.seconds(a, a, MEMORY, 60.0) == 0.0


def test_a_switch_moves_as_few_ranks_as_the_new_counts_need():
    inputs = memcap_inputs()
    cost = table(truth)
    current = plan_auto(inputs, Workload.uniform(C480, 6400), cost)
    more_decoding = table(lambda s, c, d: truth(s, c, d) * (1.3 if s == "decode" else 1.0))
    moved = plan_auto(inputs, Workload.uniform(C480, 6400), more_decoding, current)
    grown = len(moved.decoders) - len(current.decoders)
    assert grown > 0 and set(current.decoders) <= set(moved.decoders)
    assert sum(1 for r in range(64) if moved.stages_of(r) != current.stages_of(r)) == grown


def test_measured_memory_peaks_reach_the_planner():
    inputs = PlanInputs(Topology.uniform(1, 4, 4), MEMORY, 30 * GIB)
    cost = table(truth)
    balancer = Rebalancer.start(inputs, Workload.uniform(C480, 400), cost)
    assert balancer.plan.role_counts() == {"all": 4}
    timings = synthetic_timings(balancer.plan, truth, Workload.uniform(C480, 16))
    timings[0] = RankTimings(0, timings[0].samples, peaks=(("decode", C480.key, 1, 20 * GIB),))
    balancer, decision = balancer.after_batch(timings, Workload.uniform(C480, 384))
    # No rank can hold every stage resident any more: dedicated stages, or time-shared ranks.
    assert decision.switch and "all" not in balancer.plan.role_counts()


def test_timings_round_trip_the_wire_and_summarize():
    record = RankTimings(3, (StageSample("denoise", C480.key, 2, 4, 10.0), StageSample("decode", C480.key, 1, 2, 7.0)),
                         idle_s=1.5, wait_s=0.25, elapsed_s=20.0)
    vector = record.to_vector()
    assert len(vector) == VECTOR_LENGTH and all(isinstance(v, float) or isinstance(v, int) for v in vector)
    assert RankTimings.from_vector(3, [float(v) for v in vector], C480.key, 2) == record
    with pytest.raises(AssertionError):  # two work classes do not fit one vector
        RankTimings(3, (StageSample("decode", C480.key, 1, 2, 7.0),
                        StageSample("encode", C480_50.key, 1, 2, 1.0))).to_vector()
    other = RankTimings(4, (StageSample("denoise", C480.key, 2, 4, 10.0),))
    summary = summarize([record, other])
    assert summary["stages"]["denoise"] == {"items": 4.0, "busy_s": 20.0} and summary["idle_s"] == 1.5


def test_horizon_follows_the_next_batch():
    runs = runs_of([C480] * 10 + [C480_50] * 5 + [C480] * 3)
    assert runs == ((C480, 10), (C480_50, 5), (C480, 3))
    assert horizon(runs, 4) == Workload.uniform(C480, 10)
    assert horizon(runs, 12) == Workload.of({C480: 13, C480_50: 5})
    mixed = runs_of([C480, C480_50] * 50)
    assert horizon(mixed, 8) == Workload.of({C480: 50, C480_50: 50})
    assert WorkClass.from_key(C480_50.key) == C480_50 and C480.num_tokens == 32760
