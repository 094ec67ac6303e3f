"""Bytes and CPU seconds per stored video for each output form, and the PSNR of the lossy ones.

For each size (480x832 and 720x1280, 81 frames) and each form (raw, raw+zstd, raw+gzip, raw+lzf, H.264, HEVC at
the default quality and preset), the item file is built exactly as the engine's writer builds it
(``frames.stored_form`` then ``itemfile.encode_item``, in memory: the disk is left out) and measured:

- ``bytes``: the item file's size (header + HDF5 + data), and raw / bytes;
- ``cpu_s``: CPU seconds of building it (``worker.CpuMeter``: this thread and the encoder's threads), median over
  ``--repeats`` after one warm-up, and ``wall_s`` beside it (``--threads`` encoder threads);
- ``psnr_db``: of the frames read back (``frames.frames_of``) against the raw frames.

Clips: the synthetic clip (``codec.synthetic_clip``: moving shapes over moving gradients, luminance grain), and,
with ``--demo OUT:ID``, one raw video of a store (e.g. the demo model rendered at 480x832x81: random weights make
noise, the worst case for any codec). Writes ``--out`` .json and .md.

    python perf/bench_encode.py --out perf/results/encode-2026-12-03 [--tiny] [--demo OUT:ID] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from bench_common import commit, cpu_name
from bench_common import versions as package_versions
from spmd_diff.io import codec, itemfile
from spmd_diff.io.frames import frames_of, stored_form
from spmd_diff.runtime.worker import CpuMeter

FORMS = {
    "raw": {"codec": "raw", "compression": "none"},
    "raw+zstd": {"codec": "raw", "compression": "zstd"},
    "raw+gzip": {"codec": "raw", "compression": "gzip"},
    "raw+lzf": {"codec": "raw", "compression": "lzf"},
    "h264": {"codec": "h264", "quality": codec.DEFAULT_QUALITY, "preset": codec.DEFAULT_PRESET,
             "fps": codec.DEFAULT_FPS},
    "hevc": {"codec": "hevc", "quality": codec.DEFAULT_QUALITY, "preset": codec.DEFAULT_PRESET,
             "fps": codec.DEFAULT_FPS},
}
SIZES = {"480p": (81, 480, 832), "720p": (81, 720, 1280)}
TINY_SIZES = {"tiny": (9, 64, 96)}


def build_item(frames: np.ndarray, form: dict, threads: int) -> tuple[memoryview, dict]:
    f, h, w, _ = frames.shape
    attrs = {"id": "bench", "prompt": "bench", "seed": 0, "height": h, "width": w, "num_frames": f, **form}
    stored, extra = stored_form(frames, attrs, threads=threads, metadata=attrs)
    attrs = {**attrs, **extra}
    data = itemfile.encode_item(stored, attrs, item_id="bench", key="0" * 40, identity="0" * 16,
                                settings="0" * 16, token="00000000")
    return data, attrs


def read_back(data: memoryview, attrs: dict) -> np.ndarray:
    import io

    import h5py

    itemfile.load_filters()
    with h5py.File(io.BytesIO(bytes(data)), "r") as f:
        return frames_of(f["video"][...], attrs)


def measure(frames: np.ndarray, form: dict, threads: int, repeats: int) -> dict:
    build_item(frames, form, threads)  # warm-up
    cpu, wall = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        with CpuMeter() as meter:
            data, attrs = build_item(frames, form, threads)
        wall.append(time.perf_counter() - t0)
        cpu.append(meter.cpu_s)
    back = read_back(data, attrs)
    return {"bytes": len(data), "raw_over_bytes": round(frames.nbytes / len(data), 2),
            "cpu_s": round(statistics.median(cpu), 3), "wall_s": round(statistics.median(wall), 3),
            "cpu_s_all": [round(c, 3) for c in cpu], "psnr_db": round(codec.psnr(frames, back), 2),
            "bit_identical": bool(np.array_equal(frames, back))}


def demo_video(spec: str) -> np.ndarray:
    from spmd_diff.io.frames import read_frames

    out, _, item_id = spec.rpartition(":")
    return read_frames(out, item_id)


def versions() -> dict:
    import av
    import h5py

    return {**package_versions("numpy", "h5py", "hdf5plugin", "av"), "hdf5": h5py.version.hdf5_version,
            "ffmpeg_libavcodec": ".".join(map(str, av.library_versions["libavcodec"]))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="results path without extension (.json and .md written)")
    parser.add_argument("--tiny", action="store_true", help="smoke test: one 9x64x96 clip")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="encoder threads (the engine: run.threads)")
    parser.add_argument("--demo", help="OUT:ID of a raw demo video to measure too")
    parser.add_argument("--machine", default=platform.node(), help="a name for the machine in the results")
    parser.add_argument("--forms", default=",".join(FORMS))
    args = parser.parse_args()
    sizes = TINY_SIZES if args.tiny else SIZES
    forms = args.forms.split(",")
    results = []
    clips = {}
    for size, (f, h, w) in sizes.items():
        clips[f"synthetic {size}"] = lambda f=f, h=h, w=w: codec.synthetic_clip(f, h, w)
    if args.demo:
        clips["demo"] = lambda: demo_video(args.demo)
    for clip_name, make in clips.items():
        frames = make()
        for form in forms:
            row = {"clip": clip_name, "shape": list(frames.shape), "raw_bytes": int(frames.nbytes), "form": form,
                   **measure(frames, FORMS[form], args.threads, args.repeats)}
            results.append(row)
            print(json.dumps(row), flush=True)
            Path(args.out + ".partial.json").write_text(json.dumps(results, indent=1) + "\n")
    record = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": args.machine,
              "cpu": cpu_name(), "cores": os.cpu_count(), "threads": args.threads, "repeats": args.repeats,
              "commit": commit(), "versions": versions(), "results": results,
              "config": {"quality": codec.DEFAULT_QUALITY, "preset": codec.DEFAULT_PRESET, "fps": codec.DEFAULT_FPS,
                         "pix_fmt": "yuv420p", "gzip_level": 4, "zstd_level": "hdf5plugin default (3)"}}
    Path(args.out + ".json").write_text(json.dumps(record, indent=2) + "\n")
    Path(args.out + ".md").write_text(markdown(record))
    Path(args.out + ".partial.json").unlink(missing_ok=True)
    return 0


def markdown(record: dict) -> str:
    lines = [f"# Output forms: bytes, CPU, PSNR ({record['machine']}, {record['date']})", "",
             f"{record['cpu']}, {record['cores']} cores, encoder threads {record['threads']}; commit "
             f"{record['commit']}; {json.dumps(record['versions'])}; config {json.dumps(record['config'])}; "
             f"medians of {record['repeats']} after one warm-up. CPU = building the item file in memory "
             "(encode/compress + HDF5 image), disk left out.", "",
             "| clip | form | MB | raw / size | CPU s | wall s | PSNR dB |", "|---|---|---|---|---|---|---|"]
    for r in record["results"]:
        psnr = "lossless" if r["bit_identical"] else f"{r['psnr_db']:.2f}"
        lines.append(f"| {r['clip']} {'x'.join(map(str, r['shape'][:3]))} | {r['form']} | {r['bytes'] / 1e6:.2f} | "
                     f"{r['raw_over_bytes']:.1f}x | {r['cpu_s']:.2f} | {r['wall_s']:.2f} | {psnr} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
