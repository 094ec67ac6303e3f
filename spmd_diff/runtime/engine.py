"""The engine: validate everywhere, plan roles, wire channels, run the role loops, publish the results.

Order on every rank: (1) world; (2) job, prompts, model shapes, role plan, OUT — errors gathered so every rank
exits with the same message; (3) one heap for every channel and the progress board, allocated once; (4) this
rank's role loop; (5) rank 0 merges event logs and rebuilds OUT/videos.h5; every rank exits with the same code.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import socket
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

import spmd_diff
from spmd_diff.comm.channel import ChannelReceiver, ChannelSender, HeapLayout, RingSpec
from spmd_diff.comm.collectives import GroupCollectives
from spmd_diff.comm.select import make_transport
from spmd_diff.comm.transport import round_up
from spmd_diff.comm.world import World, init_world, set_threads
from spmd_diff.config import JobConfig, load_job
from spmd_diff.errors import StageTimeout, StoreFull, UserError
from spmd_diff.io.inputs import Item, load_prompts, shard_items
from spmd_diff.io.store import VideoStore, item_key
from spmd_diff.models.random_wan import make_stages
from spmd_diff.models.speed import StageOptions
from spmd_diff.models.wan import VideoSpec, WanShapes, read_shapes
from spmd_diff.observe.events import EventLog, merge_event_logs
from spmd_diff.plan.cost import DitDims, ItemCost, predict_item_cost, wait_deadline_s
from spmd_diff.parallel.group_denoise import SPDenoiser
from spmd_diff.plan.roles import RolePlan, plan_roles
from spmd_diff.plan.topology import Topology
from spmd_diff.runtime import loops
from spmd_diff.runtime.board import ProgressBoard
from spmd_diff.runtime.faults import LauncherWatchdog, OutLock, TestHooks
from spmd_diff.runtime.signals import EXIT_INTERRUPTED, StopFlag

log = logging.getLogger("spmd_diff")


@dataclass(frozen=True)
class RunRequest:
    """What the command line asked for."""

    job_path: str
    prompts_path: str
    out_dir: str
    overrides: tuple[str, ...] = ()
    model: str | None = None
    shard: tuple[int, int] | None = None
    force: bool = False
    retry_failed: bool = False


@dataclass(frozen=True)
class Setup:
    """Everything decided before the first channel exists; identical on every rank."""

    job: JobConfig
    model_dir: str
    items: tuple[Item, ...]
    shapes: WanShapes
    spec: VideoSpec
    plan: RolePlan
    dtype: str
    topology: Topology | None = None
    """What the plan was made for: the world's topology, or the virtual one of ``world.ranks_per_node``."""


def prebuild_model(path: str, world: World) -> None:
    """Local rank 0 of each node resolves first (building a missing demo or ``random:`` directory).

    No collective inside: the caller's ``run_checked`` (an allgather) is the barrier, so a failed build on one
    node reaches every rank as the same error instead of leaving its node-mates in a barrier.
    """
    if world.local_rank == 0:
        resolve_model(path)


def resolve_model(path: str) -> str:
    """"demo" -> the demo model in the cache; "random:<arch>" -> its config-only directory (each built there if
    missing); else a local directory."""
    if path == "demo":
        from spmd_diff.models.demo import demo_model_dir

        return str(demo_model_dir())
    if path.startswith("random:"):
        from spmd_diff.models.random_wan import random_model_dir

        return str(random_model_dir(path))
    if not Path(path).is_dir():
        raise UserError(f"model directory {path} does not exist (model.path in the job, or --model)")
    return str(Path(path).resolve())


def _dtype_name(job: JobConfig, device: str) -> str:
    if job.model.dtype != "auto":
        return job.model.dtype
    return "bfloat16" if device.startswith("cuda") else "float32"


def prepare(request: RunRequest, world: World) -> Setup:
    """Step (2): raises UserError; called on every rank under ``world.run_checked``."""
    overrides = list(request.overrides)
    if request.model:
        overrides.append(f"model.path={request.model!r}")
    job = load_job(request.job_path, overrides)
    items = load_prompts(request.prompts_path, job.run.seed)
    items = shard_items(items, request.shard)
    if world.size > 1 and world.topology.num_ranks != world.size:  # pragma: no cover - invariant
        raise AssertionError("topology and world disagree")
    topology = world.topology
    if job.world.ranks_per_node and job.world.ranks_per_node != len(topology.ranks_on_node(0)):
        topology = topology.regrouped(job.world.ranks_per_node)
    plan = plan_roles(topology, job.roles.encoders, job.roles.decoders, job.dit.sp_degree, job.dit.sp_layout)
    v = job.video
    spec = VideoSpec(v.height, v.width, v.num_frames, v.num_inference_steps, v.guidance_scale,
                     v.max_sequence_length)
    return Setup(job, "", tuple(items), None, spec, plan, _dtype_name(job, world.device),  # type: ignore[arg-type]
                 topology)


