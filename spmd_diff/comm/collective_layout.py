"""Where a ``GroupCollectives`` region lives in the heap, how messages are cut into chunks, and the slot header
that describes a message (pure: no transport, no state).

A ``GroupCollectives`` owns one region of the symmetric heap (allocated once, with everything else, at start):

- ``grant[r]`` (one int64 per world rank): written by rank ``r``: how far this rank may write into ``r``'s slots;
- ``arrive[r]`` (one int64 per world rank): written by rank ``r``: which of its chunks have landed here;
- ``max_ranks`` slots, one per *group position* of a source: a 128-byte header and two chunk buffers.

Forming a group (``GroupCollectives.group(ranks)``) is local and takes microseconds: the group is its rank list.
Every pair of ranks keeps an *epoch*, the count of operations the two have done together (in any group), on both
sides, without communicating: both call the same operations in the same order (as with MPI or NCCL, collectives
on groups that share ranks must be called in one order on the shared ranks). Signal values carry the epoch in
their high bits, ``epoch << EPOCH_SHIFT | k``, so a word written in an earlier operation (or another group) can
never satisfy a wait of a later one, and slots are reused safely across groups and calls.

Protocol of one operation between a sender ``s`` and a receiver ``r`` (chunk ``k`` of a message, from 0):

1. ``r`` grants ``s`` chunks ``< 2`` (``grant[r]`` on ``s`` := ``e << 20 | 2``) once it is in the operation, so
   ``s`` never writes into a slot that ``r`` is still reading for an earlier operation;
2. ``s`` waits for ``grant >= e << 20 | k + 1``, puts chunk ``k`` into buffer ``k % 2`` of its slot on ``r``
   (chunk 0 with the header when the receiver does not know the size), then ``arrive[s]`` := ``e << 20 | k + 1``,
   ordered after the payload (``put_signal``);
3. ``r`` waits for ``arrive[s] >= e << 20 | k + 1``, copies the chunk out, and grants chunk ``k + 2``.

On device heaps, operations involving the same pair of ranks must run in the order they were called: issue them on
one CUDA stream (or order the streams), since epochs are counted in call order. ``all_to_all_into`` among GPUs that
map each other's heaps runs as one kernel (CUDA C in ``spmd_diff.kernels.p2p_cuda``, else Triton in
``spmd_diff.kernels.p2p_all_to_all``) that follows this very protocol; other operations are driven from the host.

Operations run in rounds (round ``k``: every chunk ``k`` is sent, then every chunk ``k`` is received), so on one
CUDA stream or on the host no wait depends on a later step: deadlock-free by induction over rounds. On device
heaps everything is enqueued on CUDA streams (one per peer and direction for large messages) and the host does
not wait, except to read headers; deadlines are enforced when the host next synchronizes (``Group.synchronize``,
or when more than ``max_inflight`` operations are queued), naming the group, the peer and the epoch.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import torch

from spmd_diff.comm.transport import SIGNAL_BYTES, as_byte_tensor, round_up

EPOCH_SHIFT = 20
"""Low bits of a signal value: the chunk count; high bits: the pair's epoch."""
SLOT_HEADER_BYTES = 128
"""Per slot: what the receiver needs when it does not know the message (dtype, shape, bytes, chunk size)."""
ALIGN = 256
"""Alignment of every block of the region, and granularity of chunk sizes."""
SINGLE_CHUNK_BYTES = 2 << 20
"""Messages up to this size go in one chunk (no pipelining: latency first)."""
TARGET_CHUNK_BYTES = 16 << 20
"""Larger messages are cut into chunks of about this size (at least two, so copy-out overlaps transfer)."""

_HEADER = struct.Struct("<IIIIQQ8q")  # magic, dtype code, ndim, pad, nbytes, chunk bytes, shape[8]
_MAGIC = 0x53504347  # "SPCG"
_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.uint8, torch.int8, torch.int16,
           torch.int32, torch.int64, torch.bool, torch.complex64, torch.complex128]
_DTYPES += [getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2", "uint16", "uint32", "uint64")
            if isinstance(getattr(torch, name, None), torch.dtype)]
_DTYPE_CODE = {dtype: code for code, dtype in enumerate(_DTYPES)}


