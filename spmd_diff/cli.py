"""spmd-diff: the command line. Knows everything below it; nothing below knows it."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import warnings

from spmd_diff.errors import StageTimeout, UserError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spmd-diff", description="Render videos in bulk with diffusion transformers, "
                                "as one SPMD program under mpirun or srun.")
    sub = p.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo-model", help="write the built-in tiny Wan2.1-architecture demo model")
    demo.add_argument("dir", help="output directory (a diffusers pipeline directory)")

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

    export = sub.add_parser("export", help="write playable files (mp4, gif, png frames)")
    export.add_argument("out", help="OUT/ or OUT/videos.h5")
    export.add_argument("dest", help="directory to write into")
    export.add_argument("--format", choices=("mp4", "gif", "png"), default="mp4")
    export.add_argument("--ids", nargs="*", help="item ids (default: all)")
    export.add_argument("--fps", type=int, default=16)

    inspect = sub.add_parser("inspect", help="list items, their settings, status and failures")
    inspect.add_argument("path", help="OUT/ or OUT/videos.h5")
    inspect.add_argument("--id", help="show every attribute of one item")
    inspect.add_argument("--all", action="store_true", help="list every item (default: the first 100)")
    return p


def _plan(args) -> int:
    from spmd_diff.config import load_job
    from spmd_diff.plan.roles import plan_roles
    from spmd_diff.plan.topology import Topology

    job = load_job(args.job, args.overrides)
    per_node = args.ranks_per_node or args.gpus_per_node
    if per_node < 1:
        raise UserError("give --gpus-per-node G (one rank per GPU) or --ranks-per-node R")
    topology = Topology.uniform(args.nodes, per_node, args.gpus_per_node)
    if job.world.ranks_per_node:
        topology = topology.regrouped(job.world.ranks_per_node)
    plan = plan_roles(topology, job.roles.encoders, job.roles.decoders, job.dit.sp_degree, job.dit.sp_layout)
    print(topology.describe())
    print(plan.describe(topology))
    for node in range(topology.num_nodes):
        ranks = topology.ranks_on_node(node)
        roles = ", ".join(f"{r}:{plan.role_of(r)}" for r in ranks)
        print(f"  {topology.hostname(node)}: {roles}")
    return 0


def _run(args) -> int:
    from spmd_diff.runtime.signals import StopFlag

    # Catch stop signals before the heavy imports: a SIGTERM during start-up still ends in exit 75 (requeue).
    stop = StopFlag().install()
    from spmd_diff.io.inputs import parse_shard
    from spmd_diff.runtime.engine import RunRequest, run

    shard = parse_shard(args.shard) if args.shard else None
    request = RunRequest(args.job, args.prompts, args.out, tuple(args.overrides), args.model, shard, args.force,
                         args.retry_failed)
    return run(request, stop)


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

        print(build_demo_model(args.dir))
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

        print(write_report(_out_dir(args.out, write=True)))
        return 0
    if args.command == "export":
        from spmd_diff.observe.export import export_videos

        skipped: list[tuple[str, str]] = []
        for path in export_videos(args.out, args.format, args.ids, args.dest, fps=args.fps, skipped=skipped):
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
