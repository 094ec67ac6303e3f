"""The engine: load the model, wire channels, run the role loops, publish the results.

It starts where :mod:`spmd_diff.runtime.startup` ends (job, prompts, roles and OUT checked, items pending).
Order on every rank: (1) GPU binding, model shapes and this role's components — errors gathered so every rank
exits with the same message and OUT is not touched; (2) OUT's lock and job record; (3) one heap for every channel
and the progress board, allocated once; (4) this rank's role loop; (5) rank 0 merges event logs and rebuilds
OUT/videos.h5; every rank exits with the same code.
"""

from __future__ import annotations

import collections
import errno
import logging
import socket
import sys
import time
import traceback
from typing import Callable, Iterator

import torch

import spmd_diff
from spmd_diff.comm.channel import ChannelReceiver, ChannelSender
from spmd_diff.comm.heap_layout import HeapLayout, RingSpec
from spmd_diff.comm.collectives import GroupCollectives
from spmd_diff.comm.select import TransportChoice, choose_transport, make_transport
from spmd_diff.comm.transport import round_up
from spmd_diff.comm.work_queue import BatchQueue, WorkQueue
from spmd_diff.comm.world import World, set_threads
from spmd_diff.errors import StageTimeout, StoreFull, UserError
from spmd_diff.io.identity import identity_of, model_fingerprint
from spmd_diff.io.inputs import Item
from spmd_diff.io.runplan import plan_run
from spmd_diff.io.store import VideoStore, describe_corrupt, warn
from spmd_diff.io.view import build_view
from spmd_diff.models.random_wan import make_stages
from spmd_diff.models.residency import cap_gpu_memory
from spmd_diff.models.speed import StageOptions
from spmd_diff.models.shapes import VideoSpec
from spmd_diff.observe.events import EventLog, merge_event_logs
from spmd_diff.plan.for_job import read_model_configs
from spmd_diff.plan.cost import DitDims, ItemCost, predict_item_cost, wait_deadline_s
from spmd_diff.parallel.seq_comm import GroupSeqComm
from spmd_diff.parallel.decoder_group import DecoderGroup
from spmd_diff.parallel.group_denoise import SPDenoiser
from spmd_diff.plan.parallel_layout import resolve_parallel_layout
from spmd_diff.plan.roles import RolePlan
from spmd_diff.plan.workload import WorkClass
from spmd_diff.runtime import loops
from spmd_diff.runtime.board import ProgressBoard
from spmd_diff.runtime.decoder_rounds import decoder_group_loop
from spmd_diff.runtime.faults import LauncherWatchdog, OutLock, TestHooks
from spmd_diff.runtime.item_groups import runs_pulled
from spmd_diff.runtime.per_item import check_compiled_schedule, item_group_schedule, run_item_groups
from spmd_diff.runtime.setup import Setup, build_setup
from spmd_diff.runtime.rebalance import (AutoPolicy, BatchCut, FixedPolicy, Policy, StageCounters,
                                         batches_since_change, finish_together, next_batch)
from spmd_diff.runtime.signals import EXIT_INTERRUPTED, StopFlag
from spmd_diff.runtime.startup import RunRequest, Started, auto_policy, item_attrs, job_settings
from spmd_diff.runtime.time_shared import time_shared_loop

log = logging.getLogger("spmd_diff")


def _ring_specs(setup: Setup) -> tuple[RingSpec, RingSpec]:
    """Slot sizes for the largest item of the job (a message holds one item's tensors, whatever its size): what
    encode hands on (text embeddings, x2 with CFG; for image-to-video also the image embeddings and the float32
    condition) and the final latents (float32)."""
    embeds = max(s.encoded_nbytes(getattr(torch, setup.dtype), 64) for s in setup.shapes.values())
    latents = max(round_up(s.latents_nbytes(), 64) for s in setup.shapes.values())
    slots = setup.job.run.ring_slots
    return RingSpec(slots, embeds), RingSpec(slots, latents)


def setup_attrs(setup: Setup):
    """item -> the attributes of its video (:func:`spmd_diff.runtime.startup.item_attrs` for this setup)."""
    return item_attrs(setup.job, setup.model_dir, setup.dtype, setup.plan.sp_degree, setup.topology.gpus_per_node > 0)


