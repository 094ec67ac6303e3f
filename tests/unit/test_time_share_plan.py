"""Time-shared ranks in the auto planner (``roles.time_share``): every rank holds every stage, one stage's
components on its GPU at a time. Pure Python: fake worlds of 1 to 4,096 ranks, synthetic costs and timings."""

import math
import time

import pytest

from _plan_synth import synthetic_timings
from spmd_diff.errors import UserError
from spmd_diff.plan.cost_model import CostModel, TablePrior
from spmd_diff.plan.memory import GIB, H200_USABLE_BYTES, MemoryModel
from spmd_diff.plan.model_sizes import WAN21_T2V_1_3B
from spmd_diff.plan.planner import (PlanInputs, PlannerSettings, cycle_move_seconds, plan_auto, predict_plan,
                                    time_shared_plan)
from spmd_diff.plan.replan import Rebalancer, SwitchCostModel, changed_ranks, replan
from spmd_diff.plan.topology import Topology
from spmd_diff.plan.workload import WorkClass, Workload

C480 = WorkClass(480, 832, 81, 4, True)
C480_50 = WorkClass(480, 832, 81, 50, True)
MEMORY = MemoryModel.for_model(WAN21_T2V_1_3B)
NO_COLOCATION = 14 * GIB
"""Each of the 1.3B model's stages fits alone at 480p (encode 12.1, denoise 5.7, decode 11.8 GiB), no two together."""
TRUE_S = {"encode": 0.09, "denoise": 5.03, "decode": 3.5, "write": 0.34}


def truth(stage, work_class, degree=1):
    return TRUE_S[stage] * (12.5 if stage == "denoise" and work_class.num_steps == 50 else 1.0) / degree


def table(speeds=None):
    prior = TablePrior(tuple(((s, c.key, 1), truth(s, c)) for c in (C480, C480_50) for s in TRUE_S))
    return CostModel(prior, rank_speeds=tuple(enumerate(speeds)) if speeds else ())


def inputs(num_nodes, per_node, gpu_bytes=NO_COLOCATION, **settings):
    return PlanInputs(Topology.uniform(num_nodes, per_node, per_node), MEMORY, gpu_bytes, PlannerSettings(**settings))


def test_a_time_shared_rank_fits_when_each_stage_alone_fits():
    assert MEMORY.fits_time_shared([C480], NO_COLOCATION)
    assert not any(MEMORY.fits(s, [C480], NO_COLOCATION) for s in (("denoise", "decode"), ("encode", "denoise"),
                                                                   ("encode", "decode")))
    assert MEMORY.time_shared_bytes([C480]) == MEMORY.rank_bytes(("encode",), [C480])  # the text encoder's stage
    assert not MEMORY.fits_time_shared([C480], 12 * GIB)  # 12.1 GiB to encode
    # Host memory: the three components, and per item of a cycle its two embeddings (CFG) and its latents.
    components = 2 * 5.68e9 + 2 * 1.42e9 + 4 * 127e6
    per_item = 2 * 512 * 4096 * 2 + 16 * 21 * 60 * 104 * 4
    assert math.isclose(MEMORY.time_shared_host_bytes([C480], 8), components + 8 * per_item, rel_tol=0.01)


def test_memory_too_small_for_colocation_gives_time_shared_ranks_where_they_beat_dedicated_stages():
    workload = Workload.uniform(C480, 8 * 24)
    shared_inputs = inputs(1, 8)
    plan = plan_auto(shared_inputs, workload, table())
    assert plan.time_shared and plan.stage_batch == 8 and plan.role_counts() == {"time-shared": 8}
    assert all(plan.stages_of(r) == ("encode", "denoise", "decode") for r in range(8))
    assert plan.dit_groups == tuple((r,) for r in range(8)) and not plan.encoders and not plan.decoders
    dedicated = plan_auto(inputs(1, 8, time_share=False), workload, table())
    assert not dedicated.time_shared and set(dedicated.role_counts()) == {"encoder", "dit", "decoder"}
    shared_s = predict_plan(plan, workload, table(), inputs=shared_inputs).seconds
    dedicated_s = predict_plan(dedicated, workload, table()).seconds
    assert shared_s < 0.9 * dedicated_s
    # The prediction: the fluid share of all work per rank, 3 cycles of moves (13.7 GiB at 10 GB/s), half an item.
    item = sum(TRUE_S.values())
    move = (2 * 5.68e9 + 2 * 1.42e9 + 4 * 127e6) / 10e9
    assert math.isclose(cycle_move_seconds(shared_inputs), move, rel_tol=0.01)
    assert math.isclose(shared_s, 24 * item + 3 * move + item / 2, rel_tol=0.01)
    assert plan.predicted_videos_per_hour == pytest.approx(3600 * 192 / shared_s)


