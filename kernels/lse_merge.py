"""Merge two partial attention results by log-sum-exp (ring/torus attention), in place; Triton and torch.

Attention of queries against the union of two key blocks, from the two partial results::

    lse = log(exp(lse_acc) + exp(lse_blk))
    out = out_acc * exp(lse_acc - lse) + out_blk * exp(lse_blk - lse)

``lse_merge_`` uses the Triton kernel for CUDA tensors when Triton imports (one pass over the data instead of the
six the torch reference makes), else :func:`lse_merge_reference`.
"""

from __future__ import annotations

import torch

from ._triton import HAS_TRITON, triton, tl


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
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < num_rows
        n = rows % N
        h = (rows // N) % H
        b = rows // (N * H)
        la = tl.load(lse_acc + rows, mask=row_ok, other=0.0).to(tl.float32)
        lb = tl.load(lse_blk + b * lb_sb + h * lb_sh + n * lb_sn, mask=row_ok, other=0.0).to(tl.float32)
        big = tl.maximum(la, lb)
        wa = tl.exp(la - big)
        wb = tl.exp(lb - big)
        total = wa + wb
        tl.store(lse_acc + rows, (big + tl.log(total)).to(lse_acc.dtype.element_ty), mask=row_ok)
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


def lse_merge_triton(out_acc: torch.Tensor, lse_acc: torch.Tensor, out_blk: torch.Tensor,
                     lse_blk: torch.Tensor) -> None:
    """:func:`lse_merge_reference` as one Triton kernel. ``out_acc``/``lse_acc`` must be contiguous float32 and
    ``out_blk`` contiguous along ``D``; math in float32."""
    B, H, N, D = out_acc.shape
    assert out_acc.is_contiguous() and lse_acc.is_contiguous(), "accumulators must be contiguous"
    assert out_acc.dtype == torch.float32 and lse_acc.dtype == torch.float32, out_acc.dtype
    assert out_blk.shape == out_acc.shape and lse_blk.shape == lse_acc.shape, (out_blk.shape, lse_blk.shape)
    assert out_blk.stride(-1) == 1, out_blk.stride()
    num_rows = B * H * N
    if num_rows == 0:
        return
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

    ``impl``: ``"auto"`` (the torch reference, see below), ``"triton"`` or ``"torch"``.

    "auto" does not pick the Triton kernel: on an H200 (Triton 3.6) it disagreed with the reference on 8% of the
    elements of tests/gpu/test_sp_gpu.py::test_lse_merge_triton_matches_reference (perf/results/
    sp-gpu-tests-2026-11-22.log) while passing in Triton's CPU interpreter. Until that test passes on a GPU it runs
    only when asked for by name.
    """
    if impl == "triton":
        lse_merge_triton(out_acc, lse_acc, out_blk, lse_blk)
    else:
        lse_merge_reference(out_acc, lse_acc, out_blk, lse_blk)
