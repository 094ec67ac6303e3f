"""What sequence-parallel attention needs from communication, and an adapter over the project's collectives.

Attention code talks to a :class:`SeqComm`: the ranks of one DiT group (or of one torus axis), in sequence-shard
order, with an all-to-all whose receive shapes the caller already knows (every shard and head split is a pure
function of the sequence length, the head count and the degree, so nobody needs to exchange sizes), a
non-blocking variant of it (``start_all_to_all``) for ring/torus K/V passing, and a broadcast.

Implementations:

- :class:`GroupSeqComm` over the project's group-free collectives (``spmd_diff.comm.collectives``:
  ``GroupCollectives(...).group(ranks) -> Group`` with ``all_to_all``/``all_gather``/``broadcast``/``barrier``):
  on a host heap (MPI RMA) blocking; on a device heap (NVSHMEM) stream-ordered, and ``start_all_to_all`` issues
  the exchange on a side stream so that attention on the current stream overlaps it.
- ``spmd_diff.parallel.torch_comm.TorchSeqComm``: torch.distributed (NCCL on GPUs), asynchronous on NCCL's stream.

Point-to-point is an all-to-all with empty tensors for the other ranks (``recv_shapes`` entries of ``None``).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch

Shape = tuple[int, ...]


def split_sizes(total: int, parts: int) -> list[int]:
    """Balanced split of ``total`` items into ``parts``: the first ``total % parts`` get one more.

    >>> split_sizes(10, 4)
    [3, 3, 2, 2]
    """
    if parts < 1 or total < 0:
        raise ValueError(f"cannot split {total} into {parts} parts")
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def offsets(sizes: Sequence[int]) -> list[int]:
    """Exclusive prefix sums: start of each part. ``offsets([3, 3, 2]) == [0, 3, 6]``."""
    out, acc = [], 0
    for size in sizes:
        out.append(acc)
        acc += size
    return out


class Pending:
    """A started exchange; :meth:`wait` returns the received tensors (in rank order; ``None`` where nothing
    was expected). Completed ones just hold the result. ``events``: on a device heap, CUDA events (timing
    enabled) recorded on the exchange's stream before and after it, for overlap measurements; else ``None``."""

    def __init__(self, result: list[torch.Tensor | None] | None = None,
                 finish: Callable[[], list[torch.Tensor | None]] | None = None, events: Any = None) -> None:
        self._result = result
        self._finish = finish
        self.events = events

    def wait(self) -> list[torch.Tensor | None]:
        if self._result is None:
            assert self._finish is not None
            self._result = self._finish()
            self._finish = None
        return self._result


class SeqComm(abc.ABC):
    """The ranks of one sequence-parallel group (or torus axis), ``rank`` in ``[0, size)`` in shard order."""

    rank: int
    size: int
    blocking_start = True
    """:meth:`start_all_to_all` completes the exchange before it returns (a host heap): to overlap, the caller
    computes on another thread while this one exchanges (torus attention does)."""

    @abc.abstractmethod
    def all_to_all(self, send: list[torch.Tensor | None], recv_shapes: list[Shape | None]
                   ) -> list[torch.Tensor | None]:
        """Send ``send[i]`` to rank ``i`` (``None``: nothing); receive from rank ``j`` a tensor of
        ``recv_shapes[j]`` (``None``: nothing expected). Every rank calls it; the matching pairs must agree.

        All tensors have one dtype and device (that of the first non-``None`` ``send``; pass ``dtype``-carrying
        empties otherwise). ``send[rank]`` is returned as is (no copy). Returns the received tensors, contiguous.
        """

    def start_all_to_all(self, send: list[torch.Tensor | None], recv_shapes: list[Shape | None]) -> Pending:
        """Non-blocking :meth:`all_to_all`: the send tensors must stay unchanged until ``wait`` returns.
        Exchanges started by one rank complete in the order they were started. Default: blocking."""
        return Pending(self.all_to_all(send, recv_shapes))

    @abc.abstractmethod
    def broadcast(self, tensor: torch.Tensor, root: int) -> torch.Tensor:
        """``root``'s ``tensor`` on every rank; the others pass a tensor of the same shape and dtype (its
        contents are ignored) and get the result back (maybe in place)."""

    def all_gather(self, tensor: torch.Tensor, shapes: list[Shape]) -> list[torch.Tensor]:
        """Every rank's tensor (``shapes[j]`` from rank ``j``), in rank order."""
        received = self.all_to_all([tensor] * self.size, list(shapes))
        received[self.rank] = tensor
        return received  # type: ignore[return-value]

    def barrier(self) -> None:
        """Every rank of this comm has called it. Default: a one-element all-to-all."""
        probe = torch.zeros(1)
        self.all_to_all([probe] * self.size, [(1,)] * self.size)

    def split(self, outer: int, inner: int) -> tuple["SeqComm", "SeqComm"]:
        """This comm as an ``outer x inner`` grid (rank ``o * inner + i``): ``(inner_axis, outer_axis)``, the
        ``inner`` ranks sharing this rank's ``o`` and the ``outer`` ranks sharing its ``i``, each in grid order."""
        raise NotImplementedError(f"{type(self).__name__} cannot form a torus's inner and outer axes")


