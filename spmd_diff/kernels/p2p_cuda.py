"""CUDA C kernels of the GPU data plane, compiled at first use by NVRTC through CuPy (no build step, no nvcc).

Why CUDA C next to the Triton kernel of ``p2p_all_to_all``: the data plane is bound by two things Triton does
not let us control, 16-byte remote stores (Triton cannot prove the alignment of addresses read from a table, so
it moves 8 bytes per access) and the host cost of a launch (Triton's launcher binds and specializes its arguments
in Python on every call: tens of microseconds, the whole budget of a small all-to-all). Here copies move 16 bytes
per access, four in flight per thread, and a launch is one ``cuLaunchKernel`` call with argument storage built
once (CuPy compiles and loads the module).

Three kernels, all following the protocol of ``spmd_diff.comm.collective_layout`` (same heap words and values, so
every one of them interoperates with the host-driven path on the other side):

- ``p2p_all_to_all``: one group-free all-to-all among GPUs that map each other's heaps. Per peer row of the
  descriptor table (``p2p_all_to_all.describe``), ``send_blocks`` programs send and ``recv_blocks`` programs copy
  out, concurrently: chunk ``k + 1`` travels while chunk ``k`` is copied out of the slot.
  Sender: wait (acquire, system scope) for the peer's grant ``>= e | k + 1``, copy a share of chunk ``k`` into
  buffer ``k % 2`` of our slot on the peer, and the last sender block to finish the chunk (a counter per buffer)
  sets the peer's arrive word for us to ``e | k + 1`` (release, after a system fence). Receiver: block 0 grants
  chunks 0 and 1 on entry; for each chunk, wait for arrival, copy a share out (L2 loads: the slot is rewritten by
  the peer while we run), and the last block grants chunk ``k + 2``.
- ``put_signal``: every block copies a share of ``src`` into a peer's heap, the last block sets the signal word
  (release, system scope): a handoff in one launch instead of a copy and a separate signal operation.
- ``wait_at_least``: one thread spins (acquire) until a word reaches a value: a stream wait with a deadline.

Every wait gives up after ``timeout_s`` by the GPU's global timer (or at once once any wait has failed), and
records the address of the word it waited on in an error word in pinned host memory, which the host reads without
synchronizing (``failure()``); after a failure no signal is given, so peers time out too instead of reading
stale bytes. The GPU never hangs for ever, and the host reports which peer did not answer.

The torch reference is the host-driven path of the collectives (copy engines and NVSHMEM stream operations);
tests compare the two bit for bit.
"""

from __future__ import annotations

import ctypes
import itertools
import threading

import torch

try:  # CuPy is there on GPU machines; absent on CPU-only installs (CI), where nothing here runs
    import cupy

    HAS_CUPY = True
except ImportError:  # pragma: no cover - depends on the install
    cupy = None
    HAS_CUPY = False

from .p2p_all_to_all import DESC_FIELDS, MAX_PEERS, DescriptorTables

THREADS = 512
"""Threads per block of every copying kernel."""
SENDER_BLOCKS = 64
"""Sender blocks of a large all-to-all, over all peers (measured on two H200s: 64 blocks of 512 threads moved
237 GB/s to the peer, 44 blocks 218, 132 blocks 200: more blocks than the link needs only contend)."""
COUNTER_SLOTS = 64
"""``put_signal`` launches rotate over this many completion counters (launches on different streams may overlap)."""

