"""Helpers of perf/bench_throughput.py: the engine's steady state from its events, video comparisons, the report.

Steady state of a rank = the intervals between its consecutive item completions (``write`` stage ends), the first
item counted from the end of the rank's warm-up (or of its first stage start); the first ``warmup`` intervals and
the last ``DRAIN`` are dropped (at the end the finisher empties with no denoise beside it: one decode running and
one queued complete faster than in steady state); throughput = sum over ranks of 1 / median interval.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

GPU_STAGES = ("encode", "denoise", "decode")
DRAIN = 2
"""Trailing intervals of a rank that are not steady state: the Finisher holds one item decoding and one queued."""


def steady(intervals: list[float], warmup: int, drain: int = DRAIN) -> list[float]:
    """The steady-state intervals: after ``warmup``, before the last ``drain`` (all after warm-up if too few)."""
    kept = intervals[warmup:len(intervals) - drain]
    return kept if kept else intervals[warmup:]


def recompute(result: dict) -> None:
    """Engine throughput from the stored per-rank intervals with the current :func:`steady` rule (in place)."""
    warmup = result["config"]["warmup"]
    for name, v in result["variants"].items():
        if name == "baseline" or "per_rank" not in v:
            continue
        vps = 0.0
        for r in v["per_rank"].values():
            kept = steady(r["intervals_s"], warmup)
            r["median_s"] = statistics.median(kept) if kept else None
            r["median_s_with_drain"] = statistics.median(r["intervals_s"][warmup:]) if r["intervals_s"][warmup:] \
                else None
            vps += 1.0 / r["median_s"] if r["median_s"] else 0.0
        v["videos_per_s"] = vps
        v["s_per_video"] = v["num_ranks"] / vps if vps else None
        v["gpu_s_per_video"] = v["s_per_video"]
        v["steady_rule"] = f"median of intervals after the first {warmup}, before the last {DRAIN}"
    with_drain = {name: v["num_ranks"] / sum(1.0 / r["median_s_with_drain"] for r in v["per_rank"].values())
                  for name, v in result["variants"].items() if "per_rank" in v}
    note = (f"engine steady state recomputed from the stored completion intervals: median after the first "
            f"{warmup} and before the last {DRAIN} (the finisher draining); with the drain kept: " +
            ", ".join(f"{name} {s:.3f} s/video" for name, s in with_drain.items()))
    result["notes"] = [n for n in result.get("notes", []) if not n.startswith("engine steady state")] + [note]


def read_events(out_dir: Path) -> list[dict]:
    path = Path(out_dir) / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def engine_steady_state(events: list[dict], warmup: int) -> dict[str, Any]:
    """Per-rank completion intervals, stage medians (wall and GPU) over the steady-state items, peak memory."""
    stages = [e for e in events if e.get("ev") == "stage" and e.get("ok")]
    by_rank: dict[int, list[dict]] = defaultdict(list)
    for e in stages:
        by_rank[e["rank"]].append(e)
    warm_end = {e["rank"]: e["t1"] for e in events if e.get("ev") == "warmup"}
    peaks = {e["rank"]: e.get("peak_gpu_bytes") for e in events if e.get("ev") == "rank_end"}
    per_rank, steady_items, intervals_all = {}, set(), []
    for rank, records in sorted(by_rank.items()):
        writes = sorted((e for e in records if e["stage"] == "write"), key=lambda e: e["t1"])
        if not writes:
            continue
        start = warm_end.get(rank, min(e["t0"] for e in records))
        done = [start] + [e["t1"] for e in writes]
        intervals = [b - a for a, b in zip(done, done[1:])]
        kept = steady(intervals, warmup)
        steady_items.update(e["item"] for e in writes[warmup:])
        intervals_all += kept
        per_rank[rank] = {"items": len(writes), "intervals_s": [round(x, 4) for x in intervals],
                          "median_s": statistics.median(kept) if kept else None,
                          "warmup_s": (warm_end[rank] - min(e["t0"] for e in records) if rank in warm_end
                                       else None), "peak_gpu_bytes": peaks.get(rank)}
    throughput = sum(1.0 / r["median_s"] for r in per_rank.values() if r["median_s"])
    breakdown = {}
    for stage in ("encode", "denoise", "decode", "write"):
        rows = [e for e in stages if e["stage"] == stage and e["item"] in steady_items]
        if rows:
            gpu = [e["gpu_s"] for e in rows if "gpu_s" in e]
            breakdown[stage] = {"wall_s": statistics.median(e["t1"] - e["t0"] for e in rows),
                                "gpu_s": statistics.median(gpu) if gpu else None}
    gpu_busy = [sum(e.get("gpu_s", 0.0) for e in stages if e["item"] == item) for item in steady_items
                if any("gpu_s" in e for e in stages)]
    return {"per_rank": per_rank, "videos_per_s": throughput, "num_ranks": len(per_rank),
            "s_per_video": (len(per_rank) / throughput) if throughput else None,
            "gpu_busy_s_per_video": statistics.median(gpu_busy) if gpu_busy else None,
            "breakdown": breakdown, "num_steady_intervals": len(intervals_all),
            "peak_gpu_bytes": max((p for p in peaks.values() if p), default=None)}


def timeline(events: list[dict], item: str) -> list[dict]:
    """The stage spans of one item (and what else ran on its rank meanwhile), relative to its encode start."""
    rows = [e for e in events if e.get("ev") == "stage" and e.get("item") == item]
    if not rows:
        return []
    origin = min(e["t0"] for e in rows)
    end = max(e["t1"] for e in rows)
    rank = rows[0]["rank"]
    around = [e for e in events if e.get("ev") == "stage" and e.get("rank") == rank and e["t1"] > origin
              and e["t0"] < end]
    return [{"item": e["item"], "stage": e["stage"], "t0": round(e["t0"] - origin, 3), "t1": round(e["t1"] - origin, 3),
             "gpu_s": e.get("gpu_s")} for e in sorted(around, key=lambda e: e["t0"])]


def gpu_idle_fraction(events: list[dict], rank: int, t_from: float, t_to: float) -> float | None:
    """1 - (union of GPU stage spans, scaled by gpu_s / wall) / window: how long no stage kept the GPU busy."""
    spans = sorted((e["t0"], e["t1"]) for e in events if e.get("ev") == "stage" and e.get("rank") == rank
                   and e["stage"] in GPU_STAGES and e["t1"] > t_from and e["t0"] < t_to)
    if not spans or t_to <= t_from:
        return None
    covered, cur_start, cur_end = 0.0, None, None
    for a, b in spans:
        a, b = max(a, t_from), min(b, t_to)
        if cur_end is None or a > cur_end:
            if cur_end is not None:
                covered += cur_end - cur_start
            cur_start, cur_end = a, b
        else:
            cur_end = max(cur_end, b)
    covered += cur_end - cur_start
    return 1.0 - covered / (t_to - t_from)


def levels(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Mean and max absolute difference in uint8 levels, and whether the videos are bit-identical."""
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return {"mean": float(diff.mean()), "max": int(diff.max()), "identical": bool(diff.max() == 0)}


def fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def render_markdown(result: dict) -> str:
    c, env = result["config"], result["environment"]
    lines = [f"# Throughput: {c['case']} ({result['date']})", "",
             f"- hardware: {env.get('gpus')} ({env.get('num_gpus')} GPU(s)); host {env.get('host')}, "
             f"{env.get('cpus')} CPUs",
             f"- versions: python {env.get('python')}, torch {env.get('torch')} (CUDA {env.get('cuda')}, cuDNN "
             f"{env.get('cudnn')}), diffusers {env.get('diffusers')}, transformers {env.get('transformers')}; "
             f"spmd_diff commit {env.get('commit')}",
             f"- config: model {c['model']} (text encoder and DiT bf16), {c['height']}x{c['width']}x{c['num_frames']}, "
             f"{c['steps']} steps, guidance {c['guidance']}, {c['videos']} videos per variant, first {c['warmup']} "
             f"dropped (steady state = median over the rest; the engine's last {DRAIN} too: its pipeline draining); engine: `mpirun -n {c['num_gpus']} spmd-diff run` "
             f"(one rank per GPU, each encodes, denoises, decodes and writes), speed.warmup on",
             f"- command: `{result['command']}`", *[f"- {note}" for note in result.get("notes", [])], "",
             "| variant | videos/h | s/video | GPU-s/video | vs baseline A | peak GiB/GPU | GPU busy s/video | "
             "encode | denoise | decode | write |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    base = result["variants"].get("baseline", {}).get("videos_per_s")
    for name, v in result["variants"].items():
        if "error" in v:
            lines.append(f"| {name} | failed: {v['error'][:120]} |||||||||||")
            continue
        vps = v.get("videos_per_s")
        b = v.get("breakdown", {})

        def stage(s: str) -> str:
            if s not in b:
                return "-"
            gpu = b[s].get("gpu_s")
            return f"{b[s]['wall_s']:.3f}" + (f" (GPU {gpu:.3f})" if gpu is not None else "")

        ratio = f"{vps / base:.3f}x" if base and vps else "-"
        peak = v.get("peak_gpu_bytes")
        lines.append(f"| {name} | {fmt(vps * 3600 if vps else None, 1)} | {fmt(v.get('s_per_video'), 3)} | "
                     f"{fmt(v.get('gpu_s_per_video'), 3)} | {ratio} | {fmt(peak / 2**30 if peak else None, 1)} | "
                     f"{fmt(v.get('gpu_busy_s_per_video'), 3)} | {stage('encode')} | {stage('denoise')} | "
                     f"{stage('decode')} | {stage('write')} |")
    lines += ["", "Stage columns: median wall seconds per steady-state video (GPU seconds from CUDA events on the "
              "stage's stream). With decode overlapping the next denoise, stage times add up to more than s/video.",
              ""]
    targets = result.get("targets")
    if targets:
        lines += ["| target | wanted | measured | |", "|---|---|---|---|"]
        for t in targets:
            lines.append(f"| {t['variant']} | >= {t['wanted']:.2f}x | {fmt(t.get('measured'), 3)}x | "
                         f"{'met' if t.get('met') else 'MISSED'} |")
        lines.append("")
    dev = result.get("deviations", {})
    if dev:
        lines += ["## Output deviations (uint8 levels, same items, same GPU)", "", "| comparison | videos | mean | max |"
                  " identical |", "|---|---|---|---|---|"]
        for name, d in dev.items():
            if "error" in d:
                lines.append(f"| {name} | failed: {d['error'][:100]} ||||")
            else:
                lines.append(f"| {name} | {d['videos']} | {d['mean']:.3f} | {d['max']} | {d['identical']} |")
        lines.append("")
    opts = result.get("options")
    if opts:
        lines += ["## Fast-tier options one at a time (inside diffusers' WanPipeline, item 0, against its exact video)",
                  "", "| option | s/video | mean | max |", "|---|---|---|---|"]
        for name, o in opts.items():
            if "error" in o:
                lines.append(f"| {name} | failed: {o['error'][:100]} |||")
            else:
                first = f" (first call {o['first_call_s']:.1f}: compiles)" if "first_call_s" in o else ""
                lines.append(f"| {name} | {fmt(o.get('s_per_video'), 3)}{first} | {fmt(o.get('mean'), 3)} | "
                             f"{fmt(o.get('max'))} |")
        lines.append("")
    for name, v in result["variants"].items():
        rows = v.get("timeline")
        if rows:
            lines += [f"## Timeline of one steady-state video, {name} (seconds from its encode start; its rank)", "",
                      "| item | stage | t0 | t1 | GPU s |", "|---|---|---|---|---|"]
            lines += [f"| {r['item']} | {r['stage']} | {r['t0']:.3f} | {r['t1']:.3f} | {fmt(r['gpu_s'], 3)} |"
                      for r in rows]
            if v.get("gpu_idle_fraction") is not None:
                lines.append(f"\nNo GPU stage running on the rank for {100 * v['gpu_idle_fraction']:.1f}% of the "
                             "steady-state window.")
            lines.append("")
    return "\n".join(lines) + "\n"
