"""One-kernel all-to-all between GPUs that map each other's heaps (NVLink/PCIe P2P): the group-free protocol of
``spmd_diff.comm.collective_layout`` run by the GPU itself, SMs copying straight into the peers' slots.

The host path enqueues about six operations per peer and chunk (grant, grant wait, put, signal, arrival wait,
copy-out), each a Python call; this kernel does all of it in one launch. It uses the very same heap words, slot
buffers, chunk plan and signal values, so the two paths are interchangeable per operation (a rank may use either;
its peers need not know which).

Program ``(p, b)`` (peer row ``p`` of the descriptor table, block ``b`` of ``nb``), with ``e = epoch << 20``:

1. ``b == 0`` grants the peer chunks 0 and 1: the peer's grant word for us := ``e | 2`` (release, system scope);
2. for each chunk ``k``: wait (acquire) until our grant word from the peer is ``>= e | k + 1``, copy this block's
   share of chunk ``k`` into buffer ``k % 2`` of our slot on the peer; the last block to finish chunk ``k`` (a
   counter per buffer) sets the peer's arrive word for us to ``e | k + 1`` (release, system scope: after every
   block's stores); then wait until our arrive word from the peer is ``>= e | k + 1``, copy this block's share
   out of buffer ``k % 2`` of the peer's slot here, and the last block grants the peer chunk ``k + 2``.

Blocks go through chunks in order, so a counter per buffer parity suffices. A wait that spins ``max_spins``
times without success gives up, records the peer row in ``error`` and goes on (the host reports a timeout); the
kernel never hangs the GPU for ever. Blocks wait for each other only through the peers, whose kernels must run
concurrently (as any collective's).

The torch reference is the host path (``GroupCollectives.set_fused(False)``); tests compare the two.
"""

from __future__ import annotations

import torch

from ._triton import HAS_TRITON, tl, triton

DESC_FIELDS = 14
"""int64 columns of a descriptor row (see ``describe``)."""
BLOCK_ELEMS = 2048
"""Elements one program moves per loop iteration (8 or 4 bytes each)."""
MAX_PEERS = 8
"""Most descriptor rows of one launch (epochs travel as that many scalar arguments)."""


def describe(send_ptr: int, send_bytes: int, send_chunks: int, send_chunk_bytes: int, peer_slot: int,
             peer_grant: int, my_grant: int, peer_arrive: int, my_arrive: int, recv_slot: int, out_ptr: int,
             recv_bytes: int, recv_chunks: int, recv_chunk_bytes: int) -> tuple[int, ...]:
    """One descriptor row: device addresses (peers' through P2P mappings) and sizes in bytes. ``peer_slot`` /
    ``recv_slot`` are chunk buffer 0 of the slot; buffer 1 is ``buffer_stride`` bytes further."""
    return (send_ptr, send_bytes, send_chunks, send_chunk_bytes, peer_slot, peer_grant, my_grant, peer_arrive,
            my_arrive, recv_slot, out_ptr, recv_bytes, recv_chunks, recv_chunk_bytes)


class DescriptorTables:
    """Device copies of descriptor tables, cached by their contents: an operation on buffers seen before costs no
    copy. Calling it with rows gives the ``[rows, DESC_FIELDS]`` int64 table on ``device``."""

    def __init__(self, device: torch.device, limit: int = 256) -> None:
        self.device, self.limit = device, limit
        self._tables: dict = {}

    def __call__(self, rows: list[tuple[int, ...]]) -> torch.Tensor:
        key = tuple(rows)
        table = self._tables.get(key)
        if table is None:
            if len(self._tables) >= self.limit:
                self._tables.clear()
            table = self._tables[key] = torch.tensor(rows, dtype=torch.int64).to(self.device)
        return table