def test_dedicated_stages_win_where_moves_cost_more_than_a_reserved_gpu():
    # At 0.2 GB/s a cycle's moves take over a minute: 8 items of 9 s each cannot pay for them.
    plan = plan_auto(inputs(1, 8, host_to_gpu_bytes_per_s=0.2e9), Workload.uniform(C480, 800), table())
    assert not plan.time_shared and set(plan.role_counts()) == {"encoder", "dit", "decoder"}


@pytest.mark.parametrize("gib", [0, 40, 30])
def test_enough_memory_for_every_stage_never_time_shares(gib):
    for work_class in (C480, C480_50):
        plan = plan_auto(inputs(2, 8, gib * GIB if gib else H200_USABLE_BYTES), Workload.uniform(work_class, 1600),
                         table())
        assert not plan.time_shared and plan.role_counts() == {"all": 16}


def test_a_stage_that_fits_nowhere_is_a_clear_error():
    workload = Workload.uniform(C480, 80)
    with pytest.raises(UserError, match=r"no role plan fits.*encode 12.1 GiB"):
        plan_auto(inputs(1, 8, 11 * GIB), workload, table())
    with pytest.raises(UserError, match=r"roles.time_share: .*each stage alone.*11.0 GiB.*encode 12.1 GiB"):
        plan_auto(inputs(1, 8, 11 * GIB, time_share=True), workload, table())


def test_time_share_false_never_and_true_always():
    workload = Workload.uniform(C480, 800)
    for per_node in (3, 8):
        assert not plan_auto(inputs(1, per_node, time_share=False), workload, table()).time_shared
    with pytest.raises(UserError, match='no role plan fits.*roles.time_share = "auto" or true'):
        plan_auto(inputs(1, 2, time_share=False), workload, table())  # two ranks cannot hold three stages
    for gpu_bytes in (NO_COLOCATION, H200_USABLE_BYTES):
        plan = plan_auto(inputs(1, 8, gpu_bytes, time_share=True, stage_batch=3), workload, table())
        assert plan.time_shared and plan.stage_batch == 3 and plan.predicted_videos_per_hour > 0
    # Colocation off: no rank holds two stages, not even in turn.
    assert not plan_auto(inputs(1, 8, colocate=False), workload, table()).time_shared


@pytest.mark.parametrize("num_nodes,per_node", [(1, 1), (1, 2), (1, 8), (64, 8), (512, 8), (4096, 1)])
def test_time_shared_plans_from_1_to_4096_ranks(num_nodes, per_node):
    num_ranks = num_nodes * per_node
    inp = inputs(num_nodes, per_node)
    workload = Workload.uniform(C480, 24 * num_ranks)
    started = time.perf_counter()
    auto = plan_auto(inp, workload, table())
    assert time.perf_counter() - started < 1.0
    shared = plan_auto(inputs(num_nodes, per_node, time_share=True), workload, table())
    assert shared.time_shared and shared.num_ranks == num_ranks and len(shared.dit_groups) == num_ranks
    assert shared.to_dict()["time_shared"] and shared.to_dict()["stage_batch"] == 8
    assert "time-shared" in shared.describe() and "8 item(s) per cycle" in shared.describe()
    if num_ranks < 3:  # fewer ranks than stages: time-sharing is the only plan
        assert auto.same_roles(shared)
        return
    # Otherwise time-shared exactly where predicted faster than dedicated stages by the margin (8 ranks: 12%;
    # from 64 ranks on, dedicated pools round well and the 4-step items' moves cost more than the margin).
    dedicated = plan_auto(inputs(num_nodes, per_node, time_share=False), workload, table())
    shared_s = predict_plan(shared, workload, table(), inputs=inp).seconds
    dedicated_s = predict_plan(dedicated, workload, table()).seconds
    assert auto.time_shared == (shared_s < 0.97 * dedicated_s) and auto.time_shared == (num_ranks == 8)
    assert auto.same_roles(shared if auto.time_shared else dedicated)


