"""The auto planner: which ranks encode, denoise (in DiT groups of S) and decode, to finish a workload soonest.

Pure Python; fast enough to run between batches (a few ms at 4,096 ranks). The search:

1. for each allowed SP degree S whose DiT fits a GPU: the stages a DiT rank can also hold (memory), keeping only
   maximal sets (a rank that can hold more never hurts when work is pulled); likewise for non-DiT ("aux") ranks:
   encode+decode together where they fit, else encoder-only and decoder-only ranks;
2. for each such shape, the number of DiT groups g (an integer search over a unimodal predicted time) and the
   split of the other ranks between encoding and decoding (around the work-proportional split);
3. ranks are placed as ``roles.place_ranks`` does (groups inside nodes; non-DiT ranks first from the ranks that
   cannot complete a group, then whole node blocks in a node order); with uneven fitted speeds, counts are
   searched for two node orders (slowest nodes first, and the default) with each pool's exact summed speed
   (prefix sums over the placement order), and the best shapes are placed and predicted exactly -- each also
   placed as if speeds were even, and the best shape for even speeds too (a spread of slow ranks over the
   pools can beat putting them all in one); a first plan of groups of one (speeds unknown) spreads its non-DiT
   ranks over the nodes, so every stage runs on several nodes and one batch tells a slow node from a slow stage.

Where every stage fits on every GPU the answer is one plan of all-stage ranks (no GPU reserved for a small stage).
Where they do not fit together, a plan of time-shared ranks (``roles.time_share``: every rank holds every stage
and keeps one stage's components on its GPU at a time, running its items stage by stage, ``stage_batch`` at a
time) is a candidate too, predicted by ``throughput.predict_time_shared`` (the fluid share of all work per rank,
plus the host-to-GPU moves of the components per cycle, plus a tail), and chosen when predicted faster than the
shapes above by ``PlannerSettings.time_share_margin``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Sequence

from spmd_diff.errors import UserError
from spmd_diff.plan.memory import GIB, MemoryModel
from spmd_diff.plan.roles import STAGE_ORDER, RolePlan, place_ranks, summarize_layouts, with_group_options
from spmd_diff.plan.throughput import (ALL_STAGES, DECODE, DENOISE, ENCODE, HOST_TO_GPU_BYTES_PER_S, Prediction,
                                       StageWork, mask_of, predict_pools, predict_time_shared, stages_of_mask)
from spmd_diff.plan.topology import Topology
from spmd_diff.plan.workload import Workload


@dataclass(frozen=True)
class PlannerSettings:
    sp_degrees: tuple[int, ...] = (1,)
    """DiT group sizes the planner may use. Throughput is best at the smallest that fits; larger ones win only
    when memory requires them or few items are left for many ranks."""
    sp_layout: str = "auto"
    cfg_parallel: bool | str = False
    """``dit.cfg_parallel`` (False for work without guidance); see :func:`roles.with_group_options`."""
    group_decode: bool | str = False
    """``dit.group_decode``."""
    colocate: bool = True
    """Let a rank hold several stages where memory allows (False: one stage per rank)."""
    separate_aux: bool = False
    """Non-DiT ranks hold one stage each, one that DiT ranks do not hold (DiT ranks that encode never share
    encoding with encoder ranks; likewise decoding): the shapes whose hand-offs are fixed edges, which is what
    the engine's role loops run (``spmd_diff.runtime``). False: any maximal stage sets (the simulator's pulled
    work)."""
    min_gain_fraction: float = 0.05
    """Re-plan only if the predicted gain exceeds this fraction of the remaining time (noise in the timings) ..."""
    switch_cost_factor: float = 1.5
    """... plus this many times the predicted cost of switching."""
    persist_gain_fraction: float = 0.01
    """Or if the current plan was predicted behind the best by more than this fraction (plus the switch cost) ...
    """
    persist_batches: int = 2
    """... after this many batches in a row: a small but steady gain is not noise."""
    time_share: bool | str = "auto"
    """``roles.time_share``: "auto" -- a plan of time-shared ranks is a candidate where no rank can hold every
    stage at once (otherwise ranks holding every stage resident are strictly better) and ``colocate`` is on;
    True -- always that plan (a UserError if a stage alone does not fit a GPU); False -- never."""
    stage_batch: int = 8
    """``roles.stage_batch``: the most items a time-shared rank runs per cycle (the plan takes fewer to fill a
    rank's cycles evenly, or for ranks of uneven speeds: :func:`time_shared_plan`)."""
    time_share_margin: float = 0.03
    """"auto" takes time-shared ranks over dedicated stages only when predicted faster by this fraction: a
    time-shared rank's last cycle holds ``stage_batch`` items, so a rank slower than the fitted speeds say ends the
    job late, where dedicated stages hand out items one at a time."""
    host_to_gpu_bytes_per_s: float = HOST_TO_GPU_BYTES_PER_S
    """What a time-shared rank's move of a component from host memory to its GPU runs at (a cost parameter:
    the prediction's moves per cycle, and a switch away from time-sharing)."""


def candidate_degrees(min_degree: int, ranks_per_node: int, num_ranks: int) -> tuple[int, ...]:
    """SP degrees the auto planner may use: ``min_degree`` (``dit.sp_degree``) and its doublings up to the ranks
    of one node (larger groups only when memory or a short tail asks for them)."""
    degrees, degree = [], max(1, min_degree)
    while degree <= num_ranks and (degree <= max(ranks_per_node, min_degree)):
        degrees.append(degree)
        degree *= 2
    return tuple(degrees) or (min_degree,)


@dataclass(frozen=True)
class PlanInputs:
    """What does not change between batches: the allocation, the memory model, the GPU's capacity."""

    topology: Topology
    memory: MemoryModel
    gpu_bytes: int
    """Usable bytes of the smallest GPU (``world.gpu_memory_gib`` applied; see ``memory.capacity_bytes``)."""
    settings: PlannerSettings = PlannerSettings()


@dataclass(frozen=True)
class Shape:
    """A plan before placement: ``num_groups`` DiT groups of ``sp_degree`` ranks holding ``dit_mask``, and non-DiT
    ranks as (stage mask, count) pairs taken in placement order; ``slow_first``: non-DiT ranks come from the
    slowest nodes first (else from the last node backwards)."""

    sp_degree: int
    dit_mask: int
    num_groups: int
    aux: tuple[tuple[int, int], ...]
    slow_first: bool = False


class _Capacity:
    """Summed speed of each pool of a shape: ``speed`` x counts, or exact over a placement order."""

    def __init__(self, num_ranks: int, speed: float = 1.0, aux_prefix: list[float] | None = None):
        self.num_ranks, self.speed, self.prefix = num_ranks, speed, aux_prefix

    def pools(self, shape: Shape) -> tuple[list[tuple[int, float]], float]:
        """((mask, capacity) pairs, mean DiT rank speed)."""
        num_dit = shape.num_groups * shape.sp_degree
        if self.prefix is None:
            return [(shape.dit_mask, num_dit * self.speed)] + \
                [(mask, count * self.speed) for mask, count in shape.aux if count], self.speed
        pools, start = [], 0
        for mask, count in shape.aux:
            pools.append((mask, self.prefix[start + count] - self.prefix[start]))
            start += count
        dit = self.prefix[-1] - self.prefix[start]
        return [(shape.dit_mask, dit)] + pools, dit / num_dit


def plan_auto(inputs: PlanInputs, workload: Workload, cost, current: RolePlan | None = None) -> RolePlan:
    """The plan predicted to finish ``workload`` soonest. ``cost``: a :class:`CostModel`. ``current``: the plan
    in force, if any: ranks keep their roles where the new counts allow (a switch moves as few ranks as it can).

    Raises :class:`UserError` when no plan fits the GPUs' memory (the message lists what each stage needs).
    """
    _check_one_rank_per_gpu(inputs.topology)
    if not workload:
        raise ValueError("plan_auto needs a workload with at least one item")
    num_ranks = inputs.topology.num_ranks
    speeds = cost.speeds(num_ranks)
    primed = current is not None
    shared = None
    if inputs.settings.time_share is True:
        shared = time_shared_plan(inputs, workload, cost)  # raises when a stage alone does not fit
        prediction = predict_plan(shared, workload, cost, primed, inputs)
        return replace(shared, predicted_videos_per_hour=prediction.videos_per_hour)
    if time_share_candidate(inputs, workload):
        shared = time_shared_plan(inputs, workload, cost)
    candidates = search_shapes(inputs, workload, cost, speeds, primed)
    if not candidates and shared is None:
        raise UserError(_no_fit_message(inputs, workload))
    best_plan, best = None, None
    if not candidates:
        best = predict_plan(shared, workload, cost, primed, inputs)
        return replace(shared, predicted_videos_per_hour=best.videos_per_hour)
    uneven = _uneven(speeds)
    tries = [(shape, speeds) for shape, _ in candidates[: 4 if uneven else 1]]
    if uneven:  # also the best shape for even speeds, placed ignoring them (spread, or the current ranks kept)
        even = search_shapes(inputs, workload, cost, None, primed)
        tries += [(shape, None) for shape, _ in candidates[:1] + even[:1]]
    for shape, placed_speeds in tries:  # the exact prediction of each placement decides
        plan = build_plan(inputs, shape, placed_speeds, current)
        prediction = predict_plan(plan, workload, cost, primed)
        if best is None or prediction.seconds < best.seconds * (1 - 1e-9):
            best_plan, best = plan, prediction
    if shared is not None:
        prediction = predict_plan(shared, workload, cost, primed, inputs)
        if prediction.seconds < best.seconds * (1 - inputs.settings.time_share_margin):
            best_plan, best = shared, prediction
    return replace(best_plan, predicted_videos_per_hour=best.videos_per_hour)


def time_share_candidate(inputs: PlanInputs, workload: Workload) -> bool:
    """``roles.time_share = "auto"``: time-shared ranks are a candidate for ``workload`` -- no rank can hold every
    stage at once (at any allowed SP degree), each stage alone fits a GPU, and ranks may hold several stages."""
    settings, classes = inputs.settings, workload.classes
    if settings.time_share != "auto" or not settings.colocate:
        return False
    degrees = [sp for sp in settings.sp_degrees if sp <= inputs.topology.num_ranks] or [1]
    if any(inputs.memory.fits(STAGE_ORDER, classes, inputs.gpu_bytes, sp) for sp in degrees):
        return False
    return inputs.memory.fits_time_shared(classes, inputs.gpu_bytes)


def time_shared_plan(inputs: PlanInputs, workload: Workload, cost=None) -> RolePlan:
    """Every rank a group of one holding every stage, one stage's components on its GPU at a time
    (``roles.time_share``). Raises :class:`UserError` when a stage alone does not fit a GPU.

    Its ``stage_batch``: at most ``settings.stage_batch``, as few as give each rank's items the same number of
    cycles (12 items per rank in cycles of at most 8: two of 6, not 8 and 4 -- a short last cycle pulled at
    ceil(items left / ranks) leaves the ranks finishing up to an item apart); with a ``cost`` model of uneven
    rank speeds, the size up to that predicted fastest (fewer moves per item against a slow rank's shorter last
    cycle)."""
    classes = workload.classes
    memory, gpu_bytes = inputs.memory, inputs.gpu_bytes
    if not memory.fits_time_shared(classes, gpu_bytes):
        needs = ", ".join(f"{s} {memory.rank_bytes((s,), classes) / GIB:.1f} GiB" for s in STAGE_ORDER)
        raise UserError(f"roles.time_share: a time-shared rank needs each stage alone to fit its GPU, but GPUs "
                        f"offer {gpu_bytes / GIB:.1f} GiB (world.gpu_memory_gib caps it) and alone the stages "
                        f"need {needs} for {workload.describe()}")
    num_ranks = inputs.topology.num_ranks
    batch = inputs.settings.stage_batch
    per_rank = workload.num_items / num_ranks
    if per_rank > 0:
        batch = min(batch, math.ceil(per_rank / math.ceil(per_rank / batch)))
    if cost is not None and batch > 1:
        work, speeds, move_s = StageWork.of(workload, cost, 1), cost.speeds(num_ranks), cycle_move_seconds(inputs)
        if _uneven(speeds):
            batch = min(range(batch, 0, -1), key=lambda b: predict_time_shared(work, speeds, b, move_s).seconds)
    return RolePlan(num_ranks, (), tuple((r,) for r in range(num_ranks)), (), "none", (1, 1),
                    (STAGE_ORDER,) * num_ranks, "auto", time_shared=True, stage_batch=batch)


def cycle_move_seconds(inputs: PlanInputs) -> float:
    """Seconds a time-shared rank spends per cycle moving its three components from host memory to its GPU."""
    return sum(inputs.memory.component_bytes(s) for s in STAGE_ORDER) / inputs.settings.host_to_gpu_bytes_per_s


def predict_plan(plan: RolePlan, workload: Workload, cost, primed: bool = False,
                 inputs: PlanInputs | None = None) -> Prediction:
    """Predicted time of ``workload`` on ``plan`` with each rank's fitted speed (static plans too); ``primed``:
    re-planning a running job (see ``throughput.predict_pools``). ``inputs``: needed for a time-shared plan
    (its moves per cycle: :func:`cycle_move_seconds`)."""
    speeds = list(cost.speeds(plan.num_ranks))
    if plan.time_shared:
        if inputs is None:
            raise ValueError("predicting a time-shared plan needs the PlanInputs (component bytes, bandwidth)")
        return predict_time_shared(StageWork.of(workload, cost, 1), speeds, plan.stage_batch,
                                   cycle_move_seconds(inputs))
    if plan.sp_degree == 1:
        group_speeds = [speeds[group[0]] for group in plan.dit_groups]
    else:
        group_speeds = []
        for group in plan.dit_groups:
            slowest = min(speeds[r] for r in group)
            group_speeds.append(slowest)
            for rank in group:
                speeds[rank] = slowest
    pools: dict[int, float] = {}
    masks: dict[tuple[str, ...], int] = {}
    for rank in range(plan.num_ranks):
        stages = plan.stages_of(rank)
        mask = masks.get(stages)
        if mask is None:
            mask = masks[stages] = mask_of(stages)
        pools[mask] = pools.get(mask, 0.0) + speeds[rank]
    work = StageWork.of(workload, cost, plan.sp_degree)
    return predict_pools(work, sorted(pools.items()), len(plan.dit_groups), sum(group_speeds) / len(group_speeds),
                         primed)


def search_shapes(inputs: PlanInputs, workload: Workload, cost, speeds: Sequence[float] | None = None,
                  primed: bool = False) -> list[tuple[Shape, Prediction]]:
    """Every candidate shape with its predicted time (``speeds``: each rank's; None: all 1.0), fastest first."""
    num_ranks = inputs.topology.num_ranks
    speeds = list(speeds) if speeds is not None else [1.0] * num_ranks
    classes = workload.classes
    out: list[tuple[Shape, Prediction]] = []
    for sp in sorted(set(inputs.settings.sp_degrees)):
        if sp > num_ranks:
            continue

        def fits(mask: int, sp=sp) -> bool:
            return inputs.memory.fits(stages_of_mask(mask), classes, inputs.gpu_bytes, sp)

        if not fits(DENOISE):
            continue
        colocate = inputs.settings.colocate
        dit_masks = [m for m in (ALL_STAGES, DENOISE | DECODE, DENOISE | ENCODE, DENOISE)
                     if (colocate or m == DENOISE) and fits(m)]
        dit_masks = _maximal(dit_masks)
        aux_masks = [ENCODE | DECODE] if colocate and fits(ENCODE | DECODE) else [m for m in (ENCODE, DECODE)
                                                                                 if fits(m)]
        if inputs.settings.separate_aux:
            aux_masks = [m for m in (ENCODE, DECODE) if fits(m)]
        work = StageWork.of(workload, cost, sp)
        if _uneven(speeds):
            capacities = [(slow_first, _Capacity(num_ranks, aux_prefix=_aux_prefix(inputs.topology, sp, speeds,
                                                                                  slow_first)))
                          for slow_first in (True, False)]
        else:
            capacities = [(False, _Capacity(num_ranks, speeds[0]))]
        for dit_mask in dit_masks:
            masks = [m for m in aux_masks if not m & dit_mask] if inputs.settings.separate_aux else aux_masks
            for slow_first, capacity in capacities:
                found = _best_counts(num_ranks, sp, dit_mask, masks, work, capacity, slow_first, primed)
                if found is not None:
                    out.append(found)
    out.sort(key=lambda c: (round(c[1].seconds, 9), c[0].sp_degree, -bin(c[0].dit_mask).count("1"),
                            c[0].dit_mask))
    return out


def build_plan(inputs: PlanInputs, shape: Shape, speeds: Sequence[float] | None = None,
               current: RolePlan | None = None) -> RolePlan:
    """Place ``shape`` on the topology (``roles.place_ranks``; the slowest nodes give non-DiT ranks first when
    ``shape.slow_first``). With groups of one rank: a first plan (no ``current``, speeds even) spreads its
    non-DiT ranks over the nodes (:func:`_spread`), so every stage runs on several nodes and the first batch's
    timings tell a slow node from a slow stage; re-planning from a ``current`` plan of groups of one keeps
    non-DiT ranks non-DiT (and their stages) where the counts allow, unless the fitted speeds are uneven (then
    ranks go where their speed was counted: ``search_shapes`` predicted the shape for that placement)."""
    topology = inputs.topology
    num_aux = topology.num_ranks - shape.num_groups * shape.sp_degree
    node_order = _slow_first_order(topology, speeds) if shape.slow_first and speeds is not None else None
    uneven = speeds is not None and _uneven(speeds)
    if shape.sp_degree == 1 and not uneven and current is None:
        chosen = _spread(topology, num_aux)
        picked = set(chosen)
        groups = [(r,) for r in range(topology.num_ranks) if r not in picked]
    else:
        chosen, groups = place_ranks(topology, num_aux, shape.sp_degree, node_order)
    stages: list[tuple[str, ...]] = [stages_of_mask(shape.dit_mask)] * topology.num_ranks
    if current is not None and shape.sp_degree == 1 and current.sp_degree == 1 and not uneven \
            and current.num_ranks == topology.num_ranks:
        chosen, masks = _sticky_aux(shape, current, chosen)
        groups = [(r,) for r in sorted(set(range(topology.num_ranks)) - set(chosen))]
        for rank, mask in zip(chosen, masks):
            stages[rank] = stages_of_mask(mask)
    else:
        picked = iter(chosen)
        for mask, count in shape.aux:
            for _ in range(count):
                stages[next(picked)] = stages_of_mask(mask)
        if inputs.settings.separate_aux:
            for rank in picked:  # ranks left over from whole groups, with no stage of their own: idle
                stages[rank] = ()
    encoders = tuple(sorted(r for r in chosen if "encode" in stages[r]))
    decoders = tuple(sorted(r for r in chosen if "decode" in stages[r]))
    layout, torus = summarize_layouts(topology, groups, inputs.settings.sp_layout)
    plan = RolePlan(topology.num_ranks, encoders, tuple(groups), decoders, layout, torus, tuple(stages), "auto")
    return with_group_options(plan, inputs.settings.cfg_parallel, inputs.settings.group_decode)


def _best_counts(num_ranks: int, sp: int, dit_mask: int, aux_masks: list[int], work: StageWork,
                 capacity: _Capacity, slow_first: bool, primed: bool) -> tuple[Shape, Prediction] | None:
    missing = ALL_STAGES & ~dit_mask
    covered = 0
    for mask in aux_masks:
        covered |= mask
    if missing & ~covered:
        return None
    single = len(aux_masks) == 1
    min_aux = 0 if not missing else (1 if single else bin(missing).count("1"))
    max_groups = (num_ranks - min_aux) // sp
    if max_groups < 1:
        return None

    def evaluate(groups: int) -> tuple[Shape, Prediction] | None:
        best = None
        for aux in _aux_splits(num_ranks - groups * sp, missing, aux_masks, work):
            shape = Shape(sp, dit_mask, groups, aux, slow_first)
            pools, dit_speed = capacity.pools(shape)
            prediction = predict_pools(work, pools, groups, dit_speed, primed)
            if best is None or prediction.seconds < best[1].seconds:
                best = (shape, prediction)
        return best

    if not missing:  # DiT ranks hold every stage: as many groups as fit; leftover ranks help where they can
        return evaluate(max_groups)
    lo, hi = 1, max_groups
    cache: dict[int, float] = {}

    def seconds(groups: int) -> float:
        if groups not in cache:
            found = evaluate(groups)
            cache[groups] = found[1].seconds if found else float("inf")
        return cache[groups]

    while hi - lo > 4:
        m1 = lo + (hi - lo) // 3
        m2 = hi - (hi - lo) // 3
        if seconds(m1) <= seconds(m2):
            hi = m2
        else:
            lo = m1
    window = range(max(1, lo - 2), min(max_groups, hi + 2) + 1)
    fastest = min(seconds(g) for g in window)
    # Within 0.1% of the fastest, the most DiT groups: ranks that co-locate rather than ranks reserved.
    best_groups = max(g for g in window if seconds(g) <= fastest * (1 + 1e-3))
    while best_groups < max_groups and seconds(best_groups + 1) <= fastest * (1 + 1e-3):
        best_groups += 1
    return evaluate(best_groups)


def _aux_splits(num_aux: int, missing: int, aux_masks: list[int], work: StageWork) -> list[tuple[tuple[int, int], ...]]:
    """Ways to give ``num_aux`` non-DiT ranks stage sets: all of one set, or encoders and decoders around the
    work-proportional split."""
    if num_aux == 0:
        return [()] if not missing else []
    if len(aux_masks) == 1:
        return [((aux_masks[0], num_aux),)]
    if not aux_masks:
        return [] if missing else [()]
    lo = 1 if missing & ENCODE else 0
    hi = num_aux - (1 if missing & DECODE else 0)
    if lo > hi:
        return []
    encode_work = work.encode_s if missing & ENCODE else 0.0
    decode_work = work.decode_s if missing & DECODE else 0.0
    picks = {lo, hi}
    if encode_work + decode_work > 0:
        base = round(num_aux * encode_work / (encode_work + decode_work))
        picks.update(base + d for d in (-1, 0, 1))
    splits = []
    for num_encoders in sorted(n for n in picks if lo <= n <= hi):
        splits.append(((ENCODE, num_encoders), (DECODE, num_aux - num_encoders)))
    return splits


def _sticky_aux(shape: Shape, current: RolePlan, default: list[int]) -> tuple[list[int], list[int]]:
    """Non-DiT ranks for ``shape`` and their stage masks: first the current non-DiT ranks holding exactly a mask
    the shape needs, then other current non-DiT ranks, then ``default`` (``place_ranks``' pick order)."""
    wanted = {mask: count for mask, count in shape.aux if count}
    incumbents = [r for r in range(current.num_ranks) if "denoise" not in current.stages_of(r)]
    chosen: list[int] = []
    masks: list[int] = []
    for rank in incumbents:
        mask = mask_of(current.stages_of(rank))
        if wanted.get(mask, 0) > 0:
            wanted[mask] -= 1
            chosen.append(rank)
            masks.append(mask)
    taken = set(chosen)
    rest = [r for r in incumbents if r not in taken] + [r for r in default if r not in taken]
    seen: set[int] = set()
    for rank in rest:
        if rank in seen or rank in taken:
            continue
        seen.add(rank)
        mask = next((m for m, c in wanted.items() if c > 0), None)
        if mask is None:
            break
        wanted[mask] -= 1
        chosen.append(rank)
        masks.append(mask)
    return chosen, masks


def _spread(topology: Topology, num_aux: int) -> list[int]:
    """``num_aux`` ranks taken round-robin over the nodes (last node first, each node's ranks front first)."""
    per_node = [list(ranks) for ranks in reversed(topology.node_ranks)]
    chosen: list[int] = []
    depth = 0
    while len(chosen) < num_aux:
        for ranks in per_node:
            if depth < len(ranks) and len(chosen) < num_aux:
                chosen.append(ranks[depth])
        depth += 1
    return chosen


def _uneven(speeds: Sequence[float]) -> bool:
    """Speeds differ enough to place ranks by them (fitted speeds of equal GPUs scatter by a few percent)."""
    return max(speeds) > 1.1 * min(speeds)


def _slow_first_order(topology: Topology, speeds: Sequence[float]) -> list[int]:
    node_speed = [sum(speeds[r] for r in ranks) / len(ranks) for ranks in topology.node_ranks]
    return sorted(range(len(node_speed)), key=lambda n: (node_speed[n], -n))


def _aux_prefix(topology: Topology, sp: int, speeds: Sequence[float], slow_first: bool) -> list[float]:
    """Prefix sums of speed over the order in which ``place_ranks`` picks non-DiT ranks (a fixed sequence: the
    pick for A ranks is the first A of it)."""
    order, _ = place_ranks(topology, topology.num_ranks, sp,
                           _slow_first_order(topology, speeds) if slow_first else None)
    prefix = [0.0]
    for rank in order:
        prefix.append(prefix[-1] + speeds[rank])
    return prefix


def _maximal(masks: list[int]) -> list[int]:
    """Drop stage sets contained in another candidate (holding more never hurts when work is pulled)."""
    return [m for m in masks if not any(o != m and o & m == m for o in masks)]


def _check_one_rank_per_gpu(topology: Topology) -> None:
    if topology.gpus_per_node:
        for node, ranks in enumerate(topology.node_ranks):
            if len(ranks) > topology.gpus_per_node:
                raise UserError(
                    f"node {topology.hostname(node)} has {len(ranks)} ranks but {topology.gpus_per_node} GPUs: "
                    "launch one rank per GPU (e.g. srun --ntasks-per-node=GPUS)")


def _no_fit_message(inputs: PlanInputs, workload: Workload) -> str:
    classes = workload.classes
    parts = []
    for stage in ("encode", "denoise", "decode"):
        degrees = inputs.settings.sp_degrees if stage == "denoise" else (1,)
        need = min(inputs.memory.rank_bytes((stage,), classes, s) for s in degrees)
        parts.append(f"{stage} {need / GIB:.1f} GiB")
    heap = f", with a {inputs.memory.heap_bytes / GIB:.1f} GiB channel heap," if inputs.memory.heap_bytes else ""
    hint = ""
    if inputs.settings.time_share is False and inputs.memory.fits_time_shared(classes, inputs.gpu_bytes):
        hint = '; roles.time_share = "auto" or true runs every stage on each rank, one at a time'
    return (f"no role plan fits: GPUs offer {inputs.gpu_bytes / GIB:.1f} GiB (world.gpu_memory_gib caps it) and "
            f"{inputs.topology.num_ranks} rank(s) must hold every stage between them; alone each needs"
            f"{heap} {', '.join(parts)} for {workload.describe()} (a larger dit.sp_degree shrinks the DiT's "
            f"activations{hint})")
