"""Rotary embedding of q and k fused with packing q, k, v into per-destination all-to-all send buffers.

Ulysses sends rank ``j`` the heads ``j`` owns of every local token, of q, k and v. Unfused that is diffusers'
rotary (about eight full passes over q and k in float32 temporaries) and then a strided copy per destination;
fused it is one read of q, k, v and one write of the send buffers.

Rotary as diffusers' ``WanAttnProcessor`` applies it (interleaved pairs)::

    out[..., 0::2] = x[..., 0::2] * cos[..., 0::2] - x[..., 1::2] * sin[..., 1::2]
    out[..., 1::2] = x[..., 0::2] * sin[..., 1::2] + x[..., 1::2] * cos[..., 0::2]
"""

from __future__ import annotations

import torch

from ._triton import HAS_TRITON, tl, triton, use_triton


def apply_rotary_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """diffusers' Wan rotary, op for op: ``x`` ``[B, S, H, D]``, ``cos``/``sin`` broadcastable ``[1, S, 1, D]``;
    returns ``[B, S, H, D]`` in ``x.dtype`` (math in the promoted dtype of ``x`` and ``cos``)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    c = cos[..., 0::2]
    s = sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * c - x2 * s
    out[..., 1::2] = x1 * s + x2 * c
    return out.type_as(x)


def _segments(flat: torch.Tensor, batch: int, seq: int, head_dim: int, head_sizes: list[int]) -> list[torch.Tensor]:
    views, start = [], 0
    for heads in head_sizes:
        numel = 3 * batch * seq * heads * head_dim
        views.append(flat[start:start + numel].view(3, batch, seq, heads, head_dim))
        start += numel
    return views


def rope_pack_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor | None,
                        sin: torch.Tensor | None, head_sizes: list[int]) -> list[torch.Tensor]:
    """Torch reference of :func:`rope_pack` (same arguments and result)."""
    if cos is not None:
        q = apply_rotary_reference(q, cos, sin)
        k = apply_rotary_reference(k, cos, sin)
    batch, seq, num_heads, head_dim = q.shape
    flat = torch.empty(3 * q.numel(), dtype=q.dtype, device=q.device)
    views = _segments(flat, batch, seq, head_dim, head_sizes)
    start = 0
    for view, heads in zip(views, head_sizes):
        for which, x in enumerate((q, k, v)):
            view[which].copy_(x[:, :, start:start + heads])
        start += heads
    return views


if HAS_TRITON:

    @triton.jit
    def _rope_pack_kernel(x, out, cos, sin, head_base, head_width, num_rows, seq, which,
                          HD: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr, HALF_BLOCK: tl.constexpr,
                          ROTATE: tl.constexpr, BLOCK_T: tl.constexpr):
        rows = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
        head = tl.program_id(1)
        pairs = tl.arange(0, HALF_BLOCK)
        mask = (rows < num_rows)[:, None] & (pairs < HALF)[None, :]
        src = x + rows[:, None] * HD + head * D + 2 * pairs[None, :]
        x_even = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        x_odd = tl.load(src + 1, mask=mask, other=0.0).to(tl.float32)
        if ROTATE:
            pos = rows % seq
            c = tl.load(cos + pos[:, None] * D + 2 * pairs[None, :], mask=mask, other=0.0)
            s = tl.load(sin + pos[:, None] * D + 2 * pairs[None, :] + 1, mask=mask, other=0.0)
            y_even = x_even * c - x_odd * s
            y_odd = x_even * s + x_odd * c
        else:
            y_even = x_even
            y_odd = x_odd
        base = tl.load(head_base + head)
        width = tl.load(head_width + head)
        dst = out + base + which * num_rows * width * D + rows[:, None] * (width * D) + 2 * pairs[None, :]
        tl.store(dst, y_even.to(out.dtype.element_ty), mask=mask)
        tl.store(dst + 1, y_odd.to(out.dtype.element_ty), mask=mask)


def rope_pack_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor | None,
                     sin: torch.Tensor | None, head_sizes: list[int]) -> list[torch.Tensor]:
    """:func:`rope_pack` as three launches of one Triton kernel (rotary math in float32)."""
    batch, seq, num_heads, head_dim = q.shape
    assert head_dim % 2 == 0, head_dim
    assert sum(head_sizes) == num_heads, (head_sizes, num_heads)
    q, k, v = (x.contiguous() for x in (q, k, v))
    flat = torch.empty(3 * q.numel(), dtype=q.dtype, device=q.device)
    views = _segments(flat, batch, seq, head_dim, head_sizes)
    num_rows = batch * seq
    if num_rows == 0 or num_heads == 0:
        return views
    base, width, first = [], [], 0
    for heads in head_sizes:
        for local in range(heads):
            base.append(3 * num_rows * head_dim * first + local * head_dim)
            width.append(heads)
        first += heads
    head_base = torch.tensor(base, dtype=torch.int64, device=q.device)
    head_width = torch.tensor(width, dtype=torch.int64, device=q.device)
    if cos is not None:
        cos = cos.reshape(seq, head_dim).to(torch.float32).contiguous()
        sin = sin.reshape(seq, head_dim).to(torch.float32).contiguous()
    block_t = 32
    grid = (triton.cdiv(num_rows, block_t), num_heads)
    for which, x in enumerate((q, k, v)):
        rotate = cos is not None and which < 2
        _rope_pack_kernel[grid](x, flat, cos if rotate else x, sin if rotate else x, head_base, head_width,
                                num_rows, seq, which, HD=num_heads * head_dim, D=head_dim, HALF=head_dim // 2,
                                HALF_BLOCK=triton.next_power_of_2(head_dim // 2), ROTATE=rotate, BLOCK_T=block_t)
    return views


def rope_pack(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor | None,
              sin: torch.Tensor | None, head_sizes: list[int], impl: str = "auto") -> list[torch.Tensor]:
    """Rotate q and k, then pack q, k, v by destination.

    Args:
        q, k, v: ``[B, S, H, D]`` (one dtype; ``D`` even).
        cos, sin: rotary tables broadcastable to ``[1, S, 1, D]`` (diffusers' ``rotary_emb``), or ``None`` for
            no rotation.
        head_sizes: heads per destination, summing to ``H`` (destination ``j`` gets the next ``head_sizes[j]``).
        impl: ``"auto"`` (Triton on CUDA when it imports), ``"triton"`` or ``"torch"``.

    Returns:
        One ``[3, B, S, head_sizes[j], D]`` tensor per destination (q, k, v stacked), contiguous views into one
        buffer, dtype ``q.dtype``.
    """
    if impl == "triton" or (impl == "auto" and use_triton(q)):
        return rope_pack_triton(q, k, v, cos, sin, head_sizes)
    return rope_pack_reference(q, k, v, cos, sin, head_sizes)
