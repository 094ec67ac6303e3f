"""The engine's side of ``dit.per_item_degree``: the schedule of item groups for a run (``item_groups``), and
joining each group as its item starts: ``GroupCollectives.group`` (local, no communicator) and the SP hooks
attached to the transformer for it (:func:`spmd_diff.runtime.loops.item_group_loop` runs the items).

Compiled blocks (``dit.compile``, or the fast tier's ``speed.fast_compile_dit``; GPU only) are compiled once per
rank before the first item, and every group, of any degree (1 included), runs on them: a block compiles once
per distinct local token count and attention path this rank meets (:func:`compiled_pairs`), known from the
schedule up front, and Dynamo's recompile limit is set to that count (a job needing more than
``MAX_COMPILED_VARIANTS`` is refused before the first item, on every rank alike)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from spmd_diff.config import UserError
from spmd_diff.io.inputs import Item
from spmd_diff.models.speed import MAX_COMPILED_VARIANTS, allow_compiled_variants, compile_blocks
from spmd_diff.parallel.group_denoise import SPDenoiser
from spmd_diff.parallel.hooks import compiled_variants
from spmd_diff.plan.for_job import job_planning, read_image_encoder_config, read_model_configs
from spmd_diff.plan.roles import RolePlan
from spmd_diff.runtime import loops
from spmd_diff.runtime.item_groups import ItemGroup, assignments_of, job_item_groups
from spmd_diff.runtime.startup import planning_job

if TYPE_CHECKING:
    from spmd_diff.runtime.setup import Setup


def item_group_schedule(setup: Setup, plan: RolePlan, pending: list[Item]) -> list[ItemGroup]:
    """``dit.per_item_degree``: every item's group (``item_groups.schedule_item_groups``), the same on every rank:
    degrees ``dit.sp_degree`` and its doublings within a node (``plan.degree.allowed_degrees``), the cost model of
    the planner for this job (from what every rank sees alike: the topology, not its own device)."""
    job = setup.job
    cost = job_planning(planning_job(job, pending), setup.topology, read_model_configs(setup.model_dir),
                        on_gpu=setup.topology.gpus_per_node > 0, separate_aux=True,
                        image_encoder=read_image_encoder_config(setup.model_dir)).cost
    num_heads = next(iter(setup.shapes.values())).num_attention_heads
    return job_item_groups(job, pending, plan.dit_ranks, setup.topology, cost, num_heads)


def run_item_groups(ctx: loops.RankContext, setup: Setup, coll, schedule: list[ItemGroup], on_gpu: bool) -> None:
    """This rank's share of the per-item groups: form each group as its item starts (``coll.group``: local,
    no communicator) and attach sequence parallelism to the transformer for it (the previous group's hooks
    taken out first; a group of one runs the plain model)."""
    job = setup.job
    speed = job.speed
    layout = "auto" if job.dit.sp_layout == "torus" else job.dit.sp_layout  # a per-item group is inside one node
    compiled = on_gpu and (job.dit.compile or (speed.tier == "fast" and speed.fast_compile_dit))
    if compiled:
        compile_for_schedule(ctx, job, schedule)
    current: list = [None]

    def join(ranks: tuple[int, ...]) -> None:
        if current[0] == ranks:
            return
        if ctx.sp is not None:
            ctx.sp.remove()
        ctx.group = ctx.sp = None
        if len(ranks) > 1:
            ctx.group = coll.group(list(ranks))
            ctx.sp = SPDenoiser.from_group(ctx.stages, ctx.group, coll.group, layout, None,
                                           compile_blocks=compiled, cfg_parallel=_cfg_parallel(job, len(ranks)))
        current[0] = ranks

    mine = assignments_of(schedule, ctx.rank)
    try:
        loops.item_group_loop(ctx, mine, join)
    finally:
        if ctx.sp is not None:
            ctx.sp.remove()
        ctx.group = ctx.sp = None


def _cfg_parallel(job, degree: int) -> bool:
    """Whether a per-item group of ``degree`` ranks splits the CFG branches over its halves."""
    return job.dit.cfg_parallel in (True, "auto") and degree % 2 == 0


def compiled_pairs(ctx: loops.RankContext, job, schedule: list[ItemGroup], rank: int) -> set[tuple[int, int]]:
    """(video tokens, SP degree of the attention) of every forward ``rank`` runs: its items' groups (a CFG-parallel
    group's attention spans half its ranks) and, with ``speed.warmup``, the one-rank warm-up."""
    def tokens(spec) -> int:
        return ctx.stages.shapes(spec).num_video_tokens

    pairs = {(tokens(ctx.warmup_spec), 1)} if ctx.warmup and ctx.warmup_spec is not None else set()
    for group in assignments_of(schedule, rank):
        degree = group.degree // 2 if _cfg_parallel(job, group.degree) else group.degree
        pairs.add((tokens(ctx.spec_of(ctx.items[group.item])), degree))
    return pairs


def compile_for_schedule(ctx: loops.RankContext, job, schedule: list[ItemGroup]) -> None:
    """Compile this rank's transformer blocks once for the whole schedule (``models.speed.compile_blocks``,
    Inductor) and let Dynamo keep a graph per local token count and attention path this rank will meet (in this
    thread: Dynamo's settings are per thread; the rank's items run in it).

    Raises:
        UserError: on every rank alike, if some rank would need more than ``MAX_COMPILED_VARIANTS`` graphs.
    """
    models = [m for m in (ctx.stages.transformer, getattr(ctx.stages, "transformer_2", None)) if m is not None]
    ranks = sorted({rank for group in schedule for rank in group.ranks} | {ctx.rank})
    # per model (Wan2.2's two experts are counted apart: a bound, whether or not they share graphs)
    counts = {rank: len(models) * compiled_variants(compiled_pairs(ctx, job, schedule, rank)) for rank in ranks}
    worst = max(counts, key=counts.get)
    if counts[worst] > MAX_COMPILED_VARIANTS:
        raise UserError(f"dit.per_item_degree with compiled transformer blocks: rank {worst} would compile each "
                        f"block for {counts[worst]} (local token count, attention) variants, more than the "
                        f"{MAX_COMPILED_VARIANTS} allowed (the items' video shapes x their SP degrees): render fewer "
                        "distinct shapes per job, or set dit.compile = false (and speed.fast_compile_dit = false "
                        "with speed.tier = \"fast\")")
    allow_compiled_variants(counts[ctx.rank])
    for model in models:
        compile_blocks(model)
