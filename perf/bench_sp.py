"""Sequence-parallel DiT forward time per step on 1, 2 and 4 GPUs: ours (Ulysses, ring, torus 2 x 2) against
diffusers' own context parallelism (ContextParallelConfig, Ulysses and ring), xDiT/xfuser USP, and one GPU
running the plain diffusers transformer. Wan2.1-1.3B and 14B architectures, random weights, bf16, 480p and 720p x
81 frames (32,760 and 75,600 tokens), one forward = one step without CFG.

    python3 perf/bench_sp.py all --out DIR            # everything, one command (driver, no GPU of its own)

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
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "perf"))

PHASES = ("ours", "coll", "diffusers", "xfuser")
REF_DIR = Path(os.environ.get("SP_BENCH_REFS", "/tmp/sp_bench_refs"))


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
               "--cases", *args.cases] + (["--compile"] if args.compile else [])
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
    from sp_bench_report import write_report

    write_report(out, status, vars(args))
    return 0


# ---- phases (under torchrun) -------------------------------------------------------------------------------------


class Phase:
    """One torchrun phase: the world, the cases, the rounds, and an append-only results file."""

    def __init__(self, name: str, args: argparse.Namespace) -> None:
        import torch
        import torch.distributed as dist

        from sp_bench_lib import MODELS, Case

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
            else:  # the CPU smoke test of the harness (SP_BENCH_TINY=1)
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
        import torch
        import torch.distributed as dist

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
        import torch

        from sp_bench_lib import rel_err, time_forward

        try:
            timing = time_forward(fn, group, warmup=1, reps=self.args.reps)
        except Exception as error:  # noqa: BLE001 - record and carry on; a collective failure ends the phase
            if leader:
                self.record(case=case.key, degree=degree, method=method, error=f"{type(error).__name__}: {error}"[:400])
            return None
        ref_path = REF_DIR / f"{case.key}-L{case.layers}.pt"
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


def phase_main(args: argparse.Namespace) -> int:
    from sp_bench_phases import run_phase

    phase = Phase(args.phase, args)
    try:
        run_phase(phase)
    except BaseException as error:  # recorded, then re-raised: the driver goes on with the next phase
        phase.record(case="all", degree=-1, method=f"phase {args.phase} (rank {phase.rank})",
                     error=f"{type(error).__name__}: {str(error)[:600]}")
        raise
    finally:
        import torch.distributed as dist

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
    args = parser.parse_args(argv)
    if args.command == "all":
        return run_all(args)
    if args.command == "phase":
        return phase_main(args)
    from sp_bench_report import write_report

    write_report(Path(args.out), {}, vars(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