def test_predicting_a_time_shared_plan_needs_its_inputs():
    inp = inputs(1, 4)
    plan = time_shared_plan(inp, Workload.uniform(C480, 8))
    with pytest.raises(ValueError, match="PlanInputs"):
        predict_plan(plan, Workload.uniform(C480, 8), table())
    # Fewer items than ranks: one item's time and one cycle of moves.
    seconds = predict_plan(plan, Workload.uniform(C480, 2), table(), inputs=inp).seconds
    assert math.isclose(seconds, sum(TRUE_S.values()) + cycle_move_seconds(inp), rel_tol=1e-9)


def test_slow_ranks_take_shorter_cycles_or_dedicated_stages():
    workload = Workload.uniform(C480, 8 * 24)
    slow = table([0.5] * 4 + [1.0] * 4)
    plan = plan_auto(inputs(2, 4), workload, slow)
    assert plan.time_shared and 1 < plan.stage_batch < 8  # a slow rank's last cycle of 8 would end 36 s late
    even = plan_auto(inputs(2, 4), workload, table())
    assert even.stage_batch == 8


def test_a_switch_to_and_from_time_shared_ranks_counts_its_cost():
    inp = inputs(1, 8)
    workload = Workload.uniform(C480, 8 * 100)
    dedicated = plan_auto(inputs(1, 8, time_share=False), workload, table())
    decision = replan(inp, dedicated, workload, table())
    assert decision.switch and decision.best.time_shared
    assert changed_ranks(dedicated, decision.best) == tuple(range(8))
    # Every rank loads the components it lacked (into host memory): a DiT rank the text encoder and the VAE.
    costs = SwitchCostModel(drain_fraction=0.0)
    dit_rank = dedicated.dit_groups[0][0]
    assert costs.seconds(dedicated, decision.best, MEMORY, 9.0) > costs.fixed_s + \
        (MEMORY.component_bytes("encode") + MEMORY.component_bytes("decode")) / costs.load_bytes_per_s * \
        sum(1 for r in range(8) if dedicated.stages_of(r) == ("denoise",)) / 8
    assert dedicated.stages_of(dit_rank) == ("denoise",)
    assert decision.switch_cost_s > 0 and decision.threshold_s > 1.5 * decision.switch_cost_s
    # Back: the components a rank keeps come from host memory at the host-to-GPU bandwidth.
    back = costs.seconds(decision.best, dedicated, MEMORY, 9.0)
    faster = costs.seconds(decision.best, dedicated, MEMORY, 9.0, move_bytes_per_s=1e15)
    expected = sum(MEMORY.component_bytes(dedicated.stages_of(r)[0]) for r in range(8)) / 10e9 / 8
    assert back > faster >= costs.fixed_s and math.isclose(back - faster, expected, rel_tol=1e-4)
    # A switch that only changes the cycle size moves no rank.
    assert changed_ranks(decision.best, time_shared_plan(inp, workload)) == ()


@pytest.mark.parametrize("noise", [0.1, 0.3])
def test_no_flip_flop_under_noisy_timings(noise):
    inp = inputs(1, 8)
    remaining = 8 * 40
    balancer = Rebalancer.start(inp, Workload.uniform(C480, remaining), table())
    assert balancer.plan.time_shared
    for batch in range(12):
        timings = synthetic_timings(balancer.plan, truth, Workload.uniform(C480, 16), noise=noise, seed=batch)
        remaining -= 16
        balancer, decision = balancer.after_batch(timings, Workload.uniform(C480, remaining))
    assert balancer.num_switches == 0 and balancer.plan.time_shared


def test_cycles_are_filled_evenly_up_to_the_stage_batch():
    # 12 items per rank in cycles of at most 8: two cycles of 6, not 8 then 4 (the same moves, a shorter end).
    inp = inputs(1, 8)
    assert [time_shared_plan(inp, Workload.uniform(C480_50, 8 * n)).stage_batch for n in (12, 24, 9, 3, 100)] == \
        [6, 8, 5, 3, 8]
    assert time_shared_plan(inputs(1, 8, stage_batch=1), Workload.uniform(C480, 96)).stage_batch == 1
