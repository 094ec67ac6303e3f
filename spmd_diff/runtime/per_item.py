"""The engine's side of ``dit.per_item_degree``: the schedule of item groups for a run (``item_groups``), and
joining each group as its item starts: ``GroupCollectives.group`` (local, no communicator) and the SP hooks
attached to the transformer for it (:func:`spmd_diff.runtime.loops.item_group_loop` runs the items)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from spmd_diff.io.inputs import Item
from spmd_diff.parallel.group_denoise import SPDenoiser
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
    current: list = [None]

    def join(ranks: tuple[int, ...]) -> None:
        if current[0] == ranks:
            return
        if ctx.sp is not None:
            ctx.sp.remove()
        ctx.group = ctx.sp = None
        if len(ranks) > 1:
            ctx.group = coll.group(list(ranks))
            cfg = job.dit.cfg_parallel in (True, "auto") and len(ranks) % 2 == 0
            compile_blocks = on_gpu and (job.dit.compile or (speed.tier == "fast" and speed.fast_compile_dit))
            ctx.sp = SPDenoiser.from_group(ctx.stages, ctx.group, coll.group, layout, None,
                                           compile_blocks=compile_blocks, cfg_parallel=cfg)
        current[0] = ranks

    mine = assignments_of(schedule, ctx.rank)
    try:
        loops.item_group_loop(ctx, mine, join)
    finally:
        if ctx.sp is not None:
            ctx.sp.remove()
        ctx.group = ctx.sp = None
