"""The auto planner on fake worlds of 1 to 4,096 ranks and synthetic costs: no MPI, no torch."""

import math
import time

import pytest

from spmd_diff.errors import UserError
from spmd_diff.plan.cost_model import CostModel, TablePrior
from spmd_diff.plan.memory import GIB, H200_USABLE_BYTES, MemoryModel
from spmd_diff.plan.model_sizes import WAN21_T2V_1_3B, WAN21_T2V_14B
from spmd_diff.plan.planner import PlanInputs, PlannerSettings, candidate_degrees, plan_auto, predict_plan
from spmd_diff.plan.roles import plan_roles
from spmd_diff.plan.topology import Topology
from spmd_diff.plan.workload import WorkClass, Workload

C480 = WorkClass(480, 832, 81, 4, True)
C720 = WorkClass(720, 1280, 81, 4, True)
MEMORY = MemoryModel.for_model(WAN21_T2V_1_3B)
NO_COLOCATION = 14 * GIB
"""No two of the 1.3B model's stages fit together at 480p (encode 12.1, denoise 5.7, decode 11.8, denoise+decode
14.5 GiB)."""


def table_cost(encode=0.09, denoise=5.03, decode=3.5, write=0.34, work_class=C480):
    """Stage seconds for ``work_class``, and for 720p 4-step items (x4 denoise, x2.3 decode and write)."""
    table = {(s, C720.key, 1): v for s, v in (("encode", encode), ("denoise", 4 * denoise), ("decode", 2.3 * decode),
                                             ("write", 2.3 * write))}
    table.update({(s, work_class.key, 1): v for s, v in (("encode", encode), ("denoise", denoise),
                                                         ("decode", decode), ("write", write))})
    return CostModel(TablePrior(tuple(sorted(table.items()))))


def inputs(num_nodes, per_node, gpu_bytes=H200_USABLE_BYTES, **settings):
    """Time-sharing off unless asked for: these tests are about the shapes of ranks with dedicated stages
    (test_time_share.py has the time-shared candidate)."""
    settings.setdefault("time_share", False)
    return PlanInputs(Topology.uniform(num_nodes, per_node, per_node), MEMORY, gpu_bytes, PlannerSettings(**settings))


def count(plan, role):
    return sum(1 for r in range(plan.num_ranks) if plan.role_of(r) == role)


def check_plan(plan, inp, workload):
    """Integer and memory constraints every plan must meet."""
    sp = plan.sp_degree
    assert all(len(g) == sp for g in plan.dit_groups)
    dit = [r for g in plan.dit_groups for r in g]
    assert len(dit) == len(set(dit)) == len(plan.dit_groups) * sp
    for rank in range(plan.num_ranks):
        stages = plan.stages_of(rank)
        assert stages, f"rank {rank} does nothing"
        assert ("denoise" in stages) == (rank in dit)
        assert inp.memory.fits(stages, workload.classes, inp.gpu_bytes, sp), (rank, stages)
    for stage in ("encode", "denoise", "decode"):
        assert plan.ranks_with(stage), f"nobody holds {stage}"
    assert set(plan.encoders) == {r for r in range(plan.num_ranks) if r not in dit and "encode" in plan.stages_of(r)}
    assert set(plan.decoders) == {r for r in range(plan.num_ranks) if r not in dit and "decode" in plan.stages_of(r)}


def test_everything_fits_so_no_gpu_is_reserved_for_a_small_stage():
    inp = inputs(1, 8)
    plan = plan_auto(inp, Workload.uniform(C480, 800), table_cost())
    assert plan.role_counts() == {"all": 8} and not plan.encoders and not plan.decoders
    assert plan.policy == "auto" and plan.predicted_videos_per_hour > 0
    check_plan(plan, inp, Workload.uniform(C480, 800))


def test_dit_bound_reserves_no_gpu_for_decode():
    # 50-step items: the DiT is 95% of the work. At 15 GiB the DiT fits with the VAE (14.5 GiB) but not with the
    # text encoder (16.0): one encoder is dedicated and every other GPU denoises and decodes.
    inp = inputs(8, 8, gpu_bytes=15 * GIB)
    workload = Workload.uniform(WorkClass(480, 832, 81, 50, True), 6400)
    plan = plan_auto(inp, workload, table_cost(denoise=62.5, work_class=workload.classes[0]))
    assert not plan.decoders and plan.decode_on_dit
    assert count(plan, "dit+decoder") == 64 - len(plan.encoders) and 1 <= len(plan.encoders) <= 2
    check_plan(plan, inp, workload)
    everything_fits = plan_auto(inputs(8, 8), workload, table_cost(denoise=62.5, work_class=workload.classes[0]))
    assert everything_fits.role_counts() == {"all": 64}


