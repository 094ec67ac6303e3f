"""Which transport a job gets: NVSHMEM when every rank has a GPU and the GPUs reach each other, else MPI RMA.

``make_transport(world, heap_bytes, choice)`` gathers a few facts from every rank (one ``allgather``), decides with
the pure ``decide_transport`` (the same answer on every rank), logs the choice and its reason, and builds the
transport. ``choice`` is the job's ``world.transport``: "auto", "mpi" or "nvshmem" (forcing one).

NVSHMEM reads ``NVSHMEM_SYMMETRIC_SIZE`` from the environment when it starts; ``set_nvshmem_environment`` is the one
place in the package that writes the environment, right before NVSHMEM starts: it sizes NVSHMEM's heap from the
job's heap when the user has not set it.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import socket
import sys
from dataclasses import dataclass
from typing import Any, Sequence

from spmd_diff.comm.nvshmem import FALLBACK_HINT, NvshmemUnavailable, symmetric_size_for
from spmd_diff.comm.transport import Transport
from spmd_diff.errors import UserError

log = logging.getLogger("spmd_diff")

CHOICES = ("auto", "mpi", "nvshmem")


@dataclass(frozen=True)
class RankFacts:
    """What one rank knows about itself, for the choice."""

    host: str
    gpu: int
    """CUDA device index this rank uses, -1 without a GPU."""
    nvshmem: bool
    """nvshmem4py is importable."""
    peers: tuple[int, ...]
    """GPU indices of this node that this rank's GPU can access directly (P2P: NVLink or PCIe)."""
    remote_net: bool
    """An RDMA network NVSHMEM can use between nodes (an InfiniBand/RoCE device is present)."""


def gather_facts(world: Any) -> list[RankFacts]:
    """Collective over ``world.comm``: every rank's ``RankFacts``, by rank."""
    gpu, peers = -1, ()
    if str(world.device).startswith("cuda"):
        import torch

        gpu = torch.device(world.device).index or 0
        peers = tuple(other for other in range(torch.cuda.device_count())
                      if other != gpu and torch.cuda.can_device_access_peer(gpu, other))
    nvshmem = importlib.util.find_spec("nvshmem") is not None
    remote_net = os.path.isdir("/sys/class/infiniband") and bool(os.listdir("/sys/class/infiniband"))
    return world.comm.allgather(RankFacts(socket.gethostname(), gpu, nvshmem, peers, remote_net))


def decide_transport(choice: str, facts: Sequence[RankFacts]) -> tuple[str, str]:
    """``("mpi" | "nvshmem", reason)``; pure, so every rank decides alike.

    Raises:
        UserError: for an unknown ``choice``; NvshmemUnavailable when "nvshmem" is forced but cannot work.
    """
    if choice not in CHOICES:
        raise UserError(f"world.transport must be one of {', '.join(CHOICES)}, got {choice!r}")
    if choice == "mpi":
        return "mpi", "forced by world.transport = \"mpi\""
    problem = _nvshmem_problem(facts)
    if choice == "nvshmem":
        if problem:
            raise NvshmemUnavailable(f"world.transport = \"nvshmem\" cannot work: {problem}; {FALLBACK_HINT}")
        return "nvshmem", "forced by world.transport = \"nvshmem\""
    if problem:
        return "mpi", f"auto: {problem}"
    hosts = len({f.host for f in facts})
    return "nvshmem", (f"auto: {len(facts)} ranks with GPUs on {hosts} node(s), P2P between the GPUs of each node"
                       + (", an RDMA network between nodes" if hosts > 1 else ""))


