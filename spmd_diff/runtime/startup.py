"""What every rank decides before anything heavy is imported: the job, the prompts, the role plan, the model
directory and the pending items, read-only on OUT.

torch, diffusers and the model stay unimported here, so a typo in the job or the prompts, roles that do not fit
or an OUT that cannot be written is reported on every rank within about a second, and a rerun with nothing left
to render loads no model at all. Errors are gathered (``World.run_checked``): every rank exits with the same
message, nothing is written.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import spmd_diff

from spmd_diff.comm.world import World, init_world
from spmd_diff.config import PER_ITEM_VIDEO_KEYS, JobConfig, load_job
from spmd_diff.errors import UserError
from spmd_diff.io.inputs import Item, load_prompts, shard_items
from spmd_diff.io import jobrecord
from spmd_diff.io.identity import model_fingerprint
from spmd_diff.io.images import image_sha256
from spmd_diff.io.runplan import plan_run
from spmd_diff.io.store import VideoStore, describe_corrupt, warn
from spmd_diff.io.view import build_view
from spmd_diff.models.tasks import check_items_fit_task, model_task
from spmd_diff.plan.for_job import job_planning, read_image_encoder_config, read_model_configs, static_plan
from spmd_diff.plan.roles import RolePlan
from spmd_diff.plan.topology import Topology
from spmd_diff.plan.workload import WorkClass
from spmd_diff.runtime.faults import TestHooks
from spmd_diff.runtime.rebalance import AutoPolicy


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
    testing_aids: tuple[tuple[str, str], ...] = ()
    """The testing aids' environment variables (``runtime.faults.TESTING_ENV``) the CLI found set, as
    ``(name, value)``: the one place they are read; the engine's ``job_start`` record lists them."""


@dataclass(frozen=True)
class JobInputs:
    """The job as every rank sees it before any model is touched; identical on every rank."""

    job: JobConfig
    items: tuple[Item, ...]
    plan: RolePlan
    topology: Topology
    """What the plan was made for: the world's topology, or the virtual one of ``world.ranks_per_node``."""
    model_dir: str
    pending: tuple[Item, ...]
    """Items of ``items`` not yet in OUT (nor recorded as failed, unless ``--retry-failed``), as read before the
    run took OUT's lock; rank 0 reads them again under the lock before the first item starts."""


@dataclass(frozen=True)
class Started:
    """A world with its inputs validated: what :func:`spmd_diff.runtime.engine.run` starts from."""

    world: World
    inputs: JobInputs
    started_at: float


def read_job(request: RunRequest, world: World) -> tuple[JobConfig, tuple[Item, ...], RolePlan | None, Topology]:
    """Job, prompts (this shard's), role plan of a static policy (None for "auto": it needs the model's sizes):
    pure checks, raise UserError."""
    overrides = list(request.overrides)
    if request.model:
        overrides.append(f"model.path={request.model!r}")
    job = load_job(request.job_path, overrides)
    if job.world.force_cpu:
        world.use_cpu_only()
    items = shard_items(load_prompts(request.prompts_path, job.run.seed), request.shard)
    topology = world.topology
    if job.world.ranks_per_node and job.world.ranks_per_node != len(topology.ranks_on_node(0)):
        topology = topology.regrouped(job.world.ranks_per_node)
    plan = None
    if job.roles.policy == "static":
        plan = static_plan(job, topology)
    # a malformed testing aid (SPMD_DIFF_INJECT_DELAY) is a bad job too
    TestHooks.from_env(world.rank, dict(request.testing_aids))
    return job, tuple(items), plan, topology


def resolve_model(path: str) -> str:
    """"demo" ("demo-i2v") -> the text-to-video (image-to-video) demo model in the cache; "random:<arch>" -> its
    config-only directory (each built there if missing); else a local directory."""
    if path in ("demo", "demo-i2v"):
        from spmd_diff.models.demo import demo_model_dir

        return str(demo_model_dir(task="i2v" if path == "demo-i2v" else "t2v"))
    if path.startswith("random:"):
        from spmd_diff.models.random_wan import random_model_dir

        return str(random_model_dir(path))
    if not Path(path).is_dir():
        raise UserError(f"model directory {path} does not exist (model.path in the job, or --model)")
    return str(Path(path).resolve())


def dtype_name(job: JobConfig, on_gpu: bool) -> str:
    """The transformer's and text encoder's dtype: ``model.dtype``, or for "auto" bfloat16 on a GPU, else float32."""
    if job.model.dtype != "auto":
        return job.model.dtype
    return "bfloat16" if on_gpu else "float32"