def run(started: Started, request: RunRequest, stop: StopFlag) -> int:
    """Render the pending items on this rank; returns the process exit code (the same on every rank).

    ``started``: :func:`spmd_diff.runtime.startup.start`'s world and validated inputs, with items pending.
    ``stop``: a stop flag already installed (the CLI installs it before importing anything heavy).
    Order: bind the GPU; load this role's model components (a bad model stops every rank here, before OUT is
    touched); take OUT's lock and record the job; wire the channels; run the role loop; publish.
    """
    world, inputs = started.world, started.inputs
    world.bind_device()
    watchdog = LauncherWatchdog().start()
    policy: Policy = FixedPolicy()
    if inputs.job.roles.policy == "auto":
        policy = world.run_checked(lambda: auto_policy(inputs.job, inputs.topology, inputs.model_dir,
                                                       inputs.pending))
    plan = policy.plan if isinstance(policy, AutoPolicy) else inputs.plan
    setup = world.run_checked(lambda: build_setup(inputs, plan, world.device))
    set_threads(world.local_size, setup.job.run.threads)
    # Which transport (collective, before OUT is touched: a forced NVSHMEM that cannot work is a bad job).
    transport_choice = world.run_checked(lambda: choose_transport(world, setup.job.world.transport)
                                         if world.size > 1 else None)
    stages = world.run_checked(lambda: _load_stages(world, setup, setup.plan))
    cap_gpu_memory(world.device, setup.job.world.gpu_memory_gib)
    # per-item degrees with compiled blocks: a schedule that would compile too many graphs is a bad job
    world.run_checked(lambda: check_compiled_schedule(setup, setup.plan, inputs.pending,
                                                      str(world.device).startswith("cuda")))
    store = VideoStore(request.out_dir)
    lock = OutLock(request.out_dir, request.shard)

    def prepare_out():
        # Every rank names the files it writes by the item's identity, which holds the model's fingerprint: the
        # ranks must agree on it (other weights on some node would make other videos). Every rank reaches the
        # allgather; errors are raised after it.
        try:
            fingerprint, problem = model_fingerprint(setup.model_dir), None
        except OSError as exc:
            fingerprint, problem = "", f"cannot read the model directory {setup.model_dir}: {exc.strerror or exc}"
        fingerprints = world.comm.allgather(fingerprint)
        if problem:
            raise UserError(problem)
        if len(set(fingerprints)) > 1:
            by_value: dict[str, list[int]] = {}
            for rank, value in enumerate(fingerprints):
                by_value.setdefault(value, []).append(rank)
            raise UserError(f"the model directory {setup.model_dir} differs between ranks (fingerprint: "
                            + "; ".join(f"{v} on ranks {r[:8]}" for v, r in by_value.items())
                            + "): every node must see the same model files")
        store.check_writable()
        attrs_of = setup_attrs(setup)
        by_id = {item.id: item for item in setup.items}
        store.expect(lambda item_id: attrs_of(by_id[item_id]))
        if world.rank == 0:
            expected = {item.id: attrs_of(item) for item in setup.items}
            settings = job_settings(setup.job, attrs_of, setup.items)
            options = dict(force=request.force, retry_failed=request.retry_failed, model_path=setup.job.model.path,
                           job=setup.job.to_dict())
            plan_run(store, expected, settings, **options)  # refusals first: a refused job leaves OUT untouched
            lock.acquire()
            try:
                plan = plan_run(store, expected, settings, apply=True, **options)
            except BaseException:
                lock.release()
                raise
            for line in describe_corrupt(plan.corrupt, "it will be rendered again"):
                warn(line)
            if plan.rerendered:
                shown = ", ".join(map(repr, plan.rerendered[:10])) + (" ..." if len(plan.rerendered) > 10 else "")
                print(f"spmd-diff: --force: rendering {len(plan.rerendered)} changed item(s) again: {shown}",
                      file=sys.stderr)
            return [by_id[item_id].index for item_id in plan.pending]
        return None

    items_by_index = {item.index: item for item in setup.items}

    def pending_in_order():  # rank 0 decides, so every rank hands out the same order
        indices = prepare_out()
        return None if indices is None else render_order(setup, [items_by_index[i] for i in indices], world.device)

    pending_indices = world.comm.bcast(world.run_checked(pending_in_order), root=0)
    pending = [items_by_index[i] for i in pending_indices]
    cost = _slowest_item_cost(setup, pending, world.device)

    def deadline_for(plan: RolePlan) -> float:
        return wait_deadline_s(cost, setup.job.run.timeout_s, plan.fan_in())

    deadline_s = deadline_for(setup.plan)
    shard_tag = f"shard-{request.shard[0]}-of-{request.shard[1]}" if request.shard else ""
    events = EventLog(request.out_dir, world.rank, enabled=setup.job.run.events, tag=shard_tag)
    _announce(world, setup, events, pending, request.out_dir, deadline_s, transport_choice, request.testing_aids)

    try:
        role_result = _run_rank(world, setup, stages, store, events, stop, items_by_index, pending, deadline_for,
                                policy, transport_choice, TestHooks.from_env(world.rank, dict(request.testing_aids)))
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
            code = _publish(setup, store, events, pending, interrupted, started.started_at, request.out_dir)
        except Exception as exc:  # noqa: BLE001 - every rank waits in the bcast below: always reach it
            full = isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
            code = StoreFull.exit_code if full else 1
            print(f"spmd-diff: error: the items are written, but publishing {store.view_path} failed: {exc}. "
                  f"Run `spmd-diff merge {request.out_dir}` once the problem is fixed.", file=sys.stderr, flush=True)
        lock.release()
    return world.comm.bcast(code, root=0)