if HAS_TRITON:

    @triton.jit
    def _wait_at_least(word_ptr, target, max_spins):
        value = tl.atomic_add(word_ptr, 0, sem="acquire", scope="sys")
        spins = 0
        while (value < target) & (spins < max_spins):
            value = tl.atomic_add(word_ptr, 0, sem="acquire", scope="sys")
            spins += 1
        return value >= target

    @triton.jit
    def _data_ptr(address, WIDE: tl.constexpr):
        if WIDE:
            ptr = address.to(tl.pointer_type(tl.int64))
        else:
            ptr = address.to(tl.pointer_type(tl.int32))
        return ptr

    @triton.jit
    def _copy_share(src_ptr, dst_ptr, num_elems, b, nb, BLOCK: tl.constexpr):
        lanes = tl.arange(0, BLOCK)
        for start in range(b * BLOCK, num_elems, nb * BLOCK):
            index = start + lanes
            mask = index < num_elems
            tl.store(dst_ptr + index, tl.load(src_ptr + index, mask=mask), mask=mask)

    @triton.jit(do_not_specialize=["max_spins", "e0", "e1", "e2", "e3", "e4", "e5", "e6", "e7"])
    def _p2p_all_to_all_kernel(desc_ptr, counters_ptr, error_ptr, buffer_stride, max_spins,
                               e0, e1, e2, e3, e4, e5, e6, e7,
                               FIELDS: tl.constexpr, BLOCK: tl.constexpr, WIDE: tl.constexpr,
                               ELEM_BYTES: tl.constexpr):
        p = tl.program_id(0)
        b = tl.program_id(1)
        nb = tl.num_programs(1)
        epoch = tl.where(p == 0, e0, tl.where(p == 1, e1, tl.where(p == 2, e2, tl.where(p == 3, e3, tl.where(
            p == 4, e4, tl.where(p == 5, e5, tl.where(p == 6, e6, e7)))))))
        epoch = epoch.to(tl.int64) << 20
        row = desc_ptr + p * FIELDS
        send_src = _data_ptr(tl.load(row + 0), WIDE)
        send_bytes = tl.load(row + 1)
        send_chunks = tl.load(row + 2)
        send_chunk = tl.load(row + 3)
        peer_slot = _data_ptr(tl.load(row + 4), WIDE)
        peer_grant = tl.load(row + 5).to(tl.pointer_type(tl.int64))
        my_grant = tl.load(row + 6).to(tl.pointer_type(tl.int64))
        peer_arrive = tl.load(row + 7).to(tl.pointer_type(tl.int64))
        my_arrive = tl.load(row + 8).to(tl.pointer_type(tl.int64))
        recv_slot = _data_ptr(tl.load(row + 9), WIDE)
        recv_out = _data_ptr(tl.load(row + 10), WIDE)
        recv_bytes = tl.load(row + 11)
        recv_chunks = tl.load(row + 12)
        recv_chunk = tl.load(row + 13)
        stride = buffer_stride // ELEM_BYTES
        if b == 0:
            tl.atomic_xchg(peer_grant, epoch | 2, sem="release", scope="sys")
        ok = 1
        for k in range(0, tl.maximum(send_chunks, recv_chunks)):
            if k < send_chunks:
                granted = _wait_at_least(my_grant, epoch | (k + 1), max_spins)
                ok = ok & granted.to(tl.int32)
                if granted:
                    low = k * send_chunk
                    count = tl.minimum(send_chunk, send_bytes - low) // ELEM_BYTES
                    _copy_share(send_src + low // ELEM_BYTES, peer_slot + (k % 2) * stride, count, b, nb, BLOCK)
                tl.debug_barrier()
                done = tl.atomic_add(counters_ptr + p * 4 + k % 2, 1, sem="acq_rel", scope="sys")
                if done == nb - 1:
                    tl.atomic_xchg(counters_ptr + p * 4 + k % 2, 0, sem="relaxed", scope="gpu")
                    tl.atomic_xchg(peer_arrive, epoch | (k + 1), sem="release", scope="sys")
            if k < recv_chunks:
                arrived = _wait_at_least(my_arrive, epoch | (k + 1), max_spins)
                ok = ok & arrived.to(tl.int32)
                if arrived:
                    low = k * recv_chunk
                    count = tl.minimum(recv_chunk, recv_bytes - low) // ELEM_BYTES
                    _copy_share(recv_slot + (k % 2) * stride, recv_out + low // ELEM_BYTES, count, b, nb, BLOCK)
                tl.debug_barrier()
                done = tl.atomic_add(counters_ptr + p * 4 + 2 + k % 2, 1, sem="acq_rel", scope="sys")
                if done == nb - 1:
                    tl.atomic_xchg(counters_ptr + p * 4 + 2 + k % 2, 0, sem="relaxed", scope="gpu")
                    if k + 2 < recv_chunks:
                        tl.atomic_xchg(peer_grant, epoch | (k + 3), sem="release", scope="sys")
        if ok == 0:
            tl.atomic_xchg(error_ptr, (p + 1).to(tl.int64), sem="relaxed", scope="gpu")


class P2PAllToAll:
    """Launches the one-kernel all-to-all on the current stream; owns its counters, error word and a cache of
    device descriptor tables (keyed by their contents: reused buffers cost no copy).

    Args:
        device: the GPU.
        buffer_stride: bytes between chunk buffers 0 and 1 of a slot (the collectives layout's chunk size).
        max_spins: spins of a wait before it gives up (about a microsecond each).
    """

    def __init__(self, device: torch.device, buffer_stride: int, max_spins: int = 50_000_000) -> None:
        if not HAS_TRITON:
            raise RuntimeError("the one-kernel all-to-all needs Triton")
        self.device = device
        self.buffer_stride = buffer_stride
        self.max_spins = max_spins
        self.counters = torch.zeros(MAX_PEERS * 4, dtype=torch.int64, device=device)
        self.error = torch.zeros(1, dtype=torch.int64, device=device)
        self.table = DescriptorTables(device)

    @staticmethod
    def blocks_for(largest_chunk: int, peers: int) -> int:
        """Programs per peer row: one per 64 KiB of the largest chunk, at most 32, and at most 128 in all."""
        return max(1, min(32, 128 // peers, -(-largest_chunk // (64 << 10))))

    def launch(self, rows: list[tuple[int, ...]], epochs: list[int], blocks: int,
               table: torch.Tensor | None = None) -> None:
        """Enqueue one all-to-all on the current stream: ``rows`` from ``describe``, ``epochs[i]`` the pair epoch
        of row ``i`` (not shifted), ``blocks`` programs per row. Addresses and sizes must be multiples of 4."""
        num = len(rows)
        if not 0 < num <= MAX_PEERS:
            raise ValueError(f"one launch takes 1 to {MAX_PEERS} peers, got {num}")
        if table is None:
            table = self.table(rows)
        wide = all(value % 8 == 0 for row in rows for value in (row[0], row[1], row[3], row[4], row[9], row[10],
                                                                  row[11], row[13])) and self.buffer_stride % 8 == 0
        padded = list(epochs) + [0] * (MAX_PEERS - num)
        _p2p_all_to_all_kernel[(num, blocks)](table, self.counters, self.error, self.buffer_stride, self.max_spins,
                                              *padded, FIELDS=DESC_FIELDS, BLOCK=BLOCK_ELEMS,
                                              WIDE=wide, ELEM_BYTES=8 if wide else 4,
                                              num_warps=8)

    def failed_row(self) -> int:
        """0 if no launch gave up waiting, else 1 + the descriptor row of a peer that did not answer (syncs)."""
        return int(self.error.item())
