"""The data plane's costs on GPUs, one rank per GPU: ``mpirun -n 4 python perf/bench_comm.py --out DIR``.

1. all-to-all, bf16, 256 KiB .. 256 MiB per rank (split equally): ours (group-free, one-sided, ``all_to_all_into``:
   the one-kernel path, and the host-driven path on P2P copies and on NVSHMEM puts) vs NCCL
   ``all_to_all_single`` vs nvshmem4py's own ``alltoall``; each result checked before it is timed.
2. Channel handoff of a Wan 480p x 81-frame latent (16x21x60x104; bf16 and fp32), rank 0 <-> rank 1 ping-pong,
   one-way = round trip / 2: our data plane (put-with-signal, stream wait, copy out), our full channel API,
   NCCL send/recv, MPI through host memory; target 10 us + size / 400 GB/s.
3. Group formation for 2 and 4 ranks: ours vs ``MPI.Comm.Split`` vs ``torch.distributed.new_group`` (its call,
   and its first collective, which is when NCCL builds the communicator).

Times are medians over repeats after warm-up (each repeat: the slowest rank's mean over a batch of iterations,
CUDA events on the current stream). Writes ``comm-<date>.json`` and ``.md`` into ``--out`` (rank 0).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

for _key, _value in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"), ("NVSHMEM_DISABLE_NVLS", "1")):
    os.environ.setdefault(_key, _value)
os.environ.setdefault("NVSHMEM_SYMMETRIC_SIZE", "2G")  # our heap + nvshmem4py's alltoall buffers

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from mpi4py import MPI  # noqa: E402

from bench_common import results_header  # noqa: E402
from spmd_diff.comm.channel import ChannelReceiver, ChannelSender  # noqa: E402
from spmd_diff.comm.heap_layout import HeapLayout, RingSpec  # noqa: E402
from spmd_diff.comm.wire import Message  # noqa: E402
from spmd_diff.comm.collective_layout import CollectiveLayout  # noqa: E402
from spmd_diff.comm.collectives import GroupCollectives  # noqa: E402
from spmd_diff.comm.nvshmem import NvshmemTransport  # noqa: E402
from spmd_diff.comm.transport import as_byte_tensor, round_up  # noqa: E402

A2A_SIZES = [256 << 10, 1 << 20, 8 << 20, 64 << 20, 256 << 20]
LATENT_SHAPE = (16, 21, 60, 104)
NVLINK_GBPS = 478.0


class Bench:
    def __init__(self, args) -> None:
        self.args = args
        self.comm = MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.device = torch.device("cuda", self.rank % torch.cuda.device_count())
        torch.cuda.set_device(self.device)
        self.region = CollectiveLayout.bytes_needed(self.size, max(4, self.size), 16 << 20)
        latent_bytes = round_up(torch.Size(LATENT_SHAPE).numel() * 4, 4096)
        self.data_offset = round_up(self.region, 4096)
        self.sig_offset = self.data_offset + latent_bytes
        self.channel_offset = self.sig_offset + 4096
        self.ring = RingSpec(2, latent_bytes)
        heap = self.channel_offset + 2 * HeapLayout.bytes_needed([self.ring], 1) + (1 << 20)
        t0 = time.perf_counter()
        self.transport = NvshmemTransport(self.comm, heap, device=self.device)
        self.nvshmem_init_s = time.perf_counter() - t0
        self.coll = GroupCollectives(self.transport, 0, self.region, max_ranks=max(4, self.size),
                                     chunk_bytes=16 << 20, timeout_s=120)
        port = self.comm.bcast(_free_port() if self.rank == 0 else None, root=0)
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=self.rank, world_size=self.size)
        self.counter = 0
        self.results: dict = {"errors": []}

    # ---- timing ---------------------------------------------------------------------------------------------
    def timed(self, fn, iters: int, repeats: int, warmup: int = 3) -> tuple[float, list[float]]:
        """Median over ``repeats`` of the slowest rank's seconds per iteration (CUDA events)."""
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize()
        self.comm.Barrier()
        samples = []
        for _ in range(repeats):
            self.comm.Barrier()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            host = time.perf_counter()
            for _ in range(iters):
                fn()
            self.last_host_s = (time.perf_counter() - host) / iters
            end.record()
            end.synchronize()
            samples.append(self.comm.allreduce(start.elapsed_time(end) / 1e3 / iters, op=MPI.MAX))
        self.coll.synchronize()
        return statistics.median(samples), samples

    def log(self, text: str) -> None:
        if self.rank == 0:
            print(text, flush=True)

    # ---- 1. all-to-all ----------------------------------------------------------------------------------------
    def all_to_all(self) -> None:
        import nvshmem.core as nvshmem

        rows = []
        group = self.coll.group(range(self.size))
        sizes = A2A_SIZES if not self.args.quick else A2A_SIZES[:3]
        for total in sizes:
            per = total // 2 // self.size
            send_flat = torch.empty(self.size, per, dtype=torch.bfloat16, device=self.device)
            for j in range(self.size):
                send_flat[j].fill_(self.rank * self.size + j)
            out_flat = torch.empty_like(send_flat)
            send, out = list(send_flat.unbind(0)), list(out_flat.unbind(0))
            expect = torch.stack([torch.full((per,), i * self.size + self.rank, dtype=torch.bfloat16,
                                             device=self.device) for i in range(self.size)])
            iters = max(3, min(100, (64 << 20) // total * 4))
            variants = []

            def ours(path: str, kernel: str, blocks: str = ""):
                def run():
                    self.transport.set_data_path(path)
                    # pick the kernel again, drop replay plans
                    self.coll.use_kernel(kernel, tuple(int(b) for b in blocks.split(",")) if blocks else None)
                    return lambda: group.all_to_all_into(send, out)
                return run

            variants.append(("ours", ours("p2p", "cuda")))  # one CUDA kernel, replayed (Triton without CuPy)

            def persistent():
                ours("p2p", "cuda")()
                return group.all_to_all_init(send, out).start
            variants.append(("ours-persistent", persistent))  # Group.all_to_all_init: as MPI_Alltoall_init
            variants.append(("ours-triton-kernel", ours("p2p", "triton")))
            if total >= (64 << 20):
                for blocks in ("16,4", "32,8", "44,16", "64,16"):
                    variants.append((f"ours-blocks-{blocks}", ours("p2p", "cuda", blocks)))
            variants.append(("ours-host-path", ours("p2p", "off")))  # stream ops, copy engines into peer heaps
            if total >= (8 << 20):
                variants.append(("ours-host-path-nvshmem-puts", ours("nvshmem", "off")))
            variants.append(("nccl", lambda: lambda: dist.all_to_all_single(out_flat.view(-1), send_flat.view(-1))))
            src = nvshmem.tensor((self.size * per,), dtype=torch.bfloat16)
            dst = nvshmem.tensor((self.size * per,), dtype=torch.bfloat16)
            src.copy_(send_flat.view(-1))
            team = nvshmem.Teams.TEAM_WORLD
            stream = _StreamShim()
            variants.append(("nvshmem4py-alltoall",
                             lambda: lambda: nvshmem.alltoall(team, dst, src, stream=stream.current())))
            for name, make in variants:
                try:
                    fn = make()
                    out_flat.fill_(-1)
                    dst.fill_(-1)
                    fn()
                    torch.cuda.synchronize()
                    self.coll.synchronize()
                    got = dst.view(self.size, per) if name.startswith("nvshmem4py") else out_flat
                    ok = bool(torch.equal(got, expect))
                    if not self.comm.allreduce(ok, op=MPI.LAND):
                        raise AssertionError(f"{name} at {total} B/rank: wrong result")
                    median, samples = self.timed(fn, iters, self.args.repeats)
                    row = dict(method=name, bytes_per_rank=total, seconds=median, samples=samples,
                               host_us_per_call=self.comm.allreduce(self.last_host_s, op=MPI.MAX) * 1e6,
                               leaving_gbps=total * (self.size - 1) / self.size / median / 1e9,
                               algbw_gbps=total / median / 1e9)
                    rows.append(row)
                    self.log(f"a2a {total >> 10:>7} KiB/rank {name:<27} {median * 1e6:10.1f} us  "
                             f"{row['leaving_gbps']:7.1f} GB/s leaving ({row['algbw_gbps']:.1f} algbw), host "
                             f"{row['host_us_per_call']:.1f} us/call")
                except Exception as error:  # noqa: BLE001 - recorded, the other measurements go on
                    self.error(f"a2a {name} {total}", error)
            self.transport.set_data_path("p2p")
            ours("p2p", "cuda")()
            torch.cuda.synchronize()
            nvshmem.free_tensor(src)
            nvshmem.free_tensor(dst)
        self.results["all_to_all"] = rows

    # ---- 2. handoff -------------------------------------------------------------------------------------------
    def handoff(self) -> None:
        rows = []
        layout = HeapLayout(self.size, [(0, 1, self.ring, "ping"), (1, 0, self.ring, "pong")],
                            base_offset=self.channel_offset)
        layout.clear_local(self.transport)
        self.transport.barrier()
        ends = {}
        if self.rank in (0, 1):
            ends["send"] = ChannelSender(self.transport, layout["ping" if self.rank == 0 else "pong"])
            ends["recv"] = ChannelReceiver(self.transport, layout["pong" if self.rank == 0 else "ping"])
        for dtype in (torch.bfloat16, torch.float32):
            x = torch.randn(LATENT_SHAPE, device=self.device).to(dtype)
            y = torch.empty_like(x)
            nbytes = x.numel() * x.element_size()
            for name, make in (("ours-one-sided", lambda: self._stream_pingpong(x, y)),
                               ("ours-one-sided-tiny", lambda: self._stream_pingpong(x[0, 0, 0, :4], y[0, 0, 0, :4])),
                               ("ours-one-sided-in-place", lambda: self._stream_pingpong(x, y, in_place=True)),
                               ("ours-one-sided-copy-engine", lambda: self._stream_pingpong(x, y, kernel=False)),
                               ("ours-channel-api", lambda: self._channel_pingpong(x, ends)),
                               ("nccl-send-recv", lambda: self._nccl_pingpong(x, y)),
                               ("mpi-host-memory", lambda: self._mpi_pingpong(x, y))):
                try:
                    median, samples = self.timed(make(), 20, self.args.repeats)
                    size = 4 * x.element_size() if name.endswith("tiny") else nbytes
                    one_way = median / 2
                    target = 10e-6 + size / 400e9
                    row = dict(method=name, dtype=str(dtype).removeprefix("torch."), bytes=size,
                               one_way_seconds=one_way, one_way_gbps=size / one_way / 1e9, target_seconds=target,
                               meets_target=one_way <= target, samples_round_trip=samples)
                    rows.append(row)
                    self.log(f"handoff {row['dtype']:<8} {name:<18} one-way {one_way * 1e6:9.1f} us "
                             f"{row['one_way_gbps']:7.1f} GB/s (target {target * 1e6:.1f} us)")
                except Exception as error:  # noqa: BLE001
                    self.error(f"handoff {name} {dtype}", error)
        self.results["handoff"] = rows

    def _stream_pingpong(self, x: torch.Tensor, y: torch.Tensor, in_place: bool = False, kernel: bool = True):
        """Our data plane: put-with-signal into the peer's heap, the peer's stream waits, copies out (or, in place,
        answers from the slot itself), answers. ``kernel=False``: a copy-engine copy, then a signal operation."""
        t, data, sig = self.transport, self.data_offset, self.sig_offset
        nbytes = x.numel() * x.element_size()
        y_bytes = as_byte_tensor(y)
        t.use_put_kernel = kernel  # the CUDA put-with-signal kernel, or a copy-engine copy and a signal operation

        def run():
            self.counter += 1
            value = self.counter
            if self.rank == 0:
                t.put_signal(1, data, x, sig, value)
                t.stream_wait_signal(sig + 8, value, 0.0, "pong")
            elif self.rank == 1:
                t.stream_wait_signal(sig, value, 0.0, "ping")
                if in_place:
                    t.put_signal(0, data, t.local_tensor(data, nbytes), sig + 8, value)
                else:
                    y_bytes.copy_(t.local_tensor(data, nbytes))
                    t.put_signal(0, data, y, sig + 8, value)
        return run

    def _channel_pingpong(self, x: torch.Tensor, ends: dict):
        def run():
            deadline = time.monotonic() + 60
            if self.rank == 0:
                ends["send"].put(Message({"item": 0}, {"latents": x}), deadline)
                ends["recv"].take(deadline)
            elif self.rank == 1:
                message = ends["recv"].take(deadline)
                ends["send"].put(Message({"item": 0}, message.tensors), deadline)
        return run

    def _nccl_pingpong(self, x: torch.Tensor, y: torch.Tensor):
        def run():
            if self.rank == 0:
                dist.send(x, 1)
                dist.recv(y, 1)
            elif self.rank == 1:
                dist.recv(y, 0)
                dist.send(y, 0)
        return run

    def _mpi_pingpong(self, x: torch.Tensor, y: torch.Tensor):
        nbytes = x.numel() * x.element_size()
        host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        buffer = host.numpy()
        x_bytes, y_bytes = as_byte_tensor(x), as_byte_tensor(y)

        def run():
            if self.rank == 0:
                host.copy_(x_bytes)
                self.comm.Send([buffer, MPI.BYTE], 1)
                self.comm.Recv([buffer, MPI.BYTE], 1)
                y_bytes.copy_(host)
            elif self.rank == 1:
                self.comm.Recv([buffer, MPI.BYTE], 0)
                y_bytes.copy_(host)
                host.copy_(y_bytes)
                self.comm.Send([buffer, MPI.BYTE], 0)
        return run

    # ---- 3. group formation -----------------------------------------------------------------------------------
    def group_formation(self) -> None:
        rows = []
        for members in ([0, 1], list(range(self.size))):
            inside = self.rank in members
            samples = []
            for _ in range(5):
                t0 = time.perf_counter()
                for _ in range(2000):
                    if inside:
                        self.coll.group(members)
                samples.append((time.perf_counter() - t0) / 2000)
            rows.append(self._row("ours: group()", members, samples))
            samples = []
            for _ in range(20):
                self.comm.Barrier()
                t0 = time.perf_counter()
                if inside:
                    group = self.coll.group(members)
                    group.barrier()
                samples.append(time.perf_counter() - t0)
            rows.append(self._row("ours: group() + first barrier", members, samples))
            samples = []
            for _ in range(20):
                self.comm.Barrier()
                t0 = time.perf_counter()
                new = self.comm.Split(0 if inside else MPI.UNDEFINED, self.rank)
                samples.append(time.perf_counter() - t0)
                if new != MPI.COMM_NULL:
                    new.Free()
            rows.append(self._row("MPI.Comm.Split", members, samples))
            create, first = [], []
            for _ in range(5):
                self.comm.Barrier()
                t0 = time.perf_counter()
                pg = dist.new_group(ranks=members)
                create.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                if inside:
                    flag = torch.ones(1, device=self.device)
                    dist.all_reduce(flag, group=pg)
                    torch.cuda.synchronize()
                first.append(time.perf_counter() - t0)
                self.comm.Barrier()  # the groups stay (destroying NCCL communicators is not what is measured)
            rows.append(self._row("torch new_group()", members, create))
            rows.append(self._row("torch new_group() + first all_reduce", members,
                                  [a + b for a, b in zip(create, first)]))
        self.results["group_formation"] = rows

    def _row(self, method: str, members: list[int], samples: list[float]) -> dict:
        worst = [self.comm.allreduce(s, op=MPI.MAX) for s in samples]
        row = dict(method=method, num_ranks=len(members), median_us=statistics.median(worst) * 1e6,
                   samples_us=[s * 1e6 for s in worst])
        self.log(f"group of {len(members)}: {method:<38} {row['median_us']:12.2f} us")
        return row

    # ---- bookkeeping --------------------------------------------------------------------------------------------
    def error(self, what: str, error: BaseException) -> None:
        text = f"{what}: {type(error).__name__}: {error}"
        self.results["errors"].append(text)
        print(f"rank {self.rank}: {text}\n{traceback.format_exc()[-1500:]}", file=sys.stderr, flush=True)

    def environment(self) -> dict:
        import nvshmem.core as nvshmem

        smi = _run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"])
        version = nvshmem.get_version()
        header = results_header("spmd-diff", "torch", "mpi4py")
        header["versions"].update(cuda=torch.version.cuda, nccl=".".join(map(str, torch.cuda.nccl.version())),
                                  mpi=MPI.Get_library_version().splitlines()[0],
                                  nvshmem4py=version.nvshmem4py_version, libnvshmem=version.libnvshmem_version)
        return dict(
            **header, ranks=self.size,
            gpus=[line.strip() for line in smi.splitlines() if line.strip()], topology=_run(["nvidia-smi", "topo", "-m"]),
            config=dict(env={k: os.environ.get(k) for k in ("NCCL_NVLS_ENABLE", "NVSHMEM_DISABLE_NVLS",
                                                            "TORCH_SYMM_MEM_DISABLE_MULTICAST",
                                                            "NVSHMEM_SYMMETRIC_SIZE")},
                        repeats=self.args.repeats, dtype="bfloat16 (all-to-all)", latent_shape=LATENT_SHAPE,
                        chunk_bytes=self.coll.layout.chunk_bytes, nvshmem_init_s=self.nvshmem_init_s,
                        p2p_peers_of_rank0=self.transport.p2p_peers),
            nvlink_limit_gbps=NVLINK_GBPS)

    def free(self) -> None:
        self.coll.free()
        dist.destroy_process_group()
        self.transport.free()


class _StreamShim:
    """What nvshmem4py wants of a stream (``__cuda_stream__``), for torch's current stream."""

    def current(self):
        self.handle = torch.cuda.current_stream().cuda_stream
        return self

    def __cuda_stream__(self):
        return (0, self.handle)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(command: list[str]) -> str:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"unavailable: {error}"


def write_markdown(results: dict, path: Path) -> None:
    env = results["environment"]
    lines = [f"# Communication benchmark, {env['date']}", "",
             f"{env['ranks']} ranks, one per GPU: {', '.join(env['gpus'][:1])} x {len(env['gpus'])}; "
             f"torch {env['versions']['torch']}, NCCL {env['versions']['nccl']}, nvshmem4py "
             f"{env['versions']['nvshmem4py']} (libnvshmem {env['versions']['libnvshmem']}). Medians after warm-up.",
             "", "## All-to-all (bf16, equal splits)", "",
             "| bytes/rank | method | time (us) | GB/s leaving a rank | algbw GB/s | host us/call |",
             "|---|---|---|---|---|---|"]
    for r in results.get("all_to_all", []):
        lines.append(f"| {r['bytes_per_rank'] >> 10} KiB | {r['method']} | {r['seconds'] * 1e6:.1f} | "
                     f"{r['leaving_gbps']:.1f} | {r['algbw_gbps']:.1f} | {r.get('host_us_per_call', 0):.1f} |")
    lines += ["", "## Handoff of a 16x21x60x104 latent (one-way = round trip / 2)", "",
              "| dtype | method | bytes | one-way (us) | GB/s | target (us) | met |", "|---|---|---|---|---|---|---|"]
    for r in results.get("handoff", []):
        lines.append(f"| {r['dtype']} | {r['method']} | {r['bytes']} | {r['one_way_seconds'] * 1e6:.1f} | "
                     f"{r['one_way_gbps']:.1f} | {r['target_seconds'] * 1e6:.1f} | {'yes' if r['meets_target'] else 'no'} |")
    lines += ["", "## Group formation", "", "| ranks | method | median (us) |", "|---|---|---|"]
    for r in results.get("group_formation", []):
        lines.append(f"| {r['num_ranks']} | {r['method']} | {r['median_us']:.2f} |")
    if results.get("errors"):
        lines += ["", "## Errors", ""] + [f"- {e}" for e in results["errors"]]
    path.write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="three all-to-all sizes only")
    parser.add_argument("--sections", default="a2a,handoff,groups")
    args = parser.parse_args()
    bench = Bench(args)
    sections = args.sections.split(",")
    for name, run in (("a2a", bench.all_to_all), ("handoff", bench.handoff), ("groups", bench.group_formation)):
        if name in sections:
            try:
                run()
            except Exception as error:  # noqa: BLE001
                bench.error(name, error)
    results = dict(environment=bench.environment(), **bench.results)
    errors = bench.comm.gather(results["errors"], root=0)
    if bench.rank == 0:
        results["errors"] = [e for part in errors for e in part]
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = f"comm-{datetime.date.today().isoformat()}"
        (out / f"{stem}.json").write_text(json.dumps(results, indent=1) + "\n")
        write_markdown(results, out / f"{stem}.md")
        print(f"wrote {out / stem}.json and .md; {len(results['errors'])} error(s)", flush=True)
    bench.free()
    return 0


if __name__ == "__main__":
    sys.exit(main())
