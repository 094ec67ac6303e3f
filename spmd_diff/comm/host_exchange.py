"""The host-driven implementation of every collective operation: the rounds of ``collective_layout``'s protocol,
run on the host (host heaps) or enqueued on CUDA streams (device heaps)."""

from __future__ import annotations


import torch

from spmd_diff.comm.collective_layout import EPOCH_SHIFT, SLOT_HEADER_BYTES, as_bytes, chunk_split, decode_header
from spmd_diff.comm.exchange import Exchange, Operation
from spmd_diff.comm.transport import SIGNAL_BYTES

SIDE_STREAM_BYTES = 1 << 20
"""On a device heap, operations moving at least this many bytes use one CUDA stream per peer and direction."""


class HostExchange(Exchange):
    """Runs any operation (it never declines). Round ``r``: chunk ``r`` to every receiver, then chunk ``r`` from
    every sender; on device heaps, completion is tracked by ``coll.track`` against the operation's deadline."""

    def run(self, operation: Operation, epochs: dict[int, int]) -> bool:
        o = operation
        group, coll, tr, lay, me = o.group, o.coll, o.transport, o.layout, o.me
        my_rank, ranks = coll.rank, group.ranks
        peers, outgoing, incoming = o.peers, o.outgoing, o.incoming
        total = sum(entry[0].numel() for entry in outgoing.values())
        if o.has_self:
            o.results[me] = o.copy_self()
        side = coll.on_device and total >= SIDE_STREAM_BYTES
        current = torch.cuda.current_stream(tr.device) if coll.on_device else None
        if side:
            for p in peers:
                for stream in coll.stream_pair(p):
                    stream.wait_stream(current)
        stream_of = (lambda p, k: coll.stream_pair(p)[k]) if side else (lambda p, k: None)

        for p in incoming:  # step 1: grant the first two chunks
            with _on(stream_of(p, 1)):
                tr.signal(ranks[p], lay.grant_offset + my_rank * SIGNAL_BYTES, epochs[p] | 2)
        r = 0
        while True:
            active = False
            for p, (data, num, chunk, header) in outgoing.items():  # step 2: chunk r to every receiver
                if r >= num:
                    continue
                active = True
                with _on(stream_of(p, 0)):
                    tr.stream_wait_signal(lay.grant_offset + ranks[p] * SIGNAL_BYTES, epochs[p] | r + 1,
                                          o.deadline, o.what(p, f"a grant for chunk {r} from",
                                                             epochs[p] >> EPOCH_SHIFT))
                    if r == 0 and header is not None:
                        tr.put(ranks[p], lay.header_offset + me * SLOT_HEADER_BYTES, header)
                    tr.put_signal(ranks[p], lay.buffer_offset(me, r), data[r * chunk:(r + 1) * chunk],
                                  lay.arrive_offset + my_rank * SIGNAL_BYTES, epochs[p] | r + 1)
            for p, entry in incoming.items():  # step 3: chunk r from every sender
                if r == 0 and o.headers:
                    _read_header(o, p, entry, epochs[p])
                out, data, num, chunk = entry
                if r >= num:
                    continue
                active = True
                with _on(stream_of(p, 1)):
                    tr.stream_wait_signal(lay.arrive_offset + ranks[p] * SIGNAL_BYTES, epochs[p] | r + 1,
                                          o.deadline, o.what(p, f"chunk {r} of {num} from", epochs[p] >> EPOCH_SHIFT))
                    size = min(chunk, data.numel() - r * chunk)
                    if size > 0:
                        data[r * chunk:r * chunk + size].copy_(tr.local_tensor(lay.buffer_offset(p, r), size),
                                                               non_blocking=True)
                    if r + 2 < num:
                        tr.signal(ranks[p], lay.grant_offset + my_rank * SIGNAL_BYTES, epochs[p] | r + 3)
            if not active:
                break
            r += 1
        for p, entry in incoming.items():
            o.results[p] = entry[0]
        if coll.on_device:
            if side:
                for p in peers:
                    for stream in coll.stream_pair(p):
                        current.wait_stream(stream)
            checks = [(lay.arrive_offset + ranks[p] * SIGNAL_BYTES, epochs[p] | entry[2],
                       f"the last chunk from rank {ranks[p]} (epoch {epochs[p] >> EPOCH_SHIFT}) has not arrived")
                      for p, entry in incoming.items()]
            checks += [(lay.grant_offset + ranks[p] * SIGNAL_BYTES, epochs[p] | entry[1],
                        f"rank {ranks[p]} has not granted the last chunk (epoch {epochs[p] >> EPOCH_SHIFT}); "
                        f"is it in this operation?") for p, entry in outgoing.items()]
            coll.track(current.record_event(), f"{group.name} {o.op}", checks, o.deadline)
        return True


def _read_header(o: Operation, p: int, entry: list, epoch: int) -> None:
    """Wait (on the host) for chunk 0 from position ``p`` and read its header: size the receive."""
    tr, lay, ranks = o.transport, o.layout, o.group.ranks
    tr.wait_signal(lay.arrive_offset + ranks[p] * SIGNAL_BYTES, epoch | 1, o.deadline,
                   o.what(p, "chunk 0 from", epoch >> EPOCH_SHIFT))
    raw = tr.local_view(lay.header_offset + p * SLOT_HEADER_BYTES, SLOT_HEADER_BYTES).tobytes()
    where = f"{o.group.name} {o.op} from rank {ranks[p]}"
    dtype, shape, nbytes, chunk = decode_header(raw, where)
    if entry[0] is None:
        out = torch.empty(shape, dtype=dtype, device=tr.device)
        entry[:] = [out, as_bytes(out), *chunk_split(nbytes, lay.chunk_bytes)]
    elif nbytes != entry[1].numel():
        raise ValueError(f"{where}: out[{p}] has {entry[1].numel()} bytes but rank {ranks[p]} sent "
                         f"{nbytes} ({dtype}{tuple(shape)})")
    if chunk != entry[3]:
        raise RuntimeError(f"{where}: sender cut {nbytes} bytes into chunks of {chunk}, this rank expected "
                           f"{entry[3]}: the ranks disagree on the collectives layout")


class _NoStream:
    def __enter__(self):
        return None

    def __exit__(self, *exc) -> None:
        return None


_NO_STREAM = _NoStream()


def _on(stream):
    """``torch.cuda.stream(stream)``, or nothing for ``None`` (host heaps, or everything on the current stream)."""
    return _NO_STREAM if stream is None else torch.cuda.stream(stream)
