"""One-kernel all-to-all between GPUs that map each other's heaps (NVLink/PCIe P2P): the group-free protocol of
``spmd_diff.comm.collectives`` for single-chunk messages, run by the GPU itself.

The host path enqueues about six operations per peer (grant, grant wait, put, signal, arrival wait, copy-out),
each a Python call; this kernel does the same steps in one launch, so small all-to-alls cost one launch instead
of ~20 host calls. It uses the very same heap words and slot buffers with the same values, so the two paths are
interchangeable per operation (a rank may use either; its peers need not know which).

Program ``(p, b)`` (peer row ``p`` of the descriptor table, block ``b`` of ``nb``):

1. ``b == 0`` grants the peer: its grant word for us := ``epoch | 2`` (release, system scope);
2. waits (acquire) until our grant word from the peer is ``>= epoch | 1``, then copies its share of the message
   into our slot's buffer 0 on the peer; the last block to finish (a counter) sets the peer's arrive word for us
   to ``epoch | 1`` (release, system scope: after every block's stores);
3. waits until our arrive word from the peer is ``>= epoch | 1`` and copies its share out of our local slot.

A wait that spins ``max_spins`` times without success gives up, records the peer row in ``error`` and skips the
rest (the host reports it as a timeout); the kernel never hangs the GPU for ever. All blocks of the grid must be
resident at once (grid <= SMs), since blocks wait for each other through the peers.

The torch reference is the host path (``GroupCollectives`` without ``fused``); tests compare the two.
"""

from __future__ import annotations

import torch

from ._triton import HAS_TRITON, tl, triton

DESC_FIELDS = 12
"""int64 columns of a descriptor row (see ``describe``)."""
BLOCK_BYTES = 16 * 1024
"""Bytes one program moves per loop iteration (int32 lanes)."""


def describe(send_ptr: int, send_bytes: int, peer_slot: int, peer_grant: int, my_grant: int, peer_arrive: int,
             my_arrive: int, recv_slot: int, out_ptr: int, recv_bytes: int, epoch_bits: int) -> list[int]:
    """One descriptor row: addresses (device virtual addresses, peers' through P2P mappings) and sizes in bytes
    (multiples of 4); ``epoch_bits`` is ``epoch << EPOCH_SHIFT``."""
    return [send_ptr, send_bytes, peer_slot, peer_grant, my_grant, peer_arrive, my_arrive, recv_slot, out_ptr,
            recv_bytes, epoch_bits, 0]


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
    def _copy_share(src_ptr, dst_ptr, num_words, b, nb, BLOCK: tl.constexpr):
        lanes = tl.arange(0, BLOCK)
        for start in range(b * BLOCK, num_words, nb * BLOCK):
            index = start + lanes
            mask = index < num_words
            tl.store(dst_ptr + index, tl.load(src_ptr + index, mask=mask), mask=mask)

    @triton.jit
    def _p2p_all_to_all_kernel(desc_ptr, counters_ptr, error_ptr, max_spins,
                               FIELDS: tl.constexpr, BLOCK: tl.constexpr):
        p = tl.program_id(0)
        b = tl.program_id(1)
        nb = tl.num_programs(1)
        row = desc_ptr + p * FIELDS
        send_src = tl.load(row + 0).to(tl.pointer_type(tl.int32))
        send_words = tl.load(row + 1) // 4
        peer_slot = tl.load(row + 2).to(tl.pointer_type(tl.int32))
        peer_grant = tl.load(row + 3).to(tl.pointer_type(tl.int64))
        my_grant = tl.load(row + 4).to(tl.pointer_type(tl.int64))
        peer_arrive = tl.load(row + 5).to(tl.pointer_type(tl.int64))
        my_arrive = tl.load(row + 6).to(tl.pointer_type(tl.int64))
        recv_slot = tl.load(row + 7).to(tl.pointer_type(tl.int32))
        recv_out = tl.load(row + 8).to(tl.pointer_type(tl.int32))
        recv_words = tl.load(row + 9) // 4
        epoch = tl.load(row + 10)
        if b == 0:
            tl.atomic_xchg(peer_grant, epoch | 2, sem="release", scope="sys")
        granted = _wait_at_least(my_grant, epoch | 1, max_spins)
        if granted:
            _copy_share(send_src, peer_slot, send_words, b, nb, BLOCK)
        tl.debug_barrier()
        done = tl.atomic_add(counters_ptr + p, 1, sem="acq_rel", scope="sys")
        if done == nb - 1:
            tl.atomic_xchg(counters_ptr + p, 0, sem="relaxed", scope="gpu")
            if granted:
                tl.atomic_xchg(peer_arrive, epoch | 1, sem="release", scope="sys")
        arrived = _wait_at_least(my_arrive, epoch | 1, max_spins)
        if arrived:
            _copy_share(recv_slot, recv_out, recv_words, b, nb, BLOCK)
        if (granted.to(tl.int32) + arrived.to(tl.int32)) < 2:
            tl.atomic_xchg(error_ptr, (p + 1).to(tl.int64), sem="relaxed", scope="gpu")


class P2PAllToAll:
    """Launches the one-kernel all-to-all on the current stream; owns its counters and error word.

    Args:
        device: the GPU.
        max_peers: most descriptor rows of one launch.
        max_spins: spins of a wait before it gives up (about a microsecond each).
    """

    def __init__(self, device: torch.device, max_peers: int, max_spins: int = 50_000_000) -> None:
        if not HAS_TRITON:
            raise RuntimeError("the one-kernel all-to-all needs Triton")
        self.device = device
        self.max_spins = max_spins
        self.counters = torch.zeros(max_peers, dtype=torch.int64, device=device)
        self.error = torch.zeros(1, dtype=torch.int64, device=device)

    def launch(self, rows: list[list[int]], largest_bytes: int) -> None:
        """Enqueue one all-to-all over ``rows`` (from ``describe``) on the current stream."""
        num = len(rows)
        if num == 0:
            return
        # a fresh pinned table per launch (torch's host allocator reuses it only after the copy ran) and a fresh
        # device table (freed in stream order): nothing a queued launch reads is overwritten, the host never waits
        desc = torch.tensor(rows, dtype=torch.int64).pin_memory().to(self.device, non_blocking=True)
        blocks = max(1, min(16, -(-largest_bytes // (4 * BLOCK_BYTES))))
        _p2p_all_to_all_kernel[(num, blocks)](desc, self.counters, self.error, self.max_spins,
                                              FIELDS=DESC_FIELDS, BLOCK=BLOCK_BYTES // 4, num_warps=8)

    def failed_row(self) -> int:
        """0 if no launch gave up waiting, else 1 + the descriptor row of a peer that did not answer (syncs)."""
        return int(self.error.item())
