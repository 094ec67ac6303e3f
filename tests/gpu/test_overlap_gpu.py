"""Torus attention hides its K/V exchange on a GPU, measured with CUDA events (skipped without a GPU).

Four thread ranks on one GPU, each on its own CUDA stream, form a 2 x 2 torus over a virtual two-node topology:
ranks {0, 1} and {2, 3} are the nodes, so each torus column (the K/V exchange) crosses them and takes a fixed
extra time, the "inter-node link", about one local attention block long. Two transports, both through the
project's :class:`~spmd_diff.parallel.seq_comm.GroupSeqComm`:

- a device heap (tensors stay on the GPU): the exchange is queued on the comm's side stream, the link is a GPU
  sleep there; transfers and attention are both CUDA event pairs;
- a host heap (tensors staged through the CPU): the exchange blocks the rank's thread (the link is a wall-clock
  sleep) while a worker thread queues attention on the GPU; transfers are wall-clock spans, attention CUDA
  events, so the probe places both on one clock.

Each asserts the output is attention over the whole sequence and that some transfer time was hidden (0 when the
exchange and attention run one after another): on every rank for the device heap, over the group for the host
heap (see there); the hidden fractions are printed (``OVERLAP_GPU`` lines).
"""

from __future__ import annotations

import json
import time

import pytest
import torch
import torch.nn.functional as F

from spmd_diff.parallel.attention import LocalAttention, torus_attention
from spmd_diff.parallel.seq_comm import GroupSeqComm, offsets, split_sizes
from spmd_diff.parallel.overlap import OverlapProbe
from tests.gpu._gpu import num_gpus
from tests.unit._sp_threads import ThreadGroup, run_ranks

pytestmark = pytest.mark.skipif(num_gpus() < 1, reason="needs a CUDA GPU")

TOKENS_PER_RANK, HEADS, HEAD_DIM = 16384, 8, 128
COLUMNS = ((0, 2), (1, 3))  # the torus columns: each crosses the two virtual nodes


class GpuThreadGroup(ThreadGroup):
    """A thread group moving CUDA tensors between the ranks' streams; a column exchange first sleeps
    ``link_cycles`` on the calling stream (the virtual inter-node link)."""

    link_cycles = 0

    def all_to_all(self, send):
        op = self._op()
        me = self.coll.rank
        stream = torch.cuda.current_stream()
        ready = torch.cuda.Event()
        ready.record(stream)
        for peer, tensor in zip(self.ranks, send):
            self.coll.world.post((op, me, peer), (tensor, ready))
        incoming = [self.coll.world.take((op, peer, me)) for peer in self.ranks]
        for _, event in incoming:
            stream.wait_event(event)
        if self.ranks in COLUMNS and self.link_cycles:
            torch.cuda._sleep(self.link_cycles)
        out = []
        for tensor, _ in incoming:
            tensor.record_stream(stream)  # the sender may free it before this stream has read it
            out.append(tensor.clone())
        return out


class HostSlowColumn(ThreadGroup):
    link_s = 0.0

    def all_to_all(self, send):
        if self.ranks in COLUMNS:
            time.sleep(self.link_s)
        return super().all_to_all(send)


def _inputs(device: torch.device):
    gen = torch.Generator().manual_seed(5)
    num_tokens = 4 * TOKENS_PER_RANK
    q, k, v = (torch.randn(1, num_tokens, HEADS, HEAD_DIM, generator=gen).to(device, torch.bfloat16)
               for _ in range(3))
    q = q * 4  # peaked attention: every key block matters to some queries
    cos = torch.ones(1, num_tokens, 1, HEAD_DIM, device=device)
    sin = torch.zeros(1, num_tokens, 1, HEAD_DIM, device=device)
    return q, k, v, cos, sin