def chunk_split(nbytes: int, max_chunk_bytes: int) -> tuple[int, int]:
    """``(num_chunks, chunk_bytes)`` of a message; a pure function both ends compute alike.

    One chunk up to ``SINGLE_CHUNK_BYTES`` (if it fits a buffer), else chunks of about ``TARGET_CHUNK_BYTES``,
    at least two, none larger than ``max_chunk_bytes``. A message of 0 bytes is one empty chunk.
    """
    if nbytes <= min(SINGLE_CHUNK_BYTES, max_chunk_bytes):
        return 1, max(nbytes, 0)
    target = min(TARGET_CHUNK_BYTES, max_chunk_bytes)
    num_chunks = max(2, -(-nbytes // target))
    chunk = round_up(-(-nbytes // num_chunks), ALIGN)
    return -(-nbytes // chunk), chunk


def as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """Flat uint8 view ``(nbytes,)`` of a contiguous tensor of any dtype (bf16, bool and 0-dim included)."""
    try:
        return as_byte_tensor(tensor)
    except ValueError as error:
        raise ValueError(f"collectives: {error}") from None


@dataclass(frozen=True)
class CollectiveLayout:
    """Where a ``GroupCollectives`` region lives in the heap; the same on every rank."""

    base_offset: int
    world_size: int
    max_ranks: int
    chunk_bytes: int
    """Bytes of one chunk buffer (two per slot)."""

    def __post_init__(self) -> None:
        if self.base_offset < 0 or self.base_offset % ALIGN:
            raise ValueError(f"base_offset must be a non-negative multiple of {ALIGN}, got {self.base_offset}")
        if self.max_ranks < 1 or self.world_size < 1:
            raise ValueError(f"max_ranks and world_size must be >= 1, got {self.max_ranks}, {self.world_size}")
        if self.chunk_bytes < ALIGN or self.chunk_bytes % ALIGN:
            raise ValueError(f"chunk_bytes must be a positive multiple of {ALIGN}, got {self.chunk_bytes}")

    @property
    def grant_offset(self) -> int:
        return self.base_offset

    @property
    def arrive_offset(self) -> int:
        return self.base_offset + round_up(self.world_size * SIGNAL_BYTES, ALIGN)

    @property
    def header_offset(self) -> int:
        return self.arrive_offset + round_up(self.world_size * SIGNAL_BYTES, ALIGN)

    @property
    def data_offset(self) -> int:
        return self.header_offset + round_up(self.max_ranks * SLOT_HEADER_BYTES, ALIGN)

    @property
    def end(self) -> int:
        """First heap byte after the region."""
        return self.data_offset + 2 * self.max_ranks * self.chunk_bytes

    def buffer_offset(self, slot: int, chunk: int) -> int:
        return self.data_offset + (2 * slot + chunk % 2) * self.chunk_bytes

    @staticmethod
    def bytes_needed(world_size: int, max_ranks: int, chunk_bytes: int) -> int:
        """Region bytes for these sizes (add to ``base_offset`` for the heap end)."""
        return CollectiveLayout(0, world_size, max_ranks, round_up(chunk_bytes, ALIGN)).end

    @classmethod
    def fit(cls, base_offset: int, region_bytes: int, world_size: int, max_ranks: int) -> "CollectiveLayout":
        """The layout with the largest chunk buffers that fits ``region_bytes``."""
        control = cls(base_offset, world_size, max_ranks, ALIGN).data_offset - base_offset
        chunk = (region_bytes - control) // (2 * max_ranks) // ALIGN * ALIGN
        if chunk < ALIGN:
            raise ValueError(f"a collectives region of {region_bytes} bytes is too small for {world_size} ranks and "
                             f"groups of up to {max_ranks}: it needs at least {control + 2 * max_ranks * ALIGN}")
        return cls(base_offset, world_size, max_ranks, chunk)


def encode_header(tensor: torch.Tensor, chunk_bytes: int) -> bytes:
    """The slot header describing ``tensor`` (at most 8 dimensions)."""
    if tensor.dim() > 8:
        raise ValueError(f"collectives carry tensors of up to 8 dimensions, got {tensor.dim()}")
    code = _DTYPE_CODE.get(tensor.dtype)
    if code is None:
        raise ValueError(f"collectives do not carry dtype {tensor.dtype}")
    shape = list(tensor.shape) + [0] * (8 - tensor.dim())
    nbytes = tensor.numel() * tensor.element_size()
    return _HEADER.pack(_MAGIC, code, tensor.dim(), 0, nbytes, chunk_bytes, *shape)


def decode_header(raw: bytes, what: str) -> tuple[torch.dtype, tuple[int, ...], int, int]:
    """``(dtype, shape, nbytes, chunk_bytes)`` from a slot header."""
    magic, code, ndim, _, nbytes, chunk_bytes, *shape = _HEADER.unpack(raw[:_HEADER.size])
    if magic != _MAGIC or code >= len(_DTYPES) or ndim > 8:
        raise RuntimeError(f"{what}: corrupt slot header (magic {magic:#x}, dtype code {code}, ndim {ndim}); "
                           "did every rank call the same collective?")
    shape = tuple(shape[:ndim])
    dtype = _DTYPES[code]
    if math.prod(shape) * torch.empty(0, dtype=dtype).element_size() != nbytes:
        raise RuntimeError(f"{what}: slot header says {nbytes} bytes for {dtype}{shape}")
    return dtype, shape, nbytes, chunk_bytes
