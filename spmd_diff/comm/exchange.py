"""The engine of one group-free collective operation (see ``spmd_diff.comm.collectives`` for the protocol):
the host-driven rounds, on the host or on CUDA streams, and the dispatch to the one-kernel all-to-all."""

from __future__ import annotations

import logging
import time
from typing import Any, Optional

import torch

from spmd_diff.comm.collectives import (
    EPOCH_SHIFT,
    FUSED_MAX_PEERS,
    SIDE_STREAM_BYTES,
    SLOT_HEADER_BYTES,
    Group,
    as_bytes,
    chunk_plan,
    decode_header,
    encode_header,
)
from spmd_diff.comm.transport import SIGNAL_BYTES


class Exchange:
    """One operation: ``sends[p]`` goes to group position ``p``; ``recvs[p]`` receives from ``p`` (a tensor of
    the right size, or None when a header says what comes). Runs the rounds of the module docstring."""

    def __init__(self, group: Group, op: str, sends: dict, recvs: dict, deadline: float) -> None:
        coll = group.coll
        self.group, self.coll, self.transport, self.layout = group, coll, coll.transport, coll.layout
        self.op, self.deadline = op, deadline
        self.me = group.rank_in_group
        self.headers = op != "all_to_all_into" or not coll.on_device
        device = self.transport.device
        for what, tensors in (("send", sends), ("out", recvs)):
            for p, t in tensors.items():
                if t is not None and t.device != device and not (t.device.type == device.type == "cuda"
                                                                  and t.device.index in (None, device.index)):
                    raise ValueError(f"{group.name} {op}: {what}[{p}] is on {t.device}, the transport's heap on "
                                     f"{device}")
        self.sends, self.recvs = sends, recvs
        self.results: list = [None] * group.size
        self.plan: Optional[FusedPlan] = None

    def what(self, p: int, doing: str, epoch: int) -> str:
        return (f"{self.group.name} {self.op}: rank {self.coll.rank} waiting for {doing} rank "
                f"{self.group.ranks[p]} (epoch {epoch})")

    def prepare(self) -> tuple[list, dict, dict]:
        """``(peers, send_plan, recv_plan)``: positions this rank exchanges with, and per peer the bytes and
        chunk plan of what goes there / comes here (receives of unknown size get theirs from the header)."""
        me, max_chunk = self.me, self.layout.chunk_bytes
        mine, into = self.sends.get(me), self.recvs.get(me)
        if mine is not None and into is not None and as_bytes(mine).numel() != as_bytes(into).numel():
            raise ValueError(f"{self.group.name} {self.op}: out[{me}] has {as_bytes(into).numel()} bytes, "
                             f"send[{me}] {as_bytes(mine).numel()}")  # before any epoch moves
        peers = sorted((set(self.sends) | set(self.recvs)) - {me})
        send_plan = {}
        for p, tensor in self.sends.items():
            if p != me:
                data = as_bytes(tensor)
                num, chunk = chunk_plan(data.numel(), max_chunk)
                header = encode_header(tensor, chunk) if self.headers else None
                send_plan[p] = (data, num, chunk, header)
        recv_plan = {}
        for p, out in self.recvs.items():
            if p != me:
                if out is None:
                    recv_plan[p] = [None, None, None, None]
                else:
                    data = as_bytes(out)
                    recv_plan[p] = [out, data, *chunk_plan(data.numel(), max_chunk)]
        return peers, send_plan, recv_plan

    def run(self) -> list:
        group, coll, tr, lay, me = self.group, self.coll, self.transport, self.layout, self.me
        my_rank, ranks = coll.rank, group.ranks
        peers, send_plan, recv_plan = self.prepare()
        epochs = {p: coll.next_epoch(ranks[p]) << EPOCH_SHIFT for p in peers}
        total = sum(plan[0].numel() for plan in send_plan.values())
        if not self.headers and coll.on_device and self._run_fused(peers, epochs, send_plan, recv_plan):
            return self.results
        if me in self.sends and me in self.recvs:
            self.results[me] = self._copy_self(self.sends[me], self.recvs[me])
        side = coll.on_device and total >= SIDE_STREAM_BYTES
        current = torch.cuda.current_stream(tr.device) if coll.on_device else None
        if side:
            for p in peers:
                for stream in coll.stream_pair(p):
                    stream.wait_stream(current)
        stream_of = (lambda p, k: coll.stream_pair(p)[k]) if side else (lambda p, k: None)

        for p in recv_plan:  # step 1: grant the first two chunks
            with _on(stream_of(p, 1)):
                tr.signal(ranks[p], lay.grant_offset + my_rank * SIGNAL_BYTES, epochs[p] | 2)
        r = 0
        while True:
            active = False
            for p, (data, num, chunk, header) in send_plan.items():  # step 2: chunk r to every receiver
                if r >= num:
                    continue
                active = True
                with _on(stream_of(p, 0)):
                    tr.stream_wait_signal(lay.grant_offset + ranks[p] * SIGNAL_BYTES, epochs[p] | r + 1,
                                          self.deadline, self.what(p, f"a grant for chunk {r} from", epochs[p] >> 20))
                    if r == 0 and header is not None:
                        tr.put(ranks[p], lay.header_offset + me * SLOT_HEADER_BYTES, header)
                    tr.put_signal(ranks[p], lay.buffer_offset(me, r), data[r * chunk:(r + 1) * chunk],
                                  lay.arrive_offset + my_rank * SIGNAL_BYTES, epochs[p] | r + 1)
            for p, plan in recv_plan.items():  # step 3: chunk r from every sender
                if r == 0 and self.headers:
                    self._read_header(p, plan, epochs[p])
                out, data, num, chunk = plan
                if r >= num:
                    continue
                active = True
                with _on(stream_of(p, 1)):
                    tr.stream_wait_signal(lay.arrive_offset + ranks[p] * SIGNAL_BYTES, epochs[p] | r + 1,
                                          self.deadline, self.what(p, f"chunk {r} of {num} from", epochs[p] >> 20))
                    size = min(chunk, data.numel() - r * chunk)
                    if size > 0:
                        data[r * chunk:r * chunk + size].copy_(tr.local_tensor(lay.buffer_offset(p, r), size),
                                                               non_blocking=True)
                    if r + 2 < num:
                        tr.signal(ranks[p], lay.grant_offset + my_rank * SIGNAL_BYTES, epochs[p] | r + 3)
            if not active:
                break
            r += 1
        for p, plan in recv_plan.items():
            self.results[p] = plan[0]
        if coll.on_device:
            if side:
                for p in peers:
                    for stream in coll.stream_pair(p):
                        current.wait_stream(stream)
            checks = [(lay.arrive_offset + ranks[p] * SIGNAL_BYTES, epochs[p] | plan[2],
                       f"the last chunk from rank {ranks[p]} (epoch {epochs[p] >> EPOCH_SHIFT}) has not arrived")
                      for p, plan in recv_plan.items()]
            checks += [(lay.grant_offset + ranks[p] * SIGNAL_BYTES, epochs[p] | plan[1],
                        f"rank {ranks[p]} has not granted the last chunk (epoch {epochs[p] >> EPOCH_SHIFT}); "
                        f"is it in this operation?") for p, plan in send_plan.items()]
            coll.track(current.record_event(), f"{group.name} {self.op}", checks, self.deadline)
        return self.results

    def _run_fused(self, peers: list, epochs: dict, send_plan: dict, recv_plan: dict) -> bool:
        """Enqueue this operation as one kernel where ``fused_plan`` makes one; leaves it in ``self.plan`` (the
        group replays it while the same buffers come back)."""
        plan = self.fused_plan(peers, send_plan, recv_plan)
        if plan is None:
            return False
        self.coll.check_kernel()  # an earlier kernel gave up: StageTimeout, never a silent fallback
        pair_epochs = [epochs[p] >> EPOCH_SHIFT for p in peers]
        try:
            plan.enqueue(pair_epochs)
        except Exception as error:  # noqa: BLE001 - e.g. the kernel cannot launch here: nothing was enqueued
            logging.getLogger("spmd_diff").warning("one-kernel all-to-all unavailable (%s: %s); using the "
                                                   "host-driven path", type(error).__name__, error)
            self.coll._fused = False
            return False
        plan.track(pair_epochs, self.deadline)  # outside the try: a StageTimeout here must propagate
        me = self.me
        for p in peers:
            self.results[p] = recv_plan[p][0]
        if me in self.sends and me in self.recvs:
            self.results[me] = self.recvs[me] if plan.has_self else self._copy_self(self.sends[me], self.recvs[me])
        self.plan = plan
        return True

    def fused_plan(self, peers: list, send_plan: dict, recv_plan: dict) -> Optional["FusedPlan"]:
        """This operation as one kernel, not launched, if every peer's heap is mapped here (P2P) and every
        address and size is a multiple of 4 bytes; same protocol, words and chunk plan as the host path."""
        coll, tr, lay, ranks, me = self.coll, self.transport, self.layout, self.group.ranks, self.me
        if not peers or len(peers) > FUSED_MAX_PEERS or set(send_plan) != set(peers) or set(recv_plan) != set(peers):
            return None
        kernel = coll.fused_kernel()
        if kernel is None:
            return None
        addresses = [tr.address(ranks[p], 0) for p in peers]
        if None in addresses:
            return None
        local, my_rank = tr.address(coll.rank, 0), coll.rank
        rows, largest = [], 0
        for p, peer in zip(peers, addresses):
            data, num_send, send_chunk, _ = send_plan[p]
            _, out_bytes, num_recv, recv_chunk = recv_plan[p]
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
        own = me in self.sends and me in self.recvs
        fold_self = own and getattr(kernel, "SELF_ROWS", False) and len(rows) < FUSED_MAX_PEERS
        if fold_self:
            src, dst = as_bytes(self.sends[me]), as_bytes(self.recvs[me])
            rows.append((src.data_ptr() if src.numel() else 0, src.numel(), -1, 0, 0, 0, 0, 0, 0, 0,
                                 dst.data_ptr() if dst.numel() else 0, dst.numel(), 0, 0))
        return FusedPlan(kernel, self.group, peers, rows, kernel.blocks_for(largest, len(peers)),
                         [recv_plan[p][2] for p in peers], fold_self)

    def _copy_self(self, send: torch.Tensor, out: Optional[torch.Tensor]) -> torch.Tensor:
        """This rank's own block (sizes were checked by ``prepare``)."""
        if out is None:
            return send.detach().clone()
        as_bytes(out).copy_(as_bytes(send))
        return out

    def _read_header(self, p: int, plan: list, epoch: int) -> None:
        """Wait (on the host) for chunk 0 from position ``p`` and read its header: size the receive."""
        tr, lay, ranks = self.transport, self.layout, self.group.ranks
        tr.wait_signal(lay.arrive_offset + ranks[p] * SIGNAL_BYTES, epoch | 1, self.deadline,
                       self.what(p, "chunk 0 from", epoch >> EPOCH_SHIFT))
        raw = tr.local_view(lay.header_offset + p * SLOT_HEADER_BYTES, SLOT_HEADER_BYTES).tobytes()
        where = f"{self.group.name} {self.op} from rank {ranks[p]}"
        dtype, shape, nbytes, chunk = decode_header(raw, where)
        if plan[0] is None:
            out = torch.empty(shape, dtype=dtype, device=tr.device)
            plan[:] = [out, as_bytes(out), *chunk_plan(nbytes, self.layout.chunk_bytes)]
        elif nbytes != plan[1].numel():
            raise ValueError(f"{where}: out[{p}] has {plan[1].numel()} bytes but rank {ranks[p]} sent "
                             f"{nbytes} ({dtype}{tuple(shape)})")
        if chunk != plan[3]:
            raise RuntimeError(f"{where}: sender cut {nbytes} bytes into chunks of {chunk}, this rank expected "
                               f"{plan[3]}: the ranks disagree on the collectives layout")