def test_memory_too_small_for_colocation_gives_separate_roles():
    inp = inputs(8, 8, gpu_bytes=NO_COLOCATION)
    workload = Workload.uniform(C480, 6400)
    plan = plan_auto(inp, workload, table_cost())
    assert all(len(plan.stages_of(r)) == 1 for r in range(64))
    assert set(plan.role_counts()) == {"encoder", "dit", "decoder"}
    check_plan(plan, inp, workload)


@pytest.mark.parametrize("decode_share", [0.1, 0.25, 0.4])
def test_decode_capacity_grows_with_its_share_of_the_work(decode_share):
    inp = inputs(8, 8, gpu_bytes=NO_COLOCATION)
    workload = Workload.uniform(C480, 6400)
    per_item = 10.0
    plan = plan_auto(inp, workload, table_cost(encode=0.05, denoise=per_item * (1 - decode_share),
                                               decode=per_item * decode_share, write=0.0))
    decoders = len(plan.decoders)
    # Dedicated decoders track the decode share of the work (integers: within two ranks of proportional).
    assert abs(decoders - decode_share * 63) <= 2, (decode_share, plan.role_counts())


def test_more_decode_work_never_means_fewer_decoders():
    inp = inputs(8, 8, gpu_bytes=NO_COLOCATION)
    workload = Workload.uniform(C480, 6400)
    counts = [len(plan_auto(inp, workload, table_cost(decode=d)).decoders) for d in (1.0, 2.0, 3.5, 5.0, 8.0)]
    assert counts == sorted(counts) and counts[-1] > counts[0]


def test_colocation_can_be_turned_off():
    inp = inputs(1, 8, colocate=False)
    workload = Workload.uniform(C480, 800)
    plan = plan_auto(inp, workload, table_cost())
    assert all(len(plan.stages_of(r)) == 1 for r in range(8)) and len(plan.encoders) == 1
    check_plan(plan, inp, workload)


def test_partial_colocation_never_reserves_a_gpu_for_the_tiny_encode_stage():
    # 20 GiB: the DiT fits with the VAE (14.5 GiB) or with the text encoder (16.0), not with both. A dedicated
    # encoder would idle 98% of the time; encoding on the DiT ranks and decoding on dedicated ranks wastes nothing.
    inp = inputs(2, 8, gpu_bytes=20 * GIB)
    workload = Workload.uniform(C480, 1600)
    plan = plan_auto(inp, workload, table_cost())
    assert not plan.encoders and plan.encode_on_dit and not plan.decode_on_dit
    assert set(plan.role_counts()) == {"dit+encoder", "decoder"}
    check_plan(plan, inp, workload)
    # At 15 GiB only DiT+VAE co-locate: then the encoder is dedicated, and is only one.
    plan = plan_auto(inputs(2, 8, gpu_bytes=15 * GIB), workload, table_cost())
    assert plan.role_counts() == {"dit+decoder": 15, "encoder": 1}


@pytest.mark.parametrize("num_nodes,per_node,gib", [
    (1, 1, 0), (1, 2, 14), (1, 3, 14), (1, 8, 14), (2, 4, 20), (8, 8, 14), (64, 8, 16), (64, 8, 40), (512, 8, 14),
    (512, 8, 0), (4096, 1, 14), (3, 5, 14),
])
def test_integer_and_memory_constraints_from_1_to_4096_ranks(num_nodes, per_node, gib):
    inp = inputs(num_nodes, per_node, gpu_bytes=gib * GIB if gib else H200_USABLE_BYTES,
                 sp_degrees=candidate_degrees(1, per_node, num_nodes * per_node))
    num_ranks = num_nodes * per_node
    # 720p's VAE decode needs 25 GiB: mix in 720p items only where GPUs are not capped below that.
    workload = Workload.of({C480: 10 * num_ranks, C720: 3 * num_ranks if not gib or gib >= 40 else 0})
    if num_ranks < 3 and gib:
        with pytest.raises(UserError, match="no role plan fits"):
            plan_auto(inp, workload, table_cost())
        return
    plan = plan_auto(inp, workload, table_cost())
    assert plan.num_ranks == num_ranks
    check_plan(plan, inp, workload)


def test_planning_4096_ranks_is_fast():
    for gib in (14, 0):
        inp = inputs(512, 8, gpu_bytes=gib * GIB if gib else H200_USABLE_BYTES, sp_degrees=(1, 2, 4))
        workload = Workload.uniform(C480, 40 * 4096)
        cost = table_cost()
        plan_auto(inp, workload, cost)
        best = min(_timed(lambda: plan_auto(inp, workload, cost)) for _ in range(3))
        assert best < 0.1, f"{best * 1e3:.0f} ms at 4,096 ranks"  # typically 10-25 ms