def _item_cost(setup: Setup, spec: VideoSpec, device: str) -> ItemCost:
    """The cost model's prediction for one item rendered with ``spec`` (one of ``setup.shapes``)."""
    s = setup.shapes[spec]
    dit, text, vae = read_model_configs(setup.model_dir)
    dim = s.num_attention_heads * s.attention_head_dim
    d_model = text.get("d_model", 4096)
    text_params = text.get("num_layers", 24) * (4 * d_model * d_model + 3 * d_model * text.get("d_ff", 10240))
    dims = DitDims(dit.get("num_layers", 30), dim, dit.get("ffn_dim", 4 * dim), s.text_seq_len, text_params,
                   vae.get("base_dim", 96))
    return predict_item_cost(s.num_video_tokens, dims, spec.num_inference_steps, spec.guidance_scale > 1.0,
                             spec.num_frames * spec.height * spec.width, device, setup.plan.sp_degree)


def render_order(setup: Setup, items: list[Item], device: str) -> list[int]:
    """The indices of ``items`` in the order the job hands them out: longest predicted first (encode + denoise +
    decode of the item's video settings); among equal predictions each kind (:func:`item_kind`) together, in the
    order the kinds first appear, and each kind's items in prompts-file order. A mixed job then does not end on a
    long item started last beside idle ranks, and a batch can hold one kind (``rebalance.next_batch``); a job of
    one kind of item keeps the file's order. No video depends on it."""
    seconds, first = {}, {}
    for spec in {setup.spec_of(item) for item in items}:
        cost = _item_cost(setup, spec, device)
        seconds[spec] = cost.encode_s + cost.denoise_s + cost.decode_s
    for position, item in enumerate(items):
        first.setdefault(item_kind(setup, item), position)
    return [item.index for item in sorted(items, key=lambda item: (-seconds[setup.spec_of(item)],
                                                                   first[item_kind(setup, item)]))]  # stable


def item_kind(setup: Setup, item: Item) -> WorkClass:
    """The item's kind of work: the settings its cost depends on (``WorkClass``: size, frames, steps, CFG)."""
    return WorkClass.of_video(setup.spec_of(item))


def _slowest_item_cost(setup: Setup, items: list[Item], device: str) -> ItemCost:
    """The cost of the job's slowest item (by its slowest stage): what a wait's deadline must allow for."""
    specs = {setup.spec_of(item) for item in items} or {setup.spec}
    return max((_item_cost(setup, spec, device) for spec in specs), key=lambda cost: cost.slowest_s)


