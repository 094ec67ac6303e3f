"""Seconds per video, end to end (encode + denoise + decode), on any number of GPUs: ours against diffusers
(its own pipeline; on several GPUs its context parallelism) and xDiT where it imports; the DiT step alone; and the
VAE decode split in bands (``spmd_diff.parallel.vae_decode``) against the plain decode.

    python3 perf/bench_latency.py --out DIR                                   # one GPU (or the CPU with --tiny)
    torchrun --nproc-per-node N perf/bench_latency.py --out DIR              # N GPUs (NCCL; gloo on CPU)

Parts (``--parts``, default all):

- ``decode`` (one process): the plain decode (``WanStages.decode_uint8``) of random latents against the split
  decode with S = 2 and 4 bands. On one GPU the bands run as S threads sharing the GPU (their total time: the
  splitting's overhead; the video is checked against the plain one), then each band alone, replaying the halos
  recorded in the threaded run: the time and peak memory one rank of an S-GPU group would spend, less the
  exchange itself.
- ``step``: one transformer forward (the DiT step without CFG) with each attention backend (torch SDPA's own
  choice and cuDNN); the faster one is used below for both sides.
- ``latency``: one video end to end, timed after a one-step warm-up. Ours ("best plan" for N ranks): one rank
  runs the stages in turn; N > 1 ranks form one DiT group with CFG parallel when N is even (halves of N/2,
  Ulysses inside each), and the group decodes together. Diffusers: ``WanPipeline`` on the same components (N > 1:
  ``enable_parallelism(ContextParallelConfig(ulysses_degree=N))``). xDiT: recorded as importable or not (its Wan
  pipeline is not driven by this script; on one GPU its best setting is the plain pipeline).

Results: ``DIR/latency.json`` (rows appended as they complete, so a run cut short keeps what it measured) and
``DIR/latency.md``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from spmd_diff.parallel.seq_comm import SeqComm  # noqa: E402

PROMPT = "A red fox runs through fresh snow in a birch forest at sunrise."
NEGATIVE = "blurry, low quality"


# ---- in-process ranks for the split decode on one device ------------------------------------------------------


class _Mailbox:
    def __init__(self) -> None:
        self.boxes: dict = {}
        self.cond = threading.Condition()

    def post(self, key, tensor) -> None:
        with self.cond:
            self.boxes[key] = tensor
            self.cond.notify_all()

    def take(self, key):
        with self.cond:
            while key not in self.boxes:
                if not self.cond.wait(300):
                    raise TimeoutError(f"no message {key}")
            return self.boxes.pop(key)


class ThreadComm(SeqComm):
    """Ranks as threads of one process (tensors on one device: the copy is the transfer); records what each
    rank received, for :class:`ReplayComm`."""

    def __init__(self, box: _Mailbox, rank: int, size: int) -> None:
        self.box, self.rank, self.size = box, rank, size
        self.count = 0
        self.received: list[list] = []

    def all_to_all(self, send, recv_shapes):
        self.count += 1
        for peer, tensor in enumerate(send):
            if tensor is not None and peer != self.rank:
                self.box.post((self.count, self.rank, peer), tensor.clone())
        out = []
        for peer, shape in enumerate(recv_shapes):
            if shape is None:
                out.append(None)
            elif peer == self.rank:
                out.append(send[peer])
            else:
                out.append(self.box.take((self.count, peer, self.rank)))
        self.received.append(out)
        return out

    def broadcast(self, tensor, root):
        raise NotImplementedError


class ReplayComm(SeqComm):
    """One band alone: every exchange returns what the threaded run received there."""

    def __init__(self, rank: int, size: int, received: list[list]) -> None:
        self.rank, self.size, self._received, self._next = rank, size, received, 0

    def all_to_all(self, send, recv_shapes):
        out = list(self._received[self._next])
        self._next += 1
        return [send[i] if i == self.rank and out[i] is not None else out[i] for i in range(self.size)]

    def broadcast(self, tensor, root):
        raise NotImplementedError


# ---- helpers ----------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device):
    _sync(device)
    began = time.perf_counter()
    result = fn()
    _sync(device)
    return result, time.perf_counter() - began


def _peak_reset(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def _peak_since(device: torch.device, base: int) -> int:
    return torch.cuda.max_memory_allocated(device) - base if device.type == "cuda" else 0


class Recorder:
    def __init__(self, out: Path, rank: int) -> None:
        self.rows: list[dict] = []
        self.path = out / "latency.jsonl"
        self.rank = rank

    def add(self, **row) -> None:
        self.rows.append(row)
        if self.rank == 0:
            print(json.dumps(row), flush=True)
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")


# ---- parts -------------------------------------------------------------------------------------------------------


def part_decode(args, stages, device: torch.device, rec: Recorder) -> None:
    from spmd_diff.parallel.vae_decode import decode_split

    shapes = stages.shapes(args.spec)
    gen = torch.Generator().manual_seed(7)
    latents = torch.randn(shapes.latents_shape, generator=gen).to(device)
    stages.decode_uint8(latents)  # warm-up (cuDNN picks its kernels)
    base = _peak_reset(device)
    plain, seconds = _timed(lambda: stages.decode_uint8(latents), device)
    rec.add(part="decode", method="plain", bands=1, seconds=seconds, peak_bytes=_peak_since(device, base))
    plain = plain.cpu()
    for bands in args.bands:
        if shapes.latent_height < bands:
            continue
        copies = [copy.copy(stages) for _ in range(bands)]
        for mine in copies:
            mine.vae = copy.deepcopy(stages.vae)
        box = _Mailbox()
        comms = [ThreadComm(box, r, bands) for r in range(bands)]
        videos: list = [None] * bands
        errors: list = []

        def body(r: int) -> None:
            try:
                videos[r] = decode_split(copies[r], comms[r], latents)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        base = _peak_reset(device)
        _sync(device)
        began = time.perf_counter()
        threads = [threading.Thread(target=body, args=(r,)) for r in range(bands)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        _sync(device)
        seconds = time.perf_counter() - began
        if errors:
            raise errors[0]
        levels = int((videos[0].cpu().to(torch.int16) - plain.to(torch.int16)).abs().max())
        rec.add(part="decode", method=f"split, {bands} bands as threads on one device", bands=bands,
                seconds=seconds, peak_bytes=_peak_since(device, base), max_diff_levels=levels)
        for r in sorted({0, bands // 2}):  # an edge band and a middle band
            replay = ReplayComm(r, bands, comms[r].received)
            base = _peak_reset(device)
            _, seconds = _timed(lambda: decode_split(copies[r], replay, latents), device)
            rec.add(part="decode", method=f"split, band {r} of {bands} alone (halos replayed)", bands=bands,
                    band=r, seconds=seconds, peak_bytes=_peak_since(device, base))
        copies = comms = videos = []  # free the bands before the next count
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _backends(device: torch.device) -> list[str]:
    return ["native", "_native_cudnn"] if device.type == "cuda" else ["native"]


def part_step(args, stages, device: torch.device, rec: Recorder) -> str:
    """One transformer forward per backend (one rank); returns the faster backend's name."""
    shapes = stages.shapes(args.spec)
    model = stages.transformer
    hidden = torch.randn(shapes.latents_shape, device=device, dtype=model.dtype)
    text = torch.randn(shapes.embeds_shape, device=device, dtype=model.dtype)
    step = torch.tensor([500.0], device=device)
    best, best_s = "native", float("inf")
    for backend in _backends(device):
        try:
            model.set_attention_backend(backend)
            times = []
            for _ in range(1 + args.reps):
                _, seconds = _timed(lambda: model(hidden_states=hidden, timestep=step, encoder_hidden_states=text,
                                                  return_dict=False), device)
                times.append(seconds)
            median = sorted(times[1:])[len(times[1:]) // 2]
            rec.add(part="step", method="transformer forward", backend=backend, seconds=median, reps=args.reps)
            if median < best_s:
                best, best_s = backend, median
        except Exception as exc:  # noqa: BLE001 - a backend this GPU lacks is a result too
            rec.add(part="step", method="transformer forward", backend=backend, error=repr(exc)[:300])
    model.set_attention_backend(best)
    return best


def part_latency(args, stages, device: torch.device, rec: Recorder, world: int, rank: int, backend: str) -> None:
    import dataclasses

    from spmd_diff.parallel.group_denoise import SPDenoiser
    from spmd_diff.parallel.layout import resolve_layout
    from spmd_diff.parallel.vae_decode import decode_split

    spec = args.spec
    denoiser = comm = None
    if world > 1:
        from spmd_diff.parallel.torch_comm import build_torch_comms

        cfg = world % 2 == 0 and spec.do_classifier_free_guidance
        comm = build_torch_comms([list(range(world))], torus_shapes=[(2, world // 2)] if cfg else [])
        heads = int(stages.transformer.config.num_attention_heads)
        layout = resolve_layout("auto", world // 2 if cfg else world, heads, None)
        denoiser = SPDenoiser(stages, comm, layout, cfg_parallel=cfg)
        sp = "one rank" if layout.name == "none" else layout.describe()
        plan = f"{'CFG parallel, each branch on ' if cfg else ''}{sp}, decode in {world} bands"
        shapes = stages.shapes(spec)
        model = stages.transformer
        hidden = torch.randn(shapes.latents_shape, device=device, dtype=model.dtype)
        text = torch.randn(shapes.embeds_shape, device=device, dtype=model.dtype)
        step = torch.tensor([500.0], device=device)
        times = []
        for _ in range(1 + args.reps):
            dist.barrier()
            _, seconds = _timed(lambda: model(hidden_states=hidden, timestep=step, encoder_hidden_states=text,
                                              return_dict=False), device)
            times.append(seconds)
        rec.add(part="step", method=f"transformer forward, group of {world}: {sp}" + (" (one CFG branch)" if cfg
                else ""), backend=backend, seconds=sorted(times[1:])[len(times[1:]) // 2], reps=args.reps)
    else:
        plan = "one rank, stages in turn"

    def ours(run_spec):
        embeds = stages.encode(PROMPT, NEGATIVE, run_spec) if rank == 0 else None
        if denoiser is None:
            latents = stages.denoise(embeds, 42, run_spec)
            video = stages.decode_uint8(latents)
        else:
            latents = denoiser.denoise(embeds, 42 if rank == 0 else None, run_spec, every_rank=True)
            video = decode_split(stages, comm, latents)
        return video.cpu() if video is not None else None

    ours(dataclasses.replace(spec, num_inference_steps=1))  # warm-up
    video, seconds = _timed(lambda: ours(spec), device)
    if world > 1:
        dist.barrier()
    rec.add(part="latency", method="ours", plan=plan, gpus=world, backend=backend, seconds=seconds)
    if denoiser is not None:
        denoiser.remove()

    from diffusers import WanPipeline

    note = "WanPipeline" + (f", context parallelism (Ulysses over {world})" if world > 1 else "")
    try:
        if world > 1:
            from diffusers import ContextParallelConfig

            stages.transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
        pipe = WanPipeline(tokenizer=stages.tokenizer, text_encoder=stages.text_encoder,
                           transformer=stages.transformer, vae=stages.vae, scheduler=stages.new_scheduler())
        pipe.set_progress_bar_config(disable=True)

        def theirs(steps):
            return pipe(prompt=PROMPT, negative_prompt=NEGATIVE, height=spec.height, width=spec.width,
                        num_frames=spec.num_frames, num_inference_steps=steps, guidance_scale=spec.guidance_scale,
                        generator=torch.Generator("cpu").manual_seed(42), output_type="np",
                        max_sequence_length=spec.max_sequence_length).frames

        theirs(1)
        _, seconds = _timed(lambda: theirs(spec.num_inference_steps), device)
        rec.add(part="latency", method="diffusers", plan=note, gpus=world, backend=backend, seconds=seconds)
    except Exception as exc:  # noqa: BLE001 - the baseline's failure is a result
        rec.add(part="latency", method="diffusers", plan=note, gpus=world, error=repr(exc)[:300])
    try:
        import importlib.metadata

        import xfuser  # noqa: F401

        version = importlib.metadata.version("xfuser")
        rec.add(part="latency", method="xDiT", gpus=world, note=f"xfuser {version} imports; its Wan pipeline is "
                "not driven by this script (on one GPU its best setting is the plain pipeline)")
    except Exception as exc:  # noqa: BLE001
        rec.add(part="latency", method="xDiT", gpus=world, note=f"xfuser does not import here: {exc!r}"[:300])


# ---- main ---------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="random:wan2.1-t2v-1.3b")
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--reps", type=int, default=3, help="timed transformer forwards per backend (step)")
    parser.add_argument("--bands", default="2,4", help="split-decode band counts")
    parser.add_argument("--parts", default="decode,step,latency")
    parser.add_argument("--tiny", action="store_true", help="the demo model at 64 x 64 x 9, for a CPU smoke test")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.tiny:
        args.model, args.height, args.width, args.frames = "demo", 64, 64, 9
    args.bands = [int(b) for b in args.bands.split(",") if b]
    parts = set(args.parts.split(","))

    from spmd_diff.models.random_wan import make_stages
    from spmd_diff.models.wan import VideoSpec
    from spmd_diff.runtime.startup import resolve_model

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if on_gpu else torch.device("cpu")
    if on_gpu:
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if on_gpu else "gloo")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rec = Recorder(out, rank)
    args.spec = VideoSpec(height=args.height, width=args.width, num_frames=args.frames,
                          num_inference_steps=args.steps, guidance_scale=args.guidance)
    model_dir = resolve_model(args.model)
    dtype = torch.bfloat16 if on_gpu else torch.float32
    (stages, build_s) = _timed(lambda: make_stages(model_dir, {"encode", "denoise", "decode"}, device=device,
                                                    dtype=dtype), device)
    rec.add(part="setup", model=args.model, build_s=build_s, gpus=world, device=str(device))
    try:
        if "decode" in parts and rank == 0:
            part_decode(args, stages, device, rec)
        if world > 1:
            dist.barrier()
        backend = part_step(args, stages, device, rec) if "step" in parts else "native"
        if "latency" in parts:
            part_latency(args, stages, device, rec, world, rank, backend)
    finally:
        if rank == 0:
            write_report(args, rec, out, world, device)
        if world > 1:
            dist.destroy_process_group()
    return 0


def write_report(args, rec: Recorder, out: Path, world: int, device: torch.device) -> None:
    import diffusers

    if (ROOT / ".bench_commit").is_file():  # a synced copy without its own .git (wt-sync.sh writes this file)
        commit = " ".join((ROOT / ".bench_commit").read_text().split())
    else:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip() or "unknown"
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "hardware": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
            "gpus": world, "torch": torch.__version__, "diffusers": diffusers.__version__, "commit": commit,
            "model": args.model, "video": f"{args.height}x{args.width}x{args.frames}", "steps": args.steps,
            "guidance": args.guidance, "dtype": "bfloat16 DiT/text encoder, float32 VAE" if device.type == "cuda"
            else "float32"}
    (out / "latency.json").write_text(json.dumps({"meta": meta, "rows": rec.rows}, indent=2))
    lines = [f"# bench_latency, {meta['date']}", "", ", ".join(f"{k}: {v}" for k, v in meta.items()), "",
             "| part | method | bands / gpus | seconds | peak GiB | notes |", "|---|---|---|---|---|---|"]
    for row in rec.rows:
        if row["part"] == "setup":
            continue
        peak = f"{row['peak_bytes'] / 2**30:.2f}" if row.get("peak_bytes") else ""
        seconds = f"{row['seconds']:.3f}" if "seconds" in row else ""
        notes = "; ".join(f"{k}={row[k]}" for k in ("plan", "backend", "max_diff_levels", "note", "error")
                          if k in row)
        lines.append(f"| {row['part']} | {row['method']} | {row.get('bands', row.get('gpus', ''))} | {seconds} | "
                     f"{peak} | {notes} |")
    (out / "latency.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
