"""Merge two partial attention results by log-sum-exp (ring/torus attention), in place; Triton and torch.

Attention of queries against the union of two key blocks, from the two partial results::

    lse = log(exp(lse_acc) + exp(lse_blk))
    out = out_acc * exp(lse_acc - lse) + out_blk * exp(lse_blk - lse)

``lse_merge_`` uses the Triton kernel for CUDA tensors when Triton imports (one pass over the data instead of the
six the torch reference makes), else :func:`lse_merge_reference`.
"""

from __future__ import annotations

import torch

from ._triton import HAS_TRITON, triton, tl, use_triton


def lse_merge_reference(out_acc: torch.Tensor, lse_acc: torch.Tensor, out_blk: torch.Tensor,
                        lse_blk: torch.Tensor) -> None:
    """In place on ``out_acc``/``lse_acc``.

    Args:
        out_acc: ``[B, H, N, D]`` float32/float64, the running result (updated).
        lse_acc: ``[B, H, N]`` same dtype, its log-sum-exp (updated).
        out_blk: ``[B, H, N, D]`` any float dtype and strides: attention against the new block.
        lse_blk: ``[B, H, N]`` float, its log-sum-exp. Rows with ``-inf`` on both sides are not allowed.
    """
    lse_new = torch.logaddexp(lse_acc, lse_blk.to(lse_acc.dtype))
    out_acc.mul_(torch.exp(lse_acc - lse_new).unsqueeze(-1))
    out_acc.add_(out_blk.to(out_acc.dtype) * torch.exp(lse_blk.to(lse_acc.dtype) - lse_new).unsqueeze(-1))
    lse_acc.copy_(lse_new)


if HAS_TRITON:

    @triton.jit
    def _lse_merge_kernel(out_acc, lse_acc, out_blk, lse_blk, num_rows, H, N,
                          ob_sb, ob_sh, ob_sn, lb_sb, lb_sh, lb_sn,
                          D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # int32: num_rows < 2**31 (the caller checks)
        row_ok = rows < num_rows
        n = rows % N
        h = (rows // N) % H
        b = rows // (N * H)
        # Offsets in int64: rows * D and b * ob_sb pass 2**31 on large tensors (int32 wraps to negative offsets).
        rows, n, h, b = rows.to(tl.int64), n.to(tl.int64), h.to(tl.int64), b.to(tl.int64)
        la = tl.load(lse_acc + rows, mask=row_ok, other=0.0).to(tl.float32)
        lb = tl.load(lse_blk + b * lb_sb + h * lb_sh + n * lb_sn, mask=row_ok, other=0.0).to(tl.float32)
        big = tl.maximum(la, lb)
        wa = tl.exp(la - big)
        wb = tl.exp(lb - big)
        total = wa + wb
        lse_new = big + tl.log(total)
        wa = wa / total
        wb = wb / total
        cols = tl.arange(0, BLOCK_D)
        for d0 in range(0, D, BLOCK_D):
            c = d0 + cols
            m = row_ok[:, None] & (c < D)[None, :]
            pa = out_acc + rows[:, None] * D + c[None, :]
            pb = out_blk + (b * ob_sb + h * ob_sh + n * ob_sn)[:, None] + c[None, :]
            xa = tl.load(pa, mask=m, other=0.0).to(tl.float32)
            xb = tl.load(pb, mask=m, other=0.0).to(tl.float32)
            tl.store(pa, (xa * wa[:, None] + xb * wb[:, None]).to(out_acc.dtype.element_ty), mask=m)
        # lse_acc is read and overwritten in place, and the threads reading a row are not the one writing it:
        # Triton 3.6 (sm_90) loads `la` twice, in the layout of the weights (16 lanes of warp (row // 2) % 4 per
        # row) and in the layout of the store (one lane of warp 0 per row). With the store ahead of the loop and
        # no barrier (as before), warp 0 could store the merged LSE before another warp had loaded the old one;
        # that warp then weighted its rows by the merged LSE (the H200 failure of 2026-11-22: 8% of the elements).
        # The barrier orders every thread's loads before any store. out_acc needs none: each element is stored
        # from its own loaded value. Triton's CPU interpreter runs a block one whole op at a time: no races there.
        tl.debug_barrier()
        tl.store(lse_acc + rows, lse_new.to(lse_acc.dtype.element_ty), mask=row_ok)


def lse_merge_triton(out_acc: torch.Tensor, lse_acc: torch.Tensor, out_blk: torch.Tensor,
                     lse_blk: torch.Tensor) -> None:
    """:func:`lse_merge_reference` as one Triton kernel. ``out_acc``/``lse_acc`` must be contiguous float32 and
    ``out_blk`` contiguous along ``D`` (any other strides), neither block tensor overlapping the accumulators;
    math in float32."""
    B, H, N, D = out_acc.shape
    assert out_acc.is_contiguous() and lse_acc.is_contiguous(), "accumulators must be contiguous"
    assert out_acc.dtype == torch.float32 and lse_acc.dtype == torch.float32, out_acc.dtype
    assert out_blk.shape == out_acc.shape and lse_blk.shape == lse_acc.shape, (out_blk.shape, lse_blk.shape)
    assert out_blk.stride(-1) == 1, out_blk.stride()
    num_rows = B * H * N
    if num_rows == 0:
        return
    assert num_rows < 2 ** 31 - 4096, num_rows  # row indices are int32 in the kernel (offsets are int64)
    block_d = min(128, triton.next_power_of_2(D))
    block_r = max(1, 4096 // block_d)
    grid = (triton.cdiv(num_rows, block_r),)
    _lse_merge_kernel[grid](out_acc, lse_acc, out_blk, lse_blk, num_rows, H, N,
                            out_blk.stride(0), out_blk.stride(1), out_blk.stride(2),
                            lse_blk.stride(0), lse_blk.stride(1), lse_blk.stride(2),
                            D=D, BLOCK_R=block_r, BLOCK_D=block_d)


def lse_merge_(out_acc: torch.Tensor, lse_acc: torch.Tensor, out_blk: torch.Tensor, lse_blk: torch.Tensor,
               impl: str = "auto") -> None:
    """Merge ``(out_blk, lse_blk)`` into ``(out_acc, lse_acc)`` in place (shapes in :func:`lse_merge_reference`).

    ``impl``: ``"auto"`` (the Triton kernel for contiguous float32 accumulators on CUDA when Triton imports, else
    the torch reference), ``"triton"`` or ``"torch"``.

    From 2026-11-22 "auto" picked the torch reference: the kernel then raced on its in-place LSE (see the kernel)
    and failed tests/gpu/test_sp_gpu.py on an H200 (perf/results/sp-gpu-tests-2026-11-22.log). The fix is checked
    in Triton's CPU interpreter and in the compiled PTX; that GPU test is what confirms it on a GPU.
    """
    if impl == "triton" or (impl == "auto" and use_triton(out_acc) and out_acc.dtype == torch.float32
                            and out_acc.is_contiguous() and lse_acc.is_contiguous() and out_blk.stride(-1) == 1):
        lse_merge_triton(out_acc, lse_acc, out_blk, lse_blk)
    else:
        lse_merge_reference(out_acc, lse_acc, out_blk, lse_blk)