def _announce(world: World, setup: Setup, events: EventLog, pending: list[Item], out_dir: str,
              deadline_s: float, transport_choice: TransportChoice | None,
              testing_aids: tuple[tuple[str, str], ...]) -> None:
    hosts = world.comm.gather(socket.gethostname(), root=0)
    plan = setup.plan
    if world.rank == 0:
        events.emit("job_start", version=spmd_diff.__version__, config=setup.job.to_dict(), world_size=world.size,
                    plan=plan.to_dict(), hosts=hosts, num_items=len(setup.items), num_pending=len(pending),
                    model_dir=setup.model_dir, torch=torch.__version__, argv=sys.argv, deadline_s=deadline_s,
                    transport=str(transport_choice) if transport_choice else "none (one rank: no channels)",
                    testing_aids=dict(testing_aids))
        print(plan.describe(setup.topology), file=sys.stderr)
        if setup.job.roles.group_decode:
            print(f"spmd-diff: the decoder ranks {list(plan.decoders)} decode each video together (roles.group_decode)",
                  file=sys.stderr)
        print(f"spmd-diff: {len(setup.items)} item(s), {len(setup.items) - len(pending)} already in "
              f"{out_dir}, {len(pending)} to render; waits time out after {deadline_s:.0f} s", file=sys.stderr)
    events.emit("rank_start", role=plan.role_of(world.rank), host=socket.gethostname())


