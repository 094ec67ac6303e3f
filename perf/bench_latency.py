"""Seconds per video, end to end (encode + denoise + decode), on any number of GPUs: ours against diffusers
(its own pipeline; on several GPUs its context parallelism) and xDiT where it imports; the DiT step alone; and the
VAE decode split in bands (``spmd_diff.parallel.vae_decode``) against the plain decode.

    python3 perf/bench_latency.py --out DIR                                   # one GPU (or the CPU with --tiny)
    torchrun --nproc-per-node N perf/bench_latency.py --out DIR              # N GPUs (NCCL; gloo on CPU)
    mpirun -n N python3 perf/bench_latency.py --out DIR                     # the same over MPI

Parts (``--parts``, default all):

- ``decode`` (one process): the plain decode (``WanStages.decode_uint8``) of random latents against the split
  decode with S = 2 and 4 bands. On one GPU the bands run as S threads sharing the GPU (their total time: the
  splitting's overhead; the video is checked against the plain one), then each band alone, replaying the halos
  recorded in the threaded run: the time and peak memory one rank of an S-GPU group would spend, less the
  exchange itself.
- ``step`` (the DiT step alone): one transformer forward (no CFG) of the whole sequence with each of diffusers'
  attention backends that run here (torch SDPA's own choice, cuDNN, SDPA's flash kernel); the fastest is used by
  ours and diffusers below. On N > 1 GPUs each side's parallel forward is timed as well (ours in its group,
  diffusers with context parallelism, xDiT with its USP), and xDiT's own backends (SDPA, cuDNN) on every count.
- ``latency``: one video end to end, timed after a one-step warm-up, the same prompt and seed on every side;
  ``max_diff_levels_vs_ours`` compares each peer's video with ours. Ours ("best plan" for N ranks): one rank runs
  the stages in turn; N > 1 ranks form one DiT group with CFG parallel when N is even (the layout
  ``resolve_layout("auto")`` picks inside each half) and the group decodes together. Diffusers (``--peers``):
  ``WanPipeline`` on the same components; on N > 1 GPUs with ``enable_parallelism(ContextParallelConfig(...))``
  (Ulysses N when the head count divides, else ring N); on one GPU the plain pipeline, as context parallelism of
  degree 1 is refused by diffusers. xDiT (``xfuser``, when it imports; else a row "not installed" with the
  import error): as its runner drives Wan2.1 T2V, ``WanPipeline`` with its ``xFuserWanTransformer3DWrapper``
  holding the same weights, Ulysses x ring over the N GPUs (it has no CFG parallel for Wan T2V), its faster
  backend.

Launch: alone (one process, one GPU or the CPU), ``torchrun --nproc-per-node N`` or ``mpirun -n N`` (MPI:
torch.distributed is started over MPI, ``spmd_diff.parallel.torch_comm.init_from_mpi``).

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
import sys
import threading
import time
from pathlib import Path

import bench_common  # perf/, the script's own folder

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


DIFFUSERS_GPU_BACKENDS = ("native", "_native_cudnn", "_native_flash")
"""diffusers' attention backends that run here with context parallelism and no extra package (flash-attn and
the kernels hub are not installed on the GPU machines)."""
XDIT_GPU_BACKENDS = ("SDPA", "CUDNN")
"""xDiT's attention backends (``AttentionBackendType``) that run without flash-attn, SageAttention or AITER."""


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def _step_inputs(stages, spec, device: torch.device, dtype: torch.dtype) -> dict:
    """One transformer forward's inputs, the same on every rank (seeded on the host)."""
    shapes = stages.shapes(spec)
    gen = torch.Generator().manual_seed(11)
    return {"hidden_states": torch.randn(shapes.latents_shape, generator=gen).to(device, dtype),
            "timestep": torch.tensor([500.0], device=device),
            "encoder_hidden_states": torch.randn(shapes.embeds_shape, generator=gen).to(device, dtype)}


def _time_forward(model, inputs: dict, device: torch.device, reps: int, world: int) -> float:
    """Median seconds of ``reps`` forwards after one warm-up (all ranks start each together)."""
    times = []
    for _ in range(1 + reps):
        if world > 1:
            dist.barrier()
        _, seconds = _timed(lambda: model(**inputs, return_dict=False), device)
        times.append(seconds)
    return _median(times[1:])


def _video_uint8(frames) -> torch.Tensor:
    """A pipeline's ``output_type="np"`` frames (``[1, F, H, W, 3]`` floats in [0, 1]) as uint8 ``[F, H, W, 3]``,
    rounded as :func:`spmd_diff.models.wan.frames_to_uint8` does."""
    return torch.from_numpy(frames[0]).mul(255).round().clamp(0, 255).to(torch.uint8)


