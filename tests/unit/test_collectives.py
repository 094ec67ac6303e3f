"""Group-free collectives over LocalTransport (ranks as threads), against numpy references."""

from __future__ import annotations

import time

import pytest
import torch

from spmd_diff.comm import run_local
from spmd_diff.comm.collective_layout import ALIGN, CollectiveLayout, chunk_split, decode_header, encode_header
from spmd_diff.comm.collectives import GroupCollectives
from spmd_diff.errors import StageTimeout
from tests.collective_cases import run_schedule, schedule


def make(transport, chunk_bytes=None, max_ranks=4, region=1 << 20, timeout_s=30.0):
    return GroupCollectives(transport, 0, region, max_ranks=max_ranks, chunk_bytes=chunk_bytes, timeout_s=timeout_s)


@pytest.mark.parametrize("world, chunk_bytes, seed", [(4, None, 1), (4, 2048, 2), (3, 512, 3), (2, 256, 4)])
def test_random_schedules_match_numpy(world, chunk_bytes, seed):
    """Groups of 2-4 ranks in random order, overlapping, uneven and empty splits, five dtypes, many epochs;
    small chunk buffers force multi-chunk messages that reuse both buffers of a slot many times."""
    ops = schedule(world, seed, num_ops=40, max_count=1500)

    def body(transport):
        coll = make(transport, chunk_bytes)
        return run_schedule(coll, seed, ops), list(coll._epochs)

    results = run_local(world, 1 << 20, body, timeout_s=120)
    assert sum(ran for ran, _ in results) == sum(len(op.ranks) for op in ops)
    epochs = [e for _, e in results]
    for a in range(world):  # both ends of every pair counted the same operations
        for b in range(world):
            assert epochs[a][b] == epochs[b][a]


def test_same_pair_in_many_groups_reuses_slots():
    """Ranks 0 and 1 meet in groups where they sit at different positions, one call after another."""
    groups = [(0, 1), (1, 0, 2), (2, 1, 3, 0), (1, 0), (3, 0, 1)] * 6

    def body(transport):
        coll = make(transport, chunk_bytes=256)
        checked = 0
        for step, ranks in enumerate(groups):
            if transport.rank not in ranks:
                continue
            group = coll.group(ranks)
            send = [torch.full((100 + 37 * j + step,), transport.rank * 1000 + step, dtype=torch.int32)
                    for j in range(group.size)]
            got = group.all_to_all(send)
            for i, tensor in enumerate(got):
                expect = torch.full((100 + 37 * group.rank_in_group + step,), ranks[i] * 1000 + step,
                                    dtype=torch.int32)
                assert torch.equal(tensor, expect), (step, ranks, i)
                checked += 1
        return checked

    assert sum(run_local(4, 1 << 20, body, timeout_s=60)) > 0


def test_group_formation_is_local():
    """Forming a group touches neither the transport nor the heap (its cost is measured in perf/bench_comm.py)."""
    operations = ("put", "put_signal", "signal", "wait_signal", "stream_wait_signal", "read_signal", "local_view",
                  "local_tensor", "zero_local", "quiet", "barrier")

    def body(transport):
        coll = make(transport)
        calls = []
        for name in operations:
            original = getattr(transport, name)
            setattr(transport, name, lambda *a, _name=name, _original=original, **k: (calls.append(_name),
                                                                                         _original(*a, **k))[1])
        groups = [coll.group([transport.rank, (transport.rank + 1 + k % 3) % 4]) for k in range(1000)]
        for name in operations:
            delattr(transport, name)
        assert all(g.ranks[0] == transport.rank and g.rank_in_group == 0 for g in groups)
        return calls

    assert run_local(4, 1 << 20, body) == [[], [], [], []]


def test_group_errors():
    def body(transport):
        coll = make(transport, max_ranks=3)
        with pytest.raises(ValueError, match="distinct"):
            coll.group([0, 0])
        with pytest.raises(ValueError, match="at most 3"):
            coll.group([0, 1, 2, 3])
        with pytest.raises(ValueError, match="without being in it"):
            coll.group([r for r in range(4) if r != transport.rank][:2])
        group = coll.group([0, 1, 2] if transport.rank < 3 else [3, 0])
        with pytest.raises(ValueError, match="tensors for a group"):
            group.all_to_all([torch.zeros(1)])
        with pytest.raises(ValueError, match="broadcast root"):
            group.broadcast(torch.zeros(1), root=5)
        return True

    assert all(run_local(4, 1 << 20, body))