class FusedPlan:
    """An all-to-all the one-kernel path already ran with these very buffers: replaying it costs a launch.

    The descriptor rows (addresses and chunk plans) do not change between calls with the same tensors; only the
    pair epochs do, and they travel as kernel arguments.
    """

    __slots__ = ("kernel", "coll", "me", "name", "peer_ranks", "rows", "table", "blocks", "last_chunks",
                 "has_self")

    def __init__(self, kernel: Any, group: Group, peers: list, rows: list, blocks: Any, last_chunks: list,
                 has_self: bool) -> None:
        self.kernel, self.coll, self.me = kernel, group.coll, group.rank_in_group
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
        """Whether the collectives still run this plan's kernel (not switched, disabled or failed over)."""
        return self.coll._fused_allowed and self.kernel is self.coll._fused

    def replay(self, send: list, out: list, deadline: Optional[float] = None) -> list:
        """The same operation again with the buffers it was planned for: advance the epochs with every peer,
        launch, track, and copy this rank's own block where the kernel does not; returns ``out``. A launch that
        fails takes the epochs back (nothing was enqueued), so this rank stays in step with its peers."""
        coll = self.coll
        deadline = time.monotonic() + coll.timeout_s if deadline is None else deadline
        coll.check_kernel()
        epochs = [coll.next_epoch(rank) for rank in self.peer_ranks]
        try:
            self.enqueue(epochs)
        except BaseException:
            for rank in self.peer_ranks:
                coll._epochs[rank] -= 1
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