# --------------------------------------------------------------------------------------------------------------
# Over the project's group-free collectives


class GroupLike(Protocol):
    """The part of ``spmd_diff.comm.collectives.Group`` used here (a protocol: tests pass thread-backed fakes)."""

    ranks: Sequence[int]
    rank_in_group: int

    def all_to_all(self, send: list[torch.Tensor]) -> list[torch.Tensor]: ...

    def broadcast(self, tensor: torch.Tensor, root: int) -> torch.Tensor: ...

    def barrier(self) -> None: ...


class GroupSeqComm(SeqComm):
    """:class:`SeqComm` over a collectives ``Group``.

    Uses the group's ``all_to_all_into`` (preallocated receive buffers: the shapes are known) when it has one,
    else its ``all_to_all``. On a host heap both block, so ``start_all_to_all`` completes before it returns; on a
    device heap the group enqueues the transfers on CUDA streams and returns at once.

    Args:
        group: the group; its rank order is the shard order.
        subgroup: ``subgroup(world_ranks) -> Group`` (``GroupCollectives.group``), for :meth:`split`.
        device: where the group's tensors must live: its transport's device (the CPU for MPI RMA, the GPU for
            NVSHMEM). ``None``: read from the group (``group.coll.transport.device``), else the CPU. Tensors on
            another device are copied there and back.
    """

    def __init__(self, group: GroupLike, subgroup: Callable[[list[int]], GroupLike] | None = None,
                 device: torch.device | str | None = None) -> None:
        self.group = group
        self.rank = int(group.rank_in_group)
        self.size = len(group.ranks)
        transport = getattr(getattr(group, "coll", None), "transport", None)
        if device is None:
            device = getattr(transport, "device", None) or "cpu"
        self.device = torch.device(device)
        self._subgroup = subgroup
        self._side_stream = None
        self.blocking_start = self.device.type != "cuda"

    def start_all_to_all(self, send, recv_shapes) -> Pending:
        """On a device heap: the exchange is enqueued on a side stream (the collectives make the stream they are
        called on wait for the transfer, which here is the side stream), so work issued on the current stream
        after this call overlaps it; ``wait`` makes the current stream wait for the side stream. The send and
        receive tensors are kept alive until then. On a host heap: blocking, as :meth:`all_to_all`."""
        if self.device.type != "cuda":
            return Pending(self.all_to_all(send, recv_shapes))
        current = torch.cuda.current_stream(self.device)
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream(self.device)
        side = self._side_stream
        side.wait_stream(current)
        with torch.cuda.stream(side):
            began = torch.cuda.Event(enable_timing=True)
            began.record(side)
            received = self.all_to_all(send, recv_shapes)
            ended = torch.cuda.Event(enable_timing=True)
            ended.record(side)
        for tensor in received:
            if tensor is not None and tensor.is_cuda:
                tensor.record_stream(current)
        keep = list(send)

        def finish() -> list[torch.Tensor | None]:
            current.wait_stream(side)
            keep.clear()
            return received

        return Pending(finish=finish, events=(began, ended))

    def all_to_all(self, send, recv_shapes):
        _check_lengths(self, send, recv_shapes)
        template = _template(send)
        here, there = template.device, self.device
        empty = torch.empty(0, dtype=template.dtype, device=there)
        payload = [empty if tensor is None or peer == self.rank else tensor.detach().to(there).contiguous()
                   for peer, tensor in enumerate(send)]
        into = getattr(self.group, "all_to_all_into", None)
        if into is not None:
            received = [empty if shape is None or peer == self.rank
                        else torch.empty(shape, dtype=template.dtype, device=there)
                        for peer, shape in enumerate(recv_shapes)]
            into(payload, received)
        else:
            received = self.group.all_to_all(payload)
        out: list[torch.Tensor | None] = []
        for peer, (tensor, shape) in enumerate(zip(received, recv_shapes)):
            if peer == self.rank:
                out.append(send[peer] if shape is not None else None)
            elif shape is None:
                if tensor.numel():
                    raise RuntimeError(f"all_to_all: rank {peer} sent {tuple(tensor.shape)}, expected nothing")
                out.append(None)
            else:
                out.append(_as_shape(tensor, shape, template.dtype, peer).to(here))
        return out

    def broadcast(self, tensor, root):
        result = self.group.broadcast(tensor.detach().to(self.device).contiguous(), root)
        return _as_shape(result, tuple(tensor.shape), tensor.dtype, root).to(tensor.device)

    def barrier(self) -> None:
        self.group.barrier()

    def split(self, outer: int, inner: int) -> tuple["GroupSeqComm", "GroupSeqComm"]:
        if self._subgroup is None:
            raise ValueError("GroupSeqComm.split needs the subgroup factory (GroupCollectives.group)")
        if outer * inner != self.size:
            raise ValueError(f"torus {outer} x {inner} does not match the group of {self.size} ranks")
        ranks = list(self.group.ranks)
        o, i = divmod(self.rank, inner)
        inner_ranks = ranks[o * inner:(o + 1) * inner]
        outer_ranks = ranks[i::inner]
        return (GroupSeqComm(self._subgroup(inner_ranks), self._subgroup, self.device),
                GroupSeqComm(self._subgroup(outer_ranks), self._subgroup, self.device))


def _check_lengths(comm: SeqComm, send: list, recv_shapes: list) -> None:
    if len(send) != comm.size or len(recv_shapes) != comm.size:
        raise ValueError(f"all_to_all over {comm.size} ranks got {len(send)} sends and {len(recv_shapes)} "
                         "receive shapes")


def _template(send: list[torch.Tensor | None]) -> torch.Tensor:
    for tensor in send:
        if tensor is not None:
            return tensor
    raise ValueError("all_to_all needs at least one send tensor (an empty one is fine) to know the dtype")


def _as_shape(tensor: Any, shape: Shape, dtype: torch.dtype, peer: int) -> torch.Tensor:
    """A received tensor as ``shape``/``dtype``: the collectives may hand back flat or byte tensors."""
    if tensor.dtype != dtype:
        if tensor.dtype == torch.uint8:
            tensor = tensor.contiguous().view(dtype)
        else:
            raise RuntimeError(f"rank {peer} sent {tensor.dtype}, expected {dtype}")
    numel = 1
    for dim in shape:
        numel *= dim
    if tensor.numel() != numel:
        raise RuntimeError(f"rank {peer} sent {tuple(tensor.shape)} ({tensor.numel()} elements), expected {shape}")
    return tensor.reshape(shape)
