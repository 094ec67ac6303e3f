"""The transport interface: a symmetric heap on every rank with one-sided puts and 8-byte signal words.

Every rank allocates ``heap_bytes`` of the same heap once, collectively, at construction. After that, ranks
communicate only by writing into each other's heaps (``put``, ``put_signal``, ``signal``) and by waiting on
words of their own heap (``read_signal``, ``wait_signal``). There are no remote reads and no locks: this is
the subset that MPI RMA (passive target), NVSHMEM and RDMA-write-with-immediate all provide cheaply.

Memory model every implementation guarantees:

- A *signal word* is an 8-byte aligned int64 in the heap. It is written only with ``signal`` / ``put_signal``
  (atomically, never torn) or, between collective barriers, with ``zero_local``. It is read locally only.
- ``put_signal(t, ...)`` makes every byte put to rank ``t`` by this rank before the call, and its own payload,
  visible at ``t`` before the signal word changes. A rank that sees the signal (``read_signal`` /
  ``wait_signal``) may then read the payload with ``local_view``.
- A plain ``put`` may complete asynchronously; ``quiet`` (or a later ``put_signal`` / ``signal`` to the same
  target) completes it. The source buffer must not be modified until then.
- A transport object is used by one thread of its rank.

Device heaps (``device`` is a CUDA device, e.g. ``NvshmemTransport``): puts, signals and stream waits are
*stream-ordered*: they are enqueued on the calling thread's current CUDA stream and take effect in stream order;
"complete" / "reusable" above then means "for later work on that stream". ``put`` accepts tensors on
``device`` (and stages CPU sources there first). Host-side ``read_signal`` / ``wait_signal`` / ``local_view``
copy from the device. Host heaps (``device`` is the CPU) do everything synchronously and ignore streams.
"""

from __future__ import annotations

import abc
import time
import warnings
from typing import Union

import numpy as np
import torch

from spmd_diff.errors import StageTimeout

Source = Union[torch.Tensor, np.ndarray, bytes, bytearray, memoryview]
"""What ``put`` accepts: a contiguous CPU tensor (any dtype, bfloat16 included), a numpy array or bytes."""

SIGNAL_BYTES = 8
"""Size and alignment of a signal word (int64)."""


def as_byte_array(src: Source) -> np.ndarray:
    """View ``src`` as a flat uint8 numpy array without copying.

    Args:
        src: a contiguous CPU ``torch.Tensor`` of any dtype (bytes moved with ``.view(torch.uint8)``), a
            C-contiguous numpy array, or a bytes-like object.

    Returns:
        uint8 array of shape ``(nbytes,)`` sharing memory with ``src``.

    Raises:
        ValueError: if ``src`` is not on the CPU, not contiguous, or of an unsupported type.
    """
    if isinstance(src, torch.Tensor):
        if src.device.type != "cpu":
            raise ValueError(f"this transport moves CPU tensors only, got a tensor on {src.device}")
        if not src.is_contiguous():
            raise ValueError(f"put needs a contiguous tensor, got shape {tuple(src.shape)} "
                             f"strides {src.stride()}; call .contiguous() first")
        if src.numel() == 0:
            return np.empty(0, dtype=np.uint8)
        return src.detach().reshape(-1).view(torch.uint8).numpy()
    if isinstance(src, np.ndarray):
        if not src.flags.c_contiguous:
            raise ValueError(f"put needs a C-contiguous numpy array, got shape {src.shape} strides {src.strides}")
        return src.reshape(-1).view(np.uint8)
    if isinstance(src, (bytes, bytearray, memoryview)):
        return np.frombuffer(src, dtype=np.uint8)
    raise ValueError(f"put accepts a CPU torch.Tensor, numpy array or bytes, got {type(src).__name__}")


def as_byte_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """Flat uint8 view ``(nbytes,)`` of a contiguous tensor of any dtype and device (bf16, bool, 0-dim too).

    Raises:
        ValueError: if ``tensor`` is not contiguous.
    """
    if not tensor.is_contiguous():
        raise ValueError(f"need a contiguous tensor, got shape {tuple(tensor.shape)} strides {tensor.stride()}; "
                         "call .contiguous() first")
    flat = tensor.detach().reshape(-1)
    if flat.numel() == 0:
        return torch.empty(0, dtype=torch.uint8, device=tensor.device)
    return flat.view(torch.uint8) if flat.dtype != torch.uint8 else flat


class Backoff:
    """Spin, then sleep with a growing interval: cheap when the wait is short, no burnt core when it is long.

    ``pause()`` returns immediately for the first ``num_spins`` calls, then sleeps ``min_sleep_s`` doubling
    up to ``max_sleep_s``.
    """

    def __init__(self, num_spins: int = 100, min_sleep_s: float = 20e-6, max_sleep_s: float = 1e-3) -> None:
        self._num_spins = num_spins
        self._sleep_s = min_sleep_s
        self._max_sleep_s = max_sleep_s
        self._calls = 0

    def pause(self) -> None:
        self._calls += 1
        if self._calls <= self._num_spins:
            return
        time.sleep(self._sleep_s)
        self._sleep_s = min(2.0 * self._sleep_s, self._max_sleep_s)