def _nvshmem_problem(facts: Sequence[RankFacts]) -> str:
    """Why NVSHMEM would not work for these ranks, or "" if it should."""
    no_gpu = [rank for rank, f in enumerate(facts) if f.gpu < 0]
    if no_gpu:
        return f"rank(s) {_ranks(no_gpu)} have no GPU"
    missing = [rank for rank, f in enumerate(facts) if not f.nvshmem]
    if missing:
        return f"nvshmem4py is not installed for rank(s) {_ranks(missing)}"
    for rank, f in enumerate(facts):
        for other, g in enumerate(facts):
            if other != rank and g.host == f.host and g.gpu != f.gpu and g.gpu not in f.peers:
                return f"GPU {f.gpu} of rank {rank} cannot access GPU {g.gpu} of rank {other} on {f.host} (no P2P)"
    hosts = {f.host for f in facts}
    if len(hosts) > 1:
        without = [rank for rank, f in enumerate(facts) if not f.remote_net]
        if without:
            return f"{len(hosts)} nodes but rank(s) {_ranks(without)} have no RDMA network device for NVSHMEM"
    return ""


def _ranks(ranks: list[int]) -> str:
    shown = ", ".join(map(str, ranks[:8]))
    return shown + (f" and {len(ranks) - 8} more" if len(ranks) > 8 else "")


def set_nvshmem_environment(heap_bytes: int) -> None:
    """Set ``NVSHMEM_SYMMETRIC_SIZE`` for a heap of ``heap_bytes`` plus NVSHMEM's reserve, unless the user set it
    (then it is checked: NvshmemUnavailable if too small). Call before NVSHMEM starts."""
    try:
        size, user_set = symmetric_size_for(heap_bytes)
    except NvshmemUnavailable:
        return  # set too small by the user: the transport reports it, the same on every rank
    if not user_set:
        os.environ["NVSHMEM_SYMMETRIC_SIZE"] = str(size)


@dataclass(frozen=True)
class TransportChoice:
    """What ``choose_transport`` decided, the same on every rank."""

    kind: str
    """"mpi" or "nvshmem"."""
    reason: str

    def __str__(self) -> str:
        return f"{self.kind} ({self.reason})"


def choose_transport(world: Any, choice: str = "auto") -> TransportChoice:
    """Collective over ``world.comm`` (one ``allgather``): the transport the job's ``world.transport`` gets here.

    Raises:
        UserError (the same on every rank): unknown choice; NVSHMEM forced but unusable.
    """
    return TransportChoice(*decide_transport(choice, gather_facts(world)))


def make_transport(world: Any, heap_bytes: int, choice: str | TransportChoice = "auto",
                   put_kernel: bool = True) -> Transport:
    """Collective: the job's transport over ``world.comm`` with ``heap_bytes`` of heap per rank.

    Args:
        world: ``spmd_diff.comm.world.World`` (uses ``comm``, ``rank`` and ``device``).
        heap_bytes: symmetric heap bytes per rank (same on every rank).
        choice: ``world.transport`` of the job ("auto", "mpi" or "nvshmem"; decided here, collectively), or what
            ``choose_transport`` decided already.
        put_kernel: NVSHMEM: ``put_signal`` to P2P peers as one CUDA kernel (see ``NvshmemTransport``).

    Returns:
        an ``NvshmemTransport`` (heap in GPU memory) or an ``MpiRmaTransport`` (host memory); its
        ``selection`` attribute holds the reason logged.

    Raises:
        UserError (the same on every rank): unknown choice; NVSHMEM forced but unusable, or failing to start
        (the message names the setting that selects MPI).
    """
    if not isinstance(choice, TransportChoice):
        choice = choose_transport(world, choice)
    kind, reason = choice.kind, choice.reason
    if world.rank == 0:
        log.info("transport: %s (%s)", kind, reason)
        print(f"spmd-diff: transport: {kind} ({reason})", file=sys.stderr, flush=True)
    if kind == "nvshmem":
        from spmd_diff.comm.nvshmem import NvshmemTransport

        set_nvshmem_environment(heap_bytes)
        transport: Transport = NvshmemTransport(world.comm, heap_bytes, device=world.device, put_kernel=put_kernel)
    else:
        from spmd_diff.comm.mpi_rma import MpiRmaTransport

        transport = MpiRmaTransport(world.comm, heap_bytes)
    transport.selection = f"{kind} ({reason})"  # type: ignore[attr-defined]
    return transport
