"""Torus attention hides its K/V exchange: 4 thread ranks as a 2 x 2 torus whose column (the "inter-node" axis)
takes a fixed extra time per exchange; the probe's wall-clock intervals must show attention running while the
exchange is in flight (hidden fraction), and the result must still be exact attention."""

from __future__ import annotations

import time

import pytest
import torch

from spmd_diff.parallel._kernels import apply_rotary_reference
from spmd_diff.parallel.attention import math_attention, torus_attention
from spmd_diff.parallel.seq_comm import GroupSeqComm, offsets, split_sizes
from spmd_diff.parallel.overlap import OverlapProbe, _intersection, _union
from tests.unit._sp_threads import ThreadGroup, run_ranks

LINK_S = 0.02  # the virtual inter-node link: seconds per K/V exchange along a torus column


class SlowColumn(ThreadGroup):
    def all_to_all(self, send):
        if self.ranks in ((0, 2), (1, 3)):  # a torus column crosses the virtual nodes
            time.sleep(LINK_S)
        return super().all_to_all(send)


def test_interval_arithmetic() -> None:
    assert _union([(0, 1), (0.5, 2), (3, 4)]) == [(0, 2), (3, 4)]
    assert _intersection([(0, 2), (3, 4)], [(1, 3.5)]) == pytest.approx(1.5)
    probe = OverlapProbe()
    probe.wall["transfer"] = [(0.0, 1.0)]
    probe.wall["compute"] = [(1.0, 2.0)]
    assert probe.summary()["hidden_fraction"] == 0.0


def test_torus_exchange_overlaps_attention() -> None:
    gen = torch.Generator().manual_seed(3)
    num_tokens, heads, head_dim = 2048, 4, 64
    q, k, v = (torch.randn(1, num_tokens, heads, head_dim, generator=gen) for _ in range(3))
    cos, sin = torch.ones(1, num_tokens, 1, head_dim), torch.zeros(1, num_tokens, 1, head_dim)
    sizes = split_sizes(num_tokens, 4)

    def rank_fn(rank, world):
        coll = world.collectives(rank)
        comm = GroupSeqComm(SlowColumn(coll, range(4)), lambda ranks: SlowColumn(coll, ranks))
        inner, outer = comm.split(2, 2)
        cut = slice(offsets(sizes)[rank], offsets(sizes)[rank] + sizes[rank])
        probe = OverlapProbe()
        out = torus_attention(q[:, cut], k[:, cut], v[:, cut], inner, outer, sizes, (cos[:, cut], sin[:, cut]),
                              num_chunks=2, probe=probe)
        return out, probe.summary()

    results = run_ranks(4, rank_fn)
    reference = math_attention(apply_rotary_reference(q, cos, sin).transpose(1, 2).double(),
                               apply_rotary_reference(k, cos, sin).transpose(1, 2).double(),
                               v.transpose(1, 2).double())[0].transpose(1, 2)
    out = torch.cat([r[0] for r in results], dim=1)
    torch.testing.assert_close(out.double(), reference, rtol=1e-4, atol=1e-4)
    for rank, (_, summary) in enumerate(results):
        print(f"rank {rank}: {summary}")
        assert summary["transfer_s"] >= 2 * LINK_S * 0.9  # two chunks, each one slow exchange
        assert summary["hidden_fraction"] > 0.15, summary  # 0 if the exchange and attention ran one after another