class Transport(abc.ABC):
    """A symmetric heap of ``heap_bytes`` on each of ``size`` ranks, with one-sided puts and signal words.

    Subclasses allocate the heap collectively in their constructor and zero it, and release it in ``free``
    (collective, explicit; never from ``__del__``).
    """

    rank: int
    """This rank, in ``[0, size)``."""
    size: int
    """Number of ranks sharing the heap."""
    heap_bytes: int
    """Bytes of heap on every rank (a multiple of 8)."""
    device: torch.device = torch.device("cpu")
    """Where the heap lives: the CPU (host memory) or a CUDA device (stream-ordered operations)."""

    # ---- one-sided writes -------------------------------------------------------------------------------
    @abc.abstractmethod
    def put(self, target_rank: int, target_offset: int, src: Source) -> None:
        """Copy ``src``'s bytes to ``[target_offset, target_offset + nbytes)`` of ``target_rank``'s heap.

        May complete asynchronously: ``src`` must stay unchanged until ``quiet`` or a later
        ``put_signal`` / ``signal`` to ``target_rank``.
        """

    @abc.abstractmethod
    def put_signal(self, target_rank: int, target_offset: int, src: Source,
                   signal_offset: int, signal_value: int) -> None:
        """Put ``src`` like ``put``, then set the int64 word at ``signal_offset`` of ``target_rank`` to
        ``signal_value``. The signal becomes visible only after this payload and every earlier put from
        this rank to ``target_rank``. Returns when all of it is complete at the target (``src`` reusable).
        """

    @abc.abstractmethod
    def signal(self, target_rank: int, signal_offset: int, value: int) -> None:
        """Atomically set the int64 word at ``signal_offset`` of ``target_rank`` (may be this rank) to
        ``value``, after every earlier put from this rank to ``target_rank``. Complete on return."""

    # ---- local side ---------------------------------------------------------------------------------------
    @abc.abstractmethod
    def read_signal(self, offset: int) -> int:
        """Read this rank's int64 word at ``offset``; memory written before the signal is visible after."""

    def progress(self) -> None:
        """Let the communication library make progress (e.g. apply incoming RMA). Called while polling."""

    def wait_signal(self, offset: int, minimum: int, deadline: float, what: str) -> int:
        """Wait until this rank's word at ``offset`` is ``>= minimum``; return its value.

        Spins briefly, then sleeps with a growing interval (up to ~1 ms), driving ``progress`` meanwhile.

        Args:
            offset: signal word offset in this rank's heap (8-byte aligned).
            minimum: value to reach.
            deadline: ``time.monotonic()`` value after which to give up.
            what: who waits for what, for the error message.

        Raises:
            StageTimeout: at the deadline, naming ``what``, the offset, the current and expected value.
        """
        backoff = Backoff()
        while True:
            value = self.read_signal(offset)
            if value >= minimum:
                return value
            if time.monotonic() >= deadline:
                value = self.read_signal(offset)
                if value >= minimum:
                    return value
                raise StageTimeout(f"{what}: timed out on rank {self.rank} waiting for signal word at heap "
                                   f"offset {offset} to reach {minimum}, it is {value}")
            self.progress()
            backoff.pause()

    @abc.abstractmethod
    def local_view(self, offset: int, nbytes: int) -> np.ndarray:
        """Read-only uint8 view ``(nbytes,)`` of this rank's heap; read after the guarding signal is seen.

        The view aliases the heap: copy out what you keep, and drop it before ``free``."""

    def local_tensor(self, offset: int, nbytes: int) -> torch.Tensor:
        """uint8 tensor ``(nbytes,)`` on ``device`` aliasing this rank's heap; read after the guarding signal.

        Host heaps: a CPU view (treat as read-only). Device heaps: a view of device memory, read by later work
        on the current stream (after ``stream_wait_signal``). Copy out what you keep; drop it before ``free``.
        """
        view = self.local_view(offset, nbytes)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # a read-only numpy view; torch cannot mark it so
            return torch.from_numpy(view)

    def stream_wait_signal(self, offset: int, minimum: int, deadline: float, what: str) -> None:
        """Order later work after this rank's word at ``offset`` reaches ``minimum``.

        Device heaps enqueue the wait on the current stream and return at once (the deadline is then enforced
        by whoever synchronizes; see ``GroupCollectives``). Host heaps wait here, like ``wait_signal``.
        """
        self.wait_signal(offset, minimum, deadline, what)

    @abc.abstractmethod
    def zero_local(self, offset: int, nbytes: int) -> None:
        """Zero a range of this rank's own heap. Only between barriers, when no rank writes that range."""

    # ---- completion and collectives -----------------------------------------------------------------------
    @abc.abstractmethod
    def quiet(self) -> None:
        """Return when every put of this rank is complete at its target."""

    @abc.abstractmethod
    def barrier(self) -> None:
        """Collective: ``quiet`` on every rank, then a barrier; all earlier writes are visible everywhere."""

    @abc.abstractmethod
    def free(self) -> None:
        """Collective: release the heap. The transport is unusable afterwards."""

    # ---- helpers for implementations ----------------------------------------------------------------------
    def _check_rank(self, target_rank: int) -> None:
        if not 0 <= target_rank < self.size:
            raise ValueError(f"target rank {target_rank} is outside [0, {self.size})")

    def _check_range(self, offset: int, nbytes: int) -> None:
        if offset < 0 or nbytes < 0 or offset + nbytes > self.heap_bytes:
            raise ValueError(f"heap range [{offset}, {offset + nbytes}) is outside the heap of "
                             f"{self.heap_bytes} bytes")

    def _check_signal(self, offset: int) -> None:
        if offset % SIGNAL_BYTES:
            raise ValueError(f"signal word offset {offset} is not {SIGNAL_BYTES}-byte aligned")
        self._check_range(offset, SIGNAL_BYTES)


def round_up(value: int, multiple: int) -> int:
    """Smallest multiple of ``multiple`` that is ``>= value``."""
    return -(-value // multiple) * multiple