def _ring_specs(setup: Setup) -> tuple[RingSpec, RingSpec]:
    """Slot sizes from the model's shapes: text embeddings (x2 with CFG) and final latents (float32)."""
    s = setup.shapes
    itemsize = torch.tensor([], dtype=getattr(torch, setup.dtype)).element_size()
    num_embeds = 2 if setup.spec.guidance_scale > 1.0 else 1
    embeds = num_embeds * round_up(s.text_seq_len * s.text_dim * itemsize, 64)
    latents = round_up(s.latent_channels * s.latent_frames * s.latent_height * s.latent_width * 4, 64)
    slots = setup.job.run.ring_slots
    return RingSpec(slots, embeds), RingSpec(slots, latents)


def channel_edges(plan: RolePlan, enc_spec: RingSpec, dec_spec: RingSpec) -> list[tuple]:
    """Encoder -> each DiT group leader, each DiT group leader -> decoder."""
    leaders = [group[0] for group in plan.dit_groups]
    edges = [(e, d, enc_spec, f"enc{e}->dit{d}") for e in plan.encoders for d in leaders]
    edges += [(d, x, dec_spec, f"dit{d}->dec{x}") for d in leaders for x in plan.decoders]
    return edges


def item_attrs(setup: Setup):
    job, spec = setup.job, setup.spec

    def attrs(item: Item) -> dict:
        negative = item.negative_prompt if item.negative_prompt is not None else job.video.negative_prompt
        return {"prompt": item.prompt, "negative_prompt": negative, "seed": item.seed,
                "num_inference_steps": spec.num_inference_steps, "guidance_scale": spec.guidance_scale,
                "model": job.model.path, "height": spec.height, "width": spec.width, "num_frames": spec.num_frames,
                "tier": job.speed.tier, "speed": json.dumps(job.speed.resolved(), sort_keys=True)}

    return attrs


def _stages_for(role: str, plan: RolePlan, rank: int) -> set[str]:
    """The model components a role loads: an encoder never holds the DiT, a decoder only the VAE."""
    if role == "encoder":
        return {"encode"}
    if role == "decoder":
        return {"decode"}
    if role == "all":
        return {"encode", "denoise", "decode"}
    stages = {"denoise"}
    leader = rank in {group[0] for group in plan.dit_groups}
    if plan.encode_on_dit and leader:
        stages.add("encode")
    if plan.decode_on_dit and leader:
        stages.add("decode")
    return stages


def run(request: RunRequest, stop: StopFlag | None = None) -> int:
    """Run the job on this rank; returns the process exit code (the same on every rank).

    ``stop``: a stop flag already installed (the CLI installs it before importing anything heavy).
    """
    stop = stop if stop is not None else StopFlag().install()
    world = init_world()
    watchdog = LauncherWatchdog().start()
    started = time.time()
    setup = world.run_checked(lambda: prepare(request, world))
    world.run_checked(lambda: prebuild_model(setup.job.model.path, world))
    model_dir = world.run_checked(lambda: resolve_model(setup.job.model.path))
    shapes = world.run_checked(lambda: read_shapes(model_dir, setup.spec))
    setup = dataclasses.replace(setup, model_dir=model_dir, shapes=shapes)
    set_threads(world.local_size, setup.job.run.threads)
    store = VideoStore(request.out_dir)
    lock = OutLock(request.out_dir, request.shard)

    def prepare_out():
        store.check_writable()
        if world.rank == 0:
            store.check_job(setup.job.fingerprint(), force=request.force)
            lock.acquire()
            store.prepare(setup.job.fingerprint(), force=request.force)
            done = store.done_keys()
            failed = set() if request.retry_failed else set(store.failures())
            return [it.index for it in setup.items if item_key(it.id) not in done and it.id not in failed]
        return None

    pending_indices = world.comm.bcast(world.run_checked(prepare_out), root=0)
    items_by_index = {item.index: item for item in setup.items}
    pending = [items_by_index[i] for i in pending_indices]
    deadline_s = wait_deadline_s(_item_cost(setup, world.device), setup.job.run.timeout_s)
    shard_tag = f"shard-{request.shard[0]}-of-{request.shard[1]}" if request.shard else ""
    events = EventLog(request.out_dir, world.rank, enabled=setup.job.run.events, tag=shard_tag)
    _announce(world, setup, events, pending, request.out_dir, deadline_s)

    try:
        role_result = _run_rank(world, setup, store, events, stop, items_by_index, pending, deadline_s)
    finally:
        stop.uninstall()
    if isinstance(role_result, BaseException):
        # A rank that timed out, lost its disk or hit a bad component cannot trust the others to reach a
        # collective: it reports and aborts the whole job (every rank exits within seconds, non-zero).
        print(f"spmd-diff: error (rank {world.rank}): {role_result}", file=sys.stderr, flush=True)
        events.emit("job_end", status="failed", error=str(role_result))
        events.close()
        world.comm.Abort(getattr(role_result, "exit_code", 1))
    transport, monitor = role_result

    interrupted = world.comm.allreduce(1 if stop.requested else 0) > 0
    if world.rank != 0:
        events.close()
    world.comm.Barrier()
    if monitor is not None:
        monitor.stop()
    if transport is not None:
        transport.free()
    watchdog.stop()
    code = 0
    if world.rank == 0:
        try:
            code = _publish(setup, store, events, pending, interrupted, started, request.out_dir)
        except Exception as exc:  # noqa: BLE001 - every rank waits in the bcast below: always reach it
            full = isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
            code = StoreFull.exit_code if full else 1
            print(f"spmd-diff: error: the items are written, but publishing {store.view_path} failed: {exc}. "
                  f"Run `spmd-diff merge {request.out_dir}` once the problem is fixed.", file=sys.stderr, flush=True)
        lock.release()
    return world.comm.bcast(code, root=0)


