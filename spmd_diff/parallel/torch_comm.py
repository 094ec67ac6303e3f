"""A :class:`~spmd_diff.parallel.seq_comm.SeqComm` over torch.distributed (NCCL on GPUs, gloo on CPUs).

Not what the engine runs (it runs over the project's collectives, ``GroupSeqComm``): the same attention over NCCL,
as the baseline ``perf/`` benchmarks time ours against and an independent transport the GPU and MPI tests check
the attention with; the attention code does not know which one it runs over. Every exchange is a batch of
point-to-point sends/receives (``batch_isend_irecv``) of the non-empty entries, so an all-to-all, a ring step and a
torus piece are one code path; with NCCL the batch runs on NCCL's stream and ``Pending.wait`` only makes the
current stream wait for it, so attention on the block in hand overlaps the transfer of the next.

Groups are created collectively (``torch.distributed.new_group``): build every comm a job needs with
:func:`build_torch_comms` on every rank of the default group, in the same order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from spmd_diff.parallel.seq_comm import Pending, SeqComm, _check_lengths, _template


class TorchSeqComm(SeqComm):
    """The ranks ``ranks`` (global torch.distributed ranks, in shard order) of ``group``.

    Args:
        ranks: global ranks, in shard order; this process's rank must be among them.
        group: a process group holding exactly ``ranks`` (``None``: the default group, which must then be
            ``ranks`` in order).
    """

    blocking_start = False  # asynchronous on the backend's own stream / threads

    def __init__(self, ranks: Sequence[int], group: dist.ProcessGroup | None = None) -> None:
        self.ranks = [int(r) for r in ranks]
        self.group = group
        self.rank = self.ranks.index(dist.get_rank())
        self.size = len(self.ranks)
        self._splits: dict[tuple[int, int], tuple["TorchSeqComm", "TorchSeqComm"]] = {}
        nccl = self.size > 1 and dist.get_backend(group) == "nccl"
        self.device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        """Where this comm's backend moves tensors (NCCL: the current GPU); others are staged through it."""

    def start_all_to_all(self, send, recv_shapes) -> Pending:
        _check_lengths(self, send, recv_shapes)
        template = _template(send)
        ops, out, keep = [], [], []
        for peer in range(self.size):
            shape = recv_shapes[peer]
            if peer == self.rank:
                out.append(send[peer] if shape is not None else None)
                continue
            if shape is None:
                out.append(None)
            else:
                buffer = torch.empty(shape, dtype=template.dtype, device=template.device)
                out.append(buffer)
                if buffer.numel():
                    ops.append(dist.P2POp(dist.irecv, buffer, self.ranks[peer], self.group))
            tensor = send[peer]
            if tensor is not None and tensor.numel():
                tensor = tensor.contiguous()
                keep.append(tensor)
                ops.append(dist.P2POp(dist.isend, tensor, self.ranks[peer], self.group))
        works = dist.batch_isend_irecv(ops) if ops else []

        def finish() -> list[torch.Tensor | None]:
            for work in works:
                work.wait()
            keep.clear()
            return out

        return Pending(finish=finish)

    def all_to_all(self, send, recv_shapes):
        return self.start_all_to_all(send, recv_shapes).wait()

    def broadcast(self, tensor: torch.Tensor, root: int) -> torch.Tensor:
        if self.size > 1:
            staged = tensor.to(self.device).contiguous()
            dist.broadcast(staged, src=self.ranks[root], group=self.group)
            if staged is not tensor:
                tensor.copy_(staged)
        return tensor

    def barrier(self) -> None:
        if self.size > 1:
            probe = torch.zeros(1, device=_device())
            dist.all_reduce(probe, group=self.group)
            if probe.is_cuda:
                torch.cuda.current_stream().synchronize()

    def split(self, outer: int, inner: int) -> tuple["TorchSeqComm", "TorchSeqComm"]:
        """The torus's inner-axis and outer-axis comms made by :func:`build_torch_comms` (``(inner, outer)``)."""
        if (outer, inner) not in self._splits:
            raise ValueError(f"no {outer} x {inner} split was built for this comm; use build_torch_comms")
        return self._splits[(outer, inner)]


def init_from_mpi(mpi_comm, device: torch.device | None = None, backend: str | None = None,
                  timeout_s: float = 600.0) -> None:
    """Start torch.distributed over an MPI world (an engine launched by mpirun/srun), if not started yet.

    Rank and size come from ``mpi_comm``; rank 0 picks a free TCP port on its host (``MASTER_ADDR`` if set, else
    its hostname) and broadcasts the address over MPI. Collective over ``mpi_comm``.

    Args:
        mpi_comm: an ``mpi4py`` communicator (usually ``MPI.COMM_WORLD``).
        device: this rank's GPU (NCCL binds its communicators to it); ``None`` on CPU.
        backend: ``"nccl"`` with a GPU, else ``"gloo"`` (default: chosen from ``device``).
        timeout_s: collective timeout.
    """
    import datetime
    import os
    import socket

    if dist.is_initialized():
        return
    address = None
    if mpi_comm.Get_rank() == 0:
        host = os.environ.get("MASTER_ADDR") or socket.gethostname()
        with socket.socket() as probe:
            probe.bind(("", 0))
            address = (host, probe.getsockname()[1])
    host, port = mpi_comm.bcast(address, root=0)
    if backend is None:
        backend = "nccl" if device is not None and device.type == "cuda" else "gloo"
    if device is not None and device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"tcp://{host}:{port}", rank=mpi_comm.Get_rank(),
                            world_size=mpi_comm.Get_size(), timeout=datetime.timedelta(seconds=timeout_s))


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def build_torch_comms(groups: Sequence[Sequence[int]], torus_shapes: Sequence[tuple[int, int]] = ()
                      ) -> TorchSeqComm | None:
    """Collective over the default group: create a process group per entry of ``groups`` (disjoint rank lists,
    each in shard order) and, for each ``(outer, inner)`` in ``torus_shapes``, its inner-axis and outer-axis groups
    (the ``inner`` ranks sharing an outer index; the ``outer`` ranks sharing an inner index). Returns this
    rank's comm (``None`` if it is in no group), with its torus splits attached.

    Every rank must call this with the same arguments (``new_group`` is collective over the world).
    """
    mine = None
    me = dist.get_rank()
    for ranks in groups:
        ranks = [int(r) for r in ranks]
        group = dist.new_group(ranks)
        comm = TorchSeqComm(ranks, group) if me in ranks else None
        for outer, inner in torus_shapes:
            if outer * inner != len(ranks):
                raise ValueError(f"torus {outer} x {inner} does not fit a group of {len(ranks)} ranks")
            inner_axes = [ranks[o * inner:(o + 1) * inner] for o in range(outer)]  # the ranks sharing an o
            outer_axes = [ranks[i::inner] for i in range(inner)]  # the ranks sharing an i
            inner_comm = outer_comm = None
            for axis_ranks in inner_axes:
                pg = dist.new_group(axis_ranks)
                if me in axis_ranks:
                    inner_comm = TorchSeqComm(axis_ranks, pg)
            for axis_ranks in outer_axes:
                pg = dist.new_group(axis_ranks)
                if me in axis_ranks:
                    outer_comm = TorchSeqComm(axis_ranks, pg)
            if comm is not None:
                comm._splits[(outer, inner)] = (inner_comm, outer_comm)
        if comm is not None:
            mine = comm
    return mine