def item_attrs(job: JobConfig, model_dir: str, dtype: str, sp_degree: int, on_gpu: bool) -> Callable[[Item], dict]:
    """item -> the attributes of its video. All but ``model`` (the path), ``spmd_diff_version`` and the ones the
    store adds are the item's content identity (:mod:`spmd_diff.io.identity`): a finished file of other
    attributes is changed work, not finished work. The model is identified by its fingerprint (configs, weight
    names, sizes and samples), computed once per process; the speed tier and its options change pixels too, and
    the output form (``output.*``) what is stored and, for h264/hevc, the pixels read back. The video settings
    are the item's own (``VideoConfig.for_item``): an item whose settings change is a changed item."""
    fingerprint = model_fingerprint(model_dir) if model_dir else ""
    # compiled blocks change bf16 rounding (per-item degrees: every item runs compiled, degree 1 included); blocks
    # compile on GPUs only
    compiled = bool(on_gpu and job.dit.compile and (sp_degree > 1 or job.dit.per_item_degree))
    speed = json.dumps(job.speed.resolved(), sort_keys=True)
    output = job.output.attrs()  # how the video is stored: part of its identity (OutputConfig says why)

    def attrs(item: Item) -> dict:
        v = job.video.for_item(item)
        negative = item.negative_prompt if item.negative_prompt is not None else v.negative_prompt
        image = {} if item.image is None else {"image": item.image, "image_sha256": image_sha256(item.image)}
        return {**image, "id": item.id, "prompt": item.prompt, "negative_prompt": negative, "seed": item.seed,
                "num_inference_steps": v.num_inference_steps, "guidance_scale": v.guidance_scale,
                "model": job.model.path, "height": v.height, "width": v.width, "num_frames": v.num_frames,
                "max_sequence_length": v.max_sequence_length, "dtype": dtype, "model_fingerprint": fingerprint,
                "dit_compile": compiled, "tier": job.speed.tier, "speed": speed, **output,
                "spmd_diff_version": spmd_diff.__version__}

    return attrs


def job_settings(job: JobConfig, attrs_of: Callable[[Item], dict], items) -> dict | None:
    """The settings a run records in (and checks against) OUT/job.json: the job's own, ``[video]``'s defaults
    included, never one item's (an item's own settings are part of its identity, checked item by item); None
    for no items."""
    items = list(items)
    if not items:
        return None
    defaults = {name: getattr(job.video, name) for name in PER_ITEM_VIDEO_KEYS}
    return jobrecord.job_settings({**attrs_of(items[0]), **defaults}, job.video.negative_prompt)


def pending_items(store: VideoStore, job: JobConfig, items: tuple[Item, ...], attrs_of: Callable[[Item], dict],
                  force: bool, retry_failed: bool) -> tuple[Item, ...]:
    """Rank 0, read-only: refuse an OUT of another job or of changed items (unless ``force``), then the items
    left to render (the engine decides again, under OUT's lock, and then moves corrupt files aside)."""
    store.check_can_write()
    if not store.root.is_dir():
        return items
    expected = {item.id: attrs_of(item) for item in items}
    settings = job_settings(job, attrs_of, items)
    plan = plan_run(store, expected, settings, force=force, retry_failed=retry_failed, model_path=job.model.path,
                    job=job.to_dict())
    pending = set(plan.pending)
    return tuple(item for item in items if item.id in pending)


def start(request: RunRequest) -> Started:
    """Start MPI (no torch), validate everything that needs no model, find the pending items. Collective."""
    started_at = time.time()
    world = init_world(bind=False)
    job, items, plan, topology = world.run_checked(lambda: read_job(request, world))
    # Node-local rank 0 first: it builds a missing demo or random: directory once per node (errors gathered).
    world.run_checked(lambda: resolve_model(job.model.path) if world.local_rank == 0 else None)
    model_dir = world.run_checked(lambda: resolve_model(job.model.path))
    world.run_checked(lambda: check_items_fit_task(model_task(model_dir), items, job.model.path))
    if plan is None:  # policy "auto": the planner's first plan (the engine re-plans for the pending items)
        plan = world.run_checked(lambda: auto_policy(job, topology, model_dir, items).plan)
    store = VideoStore(request.out_dir)

    def look_at_out():
        if world.rank == 0:
            on_gpu = topology.gpus_per_node > 0
            attrs_of = item_attrs(job, model_dir, dtype_name(job, on_gpu), plan.sp_degree, on_gpu)
            return [it.index for it in pending_items(store, job, items, attrs_of, request.force,
                                                     request.retry_failed)]
        return None

    pending_indices = world.comm.bcast(world.run_checked(look_at_out), root=0)
    by_index = {item.index: item for item in items}
    pending = tuple(by_index[i] for i in pending_indices)
    return Started(world, JobInputs(job, items, plan, topology, model_dir, pending), started_at)


