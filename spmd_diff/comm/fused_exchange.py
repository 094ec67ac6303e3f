"""The one-kernel implementation of ``all_to_all_into`` among GPUs that map each other's heaps (CUDA C through
CuPy, else Triton): same protocol, heap words and chunk split as the host-driven rounds, launched once per
operation and replayed while the same buffers come back."""

from __future__ import annotations

import logging
import time
from typing import Any, Optional

from spmd_diff.comm.collective_layout import EPOCH_SHIFT, as_bytes
from spmd_diff.comm.exchange import Exchange, Operation
from spmd_diff.comm.kernel_loader import load_kernel_module
from spmd_diff.comm.transport import SIGNAL_BYTES
from spmd_diff.errors import StageTimeout

FUSED_MAX_PEERS = 8
"""Device heaps: ``all_to_all_into`` with up to this many peers, all P2P-mapped, runs as one kernel."""
KERNELS = ("cuda", "triton", "off")
"""Which one-kernel all-to-all to use: CUDA C (through CuPy; Triton where CuPy is missing), Triton, or none (the
host-driven rounds)."""

log = logging.getLogger("spmd_diff")


class FusedExchange(Exchange):
    """Owns the kernel of one ``GroupCollectives`` (loaded on first use) and its replayable launches.

    Args:
        coll: the ``GroupCollectives`` (its transport, layout, timeout, epochs and tracking are used).
        kernel: one of ``KERNELS``.
        a2a_blocks: ``(send_blocks, recv_blocks)`` per peer for the CUDA kernel, or None (chosen by size).
        enabled: allow the kernel at all (it runs only on device heaps whose peers have addresses).
    """

    def __init__(self, coll: Any, kernel: str = "cuda", a2a_blocks: Optional[tuple[int, int]] = None,
                 enabled: bool = True) -> None:
        self.coll = coll
        self._kernel: Any = None  # None: not loaded yet; False: none can run here
        self._launches: dict = {}
        self.kernel_choice, self.a2a_blocks = "cuda", None
        self.select(kernel, a2a_blocks)
        self.set_enabled(enabled)

    def select(self, kernel: str, a2a_blocks: Optional[tuple[int, int]] = None) -> None:
        """Use ``kernel`` (one of ``KERNELS``) from the next operation on; local, between operations."""
        if kernel not in KERNELS:
            raise ValueError(f"the one-kernel all-to-all must be one of {', '.join(KERNELS)}, got {kernel!r}")
        if a2a_blocks is not None and (len(a2a_blocks) != 2 or min(a2a_blocks) < 1):
            raise ValueError(f"a2a_blocks must be two positive block counts, got {a2a_blocks!r}")
        self.kernel_choice, self.a2a_blocks = kernel, None if a2a_blocks is None else tuple(a2a_blocks)
        self._kernel = None
        self._launches.clear()

    def set_enabled(self, enabled: bool) -> None:
        """Allow (device heaps with mapped peers) or forbid the one-kernel path; local, between operations."""
        coll = self.coll
        self.allowed = bool(enabled) and coll.on_device and hasattr(coll.transport, "address")
        self._launches.clear()

    def kernel(self) -> Any:
        """The one-kernel all-to-all launcher, or None where it cannot run (no CuPy nor Triton, host heap,
        disabled, ``kernel="off"``)."""
        if not self.allowed:
            return None
        if self._kernel is None:
            coll = self.coll
            device, stride = coll.transport.device, coll.layout.chunk_bytes
            if self.kernel_choice == "cuda":
                try:
                    cuda = load_kernel_module("p2p_cuda")
                    if cuda.available():
                        self._kernel = cuda.CudaP2P(device, stride, timeout_s=coll.timeout_s, blocks=self.a2a_blocks)
                except Exception as error:  # noqa: BLE001 - NVRTC or CuPy trouble: the Triton kernel is next
                    log.warning("CUDA data-plane kernels unavailable (%s: %s)", type(error).__name__, error)
            if self._kernel is None and self.kernel_choice != "off":
                try:
                    module = load_kernel_module("p2p_all_to_all")
                    self._kernel = module.P2PAllToAll(device, stride, max_spins=int(coll.timeout_s * 1e6))
                except (ImportError, RuntimeError):
                    pass
            self._kernel = self._kernel or False
        return self._kernel or None

    def is_current(self, kernel: Any) -> bool:
        """Whether ``kernel`` is still the one in use (not switched, disabled or failed over)."""
        return self.allowed and kernel is self._kernel

    def launch_for(self, group: Any, key: tuple) -> Optional["FusedLaunch"]:
        """A launch already run by ``group`` with the buffers of ``key``, still current, or None."""
        launch = self._launches.get((group.ranks, key))
        return launch if launch is not None and launch.current else None

    def keep_launch(self, group: Any, key: tuple, launch: "FusedLaunch") -> None:
        if len(self._launches) >= 512:
            self._launches.clear()
        self._launches[(group.ranks, key)] = launch

    def check(self, sync: bool = False) -> None:
        """Raise StageTimeout if a launch gave up waiting for a peer. The CUDA kernels report through pinned host
        memory (no synchronization); the Triton kernel only when ``sync``."""
        kernel, coll = self._kernel, self.coll
        if not kernel:
            return
        if hasattr(kernel, "failure"):
            word = kernel.failure()
            if word:
                raise StageTimeout(f"rank {coll.rank}: a one-kernel all-to-all gave up after {coll.timeout_s:.0f} s "
                                   f"waiting for {self._describe_word(word)}")
        elif sync and kernel.failed_row():
            raise StageTimeout(f"rank {coll.rank}: a one-kernel all-to-all gave up waiting for a peer (descriptor "
                               f"row {kernel.failed_row() - 1}) after ~{coll.timeout_s:.0f} s of spinning")

    def _describe_word(self, address: int) -> str:
        """What a wait on the local heap word at device ``address`` was waiting for."""
        coll = self.coll
        offset = address - coll.transport.address(coll.rank, 0)
        lay = coll.layout
        if lay.grant_offset <= offset < lay.arrive_offset:
            return f"a grant from rank {(offset - lay.grant_offset) // SIGNAL_BYTES} (is it in the operation?)"
        if lay.arrive_offset <= offset < lay.header_offset:
            return f"a chunk from rank {(offset - lay.arrive_offset) // SIGNAL_BYTES}"
        return f"the heap word at offset {offset}"

    def run(self, operation: Operation, epochs: dict[int, int]) -> bool:
        """Enqueue ``operation`` as one kernel where ``prepare_launch`` makes one; leaves it in
        ``operation.fused_launch`` (the group replays it while the same buffers come back)."""
        if operation.headers or not self.coll.on_device:
            return False
        launch = self.prepare_launch(operation)
        if launch is None:
            return False
        self.check()  # an earlier kernel gave up: StageTimeout, never a silent fallback
        peers = operation.peers
        pair_epochs = [epochs[p] >> EPOCH_SHIFT for p in peers]
        try:
            launch.enqueue(pair_epochs)
        except Exception as error:  # noqa: BLE001 - e.g. the kernel cannot launch here: nothing was enqueued
            log.warning("one-kernel all-to-all unavailable (%s: %s); using the host-driven path",
                        type(error).__name__, error)
            self._kernel = False
            return False
        launch.track(pair_epochs, operation.deadline)  # outside the try: a StageTimeout here must propagate
        me = operation.me
        for p in peers:
            operation.results[p] = operation.incoming[p][0]
        if operation.has_self:
            operation.results[me] = operation.recvs[me] if launch.has_self else operation.copy_self()
        operation.fused_launch = launch
        return True

    def prepare_launch(self, operation: Operation) -> Optional["FusedLaunch"]:
        """``operation`` (after ``prepare``) as one kernel, not launched, if every peer's heap is mapped here
        (P2P) and every address and size is a multiple of 4 bytes; same protocol, words and chunk split as the
        host path."""
        o = operation
        coll, tr, lay, ranks, me = self.coll, o.transport, o.layout, o.group.ranks, o.me
        peers, outgoing, incoming = o.peers, o.outgoing, o.incoming
        if not peers or len(peers) > FUSED_MAX_PEERS or set(outgoing) != set(peers) or set(incoming) != set(peers):
            return None
        kernel = self.kernel()
        if kernel is None:
            return None
        addresses = [tr.address(ranks[p], 0) for p in peers]
        if None in addresses:
            return None
        local, my_rank = tr.address(coll.rank, 0), coll.rank
        rows, largest = [], 0
        for p, peer in zip(peers, addresses):
            data, num_send, send_chunk, _ = outgoing[p]
            _, out_bytes, num_recv, recv_chunk = incoming[p]
            send_ptr = data.data_ptr() if data.numel() else 0
            out_ptr = out_bytes.data_ptr() if out_bytes.numel() else 0
            if (send_ptr | data.numel() | out_ptr | out_bytes.numel() | send_chunk | recv_chunk) % 4:
                return None
            largest = max(largest, send_chunk, recv_chunk)
            rows.append((send_ptr, data.numel(), num_send, send_chunk, peer + lay.buffer_offset(me, 0),
                         peer + lay.grant_offset + my_rank * SIGNAL_BYTES,
                         local + lay.grant_offset + ranks[p] * SIGNAL_BYTES,
                         peer + lay.arrive_offset + my_rank * SIGNAL_BYTES,
                         local + lay.arrive_offset + ranks[p] * SIGNAL_BYTES,
                         local + lay.buffer_offset(p, 0), out_ptr, out_bytes.numel(), num_recv, recv_chunk))
        fold_self = o.has_self and getattr(kernel, "SELF_ROWS", False) and len(rows) < FUSED_MAX_PEERS
        if fold_self:
            src, dst = as_bytes(o.sends[me]), as_bytes(o.recvs[me])
            rows.append((src.data_ptr() if src.numel() else 0, src.numel(), -1, 0, 0, 0, 0, 0, 0, 0,
                         dst.data_ptr() if dst.numel() else 0, dst.numel(), 0, 0))
        return FusedLaunch(self, kernel, o.group, peers, rows, kernel.blocks_for(largest, len(peers)),
                           [incoming[p][2] for p in peers], fold_self)


