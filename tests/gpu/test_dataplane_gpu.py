"""The data plane's kernel switches on one GPU: ``GroupCollectives(kernel=..., a2a_blocks=...)`` and
``use_kernel`` pick the CUDA kernel (with the forced or the size-chosen block counts), the Triton kernel or none;
a one-rank group on a device heap copies its own block through the host-driven path."""

from __future__ import annotations

import pytest
import torch

from tests.gpu._gpu import num_gpus

pytestmark = pytest.mark.skipif(num_gpus() < 1, reason="needs a CUDA GPU")

REGION = 4 << 20


class OneGpuHeap:
    """What GroupCollectives reads of a device transport, for one real rank (peers have no address here)."""

    def __init__(self) -> None:
        self.device = torch.device("cuda", 0)
        self.rank, self.size, self.heap_bytes = 0, 2, REGION
        self.heap = torch.zeros(REGION, dtype=torch.uint8, device=self.device)

    def zero_local(self, offset: int, nbytes: int) -> None:
        self.heap[offset:offset + nbytes].zero_()

    def barrier(self) -> None:
        torch.cuda.synchronize()

    def address(self, rank: int, offset: int):
        return self.heap.data_ptr() + offset if rank == 0 else None


def test_kernel_choice_and_block_counts():
    from spmd_diff.comm.collectives import GroupCollectives
    from spmd_diff.comm.kernel_loader import load_kernel_module

    coll = GroupCollectives(OneGpuHeap(), 0, REGION, max_ranks=2, timeout_s=30, kernel="cuda", a2a_blocks=(8, 2))
    has_cupy = load_kernel_module("p2p_cuda").available()
    kernel = coll.fused_kernel()
    assert type(kernel).__name__ == ("CudaP2P" if has_cupy else "P2PAllToAll")
    if has_cupy:
        assert kernel.blocks_for(1 << 20, 1) == (8, 2)
        coll.use_kernel("cuda")
        again = coll.fused_kernel()
        assert again is not kernel and again.blocks_for(1 << 20, 1) == (16, 4)  # one sender per 64 KiB
    coll.use_kernel("triton")
    assert type(coll.fused_kernel()).__name__ == "P2PAllToAll"
    coll.use_kernel("off")
    assert coll.fused_kernel() is None

    group = coll.group([0])
    send, out = [torch.randn(4096, device="cuda")], [torch.empty(4096, device="cuda")]
    group.all_to_all_into(send, out)
    coll.synchronize()
    assert torch.equal(out[0], send[0])