def auto_policy(job: JobConfig, topology: Topology, model_dir: str, items) -> AutoPolicy:
    """The "auto" role policy for this job's ``items``: the planner over the model's sizes (its configs, no
    weights) and the plan shapes the role loops run. A job whose items give settings of their own is planned for
    its heaviest item (most DiT work: tokens x steps x CFG branches), so every stage fits its memory."""
    items = list(items)
    if job.dit.sp_degree > topology.num_ranks:
        raise UserError(f"dit.sp_degree={job.dit.sp_degree} needs at least {job.dit.sp_degree} ranks; the job has "
                        f"{topology.num_ranks}")
    planning = job_planning(planning_job(job, items), topology, read_model_configs(model_dir),
                            on_gpu=topology.gpus_per_node > 0, separate_aux=True,
                            image_encoder=read_image_encoder_config(model_dir))
    return AutoPolicy(planning, len(items), job.roles.batch_s)


def planning_job(job: JobConfig, items) -> JobConfig:
    """``job`` with the ``[video]`` settings of its heaviest item (``job`` itself when no item has its own)."""
    def work(video) -> tuple:
        return (WorkClass.of_video(video).num_tokens * video.num_inference_steps
                * (2 if video.guidance_scale > 1.0 else 1), video.num_frames * video.height * video.width)

    heaviest = max((job.video.for_item(item) for item in items), key=work, default=job.video)
    return job if work(heaviest) <= work(job.video) else dataclasses.replace(job, video=heaviest)


def finish_without_work(started: Started, request: RunRequest) -> int:
    """Nothing left to render: no model is loaded. Rank 0 republishes the view of an existing store and records
    the run in the event log (so the report shows it had nothing to do). Collective; returns the exit code."""
    world, inputs = started.world, started.inputs
    code = 0
    if world.rank == 0:
        store = VideoStore(request.out_dir)
        if store.items_dir.is_dir():
            code = _republish(started, request, store)
        else:
            print(f"spmd-diff: nothing to render ({len(inputs.items)} item(s) in this shard, none pending); "
                  f"{request.out_dir} was not created", file=sys.stderr)
    return world.comm.bcast(code, root=0)


def _republish(started: Started, request: RunRequest, store: VideoStore) -> int:
    from spmd_diff.observe.events import EventLog, merge_event_logs
    from spmd_diff.runtime.faults import OutLock

    inputs = started.inputs
    lock = OutLock(request.out_dir, request.shard)
    try:
        lock.acquire()
    except UserError as exc:
        print(f"spmd-diff: error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    try:
        shard_tag = f"shard-{request.shard[0]}-of-{request.shard[1]}" if request.shard else ""
        events = EventLog(request.out_dir, 0, enabled=inputs.job.run.events, tag=shard_tag)
        events.emit("job_start", config=inputs.job.to_dict(), world_size=started.world.size,
                    plan=inputs.plan.to_dict(), num_items=len(inputs.items), num_pending=0,
                    model_dir=inputs.model_dir, argv=sys.argv)
        on_gpu = inputs.topology.gpus_per_node > 0
        attrs_of = item_attrs(inputs.job, inputs.model_dir, dtype_name(inputs.job, on_gpu), inputs.plan.sp_degree,
                              on_gpu)
        print(f"spmd-diff: {len(inputs.items)} item(s), {len(inputs.items)} already in {request.out_dir} or "
              "failed, 0 to render", file=sys.stderr)
        view = build_view(store, {item.id: attrs_of(item) for item in inputs.items})
        for line in describe_corrupt(view.corrupt, "rerun to render it again"):
            warn(line)
        events.emit("job_end", status="nothing to do", items_done=0, items_failed=len(store.failures()),
                    elapsed_s=time.time() - started.started_at)
        events.close()
        if inputs.job.run.events:
            merge_event_logs(request.out_dir)
    finally:
        lock.release()
    failed = [item.id for item in inputs.items if item.id in store.failures()]
    print(f"spmd-diff: complete: nothing to render (no model loaded): {len(inputs.items) - len(failed)} of "
          f"{len(inputs.items)} item(s) are in {store.view_path}"
          + (f"; {len(failed)} failed earlier: rerun with --retry-failed to render them again" if failed else ""),
          file=sys.stderr)
    return 0