def _run_rank(world: World, setup: Setup, stages, store: VideoStore, events: EventLog, stop: StopFlag,
              items_by_index: dict[int, Item], pending: list[Item], deadline_for: Callable[[RolePlan], float],
              policy: Policy, transport_choice: TransportChoice | None, hooks: TestHooks):
    """Size the heap for every plan ``policy`` may choose, then run the batches: wire the channels of the
    batch's plan (its waits time out after ``deadline_for(plan)``), run this rank's role loop until its share of
    the batch is done, and (between batches) combine every rank's timings and let ``policy`` choose the next plan:
    at once after a drain, or one batch later where the ranks render whole items alone (``rebalance.BatchCut``).

    Returns (transport, monitor) on success, or the exception that must abort the job.
    """
    plan = setup.plan
    transport, monitor = None, None
    try:
        candidates = policy.candidates(plan)
        speed = setup.job.speed
        on_gpu = str(world.device).startswith("cuda")
        if on_gpu:  # rank_end's peak is the rendering peak (weights included), not that of building them
            torch.cuda.reset_peak_memory_stats(world.device)
        board_bytes = ProgressBoard.bytes_needed(world.size)
        per_item = setup.job.dit.per_item_degree
        schedule = item_group_schedule(setup, plan, pending) if per_item else None
        max_sp = max(p.sp_degree for p in candidates)
        if schedule is not None:
            max_sp = max([max_sp, *(group.degree for group in schedule)])
            pulled = runs_pulled(schedule, setup.job, on_gpu)  # then the plan's DiT groups pull every item
            if world.rank == 0:
                by_degree = collections.Counter(group.degree for group in schedule)
                shown = ", ".join(f"{by_degree[d]} item(s) at degree {d}" for d in sorted(by_degree))
                how = (f" (every item at dit.sp_degree = {plan.sp_degree}: the DiT groups pull them from the shared "
                       f"queue)" if pulled else "")
                print(f"spmd-diff: per-item SP degree: {shown or 'no items'}{how}", file=sys.stderr)
                events.emit("item_groups", degrees={str(d): n for d, n in sorted(by_degree.items())}, pulled=pulled,
                            predicted_makespan_s=round(max((g.start_s + g.seconds for g in schedule), default=0), 3))
            if pulled:
                schedule = None
        # roles.group_decode: the decoder ranks decode as one group over the same collectives (static plans only)
        decoder_group_size = len(plan.decoders) if setup.job.roles.group_decode else 0
        coll_bytes = round_up(setup.job.dit.collective_mib << 20, 256) if max(max_sp, decoder_group_size) > 1 else 0
        channels_base = round_up(board_bytes, 256) + coll_bytes
        enc_spec, dec_spec = _ring_specs(setup)
        coll = None
        if world.size > 1:
            heap_bytes = max(_layout(world, p, enc_spec, dec_spec, channels_base).heap_bytes for p in candidates)
            transport_heap = max(heap_bytes, channels_base)
            if world.rank == 0:
                print(f"spmd-diff: symmetric heap {transport_heap / 2**20:,.1f} MiB per rank (channels, DiT "
                      f"collectives, progress board; the largest of the {len(candidates)} plan(s) this job may "
                      f"switch between); a consumer serves at most {max(p.fan_in() for p in candidates)} "
                      "producer(s)", file=sys.stderr)
            dataplane = setup.job.dataplane
            transport = make_transport(world, transport_heap, transport_choice,
                                       put_kernel=dataplane.put_kernel and dataplane.p2p_kernel == "cuda")
            if coll_bytes:  # a member waits while its leader waits for credit: the longest deadline of any plan
                coll = GroupCollectives(transport, round_up(board_bytes, 256), coll_bytes,
                                        max_ranks=max(max_sp, decoder_group_size),
                                        timeout_s=max(deadline_for(p) for p in candidates),
                                        kernel=dataplane.p2p_kernel, a2a_blocks=dataplane.a2a_block_counts())
        board = ProgressBoard(transport, world.rank, world.size)
        ctx = loops.RankContext(world.rank, items_by_index, stages, setup.spec_of, setup.job.video.negative_prompt,
                                store, events, stop, deadline_for(plan), setup_attrs(setup), board.publish,
                                hooks=hooks or None, overlap_decode=speed.overlap_decode,
                                write_queue=speed.write_queue, warmup=speed.warmup,
                                warmup_spec=setup.spec_of(pending[0]) if pending else setup.spec)
        if world.rank == 0:
            monitor = board.start_monitor(len(pending), plan, setup.job.run.progress_interval_s)
        counters = StageCounters(ctx)
        # One counter per batch, allocated once (a batch holds at least one item): a rank that emptied a batch's
        # counter can start on the next batch's while the others finish theirs.
        queue = WorkQueue(world.comm, max(1, len(pending)))
        start, number, since_change = 0, 0, 0  # items before this batch, its number, batches since a change
        drained = True  # the last batch ended in a drain (every rank waited for the others): plans may change
        unread: BatchCut | None = None  # the last batch's timings where it did not drain: read at the next cut
        sp_for: tuple = (None, None, False)  # (DiT group, components, CFG parallel) the SP hooks are attached for
        while True:  # each batch is cut as it starts, alike on every rank (next_batch: shared values only)
            kind = (lambda item: item_kind(setup, item)) if policy.one_kind_per_batch(plan) else (lambda item: None)
            # (start < len(pending) here but for an empty job, which runs one empty batch)
            base = policy.batch_items(plan, len(pending) - start, item_kind(setup, pending[start])) if pending else 1
            batch = next_batch(pending, start, base, since_change, kind)
            ctx.timeout_s = deadline_for(plan)
            if number > 0 and drained:
                ctx.stages = stages = world.run_checked(lambda: _stages_for_plan(world, setup, stages, plan))
            senders, receivers = [], []
            if transport is not None:
                layout = _layout(world, plan, enc_spec, dec_spec, channels_base)
                if number > 0 and drained:  # the last batch drained every channel: re-target them (HeapLayout)
                    transport.barrier()
                    layout.clear_local(transport)
                    transport.barrier()
                senders = [ChannelSender(transport, e) for e in layout.outbound(world.rank)]
                receivers = [ChannelReceiver(transport, e) for e in layout.inbound(world.rank)]
            in_group = coll is not None and plan.sp_degree > 1 and "denoise" in plan.stages_of(world.rank) \
                and schedule is None  # per-item groups are joined item by item (run_item_groups)
            group_ranks = plan.dit_groups[plan.group_of(world.rank)] if in_group else None
            # a DiT group (new, or on newly loaded components, or with CFG parallel switched): attach SP
            if (group_ranks, stages, plan.cfg_parallel) != sp_for:
                if sp_for[0] is not None and sp_for[1] is stages:
                    # The transformer carries the old group's hooks: load the components afresh.
                    stages.free()
                    ctx.stages = stages = _load_stages(world, setup, plan)
                ctx.group = ctx.sp = None
                if group_ranks is not None:
                    ctx.group = coll.group(group_ranks)
                    # The device comes from the collectives' transport (host memory on MPI RMA, GPU on NVSHMEM).
                    compile_fast = speed.tier == "fast" and speed.fast_compile_dit
                    model = stages.transformer if stages.transformer is not None else stages.transformer_2
                    mine = resolve_parallel_layout(plan, setup.topology, setup.job.dit.sp_layout,
                                                   int(model.config.num_attention_heads)).group_of_rank(world.rank)
                    ctx.sp = SPDenoiser.from_group(stages, ctx.group, coll.group, mine.sp,
                                                   compile_blocks=on_gpu and (setup.job.dit.compile or compile_fast),
                                                   cfg_parallel=plan.cfg_parallel)
                sp_for = (group_ranks, stages, plan.cfg_parallel)
            ctx.group_decode = ctx.sp is not None and plan.group_decode
            ctx.decoder_group = None
            if decoder_group_size and world.rank in plan.decoders:
                ctx.decoder_group = _decoder_group(ctx, coll, plan.decoders)
            if ctx.hooks:
                ctx.hooks.at("batch_start", f"batch-{number}")
            counters.mark()
            if schedule is not None:
                run_item_groups(ctx, setup, coll, schedule, on_gpu)
            else:
                _run_role(ctx, plan, queue.batch(number, len(batch)), batch, senders, receivers)
            start += len(batch)
            events.emit("batch_end", batch=number, items=len(batch), last=start >= len(pending))
            # Ranks that render whole items alone (not in per-item groups) have no channel or group wait to notice
            # a stuck peer: the waits for the other ranks' cuts get a deadline (a peer may be a whole cycle of its
            # items behind this rank), and their batches flow (no drain unless the plan changes or the job stops).
            independent = plan.ranks_independent and schedule is None
            cut_timeout = deadline_for(plan) * max(1, plan.stage_batch) if independent else None
            if start >= len(pending):
                if unread is not None:
                    unread.wait(cut_timeout)  # every rank posts it: complete the collective before leaving
                finish_together(world.comm, cut_timeout)
                break
            # under a policy that re-plans a batch holds one kind of item: its timings are of that work class
            class_key = item_kind(setup, batch[0]).key
            cut = BatchCut(world.comm, counters.since_mark(world.rank, class_key, plan.sp_degree), stop.requested,
                           class_key, plan.sp_degree)
            if independent:  # decide on the batch before (its cut long posted); this one is read at the next cut
                read, unread = unread, cut
            else:  # a drain: wait for every rank's timings of this batch
                read, unread = cut, None
            decision, stopping = None, False
            if read is not None:
                timings, stopping = read.wait(cut_timeout)
                if not stopping:
                    decision = policy.decide(plan, timings, len(pending) - start)  # the plan for what is left
            switched = False
            if decision is not None and decision.switch:
                new_heap = _layout(world, decision.best, enc_spec, dec_spec, channels_base).heap_bytes
                if transport is not None and new_heap > transport_heap:
                    policy.decline(plan)
                    if world.rank == 0:
                        events.emit("replan_declined", batch=number, declined=f"the channel heap was sized for "
                                    f"{transport_heap} bytes, the new plan needs {new_heap}", **decision.to_event())
                else:
                    switched = True
            drained = read is cut or switched or stopping
            if unread is not None and drained:  # a switch or a stop: drain this batch too (every rank posts it)
                unread.wait(cut_timeout)
                unread = None
            if stopping:
                break
            if switched:
                if world.rank == 0:
                    events.emit("replan", batch=number, timings_of_batch=number - (0 if read is cut else 1),
                                **decision.to_event())
                    print(f"spmd-diff: re-plan after batch {number}: {decision.best.role_counts()} "
                          f"({decision.reason})", file=sys.stderr, flush=True)
                plan = decision.best
                if ctx.hooks:
                    ctx.hooks.at("replan", f"batch-{number}")
            since_change = batches_since_change(pending, start, since_change, switched, kind)
            number += 1
        queue.free()
        board.publish(ctx.num_done, ctx.num_failed, ctx.busy_s, force=True)
        peak = {"peak_gpu_bytes": torch.cuda.max_memory_allocated(world.device)} if on_gpu else {}
        events.emit("rank_end", role=plan.role_of(world.rank), items=ctx.num_done, failed=ctx.num_failed,
                    busy_s=ctx.busy_s, stage_s=ctx.stage_s, **peak)
        stages.free()
        return transport, monitor
    except Exception as exc:  # noqa: BLE001 - any failure here must abort the job, never strand the other ranks
        if not isinstance(exc, (StageTimeout, StoreFull, UserError)):
            traceback.print_exc()
        return exc


