"""Sequence-parallel self-attention: Ulysses, ring and torus, over a :class:`~spmd_diff.parallel.seq_comm.SeqComm`.

Every function takes this rank's shard of the tokens, ``q, k, v`` of shape ``[B, s, H, D]`` (``s =
seq_sizes[rank]``; shards in rank order make up the sequence), and returns the attention output for the same
tokens, ``[B, s, H, D]`` in ``q.dtype``: exactly ``softmax(q k^T / sqrt(D)) v`` over the whole sequence, in exact
arithmetic. Shards may differ in length (any sequence length works) and head counts need not divide the Ulysses
degree (uneven head splits; a rank with no heads just forwards). Rotary embeddings for this rank's tokens
(``cos, sin``, each ``[1, s, 1, D]``, diffusers' Wan form) are applied inside, fused with the all-to-all packing.

- Ulysses: all-to-all from sequence shards to head shards, full-sequence attention on ``H / S`` heads, back.
- Ring: K/V blocks passed to the next rank while attention runs on the current one; log-sum-exp merge.
- Torus ``outer x inner``: Ulysses along the inner axis (the ``inner`` ranks of a node); along the outer axis
  (across nodes) each rank's K/V (for its heads, its inner axis' tokens) is cut into ``num_chunks`` pieces, attention runs on the local K/V while they
  travel, then on each piece as it lands, merged by log-sum-exp. On a comm whose exchanges run asynchronously
  (device heaps, NCCL) all pieces are started at once and attention is queued behind each; on a host heap, where
  an exchange occupies the calling thread (MPI from the main thread only), this thread exchanges the pieces one
  after another while a :class:`~spmd_diff.parallel.overlap.ComputeWorker` thread attends to what has landed.
  Either way an :class:`~spmd_diff.parallel.overlap.OverlapProbe` can record how much of the transfer was hidden.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from spmd_diff.parallel._kernels import apply_rotary_reference, lse_merge_, rope_pack
from spmd_diff.parallel.seq_comm import SeqComm, offsets, split_sizes
from spmd_diff.parallel.layout import SPLayout
from spmd_diff.parallel.overlap import ComputeWorker, OverlapProbe

Rotary = tuple[torch.Tensor, torch.Tensor]

_CUDA_BACKENDS = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
                  "math": "MATH"}


@dataclass(frozen=True)
class LocalAttention:
    """Attention of one rank's blocks, ``[B, h, Nq, D]`` x ``[B, h, Nk, D]`` -> ``[B, h, Nq, D]``.

    ``backend``: ``"auto"`` (torch SDPA's own choice; with log-sum-exp: flash for 16-bit CUDA tensors, memory-
    efficient otherwise, the fused CPU kernel on the CPU), ``"flash"``, ``"cudnn"``, ``"efficient"`` (CUDA) or
    ``"math"`` (explicit softmax in float32/float64: the reference, O(Nq x Nk) memory).
    """

    backend: str = "auto"
    lse_backend: str | None = None
    """Backend of :meth:`with_lse` (ring/torus blocks); ``None``: ``backend``."""

    def __post_init__(self) -> None:
        for backend in (self.backend, self.lse_backend):
            if backend is not None and backend != "auto" and backend not in _CUDA_BACKENDS:
                raise ValueError(f"unknown attention backend {backend!r}")

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.backend == "math":
            return math_attention(q, k, v)[0]
        if self.backend == "auto" or not q.is_cuda:
            return F.scaled_dot_product_attention(q, k, v)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(getattr(SDPBackend, _CUDA_BACKENDS[self.backend])):
            return F.scaled_dot_product_attention(q, k, v)

    def with_lse(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(out [B, h, Nq, D] in q.dtype, lse [B, h, Nq])``: lse is the natural log-sum-exp of the scaled
        scores of each query row (float32; float64 for float64 inputs)."""
        batch, heads, num_q = q.shape[:3]
        backend = self.lse_backend or self.backend
        if backend == "math" or (not q.is_cuda and q.dtype not in (torch.float32, torch.float64,
                                                                          torch.bfloat16, torch.float16)):
            return math_attention(q, k, v)
        if not q.is_cuda:
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False)[:2]
            return out, lse
        if backend == "auto":
            backend = "flash" if q.dtype in (torch.float16, torch.bfloat16) else "efficient"
        if backend == "flash":
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False)[:2]
        elif backend == "cudnn":
            out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, False,
                                                                            False)[:2]
        else:
            out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, False)[:2]
        return out, lse.reshape(batch, heads, -1)[..., :num_q]


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference attention: ``(out [B, h, Nq, D] in q.dtype, lse [B, h, Nq])``, math in float32 (float64 for
    float64 inputs)."""
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    scores = (q.to(work) @ k.to(work).transpose(-1, -2)) / math.sqrt(q.shape[-1])
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.exp(scores - lse.unsqueeze(-1)) @ v.to(work)
    return out.to(q.dtype), lse


class _Merged:
    """Running log-sum-exp merge of partial results ``[B, h, N, D]`` (accumulated in float32 or float64)."""

    def __init__(self, merge_impl: str) -> None:
        self.out: torch.Tensor | None = None
        self.lse: torch.Tensor | None = None
        self.merge_impl = merge_impl

    def add(self, out: torch.Tensor, lse: torch.Tensor) -> None:
        work = torch.float64 if out.dtype == torch.float64 else torch.float32
        if self.out is None:
            self.out = out.to(work).contiguous()
            self.lse = lse.to(work).contiguous()
        else:
            lse_merge_(self.out, self.lse, out, lse, impl=self.merge_impl)

    def result(self, like: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """The merged output ``[B, h, N, D]`` in ``like.dtype`` (zeros of ``shape`` if nothing was added)."""
        if self.out is None:
            return like.new_zeros(shape)
        return self.out.to(like.dtype)


# --------------------------------------------------------------------------------------------------------------
# Ulysses pieces


def _seq_to_heads(q, k, v, rotary: Rotary | None, comm: SeqComm, seq_sizes: list[int], head_sizes: list[int],
                  pack_impl: str) -> torch.Tensor:
    """``q, k, v [B, s, H, D]`` (sequence shard) -> ``[3, B, N, h, D]`` (this rank's heads, all of ``N =
    sum(seq_sizes)`` tokens of the comm), rotary applied to q and k."""
    batch, _, _, head_dim = q.shape
    cos, sin = rotary if rotary is not None else (None, None)
    sends = rope_pack(q, k, v, cos, sin, head_sizes, impl=pack_impl)
    mine = head_sizes[comm.rank]
    shapes = [(3, batch, size, mine, head_dim) for size in seq_sizes]
    received = comm.all_to_all(list(sends), shapes)
    return received[0] if len(received) == 1 else torch.cat(received, dim=2)


def _heads_to_seq(out_BNhD: torch.Tensor, comm: SeqComm, seq_sizes: list[int], head_sizes: list[int]) -> torch.Tensor:
    """Inverse of :func:`_seq_to_heads` for the output: ``[B, N, h, D]`` -> ``[B, s, H, D]``."""
    batch, _, _, head_dim = out_BNhD.shape
    starts = offsets(seq_sizes)
    sends = [out_BNhD[:, start:start + size].contiguous() for start, size in zip(starts, seq_sizes)]
    mine = seq_sizes[comm.rank]
    shapes = [(batch, mine, heads, head_dim) for heads in head_sizes]
    received = comm.all_to_all(sends, shapes)
    return received[0] if len(received) == 1 else torch.cat(received, dim=2)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_sizes: list[int], rank: int) -> None:
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must all be [B, s, H, D], got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if q.shape[1] != seq_sizes[rank]:
        raise ValueError(f"rank {rank} holds {q.shape[1]} tokens, but its shard is {seq_sizes[rank]} of "
                         f"{seq_sizes}")


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, comm: SeqComm, seq_sizes: list[int],
                      rotary: Rotary | None = None, local: LocalAttention = LocalAttention(),
                      pack_impl: str = "auto", head_chunks: int = 1) -> torch.Tensor:
    """Ulysses attention (module docstring); ``len(seq_sizes) == comm.size``. Heads split as
    ``split_sizes(H, comm.size)``.

    ``head_chunks > 1`` pipelines by heads: each rank's heads are cut into that many groups (at most its head
    count; 1 if some rank has no heads), every group's all-to-all is started at once, and attention on group ``c``
    runs while the later groups arrive and group ``c - 1``'s output travels back (with a non-blocking comm).
    """
    _check(q, k, v, seq_sizes, comm.rank)
    size, me = comm.size, comm.rank
    batch, _, num_heads, head_dim = q.shape
    head_sizes = split_sizes(num_heads, size)
    chunks = max(1, min(head_chunks, min(head_sizes)))
    pieces = [split_sizes(heads, chunks) for heads in head_sizes]  # pieces[j][c]: heads of rank j, group c
    cos, sin = rotary if rotary is not None else (None, None)
    segments = rope_pack(q, k, v, cos, sin, [n for per_rank in pieces for n in per_rank], impl=pack_impl)
    incoming = [comm.start_all_to_all([segments[j * chunks + c] for j in range(size)],
                                      [(3, batch, n, pieces[me][c], head_dim) for n in seq_sizes])
                for c in range(chunks)]
    starts = offsets(seq_sizes)
    outgoing = []
    for c in range(chunks):
        received = incoming[c].wait()
        qkv = received[0] if size == 1 else torch.cat(received, dim=2)  # [3, B, N, h_c, D]
        if qkv.shape[3] and qkv.shape[2]:
            out = local(qkv[0].transpose(1, 2), qkv[1].transpose(1, 2), qkv[2].transpose(1, 2)).transpose(1, 2)
        else:
            out = qkv[0]
        sends = [out[:, start:start + n].contiguous() for start, n in zip(starts, seq_sizes)]
        outgoing.append(comm.start_all_to_all(sends, [(batch, seq_sizes[me], pieces[j][c], head_dim)
                                                      for j in range(size)]))
    returned = [exchange.wait() for exchange in outgoing]  # returned[c][j]: [B, s, h_jc, D]
    parts = [returned[c][j] for j in range(size) for c in range(chunks)]  # global head order
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, comm: SeqComm, seq_sizes: list[int],
                   rotary: Rotary | None = None, local: LocalAttention = LocalAttention(),
                   merge_impl: str = "auto", pack_impl: str = "auto") -> torch.Tensor:
    """Ring attention (module docstring): ``S - 1`` steps, each sending the K/V block in hand to the next rank
    (non-blocking) while attending to it; ``len(seq_sizes) == comm.size``."""
    _check(q, k, v, seq_sizes, comm.rank)
    size, me = comm.size, comm.rank
    batch, num_q, heads, head_dim = q.shape
    nxt, prv = (me + 1) % size, (me - 1) % size
    cos, sin = rotary if rotary is not None else (None, None)
    packed = rope_pack(q, k, v, cos, sin, [heads], impl=pack_impl)[0]  # [3, B, s, H, D], q and k rotated
    q_t = packed[0].transpose(1, 2)
    kv = packed[1:]  # [2, B, s, H, D]: the block in hand, from shard (me - step) % size
    merged = _Merged(merge_impl)
    for step in range(size):
        pending = None
        if step < size - 1:
            send: list = [None] * size
            shapes: list = [None] * size
            send[nxt] = kv
            shapes[prv] = (2, batch, seq_sizes[(me - step - 1) % size], heads, head_dim)
            pending = comm.start_all_to_all(send, shapes)
        if num_q and kv.shape[2]:
            merged.add(*local.with_lse(q_t, kv[0].transpose(1, 2), kv[1].transpose(1, 2)))
        if pending is not None:
            kv = pending.wait()[prv]
    return merged.result(q, (batch, heads, num_q, head_dim)).transpose(1, 2)


def torus_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inner: SeqComm, outer: SeqComm,
                    seq_sizes: list[int], rotary: Rotary | None = None, local: LocalAttention = LocalAttention(),
                    num_chunks: int = 2, pack_impl: str = "auto", merge_impl: str = "auto",
                    probe: OverlapProbe | None = None) -> torch.Tensor:
    """Torus attention (module docstring) on an ``outer.size x inner.size`` grid; this rank is
    ``outer.rank * inner.size + inner.rank`` and ``seq_sizes`` lists all ``outer.size * inner.size`` shards in
    that order.
    ``probe``: records the K/V exchange's transfers and the attention blocks (the inner all-to-alls are not
    counted)."""
    rows, cols = outer.size, inner.size
    if len(seq_sizes) != rows * cols:
        raise ValueError(f"torus {rows} x {cols} needs {rows * cols} shard sizes, got {len(seq_sizes)}")
    row = outer.rank
    _check(q, k, v, seq_sizes, row * cols + inner.rank)
    row_sizes = [seq_sizes[r * cols:(r + 1) * cols] for r in range(rows)]
    row_lens = [sum(sizes) for sizes in row_sizes]
    head_sizes = split_sizes(q.shape[2], cols)
    qkv = _seq_to_heads(q, k, v, rotary, inner, row_sizes[row], head_sizes, pack_impl)  # [3, B, N_row, h, D]
    _, batch, num_q, heads, head_dim = qkv.shape

    pieces = [split_sizes(length, num_chunks) for length in row_lens]
    exchanges = []  # (send, receive shapes) per chunk
    for chunk, start in enumerate(offsets(pieces[row])):
        size = pieces[row][chunk]
        piece = qkv[1:3, :, start:start + size].contiguous()  # [2, B, n, h, D]
        send = [piece if peer != row else None for peer in range(rows)]
        shapes = [(2, batch, pieces[peer][chunk], heads, head_dim) if peer != row else None for peer in range(rows)]
        exchanges.append((send, shapes))

    merged = _Merged(merge_impl)
    q_t = qkv[0].transpose(1, 2)
    device = qkv.device

    def attend(k_block: torch.Tensor, v_block: torch.Tensor) -> None:  # [B, n, h, D] each
        if heads and num_q and k_block.shape[1]:
            with probe.span("compute", device) if probe is not None else contextlib.nullcontext():
                k_block, v_block = k_block.to(device), v_block.to(device)
                merged.add(*local.with_lse(q_t, k_block.transpose(1, 2), v_block.transpose(1, 2)))

    def landed(received: list) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(received[(row + step) % rows][0], received[(row + step) % rows][1]) for step in range(1, rows)]

    if outer.blocking_start:  # this thread exchanges; a worker attends to what has landed
        staging = getattr(outer, "device", device)  # staged first: a copy later would wait for queued attention
        exchanges = [([t if t is None else t.to(staging) for t in send], shapes) for send, shapes in exchanges]
        worker = ComputeWorker(device)
        try:
            worker.submit(lambda: attend(qkv[1], qkv[2]))
            for send, shapes in exchanges:
                with probe.span("transfer") if probe is not None else contextlib.nullcontext():
                    received = outer.all_to_all(send, shapes)
                for k_block, v_block in landed(received):
                    worker.submit(lambda k_block=k_block, v_block=v_block: attend(k_block, v_block))
        except BaseException:
            worker.join(raise_error=False)  # the exchange's failure is the one to report
            raise
        worker.join()
    else:  # every piece in flight at once; attention queued behind each
        pending = [outer.start_all_to_all(send, shapes) for send, shapes in exchanges]
        if probe is not None:
            for exchange in pending:
                if exchange.events is not None:
                    probe.add_events("transfer", *exchange.events)
        attend(qkv[1], qkv[2])
        for exchange in pending:
            for k_block, v_block in landed(exchange.wait()):
                attend(k_block, v_block)
    out = merged.result(qkv, (batch, heads, num_q, head_dim)).transpose(1, 2)  # [B, N_row, h, D]
    return _heads_to_seq(out, inner, row_sizes[row], head_sizes)


class SeqParallelAttention:
    """A DiT group's self-attention: the layout, its comms and kernels, as one callable.

    Args:
        layout: the resolved layout (:func:`~spmd_diff.parallel.layout.resolve_layout`).
        comm: the whole group, rank order = shard order.
        inner, outer: torus only: this rank's inner axis (``layout.inner`` ranks, Ulysses) and outer axis
            (``layout.outer`` ranks, K/V exchange) of ``comm``.
        local: the attention kernel for local blocks.
        pack_impl, merge_impl: ``"auto"``, ``"triton"`` or ``"torch"`` for the fused kernels.
        head_chunks: Ulysses head-group pipelining (see :func:`ulysses_attention`).
    """

    def __init__(self, layout: SPLayout, comm: SeqComm, inner: SeqComm | None = None, outer: SeqComm | None = None,
                 local: LocalAttention = LocalAttention(), pack_impl: str = "auto", merge_impl: str = "auto",
                 head_chunks: int = 1) -> None:
        if comm.size != layout.degree:
            raise ValueError(f"layout {layout.describe()} needs {layout.degree} ranks, the comm has {comm.size}")
        if layout.name == "torus" and (inner is None or outer is None or inner.size != layout.inner
                                       or outer.size != layout.outer):
            raise ValueError(f"{layout.describe()} needs row and column comms of {layout.inner} and {layout.outer}")
        self.layout, self.comm, self.inner, self.outer = layout, comm, inner, outer
        self.local, self.pack_impl, self.merge_impl = local, pack_impl, merge_impl
        self.head_chunks = head_chunks
        self.probe: OverlapProbe | None = None
        """Set to an :class:`OverlapProbe` to record the torus K/V exchange's overlap with attention."""

    @property
    def rank(self) -> int:
        return self.comm.rank

    @property
    def size(self) -> int:
        return self.comm.size

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_sizes: list[int],
                 rotary: Rotary | None = None) -> torch.Tensor:
        """``[B, s, H, D]`` shard in, ``[B, s, H, D]`` out (see the module docstring)."""
        name = self.layout.name
        if name == "ulysses":
            return ulysses_attention(q, k, v, self.comm, seq_sizes, rotary, self.local, self.pack_impl,
                                     self.head_chunks)
        if name == "ring":
            return ring_attention(q, k, v, self.comm, seq_sizes, rotary, self.local, self.merge_impl, self.pack_impl)
        if name == "torus":
            return torus_attention(q, k, v, self.inner, self.outer, seq_sizes, rotary, self.local,
                                   self.layout.num_chunks, self.pack_impl, self.merge_impl, self.probe)
        if rotary is not None:
            q, k = apply_rotary_reference(q, *rotary), apply_rotary_reference(k, *rotary)
        return self.local(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
