"""spmd-diff: the command line. Knows everything below it; nothing below knows it."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import warnings

from spmd_diff.errors import StageTimeout, UserError
from spmd_diff.runtime.faults import TESTING_ENV


ENV_OVERRIDES = {
    "SPMD_DIFF_P2P_KERNEL": "dataplane.p2p_kernel",
    "SPMD_DIFF_PUT_KERNEL": "dataplane.put_kernel",
    "SPMD_DIFF_A2A_BLOCKS": "dataplane.a2a_blocks",
    "SPMD_DIFF_FORCE_CPU": "world.force_cpu",
}
"""Environment variables the CLI turns into job overrides (``run`` and ``plan``), before the ``--set`` ones (which
win); the package below the CLI reads none of them. ``0``/``1`` set a true/false key."""


def env_overrides(env: dict[str, str] | None = None) -> list[str]:
    """``section.key=value`` overrides from the variables of ``ENV_OVERRIDES`` that are set (non-empty)."""
    env = os.environ if env is None else env
    overrides = []
    for name, key in ENV_OVERRIDES.items():
        value = env.get(name, "").strip()
        if not value:
            continue
        if key in ("dataplane.put_kernel", "world.force_cpu"):
            value = {"1": "true", "0": "false"}.get(value, value)
        else:
            value = repr(value)  # a TOML string
        overrides.append(f"{key}={value}")
    return overrides


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spmd-diff", description="Render videos in bulk with diffusion transformers, "
                                "as one SPMD program under mpirun or srun.")
    sub = p.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo-model", help="write the built-in tiny Wan2.1-architecture demo model")
    demo.add_argument("dir", help="output directory (a diffusers pipeline directory)")
    demo.add_argument("--task", choices=("t2v", "i2v"), default="t2v",
                      help="t2v: WanPipeline (text-to-video, default); i2v: WanImageToVideoPipeline (image-to-video)")

    run = sub.add_parser("run", help="render every pending item of a prompts file (launch under mpirun/srun)")
    run.add_argument("job", help="job file (TOML), e.g. jobs/demo.toml")
    run.add_argument("--prompts", required=True, help="JSONL (id, prompt, negative_prompt, seed) or one prompt per line")
    run.add_argument("--out", required=True, help="output directory; OUT/videos.h5 holds the videos")
    run.add_argument("--model", help="override model.path: a local diffusers directory, or 'demo'")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                     help="override a job setting (repeatable), e.g. --set video.num_inference_steps=30")
    run.add_argument("--shard", help="I/N: render only items whose index %% N == I (job arrays)")
    run.add_argument("--force", action="store_true",
                     help="re-render the items whose content (prompt, seed, settings, model) changed since OUT got "
                          "them (their old videos are deleted), and accept settings other than OUT's")
    run.add_argument("--retry-failed", action="store_true", help="render items recorded as failed again")

    plan = sub.add_parser("plan", help="print the role plan a job would get, without launching anything")
    plan.add_argument("job")
    plan.add_argument("--nodes", type=int, default=1)
    plan.add_argument("--gpus-per-node", type=int, default=0)
    plan.add_argument("--ranks-per-node", type=int, default=0, help="default: one rank per GPU")
    plan.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    plan.add_argument("--prompts", help="with dit.per_item_degree = true: also print the SP degree each item of "
                                        "this prompts file would run at (the engine's schedule)")

    merge = sub.add_parser("merge", help="rebuild OUT/videos.h5 over every finished item (e.g. after job arrays)")
    merge.add_argument("out")

    verify = sub.add_parser("verify", help="check every finished video against its checksum; move corrupt ones "
                            "aside (the next run renders them again) and rebuild OUT/videos.h5")
    verify.add_argument("out")
    verify.add_argument("--no-move", action="store_true", help="only report (works on a read-only OUT)")

    launch = sub.add_parser("launch", help="run a launcher line (mpirun/srun ...) so that Ctrl-C or SIGTERM stops "
                            "the job gracefully: items in flight finished, view published, exit 75",
                            usage="spmd-diff launch mpirun|srun [LAUNCHER OPTIONS] spmd-diff run JOB ...")
    launch.add_argument("launcher", nargs=argparse.REMAINDER, help="the whole launcher command line")

    report = sub.add_parser("report", help="write OUT/report.html and timeline PNGs from OUT/events.jsonl")
    report.add_argument("out")
    report.add_argument("--run", default="all", help="which runs recorded in OUT: 'all' (default: every run, in "
                        "order, on one time axis), 'latest', or a run number (0 = the first)")

    export = sub.add_parser("export", help="write playable files (mp4, gif, png frames)")
    export.add_argument("out", help="OUT/ or OUT/videos.h5")
    export.add_argument("dest", help="directory to write into")
    export.add_argument("--format", choices=("mp4", "gif", "png", "webdataset"), default="mp4",
                        help="mp4 (encoded videos copied as stored, raw ones encoded), gif, png frames, or "
                             "webdataset tar shards of <key>.mp4 + <key>.json with a manifest.json")
    export.add_argument("--shard-size", type=int, default=1000, help="webdataset: items per tar shard")
    export.add_argument("--ids", nargs="*", help="item ids (default: all)")
    export.add_argument("--fps", type=int, default=16, help="gif, and raw videos encoded to mp4 (encoded ones keep theirs)")

    inspect = sub.add_parser("inspect", help="list items, their settings, status and failures")
    inspect.add_argument("path", help="OUT/ or OUT/videos.h5")
    inspect.add_argument("--id", help="show every attribute of one item")
    inspect.add_argument("--all", action="store_true", help="list every item (default: the first 100)")
    return p


def _plan(args) -> int:
    import json
    from pathlib import Path

    from spmd_diff.config import load_job
    from spmd_diff.plan.for_job import job_planning, read_image_encoder_config, static_plan
    from spmd_diff.plan.memory import GIB
    from spmd_diff.plan.planner import PlanInputs, plan_auto, predict_plan
    from spmd_diff.plan.topology import Topology

    job = load_job(args.job, env_overrides() + args.overrides)
    per_node = args.ranks_per_node or args.gpus_per_node
    if per_node < 1:
        raise UserError("give --gpus-per-node G (one rank per GPU) or --ranks-per-node R")
    topology = Topology.uniform(args.nodes, per_node, args.gpus_per_node)
    if job.world.ranks_per_node:
        topology = topology.regrouped(job.world.ranks_per_node)

    # The model's sizes from its component configs (no weights are read).
    path = job.model.path
    if path.startswith("random:"):
        from spmd_diff.models.random_wan import ARCHITECTURES, architecture_name

        arch = ARCHITECTURES[architecture_name(path)]
        configs = (arch["transformer"], arch["text_encoder"], arch["vae"])
        image_encoder = arch.get("image_encoder")
    elif path in ("demo", "demo-i2v"):
        from spmd_diff.models import demo

        transformer = demo.I2V_TRANSFORMER_CONFIG if path == "demo-i2v" else demo.TRANSFORMER_CONFIG
        configs = (transformer, demo.TEXT_ENCODER_CONFIG, demo.VAE_CONFIG)
        image_encoder = demo.IMAGE_ENCODER_CONFIG if path == "demo-i2v" else None
    else:
        def read(component: str) -> dict:
            config = Path(path) / component / "config.json"
            return json.loads(config.read_text()) if config.is_file() else {}

        if not Path(path).is_dir():
            raise UserError(f"model directory {path} does not exist (model.path in the job)")
        configs = (read("transformer"), read("text_encoder"), read("vae"))
        image_encoder = read_image_encoder_config(path)
    planning = job_planning(job, topology, configs, on_gpu=bool(args.gpus_per_node), image_encoder=image_encoder)
    v, sizes, work_class, cost = job.video, planning.sizes, planning.work_class, planning.cost
    workload = planning.workload(100 * topology.num_ranks)  # steady state: many items per rank
    gpu_bytes, memory, settings = planning.inputs.gpu_bytes, planning.inputs.memory, planning.inputs.settings

    def make_plan(memory):
        if job.roles.policy == "auto":
            return plan_auto(PlanInputs(topology, memory, gpu_bytes, settings), workload, cost)
        return static_plan(job, topology)

    def heap_bytes(plan) -> tuple[int, int]:
        """Largest per-rank channel heap of the plan's channels (``RolePlan.channel_edges``), and its rank."""
        from spmd_diff.comm.heap_layout import HeapLayout, RingSpec

        shapes = (16, (v.num_frames - 1) // 4 + 1, v.height // 8, v.width // 8)
        latents = RingSpec(job.run.ring_slots, -(-shapes[0] * shapes[1] * shapes[2] * shapes[3] * 4 // 64) * 64)
        itemsize = sizes.text_dtype_bytes
        embeds = RingSpec(job.run.ring_slots, (2 if work_class.cfg else 1)
                          * (-(-v.max_sequence_length * 4096 * itemsize // 64) * 64))
        layout = HeapLayout(plan.num_ranks, plan.channel_edges(embeds, latents))
        rank = max(range(plan.num_ranks), key=lambda r: layout.rank_bytes[r])
        return layout.rank_bytes[rank], rank

    plan = make_plan(memory)
    heap, heap_rank = heap_bytes(plan)
    if job.world.transport == "nvshmem" and heap and job.roles.policy == "auto":
        plan = make_plan(memory.with_heap(heap))  # the heap lives on the GPU: plan around it
        heap, heap_rank = heap_bytes(plan)
    prediction = predict_plan(plan, workload, cost, inputs=PlanInputs(topology, memory, gpu_bytes, settings))
    print(topology.describe())
    print(sizes.describe())
    print(memory.describe([work_class], gpu_bytes, plan.sp_degree))
    print(plan.describe(topology))
    if plan.sp_degree > 1:  # what each DiT group runs (the engine attaches the same)
        from spmd_diff.plan.parallel_layout import resolve_parallel_layout

        heads = int(configs[0].get("num_attention_heads", 12))
        print(resolve_parallel_layout(plan, topology, job.dit.sp_layout, heads).describe())
    nodes = range(topology.num_nodes)
    for node in list(nodes)[:16]:
        roles = ", ".join(f"{r}:{plan.role_of(r)}" for r in topology.ranks_on_node(node))
        print(f"  {topology.hostname(node)}: {roles}")
    if topology.num_nodes > 16:
        print(f"  ... {topology.num_nodes - 16} more nodes")
    for rank in sorted({r for g in plan.dit_groups[:1] for r in g[:1]} | set(plan.encoders[:1] + plan.decoders[:1])):
        stages = plan.stages_of(rank)
        need = (memory.time_shared_bytes([work_class]) if plan.time_shared
                else memory.rank_bytes(stages, [work_class], plan.sp_degree))
        if need > gpu_bytes:
            print(f"  warning: rank {rank} holds {'+'.join(stages)}: {need / GIB:.1f} GiB, more than the "
                  f"{gpu_bytes / GIB:.1f} GiB a GPU offers (world.gpu_memory_gib)")
    if plan.time_shared:
        print(f"  time-shared ranks: {plan.num_ranks}, {plan.stage_batch} item(s) per cycle (roles.stage_batch); "
              f"GPU {memory.time_shared_bytes([work_class]) / GIB:.1f} GiB (the largest stage alone); host memory "
              f"{memory.time_shared_host_bytes([work_class], plan.stage_batch) / GIB:.1f} GiB per rank (every "
              f"component and the cycle's embeddings and latents)")
    seconds = ", ".join(f"{s} {cost.seconds(s, work_class, plan.sp_degree if s == 'denoise' else 1):.2f}"
                        for s in ("encode", "denoise", "decode", "write"))
    print(f"predicted: {prediction.videos_per_hour:,.0f} videos/h of {work_class.key} in steady state "
          f"(bottleneck: {prediction.bottleneck}; seconds per item from the analytic prior: {seconds})")
    where = "GPU memory (NVSHMEM)" if job.world.transport == "nvshmem" else "symmetric heap (GPU with NVSHMEM)"
    print(f"channel heap: up to {heap / 2**20:,.1f} MiB per rank (rank {heap_rank}, {plan.role_of(heap_rank)}) "
          f"in the {where}; a consumer serves at most {plan.fan_in()} producer(s)")
    if args.prompts:
        from spmd_diff.io.inputs import load_prompts
        from spmd_diff.runtime.item_groups import describe_item_groups, job_item_groups

        items = load_prompts(args.prompts, job.run.seed)
        if job.dit.per_item_degree:
            schedule = job_item_groups(job, items, plan.dit_ranks, topology, cost,
                                       int(configs[0].get("num_attention_heads", 12)))
            print(describe_item_groups(schedule, items, job, on_gpu=topology.gpus_per_node > 0))
        else:
            print(f"per-item SP degree: off (dit.per_item_degree); every item of {args.prompts} at degree "
                  f"{plan.sp_degree}")
    return 0


def _run(args) -> int:
    from spmd_diff.runtime.signals import StopFlag

    # Catch stop signals before the heavy imports: a SIGTERM during start-up still ends in exit 75 (requeue).
    stop = StopFlag().install()
    from spmd_diff.io.inputs import parse_shard
    from spmd_diff.runtime.startup import RunRequest, finish_without_work, start

    shard = parse_shard(args.shard) if args.shard else None
    request = RunRequest(args.job, args.prompts, args.out, tuple(env_overrides() + args.overrides), args.model,
                         shard, args.force, args.retry_failed,
                         tuple((name, os.environ[name]) for name in TESTING_ENV if os.environ.get(name)))
    started = start(request)  # no torch yet: bad input is reported within about a second
    if not started.inputs.pending:
        stop.uninstall()
        return finish_without_work(started, request)
    from spmd_diff.runtime.engine import run

    return run(started, request, stop)


def _out_dir(path: str, write: bool) -> str:
    """``path`` if it is an existing (and, with ``write``, writable) directory; UserError saying what it is not."""
    if not os.path.exists(path):
        raise UserError(f"{path} does not exist")
    if not os.path.isdir(path):
        raise UserError(f"{path} is a file, not an output directory")
    if write and not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"{path} is not writable (read-only); this command writes into it")
    return path


def _verify(args) -> int:
    from spmd_diff.io.store import describe_corrupt, open_store
    from spmd_diff.io.view import verify

    store = open_store(args.out, write=not args.no_move)
    last = [time.monotonic()]

    def progress(done: int, total: int) -> None:  # a line every 30 s: a big store takes hours to read
        if time.monotonic() - last[0] >= 30.0:
            last[0] = time.monotonic()
            print(f"spmd-diff: verify: {done}/{total} item files checked", file=sys.stderr, flush=True)

    report = verify(store, repair=not args.no_move, progress=progress)
    action = "left in place (--no-move)" if args.no_move else "rerun the job to render it again"
    for line in describe_corrupt(report.corrupt, action):
        print(f"spmd-diff: {line}", file=sys.stderr)
    rate = report.num_bytes / max(report.elapsed_s, 1e-9) / 1e6
    print(f"{store.root}: {report.num_files} item file(s), {report.num_bytes / 1e6:.1f} MB checked in "
          f"{report.elapsed_s:.1f} s ({rate:.0f} MB/s): {report.num_files - len(report.corrupt)} verified, "
          f"{len(report.corrupt)} corrupt" + (f"; {report.view.path} rebuilt" if report.view else ""))
    return 1 if report.corrupt else 0


def _dispatch(args) -> int:
    if args.command == "demo-model":
        from spmd_diff.models.demo import build_demo_model

        print(build_demo_model(args.dir, task=args.task))
        return 0
    if args.command == "run":
        return _run(args)
    if args.command == "plan":
        return _plan(args)
    if args.command == "launch":
        from spmd_diff.runtime.supervise import launch

        return launch(args.launcher[1:] if args.launcher[:1] == ["--"] else args.launcher)
    if args.command == "merge":
        from spmd_diff.io.store import describe_corrupt, open_store, warn
        from spmd_diff.io.view import build_view

        view = build_view(open_store(args.out, write=True))
        for line in describe_corrupt(view.corrupt, "rerun the job to render it again"):
            warn(line)
        corrupt = f", {len(view.corrupt)} corrupt (left out)" if view.corrupt else ""
        print(f"{view.path}: {view.num_videos} video(s), {view.num_failed} failed{corrupt}")
        return 0
    if args.command == "verify":
        return _verify(args)
    if args.command == "report":
        from spmd_diff.observe.report import write_report

        run = int(args.run) if args.run.isdigit() else args.run
        if run not in ("all", "latest") and not isinstance(run, int):
            raise UserError(f"--run {args.run!r}: give 'all', 'latest' or a run number")
        print(write_report(_out_dir(args.out, write=True), run))
        return 0
    if args.command == "export":
        from spmd_diff.observe.export import export_videos

        skipped: list[tuple[str, str]] = []
        for path in export_videos(args.out, args.format, args.ids, args.dest, fps=args.fps, skipped=skipped,
                                  shard_size=args.shard_size):
            print(path)
        for item_id, reason in skipped:
            print(f"spmd-diff: warning: {item_id!r} not exported: {reason}", file=sys.stderr)
        return 1 if skipped else 0
    if args.command == "inspect":
        from spmd_diff.observe.inspect import inspect_store

        print(inspect_store(args.path, item_id=args.id, limit=None if args.all else 100))
        return 0
    raise AssertionError(args.command)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("SPMD_DIFF_LOG", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", category=FutureWarning)
    args = _parser().parse_args(argv)
    try:
        try:
            return _dispatch(args)
        except OSError as exc:
            if args.command in ("run", "demo-model"):
                raise
            # A store command on an OUT it cannot read or write (permissions, a file where a directory should
            # be, not an HDF5 view): say which path and why, never a traceback.
            where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
            raise UserError(f"{args.command}: {where}{exc.strerror or exc}") from None
    except (UserError, StageTimeout) as exc:
        rank = os.environ.get("OMPI_COMM_WORLD_RANK") or os.environ.get("PMI_RANK") or os.environ.get("SLURM_PROCID")
        where = f" (rank {rank})" if rank is not None else ""
        print(f"spmd-diff: error{where}: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
