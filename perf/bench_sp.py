"""Sequence-parallel DiT forward time per step on 1, 2 and 4 GPUs: ours (Ulysses, ring, torus 2 x 2) against
diffusers' own context parallelism (ContextParallelConfig, Ulysses and ring), xDiT/xfuser USP, and one GPU
running the plain diffusers transformer. Wan2.1-1.3B and 14B architectures, random weights, bf16, 480p and 720p x
81 frames (32,760 and 75,600 tokens), one forward = one step without CFG.

    python3 perf/bench_sp.py all --out DIR            # everything, one command (driver, no GPU of its own)
    python3 perf/bench_sp.py all --out DIR --tiny --gpus 2 --phases ours --cases 1.3B-480p   # CPU smoke test
    python3 perf/bench_sp.py report --out DIR         # the results file again from DIR/*.jsonl

The driver runs three phases, each its own ``torchrun`` (a baseline that crashes or hangs costs its phase, not the
run), within ``--budget-s``; every measurement is appended to ``DIR/<phase>.jsonl`` as it completes; then
``DIR/bench_sp.md`` and ``DIR/bench_sp.json`` are written (hardware, versions, config, date, medians, ratios).

- ``ours``: S=1 plain diffusers (default SDPA, and cuDNN), ours at S=1; S=2 and S=4 ours Ulysses (also head-group
  pipelined), ring, and at S=4 the torus 2 x 2 with its hidden-transfer fraction (torus with the exchange removed,
  and the exchange alone: ``hidden = 1 - (T_torus - T_no_exchange) / T_exchange``).
- ``coll``: ours again, S=2 and S=4, over the project's own group-free collectives on NVSHMEM (``GroupSeqComm``
  over ``GroupCollectives`` on ``NvshmemTransport``: the engine's GPU path), launched by ``mpirun``.
- ``diffusers``: ``enable_parallelism(ContextParallelConfig(...))`` Ulysses (native SDPA and cuDNN) and ring
  (cuDNN, torch flash: native SDPA has no log-sum-exp).
- ``xfuser``: xDiT's ``xFuserWanTransformer3DWrapper`` with USP Ulysses (its default backend, cuDNN here, and SDPA
  flash), if ``xfuser`` imports (carry its wheels: xfuser, yunchang, distvae).

Rounds: S=1 runs the four cases on the four GPUs at once, then S=4 one group, then S=2 two pairs at once; each pair or
group's ranks time together (each rep starts on a group barrier; the slowest rank counts). 14B is measured with
``--layers-14b`` of its 40 blocks (default 10) and scaled to 40 (blocks dominate; the non-block work scaled along
makes it an upper bound); 1.3B runs all 30 blocks.

One file (~870 lines, over the project's ~500) so that the benchmark stands alone: the driver launches this same
file for each phase. Sections: shapes, models and timing; the driver; the phases; the results file.
"""


from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from bench_common import commit, versions
from spmd_diff.parallel.attention import LocalAttention, SeqParallelAttention, math_attention
from spmd_diff.parallel.seq_comm import Pending, SeqComm
from spmd_diff.parallel.group_denoise import build_attention
from spmd_diff.parallel.hooks import parallelize_transformer
from spmd_diff.parallel.layout import SPLayout
from spmd_diff.parallel.torch_comm import TorchSeqComm, build_torch_comms

PHASES = ("ours", "coll", "diffusers", "xfuser")



# ---- shapes, models, timing -------------------------------------------------------------------------------------


WAN_COMMON = dict(patch_size=(1, 2, 2), attention_head_dim=128, in_channels=16, out_channels=16, text_dim=4096,
                  freq_dim=256, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
                  rope_max_seq_len=1024)
MODELS = {
    "1.3B": dict(WAN_COMMON, num_attention_heads=12, ffn_dim=8960, num_layers=30),
    "14B": dict(WAN_COMMON, num_attention_heads=40, ffn_dim=13824, num_layers=40),
}
"""Wan2.1 T2V transformer configs (the checkpoints' config.json)."""
RESOLUTIONS = {"480p": (480, 832), "720p": (720, 1280)}
NUM_FRAMES = 81
TEXT_TOKENS = 512


def use_tiny_shapes() -> None:
    """``--tiny``: a CPU smoke test of the harness (gloo): tiny shapes, same code."""
    global MODELS, RESOLUTIONS, NUM_FRAMES, TEXT_TOKENS
    tiny = dict(WAN_COMMON, attention_head_dim=16, text_dim=32, freq_dim=32)
    MODELS = {"1.3B": dict(tiny, num_attention_heads=4, ffn_dim=64, num_layers=2),
              "14B": dict(tiny, num_attention_heads=8, ffn_dim=64, num_layers=4)}
    RESOLUTIONS = {"480p": (48, 80), "720p": (64, 96)}
    NUM_FRAMES = 9
    TEXT_TOKENS = 16


CUDA = torch.cuda.is_available()


