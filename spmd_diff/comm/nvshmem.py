"""Transport over NVSHMEM (nvshmem4py): the symmetric heap in GPU memory, one-sided puts GPU to GPU.

Bootstrap from the MPI world: rank 0 makes an NVSHMEM unique id, ``MPI.Bcast`` hands it to every rank, and each
rank joins with ``nvshmem.core.init(uid=..., initializer_method="uid")``; then one collective ``nvshmem`` buffer of
``heap_bytes`` is the heap. NVSHMEM reads its own symmetric heap size (``NVSHMEM_SYMMETRIC_SIZE``) from the
environment when it starts; this module never writes the environment: ``spmd_diff.comm.select.make_transport``
(the one place, at startup) sets it from the job when unset (heap plus a reserve for NVSHMEM's internal use), and
the constructor checks that the size in effect holds the heap.

Every operation is stream-ordered on the caller's current CUDA stream (see ``transport.py``):

- ``put`` / ``put_signal`` / ``signal`` enqueue copies and signal writes; nothing waits on the host. To a peer
  that NVSHMEM maps into this process (``nvshmem_ptr``: NVLink or PCIe P2P inside a node) data moves by a device
  copy into the peer's heap (``data_path="p2p"``) or NVSHMEM's ``putmem_on_stream`` (``"nvshmem"``); other peers
  (across nodes) always go through NVSHMEM's puts. The signal is written after the payload in stream order
  (``putmem_signal_on_stream`` / ``signal_op_on_stream``, after ``quiet_on_stream`` when plain NVSHMEM puts are
  outstanding), so no receiver CPU is involved and the data never touches host memory.
- ``stream_wait_signal`` enqueues ``signal_wait_until_on_stream``: the receiving stream waits, not the host.
- ``read_signal`` / ``local_view`` copy from the device on a private stream (host-side polling: channels).

One ``NvshmemTransport`` per process: NVSHMEM is initialised by the constructor and finalised by ``free``.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from typing import Any

import numpy as np
import torch

from spmd_diff.comm.transport import SIGNAL_BYTES, Source, Transport, as_byte_array, as_byte_tensor, round_up
from spmd_diff.errors import UserError

RESERVE_BYTES = 256 << 20
"""Symmetric memory NVSHMEM keeps for itself beyond our heap (teams, collectives scratch, signals)."""
DEFAULT_SYMMETRIC_BYTES = 1 << 30
"""NVSHMEM's symmetric heap when ``NVSHMEM_SYMMETRIC_SIZE`` is unset (NVSHMEM's default)."""
FALLBACK_HINT = ('set world.transport = "mpi" in the job (or --set world.transport=mpi) to move data through '
                 'MPI RMA on host memory instead')


class NvshmemUnavailable(UserError):
    """NVSHMEM cannot start here; the message says why and which setting selects the MPI fallback.

    Raised with the same message on every rank."""


def parse_size(text: str) -> int:
    """Bytes of an NVSHMEM size setting: ``"1073741824"``, ``"1G"``, ``"512M"``, ``"64K"``, ``"2GB"``."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)[bB]?\s*", text)
    if not match:
        raise ValueError(f"cannot read {text!r} as a size (e.g. 4G, 512M, 1073741824)")
    scale = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[match[2].lower()]
    return int(float(match[1]) * scale)


def symmetric_size_for(heap_bytes: int, env: dict[str, str] | None = None) -> tuple[int, bool]:
    """``(NVSHMEM_SYMMETRIC_SIZE to use, whether the user set it)``.

    Raises:
        NvshmemUnavailable: if the user's setting is too small for the heap.
    """
    env = os.environ if env is None else env
    needed = heap_bytes + RESERVE_BYTES
    if env.get("NVSHMEM_SYMMETRIC_SIZE"):
        given = parse_size(env["NVSHMEM_SYMMETRIC_SIZE"])
        if given < needed:
            raise NvshmemUnavailable(
                f"NVSHMEM_SYMMETRIC_SIZE={env['NVSHMEM_SYMMETRIC_SIZE']} ({given} bytes) is too small: this job's "
                f"heap needs {heap_bytes} bytes plus {RESERVE_BYTES} for NVSHMEM itself; unset it (the job sizes "
                f"it) or raise it to at least {needed}")
        return given, True
    return round_up(needed, 1 << 21), False