def _levels(a: torch.Tensor | None, b: torch.Tensor | None) -> int | None:
    if a is None or b is None or a.shape != b.shape:
        return None
    return int((a.to(torch.int16) - b.to(torch.int16)).abs().max())


def part_step(args, stages, device: torch.device, rec: Recorder, world: int) -> str:
    """The DiT step alone: one transformer forward (no CFG) of the whole sequence on one GPU per attention
    backend of diffusers (every rank runs its own); returns the fastest backend, used by ours and diffusers."""
    inputs = _step_inputs(stages, args.spec, device, stages.transformer.dtype)
    best, best_s = "native", float("inf")
    for backend in DIFFUSERS_GPU_BACKENDS if device.type == "cuda" else ("native",):
        try:
            stages.transformer.set_attention_backend(backend)
            seconds = _time_forward(stages.transformer, inputs, device, args.reps, 1)
            rec.add(part="step", method="transformer forward, one GPU (ours and diffusers)", backend=backend,
                    seconds=seconds, reps=args.reps)
            if seconds < best_s:
                best, best_s = backend, seconds
        except Exception as exc:  # noqa: BLE001 - a backend this GPU lacks is a result too
            rec.add(part="step", method="transformer forward, one GPU (ours and diffusers)", backend=backend,
                    error=repr(exc)[:300])
    stages.transformer.set_attention_backend(best)
    return best


def run_ours(args, stages, device: torch.device, rec: Recorder, world: int, rank: int,
             backend: str) -> torch.Tensor | None:
    """Ours, best plan for ``world`` ranks: one rank runs the stages in turn; several form one DiT group (CFG
    parallel when the count is even, the layout ``resolve_layout("auto")`` picks inside each half) and decode
    the video together in bands. Returns the video on rank 0."""
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
        inputs = _step_inputs(stages, spec, device, stages.transformer.dtype)
        rec.add(part="step", method=f"ours: transformer forward, group of {world}: {sp}"
                + (" (one CFG branch)" if cfg else ""), gpus=world, backend=backend,
                seconds=_time_forward(stages.transformer, inputs, device, args.reps, world), reps=args.reps)
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
    if world > 1:
        dist.barrier()
    video, seconds = _timed(lambda: ours(spec), device)
    if world > 1:
        dist.barrier()
    rec.add(part="latency", method="ours", plan=plan, gpus=world, backend=backend, seconds=seconds)
    if denoiser is not None:
        denoiser.remove()
    return video


def _pipeline_video(pipe, spec, steps: int) -> torch.Tensor:
    frames = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, height=spec.height, width=spec.width,
                  num_frames=spec.num_frames, num_inference_steps=steps, guidance_scale=spec.guidance_scale,
                  generator=torch.Generator("cpu").manual_seed(42), output_type="np",
                  max_sequence_length=spec.max_sequence_length).frames
    return _video_uint8(frames)


def run_diffusers(args, stages, device: torch.device, rec: Recorder, world: int, backend: str,
                  ours_video: torch.Tensor | None) -> None:
    """diffusers' ``WanPipeline`` on the same components, with its context parallelism over ``world`` GPUs
    (Ulysses when the head count divides, else ring) and the fastest backend of the step part. One GPU: the
    plain pipeline, since ``ContextParallelConfig`` refuses a degree of 1."""
    from diffusers import WanPipeline

    spec = args.spec
    heads = int(stages.transformer.config.num_attention_heads)
    if world > 1:
        how = f"Ulysses {world}" if heads % world == 0 else f"ring {world}"
        plan = f"WanPipeline, context parallelism ({how})"
    else:
        plan = ("WanPipeline, one GPU: context parallelism of degree 1 is the plain pipeline "
                "(ContextParallelConfig refuses ulysses_degree = ring_degree = 1)")
    if world > 1 and device.type != "cuda":
        rec.add(part="latency", method="diffusers", plan=plan, gpus=world, status="not run: diffusers' context "
                "parallelism needs an accelerator (enable_parallelism divides by torch.accelerator.device_count())")
        return
    try:
        if world > 1:
            from diffusers import ContextParallelConfig

            config = (ContextParallelConfig(ulysses_degree=world) if heads % world == 0
                      else ContextParallelConfig(ring_degree=world))
            stages.transformer.enable_parallelism(config=config)
            inputs = _step_inputs(stages, spec, device, stages.transformer.dtype)
            rec.add(part="step", method=f"diffusers: transformer forward, context parallelism ({how})", gpus=world,
                    backend=backend, seconds=_time_forward(stages.transformer, inputs, device, args.reps, world),
                    reps=args.reps)
        pipe = WanPipeline(tokenizer=stages.tokenizer, text_encoder=stages.text_encoder,
                           transformer=stages.transformer, vae=stages.vae, scheduler=stages.new_scheduler())
        pipe.set_progress_bar_config(disable=True)
        _pipeline_video(pipe, spec, 1)  # warm-up
        if world > 1:
            dist.barrier()
        video, seconds = _timed(lambda: _pipeline_video(pipe, spec, spec.num_inference_steps), device)
        rec.add(part="latency", method="diffusers", plan=plan, gpus=world, backend=backend, seconds=seconds,
                max_diff_levels_vs_ours=_levels(video, ours_video))
    except Exception as exc:  # noqa: BLE001 - the baseline's failure is a result
        import traceback

        rec.add(part="latency", method="diffusers", plan=plan, gpus=world, error=repr(exc)[:400],
                where=traceback.format_exc(limit=-3)[-800:])