def test_own_block_size_mismatch_is_reported_before_epochs_move():
    def body(transport):
        coll = make(transport)
        group = coll.group([0, 1])
        if transport.rank == 0:
            with pytest.raises(ValueError, match="out\\[0\\] has 48 bytes, send\\[0\\] 40"):
                group.all_to_all_into([torch.zeros(10), torch.zeros(10)], [torch.empty(12), torch.empty(10)])
            assert coll.epoch(1) == 0  # this rank stays in step with its peer, which never saw the call
        send = [torch.full((3,), float(transport.rank * 2 + j)) for j in range(2)]
        got = group.all_to_all_into(send, [torch.empty(3), torch.empty(3)])
        return [float(t[0]) for t in got]

    assert run_local(2, 1 << 20, body, timeout_s=30) == [[0.0, 2.0], [1.0, 3.0]]


def test_into_size_mismatch_is_reported():
    def body(transport):
        coll = make(transport)
        group = coll.group([0, 1])
        send = [torch.zeros(10), torch.zeros(10)]
        out = [torch.empty(12 if transport.rank == 1 else 10), torch.empty(10)]
        if transport.rank == 1:
            with pytest.raises(ValueError, match="out\\[0\\] has 48 bytes but rank 0 sent 40"):
                group.all_to_all_into(send, out)
        else:
            group.all_to_all_into(send, out)
        return True

    assert all(run_local(2, 1 << 20, body))


def test_missing_peer_times_out_naming_group_peer_and_epoch():
    def body(transport):
        coll = make(transport, timeout_s=0.5)
        if transport.rank == 2:
            return "absent"
        group = coll.group([0, 1, 2])
        with pytest.raises(StageTimeout, match=r"group\[0,1,2\] all_to_all: rank \d waiting for .*rank 2 \(epoch 1\)"):
            group.all_to_all([torch.ones(4)] * 3, deadline=time.monotonic() + 0.5)
        with pytest.raises(StageTimeout, match=r"barrier: rank \d waiting for rank 2 \(epoch 2\)"):
            group.barrier(deadline=time.monotonic() + 0.3)
        return "timed out"

    assert run_local(3, 1 << 20, body, timeout_s=30) == ["timed out", "timed out", "absent"]


def test_single_rank_group_and_self_copy():
    def body(transport):
        group = make(transport).group([transport.rank])
        x = torch.arange(5, dtype=torch.bfloat16)
        (y,) = group.all_to_all([x])
        assert torch.equal(x, y) and y.data_ptr() != x.data_ptr()
        assert torch.equal(group.broadcast(x, 0), x)
        group.barrier()
        return True

    assert all(run_local(2, 1 << 20, body))


def test_chunk_split_covers_message():
    for max_chunk in (256, 4096, 1 << 20, 64 << 20):
        for nbytes in (0, 1, 255, 256, 257, 5000, 1 << 20, (2 << 20) + 1, 100 << 20, 257 << 20):
            num, chunk = chunk_split(nbytes, max_chunk)
            assert 0 <= chunk <= max_chunk and num >= 1
            assert (num - 1) * chunk < max(nbytes, 1) <= num * chunk or nbytes == 0
            if num > 1:
                assert chunk % ALIGN == 0


def test_layout_fit_and_header_roundtrip():
    layout = CollectiveLayout.fit(0, 64 << 20, world_size=16, max_ranks=8)
    assert layout.end <= 64 << 20 and layout.chunk_bytes % ALIGN == 0
    assert layout.chunk_bytes > 3 << 20
    with pytest.raises(ValueError, match="too small"):
        CollectiveLayout.fit(0, 4096, world_size=16, max_ranks=8)
    tensor = torch.zeros(3, 0, 5, dtype=torch.bfloat16)
    assert decode_header(encode_header(tensor, 512), "t") == (torch.bfloat16, (3, 0, 5), 0, 512)
    with pytest.raises(RuntimeError, match="corrupt"):
        decode_header(bytes(128), "t")
