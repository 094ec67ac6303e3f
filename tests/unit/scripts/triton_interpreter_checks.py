"""The Triton kernels of ``spmd_diff/kernels/`` against their torch references in Triton's CPU interpreter; prints
one line per check and ``interpreter ok`` at the end. Run with ``TRITON_INTERPRET=1`` (read when the kernels are defined).

The LSE merge runs on the layouts the attention kernels hand it on CUDA (tests/gpu/test_sp_gpu.py runs the real
ones): the block output ``[B, h, N, D]`` as a view of ``[B, N, h, D]`` memory in bf16, and its LSE as flash returns
it (``[B, h, N]``), as the memory-efficient kernel does (padded to a multiple of 32, sliced), transposed from
``[B, N, h]``, and from ``[B, h, N, 1]``; with rows whose LSE is -inf on one side, head dims that are not a power of
two or need two column blocks, and one block whose offsets pass 2**31 elements (int32 offsets wrap there).

What the interpreter cannot show: races between the threads of one program (it runs a block one whole op at a
time). The LSE merge had one (see spmd_diff/kernels/lse_merge.py); only a GPU run shows those.
"""

from __future__ import annotations

import os

import torch

from spmd_diff.kernels import lse_merge
from spmd_diff.kernels.rope_pack import rope_pack_reference, rope_pack_triton

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
gen = torch.Generator().manual_seed(0)


def check_rope_pack() -> None:
    for (B, S, H, D), heads in (((2, 5, 3, 12), [2, 1, 0]), ((1, 9, 4, 8), [1, 1, 1, 1])):
        q, k, v = (torch.randn(B, S, H, D, generator=gen) for _ in range(3))
        ang = torch.randn(S, D // 2, generator=gen).repeat_interleave(2, -1)
        cos, sin = ang.cos().view(1, S, 1, D), ang.sin().view(1, S, 1, D)
        for rot in ((cos, sin), (None, None)):
            for a, b in zip(rope_pack_reference(q, k, v, *rot, heads), rope_pack_triton(q, k, v, *rot, heads)):
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    # diffusers' layout: q, k, v views of one [B, S, 3, H, D] projection, float64 rotary tables [1, S, 1, D]
    B, S, H, D = 2, 6, 4, 10
    q, k, v = torch.randn(B, S, 3, H, D, generator=gen).unbind(2)
    ang = torch.rand(S, D // 2, generator=gen, dtype=torch.float64).repeat_interleave(2, -1) * 50
    cos, sin = ang.cos().view(1, S, 1, D), ang.sin().view(1, S, 1, D)
    for a, b in zip(rope_pack_reference(q, k, v, cos, sin, [3, 1]), rope_pack_triton(q, k, v, cos, sin, [3, 1])):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)  # reference in float64, kernel in float32
    print("rope_pack ok")


def merge_both(acc: torch.Tensor, lse: torch.Tensor, blk: torch.Tensor, blk_lse: torch.Tensor, name: str) -> None:
    a, la, b, lb = acc.clone(), lse.clone(), acc.clone(), lse.clone()
    lse_merge.lse_merge_reference(a, la, blk, blk_lse)
    lse_merge.lse_merge_triton(b, lb, blk, blk_lse)
    torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6, msg=lambda m: f"{name}: out: {m}")
    torch.testing.assert_close(lb, la, rtol=1e-6, atol=1e-6, msg=lambda m: f"{name}: lse: {m}")
    print("lse_merge ok:", name)


def check_lse_merge() -> None:
    # cuDNN-like: block output and LSE both in [B, N, h, ...] memory; -inf LSE rows on either side
    B, H, N, D = 2, 3, 7, 12
    acc, lse = torch.randn(B, H, N, D, generator=gen), torch.randn(B, H, N, generator=gen) * 5
    blk = torch.randn(B, N, H, D, generator=gen).to(torch.bfloat16).transpose(1, 2)
    blk_lse = (torch.randn(B, N, H, generator=gen) * 5).transpose(1, 2)
    lse[0, 1, :2] = float("-inf")
    blk_lse[1, 2, 3:5] = float("-inf")
    merge_both(acc, lse, blk, blk_lse, "bf16 [B,N,h,D] block, [B,N,h] LSE, one-sided -inf")

    # memory-efficient kernel: LSE padded to a multiple of 32 and sliced; head dim not a power of two
    B, H, N, D = 1, 2, 45, 80
    acc, lse = torch.randn(B, H, N, D, generator=gen), torch.randn(B, H, N, generator=gen)
    blk = torch.randn(B, N, H, D, generator=gen).transpose(1, 2)
    blk_lse = torch.randn(B, H, 64, generator=gen)[..., :N]
    merge_both(acc, lse, blk, blk_lse, "padded [B,h,64][..., :45] LSE, D=80")

    # flash ([B, h, N] contiguous) and [B, h, N, 1] stats; D > 128 takes two column blocks; fp16 block
    B, H, N, D = 1, 1, 33, 160
    acc, lse = torch.randn(B, H, N, D, generator=gen), torch.randn(B, H, N, generator=gen)
    blk, blk_lse = torch.randn(B, H, N, D, generator=gen).to(torch.float16), torch.randn(B, H, N, generator=gen)
    merge_both(acc, lse, blk, blk_lse, "contiguous [B,h,N] LSE, D=160")
    merge_both(acc, lse, blk, torch.randn(B, H, N, 1, generator=gen).reshape(B, H, N), "[B,h,N,1] LSE")

    # "auto" takes the Triton kernel here (TRITON_INTERPRET=1 counts as a Triton device)
    calls = []
    triton_merge = lse_merge.lse_merge_triton
    lse_merge.lse_merge_triton = lambda *args: (calls.append(1), triton_merge(*args))
    try:
        a, la, b, lb = acc.clone(), lse.clone(), acc.clone(), lse.clone()
        lse_merge.lse_merge_(a, la, blk, blk_lse, impl="auto")
        lse_merge.lse_merge_(b.double(), lb.double(), blk, blk_lse, impl="auto")  # float64: the reference
    finally:
        lse_merge.lse_merge_triton = triton_merge
    assert calls == [1], f"auto took the Triton kernel {len(calls)} times, expected once (float32 only)"
    print("lse_merge ok: auto picks Triton")

    # offsets past 2**31 elements: block batch stride 2**30, batch 2 starts at element 2**31. The storage is
    # 4 GiB of address space of which three rows are touched.
    D = 16
    try:
        storage = torch.empty(2 * 2 ** 30 + D, dtype=torch.bfloat16)
    except RuntimeError as error:  # no 4 GiB of address space here
        print("lse_merge skipped: int64 offsets:", error)
        return
    blk = storage.as_strided((3, 1, 1, D), (2 ** 30, D, D, 1))
    blk.copy_(torch.randn(3, 1, 1, D, generator=gen))
    merge_both(torch.randn(3, 1, 1, D, generator=gen), torch.randn(3, 1, 1, generator=gen), blk,
               torch.randn(3, 1, 1, generator=gen), "block offsets past 2**31")


check_rope_pack()
check_lse_merge()
print("interpreter ok")