@dataclass(frozen=True)
class Case:
    """One model at one resolution; ``layers`` < the model's own means "measure that many blocks, scale up"."""

    model: str
    resolution: str
    layers: int

    @property
    def key(self) -> str:
        return f"{self.model}-{self.resolution}"

    @property
    def full_layers(self) -> int:
        return MODELS[self.model]["num_layers"]

    @property
    def scale(self) -> float:
        """Factor from measured time to a full-depth step (blocks dominate; embeddings counted alike: an upper
        bound)."""
        return self.full_layers / self.layers

    @property
    def latent_shape(self) -> tuple[int, ...]:
        height, width = RESOLUTIONS[self.resolution]
        return (1, 16, (NUM_FRAMES - 1) // 4 + 1, height // 8, width // 8)

    @property
    def num_tokens(self) -> int:
        _, _, frames, height, width = self.latent_shape
        return frames * (height // 2) * (width // 2)

    @property
    def heads(self) -> int:
        return MODELS[self.model]["num_attention_heads"]


def build_model(case: Case, device: torch.device, cls=None, seed: int = 0) -> torch.nn.Module:
    """A random-weight Wan transformer as ``from_pretrained(..., torch_dtype=torch.bfloat16)`` leaves one:
    bf16 weights except ``_keep_in_fp32_modules`` (fp32), the rotary tables as built (float64). Same seed, same
    weights on every rank."""
    if cls is None:
        from diffusers import WanTransformer3DModel as cls
    config = dict(MODELS[case.model], num_layers=case.layers)
    torch.manual_seed(seed)
    with torch.device(device):
        model = cls(**config)
    keep = set(getattr(cls, "_keep_in_fp32_modules", None) or ())
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not keep.intersection(name.split(".")):
                param.data = param.data.to(torch.bfloat16)
    return model.eval().requires_grad_(False)


def make_inputs(case: Case, device: torch.device, seed: int = 1) -> dict:
    """Forward kwargs: latents ``[1, 16, 21, H/8, W/8]``, one timestep, text ``[1, 512, 4096]`` (bf16)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    hidden = torch.randn(case.latent_shape, generator=gen).to(device, torch.bfloat16)
    text_dim = MODELS[case.model]["text_dim"]
    text = torch.randn(1, TEXT_TOKENS, text_dim, generator=gen).to(device, torch.bfloat16)
    return dict(hidden_states=hidden, timestep=torch.tensor([500.0], device=device), encoder_hidden_states=text,
                return_dict=False)


def group_max(value: float, group) -> float:
    """The largest ``value`` over the ranks of ``group`` (a process group, or None for this rank alone)."""
    if group is None:
        return value
    probe = torch.tensor([value], dtype=torch.float64, device="cuda" if CUDA else "cpu")
    dist.all_reduce(probe, op=dist.ReduceOp.MAX, group=group)
    return float(probe.item())


def group_sync(group) -> None:
    if group is not None:
        probe = torch.zeros(1, device="cuda" if CUDA else "cpu")
        dist.all_reduce(probe, group=group)
    if CUDA:
        torch.cuda.synchronize()


def time_forward(fn, group, warmup: int, reps: int) -> dict:
    """Median wall time of ``fn()`` (CUDA events; each rep starts together on the group and counts the slowest
    rank). Returns ``{"median_s", "times_s", "out", "warmup_s"}``."""
    t0 = time.perf_counter()
    out = None
    for _ in range(warmup):
        out = fn()
    group_sync(group)
    warmup_s = time.perf_counter() - t0
    times = []
    for _ in range(reps):
        group_sync(group)
        if CUDA:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            end.synchronize()
            elapsed = start.elapsed_time(end) / 1e3
        else:
            t1 = time.perf_counter()
            out = fn()
            elapsed = time.perf_counter() - t1
        times.append(group_max(elapsed, group))
    return {"median_s": statistics.median(times), "times_s": times, "out": out, "warmup_s": warmup_s}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    a, b = out.float(), ref.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def probe_attention(device: torch.device, heads: int, num_tokens: int, reps: int = 3) -> dict:
    """Check each local attention backend against the math reference (small shapes, Ulysses' strided layout),
    then time the ones that pass at ``heads x num_tokens`` (head dim 128, bf16). Returns
    ``{"best": name, "best_lse": name, "times": {...}, "errors": {...}}``."""
    gen = torch.Generator(device="cpu").manual_seed(3)
    small = torch.randn(3, 1, 300, 2, 128, generator=gen).to(device, torch.bfloat16)  # [3, B, N, h, D]
    q, k, v = (small[i].transpose(1, 2) for i in range(3))
    ref_out, ref_lse = math_attention(q, k, v)
    result: dict = {"times": {}, "errors": {}, "lse_times": {}}
    big = torch.randn(3, 1, num_tokens, heads, 128, device=device, dtype=torch.bfloat16)
    bq, bk, bv = (big[i].transpose(1, 2) for i in range(3))
    for name in ("auto", "flash", "cudnn", "efficient"):
        local = LocalAttention(name)
        for kind, call in (("plain", lambda: (local(q, k, v), None)), ("lse", lambda: local.with_lse(q, k, v))):
            try:
                out, lse = call()
                err = rel_err(out, ref_out)
                if lse is not None:
                    err = max(err, float((lse.float() - ref_lse.float()).abs().max()))
                if not math.isfinite(err) or err > 2e-2:
                    raise RuntimeError(f"wrong result: error {err:.3g}")
                fn = (lambda: local(bq, bk, bv)) if kind == "plain" else (lambda: local.with_lse(bq, bk, bv))
                timing = time_forward(fn, None, 1, reps)
                (result["times"] if kind == "plain" else result["lse_times"])[name] = timing["median_s"]
            except Exception as error:  # noqa: BLE001 - a backend missing here is a finding, not a failure
                result["errors"][f"{name}/{kind}"] = f"{type(error).__name__}: {str(error)[:160]}"
    result["best"] = min(result["times"], key=result["times"].get) if result["times"] else "auto"
    result["best_lse"] = min(result["lse_times"], key=result["lse_times"].get) if result["lse_times"] else "auto"
    return result


class NullComm(SeqComm):
    """Same shapes as ``inner`` comm's exchanges, no transfer (zeros): the torus with the exchange removed."""

    def __init__(self, like: SeqComm) -> None:
        self.rank, self.size = like.rank, like.size
        self.blocking_start = like.blocking_start  # the torus takes the same path as over ``like``

    def all_to_all(self, send, recv_shapes):
        template = next(t for t in send if t is not None)
        return [send[i] if i == self.rank else (None if shape is None else
                torch.zeros(shape, dtype=template.dtype, device=template.device))
                for i, shape in enumerate(recv_shapes)]

    def broadcast(self, tensor, root):
        return tensor


class RecordingComm(SeqComm):
    """Passes through to ``comm`` and records every exchange's shapes, so the exchanges alone can be replayed."""

    def __init__(self, comm: SeqComm) -> None:
        self.comm, self.rank, self.size = comm, comm.rank, comm.size
        self.blocking_start = comm.blocking_start
        self.calls: list = []
        self.recording = True

    def _note(self, send, recv_shapes) -> None:
        if self.recording:
            self.calls.append(([None if t is None else (tuple(t.shape), t.dtype) for t in send], list(recv_shapes)))

    def all_to_all(self, send, recv_shapes):
        self._note(send, recv_shapes)
        return self.comm.all_to_all(send, recv_shapes)

    def start_all_to_all(self, send, recv_shapes) -> Pending:
        self._note(send, recv_shapes)
        return self.comm.start_all_to_all(send, recv_shapes)

    def broadcast(self, tensor, root):
        return self.comm.broadcast(tensor, root)

    def replay(self, device: torch.device) -> None:
        """Every recorded exchange again, started in order, then all waited for (what one forward moves)."""
        pending = []
        for sends, shapes in self.calls:
            tensors = [None if s is None else torch.empty(s[0], dtype=s[1], device=device) for s in sends]
            pending.append(self.comm.start_all_to_all(tensors, shapes))
        for exchange in pending:
            exchange.wait()


# ---- driver ----------------------------------------------------------------------------------------------------


def run_all(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    shares = {"ours": 0.4, "coll": 0.2, "diffusers": 0.22, "xfuser": 0.18}
    status = {}
    for index, phase in enumerate(args.phases):
        left = args.budget_s - (time.monotonic() - start)
        later = sum(shares[p] for p in args.phases[index:])
        limit = max(30.0, left * shares[phase] / later) if left > 30 else 0
        if limit <= 0:
            status[phase] = "skipped: budget spent"
            continue
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.gpus}"]
        if phase == "coll":  # NVSHMEM bootstraps over MPI, as in the engine
            launcher = ["mpirun", "--allow-run-as-root", "--oversubscribe", "--bind-to", "none", "-n", str(args.gpus),
                        sys.executable]
        cmd = [*launcher, __file__, "phase", phase, "--out", str(out), "--layers-14b", str(args.layers_14b),
               "--reps", str(args.reps), "--budget-s", str(int(limit - 25)), "--degrees", args.degrees,
               "--refs", args.refs, "--coll-transport", args.coll_transport, "--cases", *args.cases] + \
            (["--compile"] if args.compile else []) + (["--tiny"] if args.tiny else [])
        print(f"[bench_sp] phase {phase}: up to {limit:.0f} s: {' '.join(cmd)}", flush=True)
        t0 = time.monotonic()
        process = subprocess.Popen(cmd, start_new_session=True)
        try:
            code = process.wait(timeout=limit)
            status[phase] = f"exit {code} after {time.monotonic() - t0:.0f} s"
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            status[phase] = f"killed at its {limit:.0f} s limit"
        print(f"[bench_sp] phase {phase}: {status[phase]}", flush=True)
    (out / "phases.json").write_text(json.dumps(status, indent=2))
    write_report(out, status, vars(args))
    return 0


# ---- phases (under torchrun) -------------------------------------------------------------------------------------


class Phase:
    """One torchrun phase: the world, the cases, the rounds, and an append-only results file."""

    def __init__(self, name: str, args: argparse.Namespace) -> None:
        self.name, self.args = name, args
        self.mpi_world = None
        if "RANK" not in os.environ:  # launched by mpirun (phase "coll"): MPI world first, as the engine does
            from spmd_diff.comm.world import init_world
            from spmd_diff.parallel.torch_comm import init_from_mpi

            self.mpi_world = init_world()
            self.rank, self.world = self.mpi_world.rank, self.mpi_world.size
            self.device = torch.device(self.mpi_world.device)
            init_from_mpi(self.mpi_world.comm, self.device, timeout_s=180)
        else:
            self.rank = int(os.environ["RANK"])
            self.world = int(os.environ["WORLD_SIZE"])
            if torch.cuda.is_available():
                self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", self.rank)))
                torch.cuda.set_device(self.device)
            else:  # the CPU smoke test of the harness (--tiny)
                self.device = torch.device("cpu")
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=180))
        probe = torch.ones(1, device=self.device)
        dist.all_reduce(probe)
        self.start = time.monotonic()
        self.cases = [Case(m, r, args.layers_14b if m == "14B" else MODELS[m]["num_layers"]) for m in ("1.3B", "14B")
                      for r in ("480p", "720p") if f"{m}-{r}" in args.cases]
        self.results = Path(args.out) / f"{name}.jsonl"

    def over_budget(self) -> bool:
        """The same answer on every rank (rank 0 decides)."""
        flag = torch.tensor([1.0 if time.monotonic() - self.start > self.args.budget_s else 0.0], device=self.device)
        dist.broadcast(flag, 0)
        return bool(flag.item())

    def rounds(self):
        """``(S, groups, cases per group)``: S=1 all GPUs at once, S=4 one group, S=2 pairs at once (in that order:
        the one-GPU references first, then what the targets are about, should the budget run out)."""
        costs = {"1.3B-480p": 0.6, "1.3B-720p": 2.4, "14B-480p": 3.2, "14B-720p": 12.2}
        for degree in (1, 4, 2):
            if degree > self.world or str(degree) not in self.args.degrees.split(","):
                continue
            groups = [list(range(i, i + degree)) for i in range(0, self.world - self.world % degree, degree)]
            load = [0.0] * len(groups)
            assigned: list[list] = [[] for _ in groups]
            for case in sorted(self.cases, key=lambda c: -costs[c.key] / c.scale):
                slot = min(range(len(groups)), key=lambda g: (len(assigned[g]), load[g]))
                assigned[slot].append(case)
                load[slot] += costs[case.key] / case.scale
            yield degree, groups, assigned

    def record(self, **row) -> None:
        row.update(phase=self.name, time=datetime.datetime.now(datetime.timezone.utc).isoformat())
        with open(self.results, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"[{self.name} r{self.rank}] {row.get('case')} S={row.get('degree')} {row.get('method')}: "
              f"{row.get('median_s', row.get('error'))}", flush=True)

    def measure(self, method: str, case, degree: int, group, fn, leader: bool, **extra) -> dict | None:
        """Time ``fn`` (a forward), check it against the one-GPU reference, record it (group leader)."""
        try:
            timing = time_forward(fn, group, warmup=1, reps=self.args.reps)
        except Exception as error:  # noqa: BLE001 - record and carry on; a collective failure ends the phase
            if leader:
                self.record(case=case.key, degree=degree, method=method, error=f"{type(error).__name__}: {error}"[:400])
            return None
        ref_path = Path(self.args.refs) / f"{case.key}-L{case.layers}.pt"
        err = None
        if ref_path.exists():
            err = rel_err(timing["out"], torch.load(ref_path, map_location=self.device))
        row = dict(case=case.key, degree=degree, method=method, median_s=timing["median_s"] * case.scale,
                   measured_s=timing["median_s"], times_s=timing["times_s"], warmup_s=timing["warmup_s"],
                   layers=case.layers, scale=case.scale, rel_err_vs_1gpu=err, **extra)
        if leader:
            self.record(**row)
        self.last_out = timing["out"]
        return row


def run_phase(phase: Phase) -> None:
    {"ours": run_ours, "coll": run_coll, "diffusers": run_diffusers, "xfuser": run_xfuser}[phase.name](phase)


def _versions() -> dict:
    found = versions("torch", "diffusers", "triton", "xfuser", "yunchang", "nvidia-nccl-cu13", "nvidia-cudnn-cu13")
    if torch.cuda.is_available():
        found["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        found["cudnn"] = torch.backends.cudnn.version()
    return found


def _free(*objects) -> None:
    del objects
    gc.collect()
    torch.cuda.empty_cache()


def _my_group(groups: list[list[int]], rank: int) -> int | None:
    return next((i for i, g in enumerate(groups) if rank in g), None)


def _forward(model, inputs):
    with torch.no_grad():
        return model(**inputs)[0]


# ---- ours ------------------------------------------------------------------------------------------------------


def run_ours(ph: Phase) -> None:
    Path(ph.args.refs).mkdir(parents=True, exist_ok=True)
    choice = [None]
    if ph.rank == 0:
        probe = probe_attention(ph.device, heads=3, num_tokens=32760) if ph.device.type == "cuda" else \
            {"best": "auto", "best_lse": "auto", "note": "CPU smoke test: no probe"}
        choice = [probe]
        cuda = ph.device.type == "cuda"
        ph.record(case="env", degree=0, method="environment", host=socket.gethostname(),
                  gpu=torch.cuda.get_device_name(ph.device) if cuda else "cpu",
                  gpus=torch.cuda.device_count() if cuda else ph.world, versions=_versions(), attention_probe=probe,
                  args=vars(ph.args), commit=commit())
    dist.broadcast_object_list(choice, 0)
    local = LocalAttention(choice[0]["best"], lse_backend=choice[0]["best_lse"])
    for degree, groups, assigned in ph.rounds():
        mine = _my_group(groups, ph.rank)
        if degree == 1:
            comm = TorchSeqComm([ph.rank], None)
        else:  # collective over the world
            comm = build_torch_comms(groups, torus_shapes=[(2, 2)] if degree == 4 else [])
        pg = comm.group if degree > 1 else None
        for case in assigned[mine] if mine is not None else []:
            leader = ph.rank == groups[mine][0]
            model = build_model(case, ph.device)
            inputs = make_inputs(case, ph.device)
            forward = lambda: _forward(model, inputs)  # noqa: E731
            if degree == 1:
                row = ph.measure("diffusers", case, 1, None, forward, leader, attention="native (SDPA default)")
                if row is not None:
                    torch.save(ph.last_out.cpu(), Path(ph.args.refs) / f"{case.key}-L{case.layers}.pt")
                ph.last_out = None
                try:
                    model.set_attention_backend("_native_cudnn")
                    ph.measure("diffusers+cudnn", case, 1, None, forward, leader, attention="_native_cudnn")
                except Exception as error:  # noqa: BLE001 - a local finding (no collectives at S=1)
                    ph.record(case=case.key, degree=1, method="diffusers+cudnn",
                              error=f"{type(error).__name__}: {error}")
                finally:
                    model.set_attention_backend("native")
                variants = [("ours", SPLayout("ulysses", 1, 1), 1)]
            else:
                variants = _sp_variants("ours", case, degree, ph.args.compile)
            _measure_variants(ph, variants, case, degree, pg, model, forward, comm, local, leader,
                              attention=f"{local.backend}/{local.lse_backend}")
            if degree == 4:
                torus_diagnostics(ph, case, comm, pg, model, forward, local, leader)
            _free(model, inputs)
        dist.barrier()
        if ph.over_budget():
            break


def _sp_variants(prefix: str, case, degree: int, compile_variant: bool) -> list:
    """``(method, layout, head_chunks)`` of our layouts at ``degree`` > 1: Ulysses (also compiled, also
    head-pipelined), ring, and at 4 the torus 2 x 2."""
    ulysses = SPLayout("ulysses", 1, degree)
    variants = [(f"{prefix}-ulysses", ulysses, 1)]
    if compile_variant:
        variants.append((f"{prefix}-ulysses+compile", ulysses, 1))
    variants += [(f"{prefix}-ulysses-pipe", ulysses, max(1, min(3, case.heads // degree))),
                 (f"{prefix}-ring", SPLayout("ring", degree, 1), 1)]
    if degree == 4:
        variants.append((f"{prefix}-torus", SPLayout("torus", 2, 2), 1))
    return variants


def _measure_variants(ph: Phase, variants: list, case, degree: int, pg, model, forward, seq_comm, local,
                      leader: bool, **extra) -> None:
    """Parallelize ``model`` over ``seq_comm`` in each layout of ``variants`` (a ``+compile`` method compiles the
    blocks), time ``forward`` and record it, then restore the model."""
    for method, layout, chunks in variants:
        compiled = method.endswith("+compile")
        handle = parallelize_transformer(model, build_attention(seq_comm, layout, local, head_chunks=chunks),
                                         compile_blocks=compiled)
        ph.measure(method, case, degree, pg, forward, leader, layout=layout.describe(), head_chunks=chunks,
                   compiled=compiled, **extra)
        handle.remove()


def torus_diagnostics(ph: Phase, case, comm, pg, model, forward, local, leader: bool) -> None:
    """The 2 x 2 torus with its inter-row exchange removed (same compute), and that exchange alone."""
    layout = SPLayout("torus", 2, 2)
    inner, outer = comm.split(2, 2)
    recorder = RecordingComm(outer)
    handle = parallelize_transformer(model, SeqParallelAttention(layout, comm, inner, recorder, local))
    forward()
    handle.remove()
    recorder.recording = False
    handle = parallelize_transformer(model, SeqParallelAttention(layout, comm, inner, NullComm(outer), local))
    ph.measure("ours-torus-no-exchange", case, 4, pg, forward, leader, layout=layout.describe())
    handle.remove()
    try:
        timing = time_forward(lambda: recorder.replay(ph.device), pg, warmup=1, reps=ph.args.reps)
        if leader:
            ph.record(case=case.key, degree=4, method="torus-exchange-only", median_s=timing["median_s"] * case.scale,
                      measured_s=timing["median_s"], times_s=timing["times_s"], layers=case.layers,
                      num_exchanges=len(recorder.calls))
    except Exception as error:  # noqa: BLE001
        if leader:
            ph.record(case=case.key, degree=4, method="torus-exchange-only", error=f"{type(error).__name__}: {error}")


# ---- ours over the project's collectives (NVSHMEM) ----------------------------------------------------------------


def run_coll(ph: Phase) -> None:
    """Our layouts over ``GroupSeqComm(GroupCollectives(NvshmemTransport))``, the engine's GPU path (mpirun)."""
    from spmd_diff.comm.collectives import GroupCollectives
    from spmd_diff.comm.select import make_transport
    from spmd_diff.parallel.seq_comm import GroupSeqComm

    heap = 1 << 30 if ph.device.type == "cuda" else 64 << 20
    transport = make_transport(ph.mpi_world, heap, ph.args.coll_transport)
    coll = GroupCollectives(transport, 0, heap, max_ranks=4, timeout_s=120)
    choice = [None]
    if ph.rank == 0:
        env = next((json.loads(line) for line in (Path(ph.args.out) / "ours.jsonl").read_text().splitlines()
                    if '"environment"' in line), {}) if (Path(ph.args.out) / "ours.jsonl").exists() else {}
        choice = [env.get("attention_probe") or {"best": "auto", "best_lse": "auto"}]
    dist.broadcast_object_list(choice, 0)
    local = LocalAttention(choice[0]["best"], lse_backend=choice[0]["best_lse"])
    try:
        for degree, groups, assigned in ph.rounds():
            if degree == 1:
                continue
            mine = _my_group(groups, ph.rank)
            pgs = [dist.new_group(g) for g in groups]
            comm = GroupSeqComm(coll.group(groups[mine]), coll.group, device=ph.device) if mine is not None else None
            for case in assigned[mine] if mine is not None else []:
                leader = ph.rank == groups[mine][0]
                model = build_model(case, ph.device)
                inputs = make_inputs(case, ph.device)
                _measure_variants(ph, _sp_variants("coll", case, degree, ph.args.compile), case, degree, pgs[mine],
                                  model, lambda: _forward(model, inputs), comm, local, leader,
                                  comm="GroupCollectives/NVSHMEM")
                _free(model, inputs)
            coll.synchronize()
            dist.barrier()
            if ph.over_budget():
                break
    finally:
        coll.free()
        transport.free()


# ---- diffusers' context parallelism ------------------------------------------------------------------------------


def run_diffusers(ph: Phase) -> None:
    from diffusers import ContextParallelConfig
    from torch.distributed.device_mesh import init_device_mesh

    for degree, groups, assigned in ph.rounds():
        if degree == 1:
            continue
        mine = _my_group(groups, ph.rank)
        pgs = [dist.new_group(g) for g in groups]
        configs = {}
        for kind, shape in (("ulysses", (1, degree)), ("ring", (degree, 1))):  # collective: meshes, flattening
            mesh = init_device_mesh(ph.device.type, (len(groups), *shape), mesh_dim_names=("dp", "ring", "ulysses"))
            config = ContextParallelConfig(ring_degree=shape[0], ulysses_degree=shape[1], mesh=mesh)
            config.setup(ph.rank, ph.world, ph.device, mesh)
            configs[kind] = config
        # the native (SDPA) backend has no log-sum-exp, so diffusers' ring needs cuDNN or torch's flash kernel
        variants = [("diffusers-ulysses", "ulysses", None), ("diffusers-ulysses+cudnn", "ulysses", "_native_cudnn"),
                    ("diffusers-ring+cudnn", "ring", "_native_cudnn"),
                    ("diffusers-ring+flash", "ring", "_native_flash")]
        if ph.args.compile:
            variants.insert(2, ("diffusers-ulysses+cudnn+compile", "ulysses", "_native_cudnn"))
        for case in assigned[mine] if mine is not None else []:
            leader = ph.rank == groups[mine][0]
            inputs = make_inputs(case, ph.device)
            for method, kind, backend in variants:
                try:
                    model = build_model(case, ph.device)
                    if backend:
                        model.set_attention_backend(backend)
                    model.enable_parallelism(config=configs[kind])
                    if method.endswith("+compile"):
                        model.compile_repeated_blocks(dynamic=False)  # diffusers' regional compilation
                except Exception as error:  # noqa: BLE001 - same on every rank: record and go on
                    if leader:
                        ph.record(case=case.key, degree=degree, method=method, error=f"{type(error).__name__}: {error}")
                    continue
                ph.measure(method, case, degree, pgs[mine], lambda: _forward(model, inputs), leader,
                           attention=backend or "native")
                _free(model)
            _free(inputs)
        dist.barrier()
        if ph.over_budget():
            break


# ---- xDiT / xfuser USP ---------------------------------------------------------------------------------------------


def run_xfuser(ph: Phase) -> None:
    try:
        from xfuser.core.distributed import init_distributed_environment, initialize_model_parallel
        from xfuser.core.distributed.parallel_state import destroy_model_parallel  # the package does not re-export it
        from xfuser.core.distributed.runtime_state import get_runtime_state
        from xfuser.model_executor.models.transformers.transformer_wan import xFuserWanTransformer3DWrapper
    except Exception as error:  # noqa: BLE001 - not installed or not importable here: a finding
        if ph.rank == 0:
            ph.record(case="all", degree=0, method="xfuser", error=f"import failed: {type(error).__name__}: {error}")
        return
    cuda = ph.device.type == "cuda"
    comm_backend = "nccl" if cuda else "gloo"  # named: xDiT refuses to pick one on a machine without a GPU
    # xDiT's default attention on this machine (no flash_attn 3/4: cuDNN) and torch's flash; SDPA in the CPU smoke test
    variants = (("xfuser-usp-ulysses", "CUDNN"), ("xfuser-usp-ulysses+sdpa_flash", "SDPA_FLASH")) if cuda else \
        (("xfuser-usp-ulysses", "SDPA"),)
    init_distributed_environment(world_size=ph.world, rank=ph.rank, backend=comm_backend)
    for degree, groups, assigned in ph.rounds():
        if degree == 1:
            continue
        mine = _my_group(groups, ph.rank)
        pgs = [dist.new_group(g) for g in groups]
        initialize_model_parallel(data_parallel_degree=ph.world // degree, sequence_parallel_degree=degree,
                                  ulysses_degree=degree, ring_degree=1, backend=comm_backend)
        for case in assigned[mine] if mine is not None else []:
            leader = ph.rank == groups[mine][0]
            inputs = make_inputs(case, ph.device)
            try:
                model = build_model(case, ph.device, cls=xFuserWanTransformer3DWrapper)
                _xfuser_runtime_state(model, ph.world // degree, degree)
            except Exception as error:  # noqa: BLE001
                if leader:
                    ph.record(case=case.key, degree=degree, method="xfuser", error=f"{type(error).__name__}: {error}")
                continue
            for method, backend in variants:
                try:
                    get_runtime_state().set_attention_backend(backend)
                except Exception as error:  # noqa: BLE001
                    if leader:
                        ph.record(case=case.key, degree=degree, method=method, error=f"{type(error).__name__}: {error}")
                    continue
                ph.measure(method, case, degree, pgs[mine], lambda: _forward(model, inputs), leader, attention=backend)
            _free(model, inputs)
        dist.barrier()
        destroy_model_parallel()
        if ph.over_budget():
            break


def _xfuser_runtime_state(model, dp_degree: int, ulysses_degree: int) -> None:
    """xDiT's global runtime state for ``model`` (an ``xFuserWanTransformer3DWrapper``) run outside its pipelines.
    Its forward needs a ``DiTRuntimeState`` (``increment_step_counter``); ``initialize_runtime_state()`` without a
    pipeline makes an ``ExternalRuntimeState``, which has none and whose default config (no parallelism) xDiT's own
    checks reject in a world of several ranks. So: this round's degrees as xDiT's engine config, and a stand-in
    pipeline holding only the transformer (xDiT reads its config: heads against the Ulysses degree, patch size).
    Local: no collective; the model parallel groups must already exist."""
    from types import SimpleNamespace

    from xfuser.config import xFuserArgs
    from xfuser.core.distributed.runtime_state import initialize_runtime_state

    config, _ = xFuserArgs(data_parallel_degree=dp_degree, ulysses_degree=ulysses_degree, ring_degree=1).create_config()
    initialize_runtime_state(pipeline=SimpleNamespace(transformer=model), engine_config=config)


# ---- the results file (pure Python: runs anywhere on a copied results folder) ----------------------------------


CASES = ("1.3B-480p", "1.3B-720p", "14B-480p", "14B-720p")
OURS = ("ours-ulysses", "ours-ulysses-pipe", "ours-ring", "ours-torus",
        "coll-ulysses", "coll-ulysses-pipe", "coll-ring", "coll-torus")
PEERS_PREFIX = ("diffusers-", "xfuser-")


def load_rows(out: Path) -> list[dict]:
    rows = []
    for path in sorted(out.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                rows.append(json.loads(line))
    return rows


def summarize(rows: list[dict]) -> dict:
    """``{case: {method: {degree: row}}}`` plus, per case, the figures the targets are stated in (ratio to the
    best peer, scaling efficiency, torus against Ulysses, hidden exchange)."""
    table: dict = {}
    for row in rows:
        if row.get("case") in CASES and "median_s" in row:
            table.setdefault(row["case"], {}).setdefault(row["method"], {})[row["degree"]] = row
    derived = {}
    for case, methods in table.items():
        t = lambda method, degree: methods.get(method, {}).get(degree, {}).get("median_s")  # noqa: E731
        info: dict = {}
        for degree in (2, 4):
            ours = {m: t(m, degree) for m in OURS if t(m, degree)}
            peers = {m: t(m, degree) for m in methods if m.startswith(PEERS_PREFIX) and t(m, degree)}
            if ours:
                best = min(ours, key=ours.get)
                info[f"ours_best_{degree}"] = (best, ours[best])
            if peers:
                best_peer = min(peers, key=peers.get)
                info[f"peer_best_{degree}"] = (best_peer, peers[best_peer])
            if ours and peers:
                info[f"ratio_vs_peer_{degree}"] = ours[best] / peers[best_peer]
        plain = t("diffusers", 1)
        ours1 = t("ours", 1)
        if "ours_best_4" in info:
            if plain:
                info["efficiency_4_vs_plain"] = plain / (4 * info["ours_best_4"][1])
            if ours1:
                info["efficiency_4_vs_ours1"] = ours1 / (4 * info["ours_best_4"][1])
        uly = min(filter(None, (t("ours-ulysses", 4), t("ours-ulysses-pipe", 4))), default=None)
        torus, bare, exchange = t("ours-torus", 4), t("ours-torus-no-exchange", 4), t("torus-exchange-only", 4)
        if torus and uly:
            info["torus_over_ulysses"] = torus / uly
        if torus and bare and exchange:
            info["torus_hidden_fraction"] = max(0.0, min(1.0, 1.0 - (torus - bare) / exchange))
            info["torus_exposed_s"] = max(0.0, torus - bare)
            info["torus_exchange_s"] = exchange
        derived[case] = info
    return {"table": table, "derived": derived}


def _fmt(seconds) -> str:
    return "" if seconds is None else f"{seconds * 1e3:,.0f}"


def write_report(out: Path, status: dict, args: dict) -> None:
    rows = load_rows(out)
    summary = summarize(rows)
    env = next((r for r in rows if r.get("method") == "environment"), {})
    errors = [r for r in rows if "error" in r]
    lines = ["# Sequence-parallel Wan2.1 DiT: forward time per step", "",
             f"Written {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC} by perf/bench_sp.py.", "",
             f"- hardware: {env.get('gpus')} x {env.get('gpu')} ({env.get('host')})",
             f"- versions: {json.dumps(env.get('versions'))}",
             f"- commit: {env.get('commit')}; args: {json.dumps(args.get('args', args), default=str)}",
             f"- phases: {json.dumps(status)}",
             "- random weights, bf16 (fp32 where diffusers keeps it), batch 1, one forward = one step without CFG, "
             "81 frames; medians over timed reps after one warm-up; each rep starts on a group barrier and counts "
             "the slowest rank; 14B measured with fewer blocks and scaled to 40 (see `layers`/`scale` in the JSON).",
             f"- our local attention kernels (probed): "
             f"{json.dumps({k: v for k, v in (env.get('attention_probe') or {}).items() if k != 'errors'})}", ""]
    for case in CASES:
        methods = summary["table"].get(case)
        if not methods:
            continue
        lines += [f"## {case}", "", "| method | 1 GPU ms | 2 GPUs ms | 4 GPUs ms | rel. err vs 1-GPU diffusers |",
                  "|---|---:|---:|---:|---:|"]
        for method, by_degree in sorted(methods.items()):
            errs = [r.get("rel_err_vs_1gpu") for r in by_degree.values() if r.get("rel_err_vs_1gpu") is not None]
            cells = " | ".join(_fmt(by_degree.get(d, {}).get("median_s")) for d in (1, 2, 4))
            lines.append(f"| {method} | {cells} | {f'{max(errs):.2e}' if errs else ''} |")
        info = summary["derived"].get(case, {})
        lines.append("")
        for degree in (2, 4):
            if f"ratio_vs_peer_{degree}" in info:
                ours, peer = info[f"ours_best_{degree}"], info[f"peer_best_{degree}"]
                lines.append(f"- {degree} GPUs: ours best {ours[0]} {_fmt(ours[1])} ms vs best peer {peer[0]} "
                             f"{_fmt(peer[1])} ms: ratio **{info[f'ratio_vs_peer_{degree}']:.3f}** (target <= 0.9)")
        if "efficiency_4_vs_plain" in info:
            lines.append(f"- scaling efficiency at 4 GPUs: {info['efficiency_4_vs_plain']:.1%} vs 1-GPU plain "
                         f"diffusers, {info.get('efficiency_4_vs_ours1', float('nan')):.1%} vs ours on 1 GPU "
                         "(target >= 85% for 1.3B-720p)")
        if "torus_over_ulysses" in info:
            lines.append(f"- torus 2x2 / Ulysses (4 GPUs, one machine): {info['torus_over_ulysses']:.3f} "
                         "(target <= 1.10)")
        if "torus_hidden_fraction" in info:
            lines.append(f"- torus inter-row exchange hidden behind compute: {info['torus_hidden_fraction']:.1%} "
                         f"(exchange alone {_fmt(info['torus_exchange_s'])} ms per step, exposed "
                         f"{_fmt(info['torus_exposed_s'])} ms)")
        lines.append("")
    if errors:
        lines += ["## What failed", ""]
        lines += [f"- {r.get('phase')} {r.get('case')} S={r.get('degree')} {r.get('method')}: {r['error']}"
                  for r in errors]
        lines.append("")
    (out / "bench_sp.md").write_text("\n".join(lines))
    (out / "bench_sp.json").write_text(json.dumps({"status": status, "rows": rows, "derived": summary["derived"]},
                                                  indent=1, default=str))
    print("\n".join(lines), flush=True)


def phase_main(args: argparse.Namespace) -> int:
    phase = Phase(args.phase, args)
    try:
        run_phase(phase)
    except BaseException as error:  # recorded, then re-raised: the driver goes on with the next phase
        phase.record(case="all", degree=-1, method=f"phase {args.phase} (rank {phase.rank})",
                     error=f"{type(error).__name__}: {str(error)[:600]}")
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("all", "phase", "report"))
    parser.add_argument("phase", nargs="?", choices=PHASES)
    parser.add_argument("--out", required=True)
    parser.add_argument("--gpus", type=int, default=4)
    parser.add_argument("--phases", nargs="+", default=list(PHASES), choices=PHASES)
    parser.add_argument("--budget-s", type=float, default=480.0, help="the whole run (all) or one phase (phase)")
    parser.add_argument("--layers-14b", type=int, default=10, help="14B blocks measured (of 40), scaled to 40")
    parser.add_argument("--reps", type=int, default=3, help="timed forwards per measurement (after one warm-up)")
    parser.add_argument("--degrees", default="1,4,2", help="sequence-parallel degrees to run (comma-separated)")
    parser.add_argument("--cases", nargs="+", default=["1.3B-480p", "1.3B-720p", "14B-480p", "14B-720p"])
    parser.add_argument("--compile", action="store_true",
                        help="add torch.compile variants at S=4 (ours: compiled blocks; diffusers: "
                             "compile_repeated_blocks); the first forward of each compiles")
    parser.add_argument("--refs", default="/tmp/sp_bench_refs",
                        help="where the one-GPU outputs are kept (phase ours writes them; every phase compares)")
    parser.add_argument("--coll-transport", default="nvshmem", help="transport of phase coll (make_transport's name)")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes: a CPU smoke test of the harness (gloo)")
    args = parser.parse_args(argv)
    if args.tiny:
        use_tiny_shapes()
    if args.command == "all":
        return run_all(args)
    if args.command == "phase":
        return phase_main(args)
    write_report(Path(args.out), {}, vars(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