def _item_cost(setup: Setup, device: str) -> ItemCost:
    s = setup.shapes

    def config(component: str) -> dict:
        path = Path(setup.model_dir) / component / "config.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    dit, text, vae = config("transformer"), config("text_encoder"), config("vae")
    dim = s.num_attention_heads * s.attention_head_dim
    d_model = text.get("d_model", 4096)
    text_params = text.get("num_layers", 24) * (4 * d_model * d_model + 3 * d_model * text.get("d_ff", 10240))
    dims = DitDims(dit.get("num_layers", 30), dim, dit.get("ffn_dim", 4 * dim), s.text_seq_len, text_params,
                   vae.get("base_dim", 96))
    spec = setup.spec
    return predict_item_cost(s.num_video_tokens, dims, spec.num_inference_steps, spec.guidance_scale > 1.0,
                             spec.num_frames * spec.height * spec.width, device, setup.plan.sp_degree)


def _announce(world: World, setup: Setup, events: EventLog, pending: list[Item], out_dir: str,
              deadline_s: float) -> None:
    hosts = world.comm.gather(socket.gethostname(), root=0)
    plan = setup.plan
    if world.rank == 0:
        events.emit("job_start", version=spmd_diff.__version__, config=setup.job.to_dict(), world_size=world.size,
                    plan=plan.to_dict(), hosts=hosts, num_items=len(setup.items), num_pending=len(pending),
                    model_dir=setup.model_dir, torch=torch.__version__, argv=sys.argv, deadline_s=deadline_s)
        print(plan.describe(setup.topology), file=sys.stderr)
        print(f"spmd-diff: {len(setup.items)} item(s), {len(setup.items) - len(pending)} already in "
              f"{out_dir}, {len(pending)} to render; waits time out after {deadline_s:.0f} s", file=sys.stderr)
    events.emit("rank_start", role=plan.role_of(world.rank), host=socket.gethostname())