def _decoder_group(ctx: loops.RankContext, coll: GroupCollectives, decoders: tuple[int, ...]) -> DecoderGroup:
    """``roles.group_decode``: this decoder rank's :class:`DecoderGroup` of every decoder rank (band order = rank
    order); each decode it takes part in is a ``decode`` stage event with its ``bands``."""
    def span(index: int, bands: int):
        return ctx.span("decode", ctx.items[index], gpu=True, fields={"bands": bands})

    return DecoderGroup(ctx.stages, GroupSeqComm(coll.group(list(decoders)), coll.group), span)


def _layout(world: World, plan: RolePlan, enc_spec: RingSpec, dec_spec: RingSpec, base: int) -> HeapLayout:
    return HeapLayout(world.size, plan.channel_edges(enc_spec, dec_spec), base_offset=base)


def _stage_options(setup: Setup, world: World, plan: RolePlan) -> StageOptions:
    """The speed tier's component options: ``exact`` keeps the pipeline's dtypes and kernels."""
    speed = setup.job.speed
    fast = speed.tier == "fast"
    on_gpu = str(world.device).startswith("cuda")
    return StageOptions(vae_dtype=torch.bfloat16 if fast and speed.fast_vae_bf16 else torch.float32,
                        # DiT groups (S > 1) compile their own blocks around the group attention
                        compile_blocks=fast and speed.fast_compile_dit and on_gpu and plan.sp_degree == 1,
                        attention_backend=speed.fast_attention if fast else None)


