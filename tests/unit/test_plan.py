"""Role planner on fake worlds of 1 to 4096 ranks: no MPI, no torch."""

import pytest

from spmd_diff.errors import UserError
from spmd_diff.plan.roles import plan_roles, spread_edges
from spmd_diff.plan.topology import Topology


def _check_partition(plan, num_ranks):
    ranks = list(plan.encoders) + list(plan.dit_ranks) + list(plan.decoders)
    assert sorted(ranks) == list(range(num_ranks)), "every rank has exactly one role"


def test_single_rank_does_everything():
    plan = plan_roles(Topology.uniform(1, 1), 1, 1)
    assert plan.role_of(0) == "all" and plan.encode_on_dit and plan.decode_on_dit
    assert plan.dit_groups == ((0,),)


def test_four_ranks_one_encoder_two_dit_one_decoder():
    plan = plan_roles(Topology.uniform(1, 4), 1, 1)
    _check_partition(plan, 4)
    assert len(plan.encoders) == 1 and len(plan.decoders) == 1 and len(plan.dit_groups) == 2
    assert [plan.role_of(r) for r in range(4)].count("dit") == 2
    assert plan.sp_layout == "none"


@pytest.mark.parametrize("nodes,per_node,enc,dec,sp", [
    (1, 2, 0, 1, 1), (2, 4, 1, 1, 2), (8, 8, 4, 4, 4), (64, 8, 16, 32, 8), (512, 8, 64, 128, 4),
    (4096, 1, 96, 200, 1), (3, 5, 1, 2, 4),
])
def test_large_fake_worlds_partition_and_fit(nodes, per_node, enc, dec, sp):
    topo = Topology.uniform(nodes, per_node, gpus_per_node=per_node)
    plan = plan_roles(topo, enc, dec, sp)
    _check_partition(plan, nodes * per_node)
    assert len(plan.encoders) == enc and len(plan.decoders) == dec
    assert all(len(g) == sp for g in plan.dit_groups)


def test_groups_stay_inside_nodes_when_possible():
    topo = Topology.uniform(2, 4, gpus_per_node=4)
    plan = plan_roles(topo, 1, 1, sp_degree=2)
    # 8 ranks: 2 non-DiT + 3 groups of 2; at most one group may cross, and auto picks ulysses when none does
    crossing = [g for g in plan.dit_groups if len({topo.node_of_rank[r] for r in g}) > 1]
    assert not crossing, plan.describe(topo)
    assert plan.sp_layout == "ulysses"


def test_torus_layout_when_groups_span_nodes():
    topo = Topology.uniform(2, 2).regrouped(2)
    plan = plan_roles(Topology.uniform(3, 2), 1, 1, sp_degree=4)
    assert plan.sp_layout == "torus" and plan.torus_shape == (2, 2)
    assert topo.num_nodes == 2


def test_roles_that_do_not_fit_name_every_factor():
    with pytest.raises(UserError) as err:
        plan_roles(Topology.uniform(1, 4), 2, 2)
    message = str(err.value)
    assert "4 ranks" in message and "2 encoder" in message and "2 decoder" in message and "0 DiT" in message


def test_dit_ranks_not_multiple_of_sp_degree():
    with pytest.raises(UserError, match="multiple of dit.sp_degree=2"):
        plan_roles(Topology.uniform(1, 5), 1, 1, sp_degree=2)


def test_more_ranks_than_gpus_is_an_error():
    with pytest.raises(UserError, match="8 ranks but 4 GPUs"):
        plan_roles(Topology.uniform(1, 8, gpus_per_node=4), 1, 1)


def test_torus_requested_on_uneven_groups_is_an_error():
    topo = Topology((0, 0, 0, 1, 1, 2))
    with pytest.raises(UserError, match="torus"):
        plan_roles(topo, 1, 1, sp_degree=4, sp_layout="torus")


def test_plan_is_pure_and_printable():
    topo = Topology.uniform(4, 8, gpus_per_node=8)
    a = plan_roles(topo, 2, 2, 2)
    b = plan_roles(topo, 2, 2, 2)
    assert a == b
    text = a.describe(topo)
    assert "encoders" in text and "group 0" in text and "decoders" in text


def test_topology_from_hostnames_and_regroup():
    topo = Topology.from_hostnames(["b", "b", "a", "a"])
    assert topo.node_of_rank == (0, 0, 1, 1) and topo.hostname(1) == "a"
    assert topo.local_rank(3) == 1
    with pytest.raises(UserError, match="must divide"):
        topo.regrouped(3)


@pytest.mark.parametrize("num_p,num_c", [(1, 1), (1, 3), (3, 1), (2, 2), (5, 2), (2, 5), (7, 3), (470, 1),
                                         (470, 7), (40, 2275), (2275, 1781)])
def test_spread_edges_cover_both_sides_with_bounded_fan_in(num_p, num_c):
    producers, consumers = list(range(100, 100 + num_p)), list(range(5000, 5000 + num_c))
    edges = spread_edges(producers, consumers)
    assert len(set(edges)) == len(edges) and edges == sorted(edges)
    out_degree = {p: sum(1 for q, _ in edges if q == p) for p in producers}
    in_degree = {c: sum(1 for _, d in edges if d == c) for c in consumers}
    assert min(out_degree.values()) >= min(2, num_c), "a producer feeds two consumers where there are two"
    assert min(in_degree.values()) >= 1, "every consumer hears from a producer"
    assert max(in_degree.values()) <= 2 * -(-num_p // num_c)


def test_the_channel_heap_grows_with_the_ratio_of_producers_to_consumers_not_their_number():
    """The simulator's memory-capped plan at 4,096 ranks (40 encoders, 2,275 DiT, 1,781 decoders), 480p latents:
    each decoder holds a few rings, not one per DiT leader (which would be 2,275 x 2 x 8.7 MB = 39 GB)."""
    from spmd_diff.comm.heap_layout import HeapLayout, RingSpec

    latents, embeds = RingSpec(2, 16 * 21 * 60 * 104 * 4), RingSpec(2, 2 * 512 * 4096 * 2)
    small = plan_roles(Topology.uniform(1, 8, 8), 1, 3, 1, "ulysses")
    big = plan_roles(Topology.uniform(512, 8, 8), 40, 1781, 1, "ulysses")
    heaps = [HeapLayout(p.num_ranks, p.channel_edges(embeds, latents)).heap_bytes for p in (small, big)]
    assert heaps[1] <= 4 * (latents.ring_bytes + embeds.ring_bytes), heaps
    assert big.fan_in() <= 2 * -(-2275 // 1781) and small.fan_in() <= 2 * -(-4 // 3)


def test_ranks_independent_only_where_no_rank_waits_for_another():
    import dataclasses

    from spmd_diff.plan.roles import plan_time_shared

    topo = Topology((0, 0, 0, 0))
    assert plan_time_shared(topo, 8).ranks_independent
    assert plan_roles(Topology((0,)), 0, 0).ranks_independent  # one rank holding every stage
    every_stage = plan_roles(topo, 0, 0)  # four groups of one, each encoding and decoding its own items
    assert every_stage.ranks_independent
    assert not plan_roles(topo, 1, 1).ranks_independent  # channels encoder -> DiT -> decoder
    assert not plan_roles(topo, 0, 0, sp_degree=2).ranks_independent  # DiT groups of two
    # an auto plan with one rank missing a stage (it hands over through a channel)
    stages = (("encode", "denoise", "decode"),) * 3 + (("denoise", "decode"),)
    assert not dataclasses.replace(every_stage, rank_stages=stages, policy="auto").ranks_independent