SOURCE = r"""
typedef long long i64;
typedef unsigned long long u64;
#define UNROLL 4

__device__ __forceinline__ i64 ld_acquire(const i64* p) {
    i64 v;
    asm volatile("ld.acquire.sys.global.b64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
    return v;
}

__device__ __forceinline__ void st_release(i64* p, i64 v) {
    asm volatile("st.release.sys.global.b64 [%0], %1;" :: "l"(p), "l"(v) : "memory");
}

__device__ __forceinline__ u64 now_ns() {
    u64 t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

// A failure is recorded twice: error[0] in pinned host memory (the host reads it without synchronizing) and
// error[1] in device memory (what kernels check: an L2 read, not a PCIe round trip). 0 = no failure, else the
// device address of the word a wait gave up on (the host decodes the peer and what was awaited from it).
struct Errors { i64* host; i64* device; };

__device__ __forceinline__ i64 read_error(Errors e) { return *(const volatile i64*)e.device; }

__device__ __forceinline__ void set_error(Errors e, i64 value) {
    *(volatile i64*)e.device = value;
    *(volatile i64*)e.host = value;
    __threadfence_system();
}

// Thread 0 polls until *word >= target; every thread of the block gets the outcome. Gives up after timeout_ns
// (the GPU's global timer), or at once when another wait of any launch already failed (the error word is set):
// after one failure nothing waits out a full deadline again.
__device__ __forceinline__ bool block_wait(const i64* word, i64 target, i64 timeout_ns, Errors error) {
    __shared__ int outcome;
    if (threadIdx.x == 0) {
        int ok = 1;
        if (ld_acquire(word) < target) {
            const u64 start = now_ns();
            const u64 max_spins = (u64)timeout_ns / 256 + 1024;  // a backstop should the global timer not tick
            unsigned ns = 32;
            u64 spins = 0;
            while (ld_acquire(word) < target) {
                if ((++spins & 31) == 0) {
                    if (read_error(error) != 0 || (i64)(now_ns() - start) > timeout_ns || spins > max_spins) {
                        ok = 0;
                        break;
                    }
                }
                if (spins > 64) { __nanosleep(ns); if (ns < 1024) ns <<= 1; }
            }
            if (!ok && read_error(error) == 0) set_error(error, (i64)word);
        }
        outcome = ok;
    }
    __syncthreads();
    bool ok = outcome != 0;
    __syncthreads();
    return ok;
}

// Block b of nb copies its share of n bytes: 16-byte accesses (UNROLL in flight per thread) when both ends are
// 16-byte aligned, else 4-byte, else bytes; the wide loads go through L2 only (the source may be rewritten
// remotely between launches, and L1 is not coherent with NVLink writes; the byte tail is read plainly, after
// the acquire that ordered it).
__device__ __forceinline__ void copy_share(const char* src, char* dst, i64 n, i64 b, i64 nb) {
    if (n <= 0) return;
    const i64 tid = threadIdx.x, nt = blockDim.x;
    i64 done = 0;
    if (((((u64)src) | ((u64)dst)) & 15) == 0) {
        const int4* s = (const int4*)src;
        int4* d = (int4*)dst;
        const i64 count = n >> 4;
        for (i64 base = b * nt * UNROLL + tid; base < count; base += nb * nt * UNROLL) {
            int4 v[UNROLL];
#pragma unroll
            for (int u = 0; u < UNROLL; u++) {
                i64 i = base + u * nt;
                if (i < count) v[u] = __ldcg(s + i);
            }
#pragma unroll
            for (int u = 0; u < UNROLL; u++) {
                i64 i = base + u * nt;
                if (i < count) __stcg(d + i, v[u]);
            }
        }
        done = count << 4;
    } else if (((((u64)src) | ((u64)dst)) & 3) == 0) {
        const int* s = (const int*)src;
        int* d = (int*)dst;
        const i64 count = n >> 2;
        for (i64 i = b * nt + tid; i < count; i += nb * nt) __stcg(d + i, __ldcg(s + i));
        done = count << 2;
    }
    for (i64 i = done + b * nt + tid; i < n; i += nb * nt) dst[i] = src[i];
}

// After every thread of the block copied: the last of nb blocks through *counter runs `last` (thread 0).
__device__ __forceinline__ bool last_block(int* counter, int nb) {
    __shared__ int is_last;
    __threadfence_system();  // this thread's stores are visible everywhere before the block counts as done
    __syncthreads();
    if (threadIdx.x == 0) {
        is_last = atomicAdd(counter, 1) == nb - 1;
        if (is_last) {
            atomicExch(counter, 0);
            __threadfence_system();
        }
    }
    __syncthreads();
    bool last = is_last != 0;
    __syncthreads();
    return last;
}

extern "C" __global__ void __launch_bounds__(512) p2p_all_to_all(
        const i64* __restrict__ desc, int* counters, i64* error_host, i64* error_device, i64 stride,
        i64 timeout_ns, int send_blocks, int recv_blocks, i64 e0, i64 e1, i64 e2, i64 e3, i64 e4, i64 e5, i64 e6,
        i64 e7) {
    const Errors error = {error_host, error_device};
    const int per_row = send_blocks + recv_blocks;
    const int p = blockIdx.x / per_row;
    const int sub = blockIdx.x % per_row;
    const i64 es[8] = {e0, e1, e2, e3, e4, e5, e6, e7};
    const i64 epoch = es[p] << 20;
    const i64* row = desc + p * FIELDS;
    if (row[2] < 0) {  // this rank's own block: a local copy, no protocol
        copy_share((const char*)row[0], (char*)row[10], row[1], sub, per_row);
        return;
    }
    // The entry grant (chunks 0 and 1 of our slot) comes from the row's first block, whatever its role: the slot
    // is free (the previous operation on this stream has completed), and no block of the row waits before it.
    if (sub == 0 && threadIdx.x == 0) st_release((i64*)row[5], epoch | 2);
    // A failed wait skips its copy, and no signal is given after a failure anywhere (the error word is set
    // before the failing block counts itself done): the peer times out too instead of reading stale bytes.
    if (sub < send_blocks) {
        const char* src = (const char*)row[0];
        const i64 nbytes = row[1], chunks = row[2], chunk = row[3];
        char* peer_slot = (char*)row[4];
        i64* peer_arrive = (i64*)row[7];
        const i64* my_grant = (const i64*)row[6];
        for (i64 k = 0; k < chunks; k++) {
            if (block_wait(my_grant, epoch | (k + 1), timeout_ns, error)) {
                const i64 low = k * chunk;
                const i64 size = nbytes - low < chunk ? nbytes - low : chunk;
                copy_share(src + low, peer_slot + (k & 1) * stride, size, sub, send_blocks);
            }
            if (last_block(counters + p * 4 + (k & 1), send_blocks) && threadIdx.x == 0 && read_error(error) == 0)
                st_release(peer_arrive, epoch | (k + 1));
        }
    } else {
        const int b = sub - send_blocks;
        i64* peer_grant = (i64*)row[5];
        const i64* my_arrive = (const i64*)row[8];
        const char* slot = (const char*)row[9];
        char* out = (char*)row[10];
        const i64 nbytes = row[11], chunks = row[12], chunk = row[13];
        for (i64 k = 0; k < chunks; k++) {
            if (block_wait(my_arrive, epoch | (k + 1), timeout_ns, error)) {
                const i64 low = k * chunk;
                const i64 size = nbytes - low < chunk ? nbytes - low : chunk;
                copy_share(slot + (k & 1) * stride, out + low, size, b, recv_blocks);
            }
            if (last_block(counters + p * 4 + 2 + (k & 1), recv_blocks) && threadIdx.x == 0 && k + 2 < chunks &&
                read_error(error) == 0)
                st_release(peer_grant, epoch | (k + 3));
        }
    }
}

extern "C" __global__ void __launch_bounds__(512) put_signal(
        const char* src, char* dst, i64 nbytes, i64* signal, i64 value, int* counter) {
    copy_share(src, dst, nbytes, blockIdx.x, gridDim.x);
    if (last_block(counter, gridDim.x) && threadIdx.x == 0) st_release(signal, value);
}

extern "C" __global__ void wait_at_least(const i64* word, i64 target, i64 timeout_ns, i64* error_host,
                                         i64* error_device) {
    block_wait(word, target, timeout_ns, Errors{error_host, error_device});
}
""".replace("FIELDS", str(DESC_FIELDS))

