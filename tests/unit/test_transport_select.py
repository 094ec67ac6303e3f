"""Transport choice (pure rule), NVSHMEM heap sizing and the GPU-free parts of the NVSHMEM transport."""

from __future__ import annotations

import pytest

from spmd_diff.comm.nvshmem import RESERVE_BYTES, NvshmemUnavailable, parse_size, symmetric_size_for
from spmd_diff.comm.select import RankFacts, decide_transport
from spmd_diff.errors import UserError


def node(host: str, num_gpus: int, nvshmem: bool = True, p2p: bool = True, net: bool = False) -> list[RankFacts]:
    return [RankFacts(host, g, nvshmem, tuple(o for o in range(num_gpus) if o != g) if p2p else (), net)
            for g in range(num_gpus)]


def test_auto_picks_nvshmem_on_one_node_of_p2p_gpus():
    kind, reason = decide_transport("auto", node("a", 4))
    assert kind == "nvshmem" and "4 ranks with GPUs on 1 node" in reason


@pytest.mark.parametrize("facts, why", [
    (node("a", 2) + [RankFacts("a", -1, True, (), False)], "rank(s) 2 have no GPU"),
    (node("a", 2, nvshmem=False), "nvshmem4py is not installed for rank(s) 0, 1"),
    (node("a", 2, p2p=False), "GPU 0 of rank 0 cannot access GPU 1 of rank 1 on a (no P2P)"),
    (node("a", 2, net=False) + node("b", 2, net=False), "2 nodes but rank(s) 0, 1, 2, 3 have no RDMA network"),
])
def test_auto_falls_back_to_mpi_and_says_why(facts, why):
    kind, reason = decide_transport("auto", facts)
    assert kind == "mpi" and why in reason


def test_multi_node_with_rdma_picks_nvshmem():
    assert decide_transport("auto", node("a", 2, net=True) + node("b", 2, net=True))[0] == "nvshmem"


def test_forcing():
    assert decide_transport("mpi", node("a", 4))[0] == "mpi"
    assert decide_transport("nvshmem", node("a", 2))[0] == "nvshmem"
    with pytest.raises(NvshmemUnavailable, match='no P2P.*world.transport = "mpi"'):
        decide_transport("nvshmem", node("a", 2, p2p=False))
    with pytest.raises(UserError, match="one of auto, mpi, nvshmem"):
        decide_transport("ucx", node("a", 2))


def test_symmetric_size_from_job_or_user():
    size, user = symmetric_size_for(1 << 30, env={})
    assert not user and size >= (1 << 30) + RESERVE_BYTES and size % (1 << 21) == 0
    assert symmetric_size_for(1 << 30, env={"NVSHMEM_SYMMETRIC_SIZE": "4G"}) == (4 << 30, True)
    with pytest.raises(NvshmemUnavailable, match="too small.*at least"):
        symmetric_size_for(1 << 30, env={"NVSHMEM_SYMMETRIC_SIZE": "1G"})
    assert parse_size("512M") == 512 << 20 and parse_size("1073741824") == 1 << 30 and parse_size("2GB") == 2 << 30
    with pytest.raises(ValueError):
        parse_size("lots")