def _xdit_degrees(world: int, heads: int) -> tuple[int, int]:
    """xDiT's sequence parallelism for ``world`` GPUs: the largest Ulysses degree dividing both the GPU count
    and the head count, ring over the rest (its USP)."""
    ulysses = max(d for d in range(1, world + 1) if world % d == 0 and heads % d == 0)
    return ulysses, world // ulysses


def run_xdit(args, stages, model_dir: str, device: torch.device, rec: Recorder, world: int, rank: int,
             local_rank: int, ours_video: torch.Tensor | None) -> None:
    """xDiT (``xfuser``) as its runner drives Wan2.1 T2V (``runner_models/wan.py``): diffusers' ``WanPipeline``
    with xDiT's ``xFuserWanTransformer3DWrapper`` (USP attention) holding the same weights, after
    ``initialize_runtime_state``. Its best setting on ``world`` GPUs: Ulysses x ring over all of them (xDiT has
    no CFG parallel for Wan T2V; its parallel VAE, a runner feature, is not enabled here), the faster of its
    backends that run here. Not installed: one row saying so, with the import error."""
    try:
        import importlib.metadata

        import xfuser  # noqa: F401

        version = importlib.metadata.version("xfuser")
    except Exception as exc:  # noqa: BLE001 - "not installed" is a result
        rec.add(part="latency", method="xDiT", gpus=world, status="not installed",
                note=f"xfuser does not import here: {exc!r}"[:400])
        return
    spec = args.spec
    heads = int(stages.transformer.config.num_attention_heads)
    ulysses, ring = _xdit_degrees(world, heads)
    plan = f"xfuser {version}: WanPipeline + xFuserWanTransformer3DWrapper, Ulysses {ulysses} x ring {ring}"
    stage = "setup"
    try:
        import inspect

        from diffusers import WanPipeline
        from xfuser import xFuserArgs
        from xfuser.core.distributed import init_distributed_environment, initialize_runtime_state
        from xfuser.model_executor.models.runner_models.wan import _build_attention_kwargs
        from xfuser.model_executor.models.transformers.transformer_wan import xFuserWanTransformer3DWrapper

        init_distributed_environment(world_size=world, rank=rank, local_rank=local_rank)

        def engine(backend: str):
            xargs = xFuserArgs(model=model_dir, ulysses_degree=ulysses, ring_degree=ring, attention_backend=backend,
                               height=spec.height, width=spec.width, num_frames=spec.num_frames,
                               num_inference_steps=spec.num_inference_steps, guidance_scale=spec.guidance_scale,
                               prompt=PROMPT, negative_prompt=NEGATIVE)
            return xargs, xargs.create_config()[0]

        xargs, config = engine(XDIT_GPU_BACKENDS[0])
        names = inspect.signature(xFuserWanTransformer3DWrapper.__init__).parameters
        kwargs = {k: v for k, v in stages.transformer.config.items() if k in names and k != "attention_kwargs"}
        with torch.device(device):
            transformer = xFuserWanTransformer3DWrapper(**kwargs, attention_kwargs=_build_attention_kwargs(xargs))
        transformer.load_state_dict(stages.transformer.state_dict())
        transformer.to(device=device, dtype=stages.transformer.dtype).eval().requires_grad_(False)
        pipe = WanPipeline(tokenizer=stages.tokenizer, text_encoder=stages.text_encoder, transformer=transformer,
                           vae=stages.vae, scheduler=stages.new_scheduler())
        pipe.set_progress_bar_config(disable=True)
        inputs = _step_inputs(stages, spec, device, transformer.dtype)
        best, best_s = None, float("inf")
        for backend in XDIT_GPU_BACKENDS:
            stage = f"step, {backend}"
            try:
                initialize_runtime_state(pipe, engine(backend)[1])
                with torch.no_grad():
                    seconds = _time_forward(transformer, inputs, device, args.reps, world)
                rec.add(part="step", method=f"xDiT: transformer forward, Ulysses {ulysses} x ring {ring}",
                        gpus=world, backend=backend, seconds=seconds, reps=args.reps)
                if seconds < best_s:
                    best, best_s = backend, seconds
            except Exception as exc:  # noqa: BLE001
                rec.add(part="step", method=f"xDiT: transformer forward, Ulysses {ulysses} x ring {ring}",
                        gpus=world, backend=backend, error=repr(exc)[:400])
        if best is None:
            raise RuntimeError("no xDiT attention backend ran")
        stage = "latency"
        initialize_runtime_state(pipe, engine(best)[1])
        _pipeline_video(pipe, spec, 1)  # warm-up
        if world > 1:
            dist.barrier()
        video, seconds = _timed(lambda: _pipeline_video(pipe, spec, spec.num_inference_steps), device)
        rec.add(part="latency", method="xDiT", plan=plan, gpus=world, backend=best, seconds=seconds,
                max_diff_levels_vs_ours=_levels(video, ours_video))
    except Exception as exc:  # noqa: BLE001 - the peer's failure is a result
        import traceback

        rec.add(part="latency", method="xDiT", plan=plan, gpus=world, status=f"failed at {stage}",
                error=repr(exc)[:400], where=traceback.format_exc(limit=-3)[-800:])

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
    parser.add_argument("--peers", default="diffusers,xdit", help="peers timed after ours (latency part)")
    parser.add_argument("--tiny", action="store_true", help="the demo model at 64 x 64 x 9, for a CPU smoke test")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.tiny:
        args.model, args.height, args.width, args.frames = "demo", 64, 64, 9
    args.bands = [int(b) for b in args.bands.split(",") if b]
    parts = set(args.parts.split(","))
    args.peers = set(args.peers.split(","))

    from spmd_diff.models.random_wan import make_stages
    from spmd_diff.models.shapes import VideoSpec
    from spmd_diff.runtime.startup import resolve_model

    on_gpu = torch.cuda.is_available()
    world, rank, local_rank = start_processes(on_gpu)
    device = torch.device("cuda", local_rank) if on_gpu else torch.device("cpu")
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
        backend = part_step(args, stages, device, rec, world) if "step" in parts else "native"
        if "latency" in parts:
            video = run_ours(args, stages, device, rec, world, rank, backend)
            if "diffusers" in args.peers:
                run_diffusers(args, stages, device, rec, world, backend, video)
            if "xdit" in args.peers:
                run_xdit(args, stages, model_dir, device, rec, world, rank, local_rank, video)
    finally:
        if rank == 0:
            write_report(args, rec, out, world, device)
        dist.destroy_process_group()
    return 0


