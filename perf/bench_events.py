"""Cost of the event log against the work it describes (the target: under 1% of the work's time).

1. Per-call cost: ``EventLog.emit`` for the record kinds a job writes (stage, handoff, wait) and the ``span``
   context manager, writing to a real file; medians over repeats after warm-up.
2. What a real job emits: from a finished demo run's ``OUT/events.jsonl`` (run one with ``--out``, or let
   this script run the 4-rank demo under mpirun): records per item, per rank, and the per-item stage time.
3. Overhead = records per item x per-call cost / per-item stage time (all ranks together, and on the rank
   with the most records per unit of work). Also: merge cost per record (once, at job end).

Writes ``perf/results/events_overhead-<date>.json``.

    python perf/bench_events.py                    # runs the demo job (mpirun -n 4) first
    python perf/bench_events.py --out /tmp/demo1   # uses a finished run's events
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import spmd_diff
from bench_common import REPO, commit, cpu_name
from spmd_diff.observe.events import EventLog, merge_event_logs, read_events


def per_call_us(directory: Path, n: int = 20000, repeats: int = 7) -> dict[str, float]:
    """Median µs per call of each kind of record, over ``repeats`` batches of ``n`` after one warm-up batch."""
    log = EventLog(directory, 0)
    item = "a-typical-item-id-000123"
    kinds = {
        "stage": lambda i: log.emit("stage", stage="denoise", item=item, t0=1.8e9, t1=1.8e9 + 2.5, ok=True),
        "handoff": lambda i: log.emit("handoff", channel="enc0->dit12", src=0, dst=12, item=item, bytes=4194304,
                                      t0=1.8e9, t1=1.8e9 + 0.01),
        "wait": lambda i: log.emit("wait", channel="dit12->dec3", what="data", t0=1.8e9, t1=1.8e9 + 0.3),
    }

    def span(i: int) -> None:
        with log.span("decode", item, role="decoder"):
            pass

    kinds["span"] = span
    out = {}
    for name, fn in kinds.items():
        samples = []
        for rep in range(repeats + 1):
            t = time.perf_counter()
            for i in range(n):
                fn(i)
            dt_us = (time.perf_counter() - t) / n * 1e6
            if rep:  # the first batch is warm-up
                samples.append(dt_us)
        out[name] = statistics.median(samples)
    log.close()
    return out


def merge_us_per_record(directory: Path) -> float:
    t = time.perf_counter()
    path = merge_event_logs(directory)
    elapsed = time.perf_counter() - t
    return elapsed / max(1, len(read_events(path))) * 1e6


def run_demo(out: Path) -> None:
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        raise SystemExit("mpirun not found: pass --out of a finished run")
    cmd = [mpirun, "--allow-run-as-root", "--oversubscribe", "-n", "4", sys.executable, "-m", "spmd_diff", "run",
           str(REPO / "jobs/demo.toml"), "--prompts", str(REPO / "jobs/demo_prompts.jsonl"), "--out", str(out)]
    subprocess.run(cmd, check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})


def job_profile(events_path: Path) -> dict:
    """Records per item and stage seconds per item of the latest run in a merged event log."""
    recs = read_events(events_path)
    latest = max((r.get("run", 0) for r in recs), default=0)
    recs = [r for r in recs if r.get("run", 0) == latest]
    items = {r["item"] for r in recs if r["ev"] == "stage" and r.get("stage") in ("write",)} or \
        {r["item"] for r in recs if r["ev"] == "stage"}
    num_items = max(1, len(items))
    per_rank_records: Counter = Counter(r["rank"] for r in recs)
    per_rank_busy: dict[int, float] = defaultdict(float)
    for r in recs:
        if r["ev"] == "stage":
            per_rank_busy[r["rank"]] += r["t1"] - r["t0"]
    kinds = Counter(r["ev"] for r in recs)
    in_loop = sum(v for k, v in kinds.items() if k in ("stage", "handoff", "wait", "failure"))
    return {
        "events_file": str(events_path),
        "num_items": num_items,
        "num_records": len(recs),
        "records_by_kind": dict(kinds),
        "records_per_item_in_loop": in_loop / num_items,
        "records_per_item_all": len(recs) / num_items,
        "stage_seconds_per_item_all_ranks": sum(per_rank_busy.values()) / num_items,
        "per_rank": {str(k): {"records": per_rank_records[k], "stage_seconds": per_rank_busy.get(k, 0.0)}
                     for k in sorted(per_rank_records)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="a finished run's OUT/ (default: run the demo job now)")
    parser.add_argument("--results", type=Path, default=REPO / "perf" / "results")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        out = args.out
        if out is None:
            out = tmp_path / "demo"
            run_demo(out)
        profile = job_profile(merge_event_logs(out) if (out / "events").is_dir() else out / "events.jsonl")
        costs = per_call_us(tmp_path / "bench")
        merge_cost = merge_us_per_record(tmp_path / "bench")

    mean_us = statistics.mean([costs["stage"], costs["handoff"], costs["wait"]])
    emit_s_per_item = profile["records_per_item_all"] * mean_us * 1e-6
    work_s = profile["stage_seconds_per_item_all_ranks"]
    worst = None
    for rank, r in profile["per_rank"].items():
        if r["stage_seconds"] > 0:
            frac = r["records"] * mean_us * 1e-6 / r["stage_seconds"]
            if worst is None or frac > worst[1]:
                worst = (rank, frac)
    result = {
        "benchmark": "events_overhead",
        "date": dt.date.today().isoformat(),
        "commit": commit(),
        "hardware": {"cpu": cpu_name(), "cores": os.cpu_count(), "load_avg_1m": os.getloadavg()[0],
                     "machine": platform.machine()},
        "versions": {"python": platform.python_version(), "spmd_diff": spmd_diff.__version__},
        "config": {"per_call": "median of 7 batches x 20000 calls after 1 warm-up batch, file on local disk",
                   "job": "jobs/demo.toml (demo model, 64x64x9 frames, 4 steps), mpirun -n 4, CPU"},
        "per_call_us": costs,
        "merge_us_per_record": merge_cost,
        "job": profile,
        "overhead": {
            "emit_seconds_per_item": emit_s_per_item,
            "stage_seconds_per_item": work_s,
            "fraction_all_ranks": emit_s_per_item / work_s if work_s else None,
            "fraction_worst_rank": None if worst is None else {"rank": worst[0], "fraction": worst[1]},
            "note": "all records of the run (incl. job/rank start/end) x mean per-call cost / stage time",
        },
    }
    args.results.mkdir(parents=True, exist_ok=True)
    path = args.results / f"events_overhead-{result['date']}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"per_call_us": costs, "overhead": result["overhead"]}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