class PersistentAllToAll:
    """What ``Group.all_to_all_init`` returns: ``start()`` runs the all-to-all again (device heaps: one kernel
    launch with the pair epochs as arguments; elsewhere, or where the kernel cannot run, ``all_to_all_into``)."""

    def __init__(self, group: Group, send: list, out: list) -> None:
        self.group, self.send, self.out = group, send, out
        self._plan = None
        coll = group.coll
        if coll.on_device and coll._fused_allowed:
            exchange = Exchange(group, "all_to_all_into", dict(enumerate(send)), dict(enumerate(out)), 0.0)
            self._plan = exchange.fused_plan(*exchange.prepare())

    def start(self, deadline: Optional[float] = None) -> list[torch.Tensor]:
        """Enqueue one all-to-all; returns ``out`` (complete in stream order)."""
        if self._plan is None or not self._plan.current:
            return self.group.all_to_all_into(self.send, self.out, deadline)
        return self._plan.replay(self.send, self.out, deadline)


def load_kernel_module(name: str) -> Any:
    """``spmd_diff.kernels.<name>``; from the checkout's ``kernels/`` when the package is not installed."""
    import importlib
    import importlib.util
    import pathlib
    import sys

    if "spmd_diff.kernels" not in sys.modules:
        try:
            importlib.import_module("spmd_diff.kernels")
        except ImportError:
            root = pathlib.Path(__file__).resolve().parents[2] / "kernels"
            spec = importlib.util.spec_from_file_location("spmd_diff.kernels", root / "__init__.py",
                                                          submodule_search_locations=[str(root)])
            if spec is None or spec.loader is None:
                raise
            module = importlib.util.module_from_spec(spec)
            sys.modules["spmd_diff.kernels"] = module
            spec.loader.exec_module(module)
    return importlib.import_module(f"spmd_diff.kernels.{name}")


class _NoStream:
    def __enter__(self):
        return None

    def __exit__(self, *exc) -> None:
        return None


_NO_STREAM = _NoStream()


def _on(stream):
    """``torch.cuda.stream(stream)``, or nothing for ``None`` (host heaps, or everything on the current stream)."""
    return _NO_STREAM if stream is None else torch.cuda.stream(stream)