def _timed(fn):
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def test_few_items_on_many_ranks_use_larger_groups():
    inp = inputs(1, 8, sp_degrees=(1, 2, 4, 8))
    cost = table_cost(denoise=62.5, work_class=C480)
    assert plan_auto(inp, Workload.uniform(C480, 2), cost).sp_degree == 4
    assert plan_auto(inp, Workload.uniform(C480, 800), cost).sp_degree == 1


def test_large_model_needs_larger_groups_where_one_gpu_cannot_hold_the_activations():
    memory = MemoryModel.for_model(WAN21_T2V_14B)
    topology = Topology.uniform(2, 8, 8)
    work_class = C720  # 14B weights 26.6 GiB + 720p activations 10.6 GiB / S: S = 4 fits in 32 GiB
    inp = PlanInputs(topology, memory, 32 * GIB, PlannerSettings(sp_degrees=(1, 2, 4, 8)))
    workload = Workload.uniform(work_class, 160)
    plan = plan_auto(inp, workload, table_cost(denoise=900.0, decode=30.0, work_class=work_class))
    assert plan.sp_degree == 4 and plan.sp_layout == "ulysses"
    check_plan(plan, inp, workload)


def test_nothing_fits_names_what_each_stage_needs():
    with pytest.raises(UserError, match=r"GPUs offer 8.0 GiB.*encode 12.1 GiB"):
        plan_auto(inputs(1, 4, gpu_bytes=8 * GIB), Workload.uniform(C480, 10), table_cost())


def test_one_rank_per_gpu():
    with pytest.raises(UserError, match="8 ranks but 4 GPUs"):
        plan_auto(PlanInputs(Topology.uniform(1, 8, 4), MEMORY, H200_USABLE_BYTES), Workload.uniform(C480, 8),
                  table_cost())


def test_predict_plan_of_a_static_plan_matches_the_arithmetic():
    # The static split of the demo job, 1 encoder, 2 DiT, 1 decoder on 4 GPUs, is decoder-bound at about 1,000 videos/h; all stages on
    # every GPU ~ 4 x 3600 / 8.96 = 1,600.
    workload = Workload.uniform(C480, 4000)
    static = predict_plan(plan_roles(Topology.uniform(1, 4, 4), 1, 1), workload, table_cost())
    auto = plan_auto(inputs(1, 4), workload, table_cost())
    assert static.bottleneck == "decode" and 900 < static.videos_per_hour < 1000
    assert 1550 < auto.predicted_videos_per_hour < 1620


def test_slow_node_ranks_are_given_to_the_pool_that_suffers_least():
    inp = inputs(8, 8, gpu_bytes=NO_COLOCATION)
    workload = Workload.uniform(C480, 6400)
    cost = table_cost()
    fast = plan_auto(inp, workload, cost)
    slow = CostModel(cost.prior, rank_speeds=tuple((r, 0.5 if r < 8 else 1.0) for r in range(64)))
    plan = plan_auto(inp, workload, slow)
    check_plan(plan, inp, workload)
    assert predict_plan(plan, workload, slow).seconds <= predict_plan(fast, workload, slow).seconds
    assert math.isclose(predict_plan(fast, workload, cost).seconds,
                        3600 * 6400 / fast.predicted_videos_per_hour, rel_tol=1e-9)


def test_candidate_degrees():
    assert candidate_degrees(1, 8, 4096) == (1, 2, 4, 8)
    assert candidate_degrees(2, 4, 4096) == (2, 4)
    assert candidate_degrees(1, 8, 2) == (1, 2)
    assert candidate_degrees(16, 8, 64) == (16,)


def test_static_plans_answer_the_new_accessors_and_keep_the_old():
    plan = plan_roles(Topology.uniform(2, 4, 4), 1, 1, sp_degree=2)
    leaders = [g[0] for g in plan.dit_groups]
    assert plan.stages_of(plan.encoders[0]) == ("encode",) and plan.stages_of(plan.decoders[0]) == ("decode",)
    assert all(plan.stages_of(r) == ("denoise",) for g in plan.dit_groups for r in g)
    assert plan.role_counts() == {"encoder": 1, "decoder": 1, "dit": 6} and plan.policy == "static"
    assert set(plan.to_dict()) == {"encoders", "dit_groups", "decoders", "sp_layout", "torus_shape", "policy"}
    alone = plan_roles(Topology.uniform(1, 2, 2), 0, 0)
    assert alone.stages_of(0) == ("encode", "denoise", "decode") and alone.role_of(0) == "dit"
    assert plan_roles(Topology.uniform(1, 1), 1, 1).role_of(0) == "all"
    assert leaders and not plan.same_roles(alone)
    auto = plan_auto(inputs(1, 8, gpu_bytes=20 * GIB), Workload.uniform(C480, 800), table_cost())
    assert auto.to_dict()["roles"] and "predicted" in auto.describe() and auto.same_roles(auto)