def _load_stages(world: World, setup: Setup, plan: RolePlan):
    """This rank's model components for its role in ``plan`` (time-shared: in host memory, one stage's on the
    device at a time)."""
    return make_stages(setup.model_dir, plan.stages_of(world.rank), device=world.device,
                       dtype=getattr(torch, setup.dtype), options=_stage_options(setup, world, plan),
                       time_shared=plan.time_shared)


def _stages_for_plan(world: World, setup: Setup, stages, plan: RolePlan):
    """This rank's components for its role in ``plan``: the loaded ones if they cover it, else loaded anew
    (the old ones freed first, so a rank never holds two copies). Components all on the device serve a
    time-shared plan as they are (they fitted together); time-shared ones serve a plan of one stage once that
    stage is moved to the device, and are loaded anew for a plan of several stages on the device together."""
    needed = set(plan.stages_of(world.rank))
    if needed <= stages.stages:
        if not stages.time_shared or plan.time_shared:
            return stages
        if len(needed) == 1:
            stages.use(needed.pop())
            return stages
    stages.free()
    return _load_stages(world, setup, plan)


def _publish(setup: Setup, store: VideoStore, events: EventLog, pending: list[Item], interrupted: bool,
             started: float, out_dir: str) -> int:
    """Rank 0, after every rank finished: rebuild the view, close the event log, say what happened."""
    attrs_of = setup_attrs(setup)
    expected = {item.id: attrs_of(item) for item in setup.items}
    view = build_view(store, expected)
    for line in describe_corrupt(view.corrupt, "rerun to render it again"):
        warn(line)
    failures = store.failures()
    remaining = [it for it in pending if view.identities.get(it.id) != identity_of(expected[it.id])]
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


def _pulled(queue: BatchQueue, pending: list[Item]) -> Iterator[Item]:
    """The items this rank takes from the shared queue, one at a time, as it becomes free for the next."""
    while (index := queue.take()) is not None:
        yield pending[index]


def _run_role(ctx: loops.RankContext, plan: RolePlan, queue: BatchQueue, pending: list[Item],
              senders: list[ChannelSender], receivers: list[ChannelReceiver]) -> None:
    """This rank's loop for the stages ``plan`` gives it. Ranks at the head of the pipeline (encoders, or DiT
    group leaders that encode) pull items from ``queue``; an idle rank (left over from whole DiT groups) only
    takes part in the collectives."""
    stages = set(plan.stages_of(ctx.rank))
    if not stages:
        return
    if plan.time_shared:
        time_shared_loop(ctx, queue, pending, plan.stage_batch, plan.num_ranks)
    elif "denoise" not in stages:
        if stages == {"encode"}:
            loops.encoder_loop(ctx, _pulled(queue, pending), senders)
        elif stages == {"decode"} and ctx.decoder_group is not None:
            decoder_group_loop(ctx, receivers)
        elif stages == {"decode"}:
            loops.decoder_loop(ctx, receivers)
        else:
            raise AssertionError(f"rank {ctx.rank}: no role loop holds {sorted(stages)} without denoise")
    elif ctx.group is not None and ctx.group.rank_in_group != 0:
        loops.dit_member_loop(ctx)
    else:
        loops.dit_loop(ctx, _pulled(queue, pending) if "encode" in stages else None, receivers, senders)