def _run_rank(world: World, setup: Setup, store: VideoStore, events: EventLog, stop: StopFlag,
              items_by_index: dict[int, Item], pending: list[Item], deadline_s: float):
    """Load this role's components, wire the channels, run the role loop.

    Returns (transport, monitor) on success, or the exception that must abort the job.
    """
    plan = setup.plan
    role = plan.role_of(world.rank)
    transport, monitor = None, None
    try:
        speed = setup.job.speed
        fast = speed.tier == "fast"
        on_gpu = str(world.device).startswith("cuda")
        compile_fast = fast and speed.fast_compile_dit and on_gpu  # every SP degree; dit.compile: S > 1 only
        options = StageOptions(vae_dtype=torch.bfloat16 if fast and speed.fast_vae_bf16 else torch.float32,
                               compile_blocks=compile_fast and plan.sp_degree == 1,  # SP groups compile their own
                               attention_backend=speed.fast_attention if fast else None)
        stages = make_stages(setup.model_dir, _stages_for(role, plan, world.rank), device=world.device,
                             dtype=getattr(torch, setup.dtype), options=options)
        if on_gpu:  # rank_end's peak is the rendering peak (weights included), not that of building them
            torch.cuda.reset_peak_memory_stats(world.device)
        board_bytes = ProgressBoard.bytes_needed(world.size)
        coll_bytes = round_up(setup.job.dit.collective_mib << 20, 256) if plan.sp_degree > 1 else 0
        senders: list[ChannelSender] = []
        receivers: list[ChannelReceiver] = []
        coll = None
        if world.size > 1:
            enc_spec, dec_spec = _ring_specs(setup)
            channels_base = round_up(board_bytes, 256) + coll_bytes
            layout = HeapLayout(world.size, channel_edges(plan, enc_spec, dec_spec), base_offset=channels_base)
            transport = make_transport(world, max(layout.heap_bytes, channels_base), setup.job.world.transport)
            senders = [ChannelSender(transport, e) for e in layout.outbound(world.rank)]
            receivers = [ChannelReceiver(transport, e) for e in layout.inbound(world.rank)]
            if coll_bytes:
                coll = GroupCollectives(transport, round_up(board_bytes, 256), coll_bytes, max_ranks=plan.sp_degree,
                                        timeout_s=deadline_s)
        board = ProgressBoard(transport, world.rank, world.size)
        ctx = loops.RankContext(world.rank, items_by_index, stages, setup.spec, setup.job.video.negative_prompt,
                                store, events, stop, deadline_s, item_attrs(setup), board.publish,
                                hooks=TestHooks.from_env(world.rank) or None, overlap_decode=speed.overlap_decode,
                                write_queue=speed.write_queue, warmup=speed.warmup)
        if coll is not None and role == "dit":
            ctx.group = coll.group(plan.dit_groups[plan.group_of(world.rank)])
            # The device comes from the collectives' transport (host memory on MPI RMA, GPU on NVSHMEM).
            ctx.sp = SPDenoiser.from_group(stages, ctx.group, coll.group, plan.sp_layout, plan.torus_shape,
                                           compile_blocks=on_gpu and (setup.job.dit.compile or compile_fast))
        if world.rank == 0:
            monitor = board.start_monitor(len(pending), plan, setup.job.run.progress_interval_s)
        _run_role(ctx, role, plan, pending, senders, receivers)
        board.publish(ctx.num_done, ctx.num_failed, ctx.busy_s, force=True)
        peak = {"peak_gpu_bytes": torch.cuda.max_memory_allocated(world.device)} if on_gpu else {}
        events.emit("rank_end", role=role, items=ctx.num_done, failed=ctx.num_failed, busy_s=ctx.busy_s, **peak)
        stages.free()
        return transport, monitor
    except Exception as exc:  # noqa: BLE001 - any failure here must abort the job, never strand the other ranks
        if not isinstance(exc, (StageTimeout, StoreFull, UserError)):
            traceback.print_exc()
        return exc


def _publish(setup: Setup, store: VideoStore, events: EventLog, pending: list[Item], interrupted: bool,
             started: float, out_dir: str) -> int:
    """Rank 0, after every rank finished: rebuild the view, close the event log, say what happened."""
    store.build_view([item.id for item in setup.items])
    failures = store.failures()
    remaining = [it for it in pending if not store.is_done(it.id)]
    not_rendered = [it for it in remaining if it.id not in failures]
    num_failed = len(failures)
    status = "interrupted" if interrupted and not_rendered else "complete"
    events.emit("job_end", status=status, items_done=len(pending) - len(remaining), items_failed=num_failed,
                elapsed_s=time.time() - started)
    events.close()
    if setup.job.run.events:
        merge_event_logs(out_dir)
    print(f"spmd-diff: {status}: {len(pending) - len(remaining)} rendered, {num_failed} failed, "
          f"{len(not_rendered)} not rendered yet; videos in "
          f"{store.view_path}" + ("; rerun with --retry-failed to render the failed items again" if num_failed
                                  else ""), file=sys.stderr)
    return EXIT_INTERRUPTED if status == "interrupted" else 0


def _run_role(ctx: loops.RankContext, role: str, plan: RolePlan, pending: list[Item],
              senders: list[ChannelSender], receivers: list[ChannelReceiver]) -> None:
    if role == "all":
        loops.solo_loop(ctx, pending)
    elif role == "encoder":
        mine = [it for k, it in enumerate(pending) if k % len(plan.encoders) == plan.encoders.index(ctx.rank)]
        loops.encoder_loop(ctx, mine, senders)
    elif role == "decoder":
        loops.decoder_loop(ctx, receivers)
    elif ctx.group is not None and ctx.group.rank_in_group != 0:
        loops.dit_member_loop(ctx)
    else:
        group = plan.group_of(ctx.rank)
        mine = None
        if plan.encode_on_dit:
            mine = [it for k, it in enumerate(pending) if k % len(plan.dit_groups) == group]
        loops.dit_loop(ctx, mine, receivers, senders)