class NvshmemTransport(Transport):
    """Symmetric heap of ``heap_bytes`` in the memory of ``device`` on every rank of ``comm``.

    Construction is collective over ``comm`` (unique-id broadcast, NVSHMEM init, heap allocation, zeroing,
    barrier); so is ``free``. Use from one thread (``read_signal`` / ``local_view`` may also be called from a
    monitoring thread).

    Args:
        comm: mpi4py communicator of every rank sharing the heap (its ranks are the NVSHMEM PEs).
        heap_bytes: bytes per rank, the same everywhere; rounded up to a multiple of 8.
        device: this rank's GPU (default: the current CUDA device).
        data_path: "p2p" (device copies into peer-mapped heaps where NVSHMEM maps them) or "nvshmem"
            (``putmem_on_stream`` always).
        put_kernel: ``put_signal`` to P2P peers as one CUDA kernel (copy, then signal; measured on two H200s:
            21.3 us one-way for a bf16 480p latent against 21.9 us by copy engine and signal operation); where CuPy
            is missing, or False (the job's ``dataplane.put_kernel``), a copy and a signal operation.

    Raises:
        NvshmemUnavailable: nvshmem4py missing, no GPU, or NVSHMEM failed to start; the message names the
            fallback setting.
    """

    def __init__(self, comm: Any, heap_bytes: int, device: Any = None, data_path: str = "p2p",
                 put_kernel: bool = True) -> None:
        from mpi4py import MPI

        if data_path not in ("p2p", "nvshmem"):
            raise ValueError(f"data_path must be 'p2p' or 'nvshmem', got {data_path!r}")
        heap_bytes = round_up(int(heap_bytes), SIGNAL_BYTES)
        if comm.allreduce(heap_bytes, op=MPI.MIN) != comm.allreduce(heap_bytes, op=MPI.MAX) or heap_bytes <= 0:
            raise ValueError(f"heap_bytes must be positive and the same on every rank, got {heap_bytes} here")
        problem = None
        try:
            if not torch.cuda.is_available():
                raise NvshmemUnavailable("no CUDA device visible to this rank")
            self.device = torch.device(device) if device is not None else torch.device(
                "cuda", torch.cuda.current_device())
            if self.device.index is None:
                self.device = torch.device("cuda", torch.cuda.current_device())
            torch.cuda.set_device(self.device)
            size, _ = symmetric_size_for(heap_bytes)  # a size set too small: reported here, on every rank
            if not os.environ.get("NVSHMEM_SYMMETRIC_SIZE") and size > DEFAULT_SYMMETRIC_BYTES:
                raise NvshmemUnavailable(
                    f"this heap of {heap_bytes} bytes needs NVSHMEM_SYMMETRIC_SIZE={size} (NVSHMEM's default is "
                    f"{DEFAULT_SYMMETRIC_BYTES}); set it before the transport starts "
                    "(spmd_diff.comm.select.set_nvshmem_environment, which make_transport calls)")
            import nvshmem.bindings as bindings  # noqa: F401 - fail here, before any rank starts NVSHMEM
            import nvshmem.core  # noqa: F401
            from cuda.core import Device  # noqa: F401
        except NvshmemUnavailable as error:
            problem = str(error)
        except ImportError as error:
            problem = f"nvshmem4py cannot be imported ({error}); install nvshmem4py-cu13 (or -cu12)"
        problems = comm.allgather(problem)
        bad = [(rank, text) for rank, text in enumerate(problems) if text]
        if bad:
            rank, text = bad[0]
            raise NvshmemUnavailable(f"NVSHMEM transport unavailable on rank {rank}"
                                     f"{f' (and {len(bad) - 1} more)' if len(bad) > 1 else ''}: {text}; "
                                     f"{FALLBACK_HINT}")
        self._start(comm, heap_bytes, data_path, put_kernel)

    def _start(self, comm: Any, heap_bytes: int, data_path: str, put_kernel: bool) -> None:
        import nvshmem.bindings as bindings
        import nvshmem.core as nvshmem
        from cuda.core import Device

        self._bindings = bindings
        self._nvshmem = nvshmem
        self.rank, self.size, self.heap_bytes = comm.Get_rank(), comm.Get_size(), heap_bytes
        self._comm = comm.Dup()
        error = None
        try:
            cuda_device = Device(self.device.index)
            cuda_device.set_current()
            uid = nvshmem.get_unique_id(empty=self.rank != 0)
            self._comm.Bcast(uid._data.view(np.int8), root=0)
            nvshmem.init(device=cuda_device, uid=uid, rank=self.rank, nranks=self.size, initializer_method="uid")
        except Exception as exc:  # noqa: BLE001 - reported identically on every rank below
            error = f"{type(exc).__name__}: {exc}"
        errors = self._comm.allgather(error)
        if any(errors):
            rank = next(r for r, e in enumerate(errors) if e)
            raise NvshmemUnavailable(f"NVSHMEM failed to start on rank {rank}: {errors[rank]} (NVSHMEM_DEBUG=INFO "
                                     f"shows why: no P2P or remote transport between the GPUs?); {FALLBACK_HINT}")
        self._buffer = nvshmem.buffer(heap_bytes)
        self._base = int(self._buffer.handle)
        self._heap = torch.utils.dlpack.from_dlpack(self._buffer).view(torch.uint8).reshape(-1)
        assert self._heap.numel() == heap_bytes and self._heap.device == self.device
        self._signal_set = int(bindings.Signal_op.SIGNAL_SET)
        self._cmp_ge = int(bindings.Cmp_type.CMP_GE)
        self._mapped: dict[int, torch.Tensor] = {}
        for pe in range(self.size):
            if pe != self.rank and bindings.ptr(self._base, pe):
                peer = nvshmem.get_peer_buffer(self._buffer, pe)
                self._mapped[pe] = torch.utils.dlpack.from_dlpack(peer).view(torch.uint8).reshape(-1)
        self.p2p_peers = sorted(self._mapped)
        """Ranks whose heap NVSHMEM maps into this process (NVLink/PCIe P2P): addressable by kernels."""
        self._peer_heaps: dict[int, torch.Tensor] = {}
        self._kernels: Any = None
        self.use_put_kernel = bool(put_kernel)
        """``put_signal`` to P2P peers as one CUDA kernel (see the constructor's ``put_kernel``)."""
        self.set_data_path(data_path)
        self._unfenced: set[int] = set()
        self._host_stream = torch.cuda.Stream(self.device)
        self._host_word = torch.empty(1, dtype=torch.int64, pin_memory=True)
        self._host_lock = threading.Lock()
        self._freed = False
        self._heap.zero_()
        torch.cuda.synchronize(self.device)
        self._comm.Barrier()

    def set_data_path(self, data_path: str) -> None:
        """Local, any time between operations: "p2p" (device copies to mapped peers) or "nvshmem" (its puts)."""
        if data_path not in ("p2p", "nvshmem"):
            raise ValueError(f"data_path must be 'p2p' or 'nvshmem', got {data_path!r}")
        self.data_path = data_path
        self._peer_heaps = dict(self._mapped) if data_path == "p2p" else {}

    def address(self, rank: int, offset: int) -> int | None:
        """Device address of ``offset`` in ``rank``'s heap as this process sees it, or None if not mapped here."""
        self._check_rank(rank)
        if rank == self.rank:
            return self._base + offset
        peer = self._mapped.get(rank)
        return None if peer is None else peer.data_ptr() + offset

    # ---- helpers ------------------------------------------------------------------------------------------
    def _stream(self) -> int:
        return torch.cuda.current_stream(self.device).cuda_stream

    def _device_bytes(self, src: Source) -> torch.Tensor:
        """``src`` as a uint8 tensor on this device (CPU sources are copied up on the current stream)."""
        if isinstance(src, torch.Tensor) and src.device.type == "cuda":
            if src.device != self.device:
                raise ValueError(f"put from {src.device}, but this rank's heap is on {self.device}")
            return as_byte_tensor(src)
        host = torch.from_numpy(np.array(as_byte_array(src), dtype=np.uint8, copy=True))
        return host.to(self.device, non_blocking=True)

    # ---- one-sided writes -------------------------------------------------------------------------------
    def put(self, target_rank: int, target_offset: int, src: Source) -> None:
        data = self._device_bytes(src)
        nbytes = data.numel()
        self._check_rank(target_rank)
        self._check_range(target_offset, nbytes)
        if nbytes == 0:
            return
        if target_rank == self.rank:
            self._heap[target_offset:target_offset + nbytes].copy_(data, non_blocking=True)
        elif target_rank in self._peer_heaps:
            self._peer_heaps[target_rank][target_offset:target_offset + nbytes].copy_(data, non_blocking=True)
        else:
            self._bindings.putmem_on_stream(self._base + target_offset, data.data_ptr(), nbytes, target_rank,
                                            self._stream())
            self._unfenced.add(target_rank)

    def put_signal(self, target_rank: int, target_offset: int, src: Source,
                   signal_offset: int, signal_value: int) -> None:
        self._check_signal(signal_offset)
        self._check_rank(target_rank)
        if target_rank in self._peer_heaps and self.use_put_kernel and self._put_kernel() is not None:
            data = self._device_bytes(src)
            self._check_range(target_offset, data.numel())
            if self._unfenced:  # NVSHMEM puts still in flight (after a data-path switch) go first
                self._bindings.quiet_on_stream(self._stream())
                self._unfenced.clear()
            peer = self._peer_heaps[target_rank].data_ptr()
            try:
                self._kernels.put_signal(data.data_ptr(), peer + target_offset, data.numel(), peer + signal_offset,
                                         signal_value)
                return
            except RuntimeError as error:  # the launch failed, nothing was enqueued: copy + signal from now on
                logging.getLogger("spmd_diff").warning("CUDA put kernel failed to launch (%s); using a copy and "
                                                       "a signal operation", error)
                self._kernels = False
        if target_rank == self.rank or target_rank in self._peer_heaps:
            self.put(target_rank, target_offset, src)
            self.signal(target_rank, signal_offset, signal_value)
            return
        data = self._device_bytes(src)
        self._check_range(target_offset, data.numel())
        if data.numel() == 0:
            self.signal(target_rank, signal_offset, signal_value)
            return
        stream = self._stream()
        if target_rank in self._unfenced:
            self._bindings.quiet_on_stream(stream)
            self._unfenced.clear()
        self._bindings.putmem_signal_on_stream(self._base + target_offset, data.data_ptr(), data.numel(),
                                               self._base + signal_offset, signal_value, self._signal_set,
                                               target_rank, stream)

    def _put_kernel(self) -> Any:
        """The CUDA ``put_signal`` kernel (one launch: SM copy into the peer's heap, then the signal), or None
        without CuPy (then: a copy, then a signal operation)."""
        if self._kernels is None:
            self._kernels = False
            try:
                from spmd_diff.comm.kernel_loader import load_kernel_module

                cuda = load_kernel_module("p2p_cuda")
                if cuda.available():
                    self._kernels = cuda.CudaP2P(self.device, 256)
            except Exception as error:  # noqa: BLE001 - NVRTC or CuPy trouble: copy + signal operation instead
                logging.getLogger("spmd_diff").warning("CUDA put kernel unavailable (%s: %s)",
                                                       type(error).__name__, error)
        return self._kernels or None

    def signal(self, target_rank: int, signal_offset: int, value: int) -> None:
        self._check_rank(target_rank)
        self._check_signal(signal_offset)
        stream = self._stream()
        if target_rank in self._unfenced:
            self._bindings.quiet_on_stream(stream)
            self._unfenced.clear()
        self._bindings.signal_op_on_stream(self._base + signal_offset, value, self._signal_set, target_rank, stream)

    # ---- local side ---------------------------------------------------------------------------------------
    def read_signal(self, offset: int) -> int:
        self._check_signal(offset)
        with self._host_lock, torch.cuda.stream(self._host_stream):
            word = self._heap[offset:offset + SIGNAL_BYTES].view(torch.int64)
            self._host_word.copy_(word, non_blocking=True)
            self._host_stream.synchronize()
            return int(self._host_word[0])

    def stream_wait_signal(self, offset: int, minimum: int, deadline: float, what: str) -> None:
        self._check_signal(offset)
        self._bindings.signal_wait_until_on_stream(self._base + offset, self._cmp_ge, minimum, self._stream())

    def local_view(self, offset: int, nbytes: int) -> np.ndarray:
        """A host copy of ``nbytes`` of this rank's heap (read after the guarding signal was seen)."""
        self._check_range(offset, nbytes)
        with self._host_lock, torch.cuda.stream(self._host_stream):
            host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=nbytes >= 4096)
            host.copy_(self._heap[offset:offset + nbytes], non_blocking=True)
            self._host_stream.synchronize()
        view = host.numpy()
        view.flags.writeable = False
        return view

    def local_tensor(self, offset: int, nbytes: int) -> torch.Tensor:
        self._check_range(offset, nbytes)
        return self._heap[offset:offset + nbytes]

    def zero_local(self, offset: int, nbytes: int) -> None:
        self._check_range(offset, nbytes)
        self._heap[offset:offset + nbytes].zero_()
        torch.cuda.current_stream(self.device).synchronize()

    # ---- completion and collectives -----------------------------------------------------------------------
    def quiet(self) -> None:
        self._bindings.quiet_on_stream(self._stream())
        self._unfenced.clear()
        torch.cuda.current_stream(self.device).synchronize()

    def barrier(self) -> None:
        self.quiet()
        torch.cuda.synchronize(self.device)
        self._comm.Barrier()

    def free(self) -> None:
        if self._freed:
            return
        self._freed = True
        torch.cuda.synchronize(self.device)
        self._comm.Barrier()
        self._peer_heaps.clear()
        self._mapped.clear()
        del self._heap
        try:
            self._nvshmem.free(self._buffer)
        except Exception as error:  # noqa: BLE001 - finalize releases it anyway; do not mask the job's result
            logging.getLogger("spmd_diff").warning("nvshmem free of the heap: %s: %s", type(error).__name__, error)
        del self._buffer
        self._nvshmem.finalize()
        self._comm.Free()