class FusedLaunch:
    """An all-to-all the one-kernel path already ran with these very buffers: replaying it costs a launch.

    The descriptor rows (addresses and chunk splits) do not change between calls with the same tensors; only the
    pair epochs do, and they travel as kernel arguments.
    """

    __slots__ = ("fused", "kernel", "coll", "me", "name", "peer_ranks", "rows", "table", "blocks", "last_chunks",
                 "has_self")

    def __init__(self, fused: FusedExchange, kernel: Any, group: Any, peers: list, rows: list, blocks: Any,
                 last_chunks: list, has_self: bool) -> None:
        self.fused, self.kernel, self.coll, self.me = fused, kernel, group.coll, group.rank_in_group
        self.name = f"{group.name} all_to_all_into (one kernel)"
        self.peer_ranks = [group.ranks[p] for p in peers]
        self.rows, self.blocks, self.last_chunks, self.has_self = rows, blocks, last_chunks, has_self
        self.table = kernel.table(rows)

    def enqueue(self, epochs: list) -> None:
        """Launch with these pair epochs (already advanced). Raises only if nothing was enqueued."""
        self.kernel.launch(self.rows, epochs, self.blocks, self.table)

    def track(self, epochs: list, deadline: float) -> None:
        """Track the launch against ``deadline`` (see ``GroupCollectives.track_lazily``)."""
        self.coll.track_lazily(self.name, (self._checks, epochs), deadline)

    @property
    def current(self) -> bool:
        """Whether the collectives still run this launch's kernel (not switched, disabled or failed over)."""
        return self.fused.is_current(self.kernel)

    def replay(self, send: list, out: list, deadline: Optional[float] = None) -> list:
        """The same operation again with the buffers it was prepared for: advance the epochs with every peer,
        launch, track, and copy this rank's own block where the kernel does not; returns ``out``. A launch that
        fails takes the epochs back (nothing was enqueued), so this rank stays in step with its peers."""
        coll = self.coll
        deadline = time.monotonic() + coll.timeout_s if deadline is None else deadline
        self.fused.check()
        epochs = [coll.next_epoch(rank) for rank in self.peer_ranks]
        try:
            self.enqueue(epochs)
        except BaseException:
            coll.rewind_epochs(self.peer_ranks)
            raise
        self.track(epochs, deadline)
        if not self.has_self:
            as_bytes(out[self.me]).copy_(as_bytes(send[self.me]))
        return out

    def _checks(self, epochs: list) -> list:
        lay = self.coll.layout
        return [(lay.arrive_offset + rank * SIGNAL_BYTES, epoch << EPOCH_SHIFT | chunks,
                 f"the last chunk from rank {rank} (epoch {epoch}) has not arrived")
                for rank, epoch, chunks in zip(self.peer_ranks, epochs, self.last_chunks)]