_RAW_STREAM = getattr(torch._C, "_cuda_getCurrentRawStream", None)
"""``cudaStream_t`` of a device's current stream without building a ``torch.cuda.Stream`` (CUDA builds)."""
_modules: dict = {}
_lock = threading.Lock()


class _Launcher:
    """``cuLaunchKernel`` through ctypes with argument storage built once: a launch sets the changing values in
    place and makes one C call (CuPy's launcher converts every argument on every call: microseconds that a small
    all-to-all cannot afford). Argument values are copied by the driver at launch, so reuse is safe.

    Args:
        function: a CuPy ``RawKernel`` (or ``Function``; ``ptr`` of its ``Function`` is the ``CUfunction``).
        types: the ctypes type of each kernel parameter, in order.
    """

    _driver = None

    def __init__(self, function, types: list) -> None:
        if _Launcher._driver is None:
            driver = ctypes.CDLL("libcuda.so.1")
            driver.cuLaunchKernel.argtypes = [ctypes.c_void_p] + [ctypes.c_uint] * 6 + [
                ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
            driver.cuLaunchKernel.restype = ctypes.c_int
            _Launcher._driver = driver
        self._function = ctypes.c_void_p(getattr(function, "kernel", function).ptr)  # RawKernel -> Function
        self.args = [kind() for kind in types]
        self._storage = (ctypes.c_void_p * len(types))(*[ctypes.addressof(a) for a in self.args])
        self._params = ctypes.cast(self._storage, ctypes.c_void_p)

    def __call__(self, grid: int, block: int, stream: int, *values) -> None:
        """Launch with parameters ``values`` (all of them, in order) on ``stream`` (a ``cudaStream_t``)."""
        for slot, value in zip(self.args, values):
            slot.value = value
        status = self._driver.cuLaunchKernel(self._function, grid, 1, 1, block, 1, 1, 0, stream, self._params, None)
        if status:
            raise RuntimeError(f"cuLaunchKernel failed with CUresult {status}")


def _module(device: torch.device):
    """The compiled module for ``device`` (NVRTC, for its compute capability; cached per device)."""
    with _lock:
        module = _modules.get(device.index)
        if module is None:
            with cupy.cuda.Device(device.index):
                module = cupy.RawModule(code=SOURCE, options=("-std=c++17",))
                module.compile()
            _modules[device.index] = module
        return module


def available() -> bool:
    """CuPy imports (which implementation runs is the caller's choice: the job's ``dataplane.p2p_kernel``)."""
    return HAS_CUPY


class CudaP2P:
    """Launches the kernels on the current torch stream of ``device``; owns counters, the error words and a
    cache of device descriptor tables (keyed by their contents: reused buffers cost no copy).

    Args:
        device: the GPU.
        buffer_stride: bytes between chunk buffers 0 and 1 of a collectives slot.
        timeout_s: how long one wait inside a kernel may take before it gives up (the GPU's global timer).
        blocks: ``(send_blocks, recv_blocks)`` per peer of every all-to-all launch, or None: chosen by size
            (``blocks_for``; the job's ``dataplane.a2a_blocks``).
    """

    SELF_ROWS = True
    """A descriptor row with ``send_chunks < 0`` is this rank's own block: copied locally, in the same launch."""

    def __init__(self, device: torch.device, buffer_stride: int, timeout_s: float = 600.0,
                 blocks: tuple[int, int] | None = None) -> None:
        if not HAS_CUPY:
            raise RuntimeError("the CUDA data-plane kernels need CuPy")
        if blocks is not None and (len(blocks) != 2 or min(blocks) < 1):
            raise ValueError(f"blocks must be two positive block counts, e.g. (64, 16), got {blocks!r}")
        self.forced_blocks = None if blocks is None else (int(blocks[0]), int(blocks[1]))
        self.device = torch.device(device)
        self.buffer_stride = buffer_stride
        self.timeout_ns = int(timeout_s * 1e9)
        module = _module(self.device)
        u64, i64, i32 = ctypes.c_uint64, ctypes.c_int64, ctypes.c_int32
        with cupy.cuda.Device(self.device.index):  # RawKernel loads on CuPy's current device
            self._a2a = _Launcher(module.get_function("p2p_all_to_all"),
                                  [u64, u64, u64, u64, i64, i64, i32, i32] + [i64] * MAX_PEERS)
            self._put = _Launcher(module.get_function("put_signal"), [u64, u64, i64, u64, i64, u64])
            self._wait = _Launcher(module.get_function("wait_at_least"), [u64, i64, i64, u64, u64])
        self.counters = torch.zeros(MAX_PEERS * 4 + COUNTER_SLOTS, dtype=torch.int32, device=self.device)
        self.error_host = torch.zeros(1, dtype=torch.int64, pin_memory=True)  # device-visible (UVA), no sync
        self._error_view = self.error_host.numpy()
        self.error_device = torch.zeros(1, dtype=torch.int64, device=self.device)
        self.table = DescriptorTables(self.device)
        self._rotation = itertools.cycle(range(COUNTER_SLOTS))
        self._sms = torch.cuda.get_device_properties(self.device).multi_processor_count
        self._errors = (self.error_host.data_ptr(), self.error_device.data_ptr())
        self._fixed = (self.counters.data_ptr(), *self._errors, buffer_stride, self.timeout_ns)
        self._no_epochs = (0,) * MAX_PEERS

    def failure(self) -> int:
        """0, or the device address of the heap word a wait gave up on (read without synchronizing: the
        kernels write it into pinned host memory). Sticky until ``clear_failure``."""
        return int(self._error_view[0])

    def clear_failure(self) -> None:
        """Forget a recorded failure (synchronizes the device; kernels check the device copy)."""
        torch.cuda.synchronize(self.device)
        self._error_view[0] = 0
        self.error_device.zero_()
        torch.cuda.synchronize(self.device)

    def _stream(self) -> int:
        return _RAW_STREAM(self.device.index) if _RAW_STREAM else torch.cuda.current_stream(self.device).cuda_stream

    def blocks_for(self, largest_chunk: int, peers: int) -> tuple[int, int]:
        """``(send_blocks, recv_blocks)`` per peer: one sender per 64 KiB of the largest chunk, up to a share of
        ``SENDER_BLOCKS`` (at least 16); a quarter as many receivers, at most 16 (their copies are local).
        The constructor's ``blocks`` overrides."""
        if self.forced_blocks is not None:
            return self.forced_blocks
        send = max(1, min(-(-largest_chunk // (64 << 10)), max(16, SENDER_BLOCKS // peers)))
        return send, max(1, min(send // 4, 16))

    def launch(self, rows: list[tuple[int, ...]], epochs: list[int], blocks: tuple[int, int],
               table: torch.Tensor | None = None) -> None:
        """Enqueue one all-to-all: ``rows`` from ``p2p_all_to_all.describe``, ``epochs[i]`` the pair epoch of row
        ``i`` (not shifted), ``blocks`` from ``blocks_for``."""
        num = len(rows)
        if not 0 < num <= MAX_PEERS:
            raise ValueError(f"one launch takes 1 to {MAX_PEERS} peers, got {num}")
        if table is None:
            table = self.table(rows)
        send, recv = blocks
        self._a2a(num * (send + recv), THREADS, self._stream(), table.data_ptr(), *self._fixed, send, recv,
                  *epochs, *self._no_epochs[len(epochs):])

    def put_signal(self, src_ptr: int, dst_ptr: int, nbytes: int, signal_ptr: int, value: int) -> None:
        """Enqueue: copy ``nbytes`` from ``src_ptr`` to ``dst_ptr`` (a peer-mapped heap address), then set the
        word at ``signal_ptr`` to ``value`` once every byte is visible there."""
        blocks = max(1, min(self._sms, -(-nbytes // (THREADS * 16 * 4))))
        counter = self.counters.data_ptr() + 4 * (MAX_PEERS * 4 + next(self._rotation))
        self._put(blocks, THREADS, self._stream(), src_ptr, dst_ptr, nbytes, signal_ptr, value, counter)

    def wait_at_least(self, word_ptr: int, target: int) -> None:
        """Enqueue: the stream waits until the local word at ``word_ptr`` is ``>= target`` (or gives up)."""
        self._wait(1, 32, self._stream(), word_ptr, target, self.timeout_ns, *self._errors)