def _local_block_seconds(q: torch.Tensor) -> float:
    """One rank's local attention block alone: its row's tokens, half the heads, queries against its own K/V."""
    block = q[:, : 2 * TOKENS_PER_RANK, : HEADS // 2].transpose(1, 2).contiguous()
    local = LocalAttention()
    for _ in range(2):
        local.with_lse(block, block, block)
    torch.cuda.synchronize()
    began = time.perf_counter()
    for _ in range(5):
        local.with_lse(block, block, block)
    torch.cuda.synchronize()
    return (time.perf_counter() - began) / 5


def _sleep_cycles_per_s() -> float:
    began, ended = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(1_000_000)
    began.record()
    torch.cuda._sleep(20_000_000)
    ended.record()
    ended.synchronize()
    return 20_000_000 / (began.elapsed_time(ended) / 1e3)


def _run_torus(device: torch.device, make_group, comm_device: str):
    q, k, v, cos, sin = _inputs(device)
    sizes = split_sizes(q.shape[1], 4)

    def rank_fn(rank, world):
        torch.cuda.set_device(device)
        coll = world.collectives(rank)
        comm = GroupSeqComm(make_group(coll, range(4)), lambda ranks: make_group(coll, ranks), comm_device)
        inner, outer = comm.split(2, 2)
        cut = slice(offsets(sizes)[rank], offsets(sizes)[rank] + sizes[rank])
        with torch.cuda.stream(torch.cuda.Stream(device)):
            for _ in range(2):  # the first run warms the kernels up; the second is measured
                probe = OverlapProbe()
                out = torus_attention(q[:, cut], k[:, cut], v[:, cut], inner, outer, sizes,
                                      (cos[:, cut], sin[:, cut]), num_chunks=2, probe=probe)
            summary = probe.summary()
            torch.cuda.current_stream().synchronize()
        return out, summary

    results = run_ranks(4, rank_fn, timeout_s=300)
    reference = F.scaled_dot_product_attention(q.transpose(1, 2).float(), k.transpose(1, 2).float(),
                                               v.transpose(1, 2).float()).transpose(1, 2)
    out = torch.cat([r[0] for r in results], dim=1).float()
    assert out.shape == reference.shape
    error = float((out - reference).norm() / reference.norm())
    assert error < 2e-2, error  # bfloat16 inputs and blocks: about 4e-3; a missing or doubled block: order 1
    return [r[1] for r in results]


def _report(transport: str, link_s: float, compute_s: float, summaries: list[dict]) -> None:
    print("OVERLAP_GPU " + json.dumps({"transport": transport, "device": torch.cuda.get_device_name(),
                                       "link_s_per_exchange": link_s, "local_block_s": compute_s,
                                       "ranks": summaries}))


def test_device_heap_exchange_overlaps_attention_cuda_events() -> None:
    device = torch.device("cuda", 0)
    compute_s = _local_block_seconds(_inputs(device)[0])

    class Group(GpuThreadGroup):
        link_cycles = int(compute_s * _sleep_cycles_per_s())

    summaries = _run_torus(device, Group, "cuda")
    _report("device heap (side stream, CUDA events)", compute_s, compute_s, summaries)
    for rank, summary in enumerate(summaries):
        assert summary["transfer_s"] >= 2 * compute_s * 0.9, (rank, summary)  # two chunks, each a slow link
        assert summary["hidden_fraction"] > 0.2, (rank, summary)


def test_host_heap_exchange_overlaps_attention_on_the_gpu() -> None:
    device = torch.device("cuda", 0)
    compute_s = _local_block_seconds(_inputs(device)[0])
    link_s = max(compute_s, 0.005)

    class Group(HostSlowColumn):
        pass

    Group.link_s = link_s
    summaries = _run_torus(device, Group, "cpu")
    _report("host heap (blocking exchange, worker thread; wall + CUDA events)", link_s, compute_s, summaries)
    for rank, summary in enumerate(summaries):
        assert summary["transfer_s"] >= 2 * link_s * 0.9, (rank, summary)
    # Per rank the fraction spreads widely here (0.02 to 0.98 on one H200): four ranks' host copies and kernels
    # share one GPU and skew the ranks, and a rank that reaches the exchange first waits there for its peer (wait
    # counted as transfer) with its attention already done or still queued. The group's total is the measure.
    hidden = sum(summary["hidden_s"] for summary in summaries)
    transfer = sum(summary["transfer_s"] for summary in summaries)
    assert hidden / transfer > 0.1, summaries
