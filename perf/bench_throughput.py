"""Videos per GPU-hour: diffusers' WanPipeline as users run it (baseline A) against spmd-diff's exact and fast tiers,
on the same GPUs in the same run. One case per call:

    python3 perf/bench_throughput.py --case 4cfg   --out DIR   # 4 steps, CFG 5.0, 12 videos per variant
    python3 perf/bench_throughput.py --case 4nocfg --out DIR   # 4 steps, no CFG
    python3 perf/bench_throughput.py --case 50cfg  --out DIR   # 50 steps, CFG 5.0, 2 videos per variant
    python3 perf/bench_throughput.py --case i2v4cfg --out DIR  # image-to-video (random Wan2.1-I2V-14B 480P),
                                                                # 4 steps, CFG 5.0, 3 videos per variant
    python3 perf/bench_throughput.py --case memcap4cfg --variants baseline,timeshare --out DIR
                    # GPU memory capped at 16 GiB: the stages do not fit together; 4 steps, CFG 5.0, 16 videos

- baseline A: one process per GPU (``CUDA_VISIBLE_DEVICES``), each one ``WanPipeline`` (text encoder and DiT bf16,
  VAE float32, ``output_type="np"``) over its share of the items, timed call by call (synchronised), after an
  untimed one-step warm-up call; the random weights are the engine's (same seeds), so videos can be compared.
  Image-to-video cases run ``WanImageToVideoPipeline`` (CLIP image encoder bf16 too) on generated first-frame
  images (one PNG per item, written beside the items), as the engine reads them.
- exact / fast: the real engine, ``mpirun -n G python -m spmd_diff run`` with one rank per GPU (each encodes,
  denoises, decodes and writes its items), ``speed.tier`` exact or fast; steady state from its ``events.jsonl``
  (intervals between a rank's completed writes), so model load, warm-up and compilation are out.

- memcap cases (``mem_gib``): both sides capped by ``torch.cuda.set_per_process_memory_fraction`` once their
  weights are loaded (random weights are built in float32 before the cast). Baseline A is then what a diffusers
  user does on a GPU too small for the pipeline: ``enable_model_cpu_offload()`` (each component moved to the GPU
  for its forward, the previous one back to the host). ``timeshare``: the engine with ``roles.policy = "static"``,
  ``roles.time_share = true``, ``roles.stage_batch = 8``, ``world.gpu_memory_gib`` = the cap; its steady state
  is whole cycles (the writes after the first cycle over the time they took: a cycle writes its videos in a
  burst, so intervals between writes say nothing), and the move seconds per cycle come from its move events.

Every variant drops its first ``--warmup`` videos and reports the median of the rest (the engine also drops its
last two intervals: its decode/write pipeline draining with no denoise beside it; ``--rerender JSON`` recomputes
a stored result with the current rule). Deviations: engine exact
against baseline A (should be bit-identical), engine fast against engine exact, and with ``--options`` each fast
option alone inside the pipeline. Writes ``DIR/throughput-<case>-<date>.md`` and ``.json`` (hardware, versions,
commit, config, date). Runs on CPU too (``--tiny``: the demo model at 64x64x9, for a smoke test).

One file (~660 lines, over the project's ~500) so that the benchmark stands alone: the baseline workers it
launches are this same file. Sections: the baseline; the engine; the engine's steady state from its
events, video comparisons and the report; the driver.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import time
import traceback
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from bench_common import REPO as ROOT
from bench_common import commit, cpu_name

CASES = {"4cfg": dict(steps=4, guidance=5.0, videos=12, warmup=2),
         "4nocfg": dict(steps=4, guidance=1.0, videos=12, warmup=2),
         "50cfg": dict(steps=50, guidance=5.0, videos=2, warmup=0),
         "i2v4cfg": dict(steps=4, guidance=5.0, videos=3, warmup=1, task="i2v"),
         "memcap4cfg": dict(steps=4, guidance=5.0, videos=16, warmup=2, mem_gib=16.0, baseline_videos=10,
                            stage_batch=8)}
TARGETS = {"4cfg": {"exact": 1.05, "fast": 1.3}, "4nocfg": {"exact": 1.05, "fast": 1.35},
           "50cfg": {"exact": 1.02, "fast": 1.15}, "i2v4cfg": {"exact": 1.05}, "memcap4cfg": {"timeshare": 1.0}}
DEFAULT_MODELS = {"t2v": ("random:wan2.1-t2v-1.3b", "demo"), "i2v": ("random:wan2.1-i2v-14b-480p", "demo-i2v")}
"""Per task: the model of a GPU run and of a ``--tiny`` CPU run."""
NEGATIVE = "blurry, low quality"
SUBJECTS = ["a red fox running through fresh snow", "waves breaking on black volcanic rocks", "a busy night market",
            "a hot air balloon over green hills", "a cat chasing a paper ball", "rain on a city street at dusk",
            "a sailboat in a storm", "a chef flipping pancakes", "cherry blossoms in the wind",
            "a steam train crossing a bridge", "a dog catching a frisbee", "northern lights over a frozen lake",
            "a hummingbird at a flower", "a skateboarder in an empty pool", "fireworks over a harbour",
            "a horse galloping along a beach"]


def make_items(num: int, seed: int, image_dir: Path | None = None, size: tuple[int, int] = (480, 832)) -> list[dict]:
    """``num`` items; with ``image_dir`` (image-to-video) each gets a generated first frame of ``size`` (h, w)."""
    items = [{"id": f"v{k:03d}", "prompt": f"Cinematic shot of {SUBJECTS[k % len(SUBJECTS)]}, detailed, take {k}.",
              "seed": seed + k} for k in range(num)]
    if image_dir is not None:
        import numpy as np
        import PIL.Image

        image_dir.mkdir(parents=True, exist_ok=True)
        height, width = size
        y, x = np.mgrid[0:height, 0:width]
        for k, item in enumerate(items):
            phase = k * 0.7
            pixels = np.stack([127 + 120 * np.sin(x / 37 + phase), 127 + 120 * np.cos(y / 23 - phase),
                               127 + 120 * np.sin((x + y) / 51 + 2 * phase)], -1).astype(np.uint8)
            item["image"] = str(image_dir / f"{item['id']}.png")
            PIL.Image.fromarray(pixels).save(item["image"])
    return items


# ---- baseline A: one WanPipeline per GPU (a worker process) --------------------------------------------------------


def baseline_worker(args: argparse.Namespace) -> None:
    import numpy as np
    import torch
    from diffusers import WanImageToVideoPipeline, WanPipeline

    from spmd_diff.io.images import load_image
    from spmd_diff.models.random_wan import make_stages
    from spmd_diff.models.residency import cap_gpu_memory
    from spmd_diff.models.wan import _frames_to_uint8

    cfg = json.loads(args.worker_config)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    t_load = time.time()
    model_dir = _model_dir(cfg["model"])
    offload = bool(cfg.get("mem_gib")) and device == "cuda"  # built on the GPU one at a time, kept on the host
    stages = make_stages(model_dir, {"encode", "denoise", "decode"}, device=device, dtype=dtype, time_shared=offload)
    i2v = cfg.get("task") == "i2v"
    if i2v:
        pipe = WanImageToVideoPipeline(tokenizer=stages.tokenizer, text_encoder=stages.text_encoder, vae=stages.vae,
                                       scheduler=stages._scheduler, transformer=stages.transformer,
                                       image_encoder=stages.image_encoder, image_processor=stages.image_processor)
        stages.encode_vae = None  # the pipeline encodes and decodes with its one VAE
    else:
        pipe = WanPipeline(tokenizer=stages.tokenizer, text_encoder=stages.text_encoder, vae=stages.vae,
                           scheduler=stages._scheduler, transformer=stages.transformer)
    pipe.set_progress_bar_config(disable=True)
    if offload:
        cap_gpu_memory("cuda:0", cfg["mem_gib"])  # as the engine caps world.gpu_memory_gib
        pipe.enable_model_cpu_offload()
    load_s = time.time() - t_load
    if device == "cuda":  # the rendering peak (weights included), as the engine's rank_end reports it
        torch.cuda.reset_peak_memory_stats()
    items = json.loads(Path(cfg["items"]).read_text())[:cfg.get("baseline_videos")][cfg["rank"]::cfg["num_gpus"]]
    save_dir = Path(cfg["save_dir"])

    def render(item: dict, steps: int | None = None):
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        image = {"image": load_image(item["image"])} if i2v else {}  # the engine's encode stage reads it too
        frames = pipe(**image, prompt=item["prompt"], negative_prompt=NEGATIVE, height=cfg["height"], width=cfg["width"],
                      num_frames=cfg["num_frames"], num_inference_steps=steps or cfg["steps"],
                      guidance_scale=cfg["guidance"], generator=torch.Generator("cpu").manual_seed(item["seed"]),
                      output_type="np", max_sequence_length=512).frames
        sync()
        return frames, time.perf_counter() - t0

    render(items[0], steps=1)  # untimed warm-up, as the engine's speed.warmup
    times, saved = [], []
    for k, item in enumerate(items):
        frames, seconds = render(item)
        times.append(seconds)
        if k >= cfg["warmup"] and len(saved) < cfg["save"]:
            np.save(save_dir / f"{item['id']}.npy", _frames_to_uint8(frames[0]))
            saved.append(item["id"])
    result = {"times_s": times, "load_s": load_s, "saved": saved, "items": [it["id"] for it in items],
              "peak_gpu_bytes": torch.cuda.max_memory_allocated() if device == "cuda" else None}
    if cfg.get("options") and saved:
        result["options"] = _options(pipe, stages, model_dir, items, saved[0], render, save_dir)
    Path(cfg["result"]).write_text(json.dumps(result, indent=2))


def _model_dir(model: str) -> Path:
    from spmd_diff.runtime.startup import resolve_model

    return Path(resolve_model(model))


def _options(pipe, stages, model_dir, items, item_id, render, save_dir) -> dict:
    """Each fast option on one item against its exact (baseline) video: bf16 VAE alone, cuDNN attention alone, then
    cuDNN attention with compiled blocks (also against cuDNN alone: the compilation's own effect). The compiled
    graph is the fast tier's, so the engine's fast run afterwards finds it in Inductor's on-disk cache."""
    import numpy as np
    import torch

    from spmd_diff.models.random_wan import build_random_module
    from spmd_diff.models.speed import StageOptions, apply_transformer_options
    from spmd_diff.models.wan import _frames_to_uint8

    item = next(it for it in items if it["id"] == item_id)
    reference = np.load(save_dir / f"{item_id}.npy")
    device = torch.device(stages.device)
    out: dict = {}
    videos: dict = {}

    def measure(name: str, repeat: int = 1, against: str | None = None) -> None:
        try:
            seconds = []
            for _ in range(repeat):
                frames, s = render(item)
                seconds.append(s)
            videos[name] = _frames_to_uint8(frames[0])
            out[name] = {"s_per_video": seconds[-1], **levels(videos[name], reference)}
            if repeat > 1:
                out[name]["first_call_s"] = seconds[0]
            if against in videos:
                out[f"{name} vs {against}"] = levels(videos[name], videos[against])
        except Exception as exc:  # noqa: BLE001 - report and go on with the next option
            out[name] = {"error": f"{type(exc).__name__}: {exc}"}
            traceback.print_exc()

    exact_vae = pipe.vae
    try:
        pipe.vae = (build_random_module("vae", model_dir, device, torch.bfloat16, stages.weight_seed)
                    if hasattr(stages, "weight_seed") else copy.deepcopy(exact_vae).to(torch.bfloat16))
        measure("bf16 VAE")
    finally:
        pipe.vae = exact_vae
    apply_transformer_options(pipe.transformer, StageOptions(attention_backend="_native_cudnn"), device)
    measure("cuDNN attention")
    apply_transformer_options(pipe.transformer, StageOptions(compile_blocks=True), device)
    measure("cuDNN attention + compiled blocks (S=1)", repeat=2, against="cuDNN attention")
    return out


def run_baseline(args, cfg: dict, items_path: Path, work: Path, num_gpus: int) -> dict:
    save_dir = work / "baseline_videos"
    save_dir.mkdir(parents=True, exist_ok=True)
    procs = []
    for rank in range(num_gpus):
        wcfg = dict(cfg, items=str(items_path), rank=rank, num_gpus=num_gpus, save_dir=str(save_dir),
                    result=str(work / f"baseline-{rank}.json"), save=2, options=args.options and rank == 0)
        env = dict(os.environ)
        if num_gpus > 0 and args.device == "cuda":
            env["CUDA_VISIBLE_DEVICES"] = str(rank)
        log = open(work / f"baseline-{rank}.log", "w")
        procs.append((subprocess.Popen([sys.executable, __file__, "--worker-config", json.dumps(wcfg)], env=env,
                                       stdout=log, stderr=subprocess.STDOUT), log))
    codes = []
    for proc, log in procs:
        codes.append(proc.wait(timeout=args.step_timeout_s))
        log.close()
    if any(codes):
        tail = (work / f"baseline-{codes.index(next(c for c in codes if c))}.log").read_text()[-3000:]
        raise RuntimeError(f"baseline worker exit codes {codes}: {tail}")
    results = [json.loads((work / f"baseline-{r}.json").read_text()) for r in range(num_gpus)]
    medians = [statistics.median(r["times_s"][cfg["warmup"]:]) for r in results]
    vps = sum(1.0 / m for m in medians)
    return {"videos_per_s": vps, "s_per_video": num_gpus / vps, "gpu_s_per_video": num_gpus / vps,
            "per_gpu": results, "peak_gpu_bytes": max((r["peak_gpu_bytes"] or 0) for r in results) or None,
            "saved": {i: str(save_dir / f"{i}.npy") for r in results for i in r["saved"]},
            "options": results[0].get("options"), "load_s": [r["load_s"] for r in results]}


# ---- the engine ---------------------------------------------------------------------------------------------------


def run_engine(args, cfg: dict, tier: str, items: list[dict], work: Path, num_gpus: int) -> dict:
    """``tier``: "exact" or "fast" (``roles.policy = "auto"``), or "timeshare" (exact, every rank time-shared)."""
    variant, timeshare = tier, tier == "timeshare"
    tier = "exact" if timeshare else tier
    roles = (f'policy = "static"\nencoders = 0\ndecoders = 0\ntime_share = true\nstage_batch = {cfg["stage_batch"]}'
             if timeshare else 'policy = "auto"')
    out = work / f"engine-{variant}"
    prompts = work / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(it) + "\n" for it in items))
    job = work / f"job-{variant}.toml"
    job.write_text(f"""[model]
path = "{cfg['model']}"
[video]
height = {cfg['height']}
width = {cfg['width']}
num_frames = {cfg['num_frames']}
num_inference_steps = {cfg['steps']}
guidance_scale = {cfg['guidance']}
negative_prompt = "{NEGATIVE}"
[run]
timeout_s = 900
[roles]
{roles}
[world]
gpu_memory_gib = {cfg.get('mem_gib', 0.0)}
[speed]
tier = "{tier}"
[output]
video = "{cfg.get('output', 'raw')}"
""")
    command = ["mpirun", "--allow-run-as-root", "--oversubscribe", "--bind-to", "none", "-n", str(max(1, num_gpus)),
               sys.executable, "-m", "spmd_diff", "run", str(job), "--prompts", str(prompts), "--out", str(out)]
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.time()
    with open(work / f"engine-{variant}.log", "w") as log:
        code = subprocess.call(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=args.step_timeout_s)
    if code != 0:
        raise RuntimeError(f"engine exit code {code}: {(work / f'engine-{variant}.log').read_text()[-3000:]}")
    events = read_events(out)
    result = engine_steady_state(events, cfg["warmup"])
    if timeshare:
        result.update(cycle_steady_state(events, cfg["stage_batch"]))
    result["gpu_s_per_video"] = result["num_ranks"] / result["videos_per_s"]
    result["wall_s"] = time.time() - t0
    result["out"] = str(out)
    start = next(e for e in events if e.get("ev") == "job_start")
    result["plan"] = {"policy": start["plan"].get("policy"), "roles": start["plan"].get("roles"),
                      "replans": sum(1 for e in events if e.get("ev") == "replan")}
    writes = sorted((e for e in events if e.get("ev") == "stage" and e.get("stage") == "write"), key=lambda e: e["t1"])
    if len(writes) > cfg["warmup"]:
        middle = writes[min(len(writes) - 1, cfg["warmup"] + (len(writes) - cfg["warmup"]) // 2)]
        result["timeline"] = timeline(events, middle["item"])
        rank_writes = [e for e in writes if e["rank"] == middle["rank"]]
        if len(rank_writes) > cfg["warmup"] + 1:
            result["gpu_idle_fraction"] = gpu_idle_fraction(events, middle["rank"],
                                                            rank_writes[cfg["warmup"]]["t1"], rank_writes[-1]["t1"])
    return result


def engine_video(out: str, item_id: str):
    import h5py

    with h5py.File(Path(out) / "videos.h5", "r") as f:
        return f["videos"][item_id][...]


def deviations(result: dict, items: list[dict], max_videos: int = 4) -> dict:
    import numpy as np

    v = result["variants"]
    dev = {}

    def compare(name: str, pairs) -> None:
        try:
            stats = [levels(a(), b()) for a, b in pairs]
            if stats:
                dev[name] = {"videos": len(stats), "mean": statistics.mean(s["mean"] for s in stats),
                             "max": max(s["max"] for s in stats), "identical": all(s["identical"] for s in stats)}
        except Exception as exc:  # noqa: BLE001
            dev[name] = {"error": f"{type(exc).__name__}: {exc}"}

    base, exact, fast = v.get("baseline", {}), v.get("exact", {}), v.get("fast", {})
    timeshare = v.get("timeshare", {})
    if "saved" in base and "out" in timeshare:
        compare("engine time-shared vs baseline A (offload)",
                [(lambda i=i: engine_video(timeshare["out"], i), lambda p=p: np.load(p))
                 for i, p in base["saved"].items()])
    if "saved" in base and "out" in exact:
        compare("engine exact vs baseline A", [(lambda i=i: engine_video(exact["out"], i), lambda p=p: np.load(p))
                                               for i, p in base["saved"].items()])
    if "out" in exact and "out" in fast:
        ids = [it["id"] for it in items][-max_videos:]
        compare("engine fast vs engine exact", [(lambda i=i: engine_video(fast["out"], i),
                                                 lambda i=i: engine_video(exact["out"], i)) for i in ids])
    return dev


# ---- the engine's steady state from its events, video comparisons, the report -------------------------------
#
# Steady state of a rank = the intervals between its consecutive item completions (``write`` stage ends), the first
# item counted from the end of the rank's warm-up (or of its first stage start); the first ``warmup`` intervals and
# the last ``DRAIN`` are dropped (at the end the finisher empties with no denoise beside it: one decode running and
# one queued complete faster than in steady state); throughput = sum over ranks of 1 / median interval.


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


def cycle_steady_state(events: list[dict], stage_batch: int) -> dict[str, Any]:
    """A time-shared rank's steady state: its writes after its first cycle (``stage_batch`` items) over the
    time from the end of that cycle's last write to its own last write; and the move seconds of each cycle (a
    cycle starts with the move of the encode stage), their median over the cycles after the first."""
    per_rank, moves = {}, []
    for rank in sorted({e["rank"] for e in events if e.get("ev") == "stage"}):
        writes = sorted(e["t1"] for e in events if e.get("ev") == "stage" and e.get("stage") == "write"
                        and e.get("ok") and e["rank"] == rank)
        mine = sorted((e for e in events if e.get("ev") == "move" and e["rank"] == rank), key=lambda e: e["t0"])
        cycles: list[list[dict]] = []
        for e in mine:
            if e["stage"] == "encode" or not cycles:
                cycles.append([])
            cycles[-1].append(e)
        moves += [sum(e["seconds"] for e in c) for c in cycles[1:]]
        if len(writes) > stage_batch:
            per_rank[rank] = {"items": len(writes), "steady_items": len(writes) - stage_batch,
                              "median_s": (writes[-1] - writes[stage_batch - 1]) / (len(writes) - stage_batch),
                              "cycle_move_s": [round(sum(e["seconds"] for e in c), 3) for c in cycles],
                              "move_gib": sorted({round(e["bytes"] / 2**30, 2) for e in mine})}
    vps = sum(1.0 / r["median_s"] for r in per_rank.values())
    return {"videos_per_s": vps, "s_per_video": len(per_rank) / vps if vps else None,
            "cycle_per_rank": per_rank, "move_s_per_cycle": statistics.median(moves) if moves else None,
            "steady_rule": f"time-shared: writes after the first cycle of {stage_batch} over their time"}


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
    for name, v in result["variants"].items():
        if v.get("cycle_per_rank"):
            lines += ["", f"{name}: steady state over whole cycles ({v['steady_rule']}); move seconds per cycle "
                      f"(median after the first) {fmt(v.get('move_s_per_cycle'), 3)}; per rank: "
                      + "; ".join(f"rank {r}: {c['steady_items']} steady videos, {c['median_s']:.3f} s/video, moves "
                                  f"per cycle {c['cycle_move_s']} s, stages of {c['move_gib']} GiB"
                                  for r, c in v["cycle_per_rank"].items())]
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


# ---- driver -------------------------------------------------------------------------------------------------------


def environment(num_gpus: int) -> dict:
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None, "host": socket.gethostname(),
           "cpus": os.cpu_count(), "num_gpus": num_gpus}
    for name in ("diffusers", "transformers", "numpy", "h5py"):
        try:
            env[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001
            env[name] = None
    if torch.cuda.is_available():
        env["gpus"] = ", ".join(sorted({torch.cuda.get_device_name(i) for i in range(num_gpus)}))
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=30).stdout.split()[0]
        except Exception:  # noqa: BLE001
            env["driver"] = None
    else:
        env["gpus"] = f"CPU only ({cpu_name()})"
    env["commit"] = commit() or None
    return env


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=sorted(CASES), default="4cfg")
    parser.add_argument("--out", default="perf/results/throughput")
    parser.add_argument("--variants", default="baseline,exact,fast")
    parser.add_argument("--videos", type=int, help="videos per variant (default: the case's)")
    parser.add_argument("--warmup", type=int, help="videos dropped from the steady state (default: the case's)")
    parser.add_argument("--gpus", type=int, help="GPUs to use (default: all visible)")
    parser.add_argument("--model", help="default: random:wan2.1-t2v-1.3b, for i2v cases random:wan2.1-i2v-14b-480p")
    parser.add_argument("--size", default="480x832x81", help="HEIGHTxWIDTHxFRAMES")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test: demo model, 64x64x9")
    parser.add_argument("--options", action="store_true", help="also time each fast option alone (GPU)")
    parser.add_argument("--output", default="raw", choices=("raw", "h264", "hevc"),
                        help="the engine's [output] video form (the baseline returns frames either way)")
    parser.add_argument("--tag", default="")
    parser.add_argument("--work", default="/tmp/bench_throughput", help="scratch folder (items, logs, engine outputs)")
    parser.add_argument("--step-timeout-s", type=float, default=580)
    parser.add_argument("--rerender", metavar="JSON", help="recompute the steady state from a results JSON's "
                        "stored intervals and rewrite its .md/.json (no GPU)")
    parser.add_argument("--worker-config", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rerender:
        path = Path(args.rerender)
        result = json.loads(path.read_text())
        recompute(result)
        args.case = result["config"]["case"]
        print(write_results(result, args, path.parent, stem=path.stem))
        return 0
    if args.worker_config:
        cfg = json.loads(args.worker_config)
        args.worker_config = json.dumps(cfg)
        baseline_worker(args)
        return 0

    import torch

    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    num_gpus = (args.gpus or torch.cuda.device_count()) if args.device == "cuda" else 1
    case = CASES[args.case]
    task = case.get("task", "t2v")
    if args.tiny:
        args.model, args.size = DEFAULT_MODELS[task][1], "64x64x9"
    elif args.model is None:
        args.model = DEFAULT_MODELS[task][0]
    height, width, frames = (int(x) for x in args.size.split("x"))
    cfg = dict(case=args.case, task=task, output=args.output, model=args.model, height=height, width=width, num_frames=frames, steps=case["steps"],
               guidance=case["guidance"], videos=args.videos or case["videos"],
               warmup=case["warmup"] if args.warmup is None else args.warmup, num_gpus=num_gpus)
    cfg.update({key: case[key] for key in ("mem_gib", "baseline_videos", "stage_batch") if key in case})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) / args.case
    work.mkdir(parents=True, exist_ok=True)
    items = make_items(cfg["videos"] * max(1, num_gpus), seed=1000,
                       image_dir=work / "images" if task == "i2v" else None, size=(height, width))
    items_path = work / "items.json"
    items_path.write_text(json.dumps(items))
    result = {"benchmark": "throughput", "date": datetime.date.today().isoformat(), "config": cfg,
              "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "environment": environment(num_gpus),
              "variants": {}}
    for name in args.variants.split(","):
        t0 = time.time()
        print(f"=== {name} ...", flush=True)
        try:
            if name == "baseline":
                result["variants"][name] = run_baseline(args, cfg, items_path, work, num_gpus)
            else:
                result["variants"][name] = run_engine(args, cfg, name, items, work, num_gpus)
        except Exception as exc:  # noqa: BLE001 - a failing variant is reported; the others still run
            traceback.print_exc()
            result["variants"][name] = {"error": f"{type(exc).__name__}: {exc}"[-2000:]}
        v = result["variants"][name]
        v["step_s"] = time.time() - t0
        print(f"=== {name}: {v['step_s']:.0f} s; s/video {v.get('s_per_video')}", flush=True)
        if "options" in v:
            result["options"] = v.pop("options")
        write_results(result, args, out)  # after every variant: a call cut short still brings back what ran
    result["deviations"] = deviations(result, items)
    print(write_results(result, args, out))
    return 0


def write_results(result: dict, args: argparse.Namespace, out: Path, stem: str | None = None) -> str:
    base = result["variants"].get("baseline", {}).get("videos_per_s")
    result["targets"] = []
    for name, wanted in TARGETS[args.case].items():
        vps = result["variants"].get(name, {}).get("videos_per_s")
        measured = vps / base if vps and base else None
        result["targets"].append({"variant": name, "wanted": wanted, "measured": measured,
                                  "met": measured is not None and measured >= wanted})
    stem = stem or f"throughput-{args.case}{'-' + args.tag if args.tag else ''}-{result['date']}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    text = render_markdown(result)
    (out / f"{stem}.md").write_text(text)
    return text


if __name__ == "__main__":
    sys.exit(main())