def start_processes(on_gpu: bool) -> tuple[int, int, int]:
    """Start torch.distributed (NCCL on GPUs, else gloo) however the script was launched: torchrun (its
    environment), mpirun / srun (over MPI, :func:`~spmd_diff.parallel.torch_comm.init_from_mpi`) or alone (a
    world of one, which xDiT needs too). Returns ``(world, rank, local_rank)``; binds this process's GPU."""
    import socket

    backend = "nccl" if on_gpu else "gloo"
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if on_gpu:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend)
    elif any(name in os.environ for name in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK")):  # mpirun, srun
        from mpi4py import MPI

        from spmd_diff.parallel.torch_comm import init_from_mpi

        local_rank = MPI.COMM_WORLD.Split_type(MPI.COMM_TYPE_SHARED).Get_rank()
        init_from_mpi(MPI.COMM_WORLD, torch.device("cuda", local_rank) if on_gpu else None, backend)
    else:
        local_rank = 0
        if on_gpu:
            torch.cuda.set_device(0)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    return dist.get_world_size(), dist.get_rank(), local_rank


def write_report(args, rec: Recorder, out: Path, world: int, device: torch.device) -> None:
    import diffusers

    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "hardware": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
            "gpus": world, "torch": torch.__version__, "diffusers": diffusers.__version__, "commit": bench_common.commit(),
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
        notes = "; ".join(f"{k}={row[k]}" for k in ("plan", "backend", "max_diff_levels",
                                                       "max_diff_levels_vs_ours", "status", "note", "error")
                          if k in row)
        lines.append(f"| {row['part']} | {row['method']} | {row.get('bands', row.get('gpus', ''))} | {seconds} | "
                     f"{peak} | {notes} |")
    (out / "latency.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
