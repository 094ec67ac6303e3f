"""The MPI world: ranks, nodes, node-local ranks, GPU binding. Built once and passed around; it holds no resource
of its own to free (MPI is finalized by mpi4py at exit)."""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

from spmd_diff.errors import UserError
from spmd_diff.plan.topology import Topology

T = TypeVar("T")


def slurm_task_mismatch(world_size: int, env: dict[str, str] | None = None) -> str | None:
    """The error to raise when MPI sees a different number of tasks than the Slurm step promised, else None.

    Checked only for tasks that srun launched directly: under ``mpirun`` inside an allocation, Slurm's step is
    the daemons', and Open MPI sets OMPI_COMM_WORLD_SIZE.
    """
    env = os.environ if env is None else env
    promised = env.get("SLURM_STEP_NUM_TASKS") or None
    if promised is None or "OMPI_COMM_WORLD_SIZE" in env or env.get("SPMD_DIFF_SKIP_SLURM_CHECK") == "1":
        return None
    try:
        promised_tasks = int(promised)
    except ValueError:
        return None
    if promised_tasks == world_size:
        return None
    return (f"Slurm started {promised_tasks} tasks but MPI sees a world of {world_size}: the tasks did not join one "
            f"MPI job (each is a singleton). Launch with srun --mpi=pmix (or pmi2; `srun --mpi=list` shows what "
            f"this cluster has) or with mpirun inside the allocation. Refusing to run {promised_tasks} copies "
            f"of the job against one output directory.")


@dataclass
class World:
    """What this process is in the job. ``comm`` is an mpi4py communicator over every rank."""

    comm: Any
    rank: int
    size: int
    local_rank: int
    local_size: int
    topology: Topology
    device: str

    def gather_errors(self, error: BaseException | None) -> BaseException | None:
        """Collective: the first rank's error (by rank), or None if no rank failed. Same answer everywhere."""
        messages = self.comm.allgather(None if error is None else (type(error).__name__, str(error)))
        for rank, message in enumerate(messages):
            if message is not None:
                if error is not None and rank == self.rank:
                    return error
                kind, text = message
                exc = UserError(text) if kind == "UserError" else RuntimeError(f"rank {rank}: {kind}: {text}")
                return exc
        return None

    def run_checked(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on every rank; if any rank raised a UserError, every rank raises it (no one hangs)."""
        result, error = None, None
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001 - every rank must reach the gather below
            error = exc
        first = self.gather_errors(error)
        if first is not None:
            raise first
        return result  # type: ignore[return-value]

    def bind_device(self) -> str:
        """Import torch and bind this rank's GPU (node-local rank modulo the node's GPUs); sets :attr:`device`.

        Where torch sees no GPU although the device nodes exist (a CPU build of torch, say), the rank runs on the
        CPU and says so once.
        """
        num_gpus = self.topology.gpus_per_node
        if num_gpus > 0:
            import torch

            seen = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if seen < num_gpus:
                if self.rank == 0:
                    print(f"spmd-diff: warning: {num_gpus} GPU(s) per node found, but torch sees {seen}; "
                          "ranks use the GPUs torch sees (or the CPU)", file=sys.stderr, flush=True)
                num_gpus = seen
        if num_gpus > 0:
            torch.cuda.set_device(self.local_rank % num_gpus)
            self.device = f"cuda:{self.local_rank % num_gpus}"
        return self.device

    def use_cpu_only(self) -> None:
        """Plan and run as if no node had GPUs (the job's ``world.force_cpu``); before ``bind_device``."""
        self.topology = dataclasses.replace(self.topology, gpus_per_node=0)
        self.device = "cpu"


def init_world(ranks_per_node: int = 0, bind: bool = True) -> World:
    """Start MPI (threads: funneled), check the launch, find nodes and their GPUs; bind a GPU if ``bind``.

    With ``bind=False`` nothing imports torch: the engine validates the job first (a typo is reported in about
    a second) and calls :meth:`World.bind_device` only once there is work to do.
    """
    import mpi4py

    # Only the main thread calls MPI (the progress thread on rank 0 reads local memory). Asking for
    # THREAD_MULTIPLE would rule out Open MPI's osc/pt2pt, the one-sided path of TCP-only clusters.
    mpi4py.rc.thread_level = "funneled"
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    mismatch = slurm_task_mismatch(size)
    if mismatch:
        raise UserError(mismatch)
    node_comm = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
    local_rank, local_size = node_comm.Get_rank(), node_comm.Get_size()
    node_comm.Free()
    num_gpus = local_gpu_count()
    hostnames = comm.allgather(socket.gethostname())
    min_gpus = comm.allreduce(num_gpus, op=MPI.MIN)
    topology = Topology.from_hostnames(hostnames, gpus_per_node=min_gpus)
    if ranks_per_node:
        topology = topology.regrouped(ranks_per_node)
    world = World(comm, rank, size, local_rank, local_size, topology, "cpu")
    if bind:
        world.bind_device()
    return world


def local_gpu_count(env: dict[str, str] | None = None, dev_dir: str = "/dev") -> int:
    """GPUs this process may use, without importing torch or initialising CUDA.

    ``CUDA_VISIBLE_DEVICES`` set: its entries up to the first invalid one (as CUDA
    reads it; empty or "-1" hides every GPU). Otherwise the NVIDIA device nodes ``/dev/nvidia<N>``.
    :meth:`World.bind_device` checks the figure against what torch then sees.
    """
    env = os.environ if env is None else env
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        count = 0
        for entry in visible.split(","):
            entry = entry.strip()
            if not entry or entry.startswith("-"):
                break
            count += 1
        return count
    try:
        names = os.listdir(dev_dir)
    except OSError:
        return 0
    return sum(1 for name in names if name.startswith("nvidia") and name[6:].isdigit())


def set_threads(local_size: int, requested: int = 0) -> None:
    """torch intra-op threads: ``requested``, else the cores this rank is bound to, else cores / ranks on node."""
    import torch

    if requested > 0:
        torch.set_num_threads(requested)
        return
    if "OMP_NUM_THREADS" in os.environ:
        return
    bound = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    total = os.cpu_count() or 1
    threads = bound if bound < total else max(1, total // max(1, local_size))
    torch.set_num_threads(threads)
