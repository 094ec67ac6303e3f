"""The engine's side of ``dit.per_item_degree``: the schedule of item groups for a run (``item_groups``), and
joining each group as its item starts: ``GroupCollectives.group`` (local, no communicator) and the SP hooks
attached to the transformer for it (:func:`spmd_diff.runtime.loops.item_group_loop` runs the items).

Compiled blocks (``dit.compile``, or the fast tier's ``speed.fast_compile_dit``; GPU only) are compiled once per
rank before the first item, and every group, of any degree (1 included), runs on them: a block compiles once
per distinct local token count and attention path this rank meets (:func:`compiled_pairs`), known from the
schedule up front, and Dynamo's recompile limit is set to that count (a job needing more than
``MAX_COMPILED_VARIANTS`` is refused before OUT is touched, on every rank alike: :func:`check_compiled_schedule`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from spmd_diff.config import UserError
from spmd_diff.io.inputs import Item
from spmd_diff.models.shapes import model_index, transformer_names
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
    compiled = on_gpu and _compiles(job)
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


def compiled_pairs(job, schedule: list[ItemGroup], rank: int, tokens_of: Callable[[int], int],
                   warmup_tokens: int | None) -> set[tuple[int, int]]:
    """(video tokens, SP degree of the attention) of every forward ``rank`` runs: its items' groups (a CFG-parallel
    group's attention spans half its ranks; ``tokens_of(item index)``) and the one-rank warm-up
    (``warmup_tokens``, None without ``speed.warmup``)."""
    pairs = {(warmup_tokens, 1)} if warmup_tokens is not None else set()
    for group in assignments_of(schedule, rank):
        degree = group.degree // 2 if _cfg_parallel(job, group.degree) else group.degree
        pairs.add((tokens_of(group.item), degree))
    return pairs


def compiled_variant_counts(job, schedule: list[ItemGroup], tokens_of: Callable[[int], int],
                            warmup_tokens: int | None, num_models: int = 1) -> dict[int, int]:
    """Rank -> the graphs each compiled block code takes on it (``hooks.compiled_variants`` of its pairs, times
    the transformers it holds: Wan2.2's two experts are counted apart, a bound whether or not they share)."""
    ranks = sorted({rank for group in schedule for rank in group.ranks})
    return {rank: num_models * compiled_variants(compiled_pairs(job, schedule, rank, tokens_of, warmup_tokens))
            for rank in ranks}


def check_compiled_variants(counts: dict[int, int]) -> None:
    """Refuse a schedule some rank of which would compile a block more than ``MAX_COMPILED_VARIANTS`` times.

    Raises:
        UserError: the same on every rank (every rank computes the same schedule).
    """
    if not counts:
        return
    worst = max(counts, key=counts.get)
    if counts[worst] > MAX_COMPILED_VARIANTS:
        raise UserError(f"dit.per_item_degree with compiled transformer blocks: rank {worst} would compile each "
                        f"block for {counts[worst]} (local token count, attention) variants, more than the "
                        f"{MAX_COMPILED_VARIANTS} allowed (the items' video shapes x their SP degrees): render fewer "
                        "distinct shapes per job, or set dit.compile = false (and speed.fast_compile_dit = false "
                        "with speed.tier = \"fast\")")


def check_compiled_schedule(setup: Setup, plan: RolePlan, pending: list[Item], on_gpu: bool) -> None:
    """Before OUT is touched (``engine.run``, on every rank): a per-item schedule with compiled blocks that needs
    too many graphs on some rank is a bad job (``check_compiled_variants``)."""
    job = setup.job
    if not (job.dit.per_item_degree and on_gpu and pending and _compiles(job)):
        return
    schedule = item_group_schedule(setup, plan, pending)
    by_index = {item.index: item for item in pending}
    num_models = len(transformer_names(model_index(setup.model_dir)[1]))
    check_compiled_variants(compiled_variant_counts(
        job, schedule, lambda n: setup.shapes[setup.spec_of(by_index[n])].num_video_tokens,
        setup.shapes[setup.spec_of(pending[0])].num_video_tokens if job.speed.warmup else None, num_models))


def _compiles(job) -> bool:
    """Compiled transformer blocks on a GPU: ``dit.compile``, or the fast tier's ``speed.fast_compile_dit``."""
    return job.dit.compile or (job.speed.tier == "fast" and job.speed.fast_compile_dit)


def compile_for_schedule(ctx: loops.RankContext, job, schedule: list[ItemGroup]) -> None:
    """Compile this rank's transformer blocks once for the whole schedule (``models.speed.compile_blocks``,
    Inductor) and let Dynamo keep a graph per local token count and attention path this rank will meet (in this
    thread: Dynamo's settings are per thread in recent torch; the rank's items run in it).

    Raises:
        UserError: on every rank alike, if some rank would need more than ``MAX_COMPILED_VARIANTS`` graphs
            (``engine.run`` checked it before OUT was touched: here it is only a guard).
    """
    models = [m for m in (ctx.stages.transformer, getattr(ctx.stages, "transformer_2", None)) if m is not None]
    warmup = ctx.stages.shapes(ctx.warmup_spec).num_video_tokens if ctx.warmup and ctx.warmup_spec else None
    counts = compiled_variant_counts(job, schedule, lambda n: ctx.stages.shapes(ctx.spec_of(ctx.items[n]))
                                     .num_video_tokens, warmup, len(models))
    check_compiled_variants(counts)
    allow_compiled_variants(max(counts.get(ctx.rank, 0), 1))
    for model in models:
        compile_blocks(model)
