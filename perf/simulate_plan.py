#!/usr/bin/env python3
"""Replay workloads through the role planner and compare makespans (the elastic engine's simulator).

For each scenario and allocation (8 to 4,096 GPUs) the same items are rendered in a discrete-event simulation
(perf/plan_sim.py) under four policies:

- static: the best fixed split of roles, searched with the true stage costs over the whole job (an oracle
  static: ``plan_roles(topology, encoders, decoders)``; the 5 best by the fluid model are simulated, the best kept);
- one-pipeline-per-GPU: every GPU encodes, denoises and decodes its own pulled items (only where memory allows);
- time-shared (fixed): every GPU runs every stage of its pulled items, one stage's components on it at a time
  (``roles.time_share = true``; only where the stages do not fit together but each alone does);
- auto (engine): what the engine does (``plan_sim.Simulation`` "engine" mode): items in the engine's render order
  (longest predicted first, ties in file order: ``engine.render_order``'s rule), batches cut as each starts
  (``rebalance.AutoPolicy.batch_items`` from ``roles.batch_s`` = 300 s, grown by ``rebalance.batch_length``), the
  batch's timings to ``spmd_diff.plan.replan.Rebalancer`` -- the planner code the engine calls -- starting from
  the analytic prior, and a switch a global one at a drained boundary. Where the plan's ranks are independent
  (``RolePlan.ranks_independent``: time-shared, or every stage on groups of one) batch boundaries flow: a rank
  goes on to the next batch as soon as it has finished its items of this one, and batch k's timings decide at
  cut k+1 (a re-plan lags one batch; only a switch drains); other plans drain the pipeline at every batch's end.
  Also with a drain at every batch's end whatever the plan ("no flow": the engine before flowing boundaries),
  and with every batch ``batch_s`` long (a drain per batch: the engine before batches grew);
- auto (rolling, hypothetical): the same planner with batches of max(16, 2 x GPUs) items in file order, no drain
  at a batch's end and a rolling switch (only ranks that change stop); "auto, global switch" the same with a
  global switch (drain + barrier + slowest load) -- neither is what the engine does;
- lower bound: total work (seconds of every stage of every item on one GPU) / total GPU speed.

Every policy pulls work (an idle unit takes the next item), so the comparison isolates the role plan. Where
stages cannot share a GPU, a dedicated-roles bound (``dedicated_bound``) is reported beside the work bound.

Then the mixed jobs of per-item SP degree (``DEGREE_SCENARIOS``, 16 to 512 GPUs): the same items under the
engine's per-item schedule (``spmd_diff.runtime.item_groups``, longest first and in file order) and under each
fixed degree, as the engine runs it (static groups) and with groups formed from free ranks per item
(``plan_sim.DegreeSimulation``).

    python perf/simulate_plan.py                      # all scenarios, 8..4096 GPUs; writes perf/results/
    python perf/simulate_plan.py --scales 8 64 --scenarios uniform-4step --out /tmp/sim
    python perf/simulate_plan.py --degree-only --jobs 2     # per-item degree only: simulate-degree-DATE.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

from plan_sim import (C480_4, C480_4_NOCFG, C480_50, C720_4, C720_50, DegreeSimulation, Simulation,  # its own folder
                      TrueCost, true_seconds)

from spmd_diff.config import RolesConfig  # noqa: E402

from spmd_diff.plan.cost_model import AnalyticPrior, CostModel, TablePrior  # noqa: E402
from spmd_diff.plan.degree import DegreeRequest, allowed_degrees, pick_degree  # noqa: E402
from spmd_diff.plan.memory import MemoryModel, capacity_bytes  # noqa: E402
from spmd_diff.plan.model_sizes import WAN21_T2V_1_3B  # noqa: E402
from spmd_diff.plan.planner import PlanInputs, PlannerSettings, time_shared_plan  # noqa: E402
from spmd_diff.plan.replan import Rebalancer, SwitchCostModel  # noqa: E402
from spmd_diff.plan.roles import place_ranks, plan_roles  # noqa: E402
from spmd_diff.plan.throughput import DECODE, DENOISE, ENCODE, StageWork, predict_pools, stages_of_mask  # noqa: E402
from spmd_diff.plan.topology import Topology  # noqa: E402
from spmd_diff.plan.workload import Workload, horizon, runs_of  # noqa: E402
from spmd_diff.runtime.rebalance import (batch_length, batch_size_for, batches_since_change,  # noqa: E402
                                         next_batch)
from spmd_diff.runtime.item_groups import (FILE_ORDER, LONGEST_FIRST, schedule_item_groups, widens_any,  # noqa: E402
                                           start_order)

SCALES = (8, 64, 512, 4096)
MEMCAP_GIB = 14.0
"""A GPU cap under which no two of Wan2.1-1.3B's stages fit one GPU at 480p (the memory model: text encoder
12.1 GiB, DiT 5.7, VAE decode 11.8, DiT+VAE 14.5)."""
SCENARIOS = {
    "uniform-4step": dict(items=[(C480_4, 24)], note="480p 4-step CFG, 24 items/GPU, H200 memory"),
    "uniform-50step": dict(items=[(C480_50, 8)], note="480p 50-step CFG, 8 items/GPU, H200 memory"),
    "mix-4-50": dict(items=[(C480_4, 12), (C480_50, 12)], shuffle=True,
                     note="480p, 4- and 50-step CFG items interleaved at random, 12+12 items/GPU"),
    "mix-480-720": dict(items=[(C480_4, 12), (C720_4, 12)], shuffle=True,
                        note="4-step CFG, 480p and 720p interleaved at random, 12+12 items/GPU"),
    "memcap-4step": dict(items=[(C480_4, 24)], gib=MEMCAP_GIB,
                         note=f"480p 4-step CFG, 24 items/GPU, GPUs capped at {MEMCAP_GIB:g} GiB (no co-location)"),
    "slow-node": dict(items=[(C480_4, 24)], gib=MEMCAP_GIB, slow=True,
                      note="as memcap-4step, and node 0 runs at half speed"),
    "4step-then-50step": dict(items=[(C480_4_NOCFG, 12), (C480_50, 12)], gib=MEMCAP_GIB,
                              note=f"a 4-step no-CFG draft pass, then a 50-step CFG pass over the same prompts, "
                                   f"12 items/GPU each, GPUs capped at {MEMCAP_GIB:g} GiB (no co-location)"),
    "drafts-then-finals": dict(items=[(C480_4_NOCFG, 40), (C480_50, 4)], gib=MEMCAP_GIB,
                               note=f"a 4-step no-CFG draft pass over every prompt, then a 50-step CFG pass over a "
                                    f"tenth of them, 40 + 4 items/GPU, GPUs capped at {MEMCAP_GIB:g} GiB"),
}


GLOBAL_SWITCH_SCENARIOS = ("memcap-4step", "slow-node", "4step-then-50step", "drafts-then-finals")
"""Scenarios also simulated with every switch a global drain and barrier (the heap re-targeting HeapLayout
documents today), to show what a rolling switch is worth."""


DEGREE_SCALES = (16, 64, 512)
DEGREE_SCENARIOS = {
    "all4-1": dict(items=[(C480_4, 1), (C480_50, 1), (C720_4, 1), (C720_50, 1)],
                   note="480p/720p x 4/50-step CFG, one item of each per GPU, interleaved at random"),
    "all4-2": dict(items=[(C480_4, 2), (C480_50, 2), (C720_4, 2), (C720_50, 2)],
                   note="the same, two of each per GPU"),
    "all4-6": dict(items=[(C480_4, 6), (C480_50, 6), (C720_4, 6), (C720_50, 6)],
                   note="the same, six of each per GPU"),
    "480-720-2": dict(items=[(C480_4, 2), (C720_4, 2)], note="4-step CFG, 480p and 720p, 2 + 2 items per GPU"),
    "480-720-12": dict(items=[(C480_4, 12), (C720_4, 12)], note="4-step CFG, 480p and 720p, 12 + 12 items per GPU"),
    "4-50-2": dict(items=[(C480_4, 2), (C480_50, 2)], note="480p CFG, 4- and 50-step, 2 + 2 items per GPU"),
    "4-50-12": dict(items=[(C480_4, 12), (C480_50, 12)], note="480p CFG, 4- and 50-step, 12 + 12 items per GPU"),
}
"""Mixed jobs for the per-item degree policy (every GPU holds every stage: H200 memory)."""
WAN21_HEADS = 12
"""Wan2.1-1.3B's attention heads: per-item groups of 1, 2 or 4 ranks (8 would split 12 heads unevenly)."""


def run_degree_scenario(name: str, num_gpus: int, seed: int = 0) -> dict:
    """Per-item degree (the engine's schedule, ``spmd_diff.runtime.item_groups.schedule_item_groups``, longest
    first and in file order) against every fixed degree (static groups as the engine runs them; groups formed
    from free ranks per item), same items."""
    spec = DEGREE_SCENARIOS[name]
    rng = random.Random(seed)
    topology = Topology.uniform(num_gpus // 8, 8, 8)
    items = [c for c, per_gpu in spec["items"] for _ in range(per_gpu * num_gpus)]
    rng.shuffle(items)
    classes = sorted(set(items))
    # The policy's cost model: the measured degree-1 seconds, wider groups at the model's 0.94 per doubling.
    cost = CostModel(TablePrior(tuple(sorted(((s, c.key, 1), true_seconds(s, c)) for c in classes
                                             for s in ("encode", "denoise", "decode", "write")))))
    allowed = allowed_degrees(WAN21_HEADS, 8, num_gpus)

    def policy(degrees):
        def choose(work_class, free, queued_s, running_s, busy_until):
            return pick_degree(cost, DegreeRequest(work_class, free, num_gpus, queued_s, running_s, busy_until),
                               degrees)
        return choose

    sim = DegreeSimulation(items, topology, seed=seed)
    row = {"scenario": name, "gpus": num_gpus, "items": len(items), "allowed_degrees": list(allowed)}
    work = sum(sum(true_seconds(s, c) for s in ("encode", "denoise", "decode", "write")) for c in items)
    widest = max(allowed)
    row["lower_bound_s"] = max(work / num_gpus, max(
        true_seconds("encode", c) + true_seconds("denoise", c, widest) + true_seconds("decode", c)
        + true_seconds("write", c) for c in items))
    started = time.perf_counter()
    work_classes = list(enumerate(items))
    for order, key in ((LONGEST_FIRST, "per_item"), (FILE_ORDER, "per_item_file_order")):
        planned = time.perf_counter()
        schedule = schedule_item_groups(work_classes, topology.node_ranks, cost, allowed, order)
        row[f"{key}_schedule_wall_s"] = round(time.perf_counter() - planned, 3)
        # The engine runs a schedule that widens no item as the fixed degree's groups pulling the items in its
        # render order (runtime.item_groups.widens_any; dit.sp_degree = 1 here)
        row[f"{key}_pulled"] = pulled = order == LONGEST_FIRST and not widens_any(schedule, 1)
        run = sim.run_static_groups(1, start_order(work_classes, cost, 1)) if pulled else sim.run_schedule(schedule)
        row[f"{key}_s"] = run["makespan_s"]
        row[f"{key}_degrees"] = {str(k): v for k, v in run["degrees"].items()}
        row[f"{key}_predicted_s"] = max(g.start_s + g.seconds + g.leader_s for g in schedule)
    row["static_s"] = {str(d): sim.run_static_groups(d)["makespan_s"] for d in allowed}
    row["free_ranks_s"] = {str(d): sim.run_free_ranks(policy((d,)), d)["makespan_s"] for d in allowed}
    # A fixed degree could pull longest first too (not what the engine's fixed path does): the order's share.
    row["static_longest_first_s"] = {str(d): sim.run_static_groups(d, start_order(work_classes, cost, d))[
        "makespan_s"] for d in allowed}
    for model in ("static", "free_ranks", "static_longest_first"):
        best = min(row[f"{model}_s"], key=lambda d: row[f"{model}_s"][d])
        row[f"best_{model}_degree"] = int(best)
        row[f"best_{model}_over_per_item"] = row[f"{model}_s"][best] / row["per_item_s"]
    row["static1_over_per_item"] = row["static_s"]["1"] / row["per_item_s"]
    row["file_order_over_per_item"] = row["per_item_file_order_s"] / row["per_item_s"]
    row["per_item_over_bound"] = row["per_item_s"] / row["lower_bound_s"]
    row["sim_wall_s"] = round(time.perf_counter() - started, 2)
    row["targets"] = {"per_item_1.2x_best_static_longest_first": row["best_static_longest_first_over_per_item"] >= 1.2,
                      "per_item_1.2x_best_static": row["best_static_over_per_item"] >= 1.2,
                      "per_item_1.2x_best_free_ranks": row["best_free_ranks_over_per_item"] >= 1.2}
    return row


def topology_for(num_gpus: int) -> Topology:
    per_node = min(8, max(1, num_gpus // 2))
    return Topology.uniform(num_gpus // per_node, per_node, per_node)


def make_job(name: str, num_gpus: int, seed: int):
    """(items in rendering order, sequential phases as workloads, rank speeds, GPU bytes)."""
    spec = SCENARIOS[name]
    rng = random.Random(seed)
    topology = topology_for(num_gpus)
    if spec.get("shuffle"):
        items = [c for c, per_gpu in spec["items"] for _ in range(per_gpu * num_gpus)]
        rng.shuffle(items)
        phases = [Workload.of(runs_of(sorted(items)))]
    else:
        items = [c for c, per_gpu in spec["items"] for _ in range(per_gpu * num_gpus)]
        phases = [Workload.uniform(c, per_gpu * num_gpus) for c, per_gpu in spec["items"]]
    speeds = [1.0] * num_gpus
    if spec.get("slow"):
        for rank in topology.node_ranks[0]:
            speeds[rank] = 0.5
    return topology, items, phases, speeds, capacity_bytes(spec.get("gib", 0.0))


class FixedPolicy:
    def __init__(self, plan):
        self.plan = plan

    def initial_plan(self):
        return self.plan

    def on_batch(self, timings, remaining):
        return None


class AutoPolicy:
    """The engine's loop around the planner: start from the prior, refit and re-plan after every batch."""

    def __init__(self, inputs: PlanInputs, items, batch_items: int, switch_costs: SwitchCostModel):
        self.inputs, self.items, self.batch_items, self.switch_costs = inputs, items, batch_items, switch_costs
        self.decisions = []
        self.plan_ms = []

    def initial_plan(self):
        started = time.perf_counter()
        self.balancer = Rebalancer.start(self.inputs, horizon(runs_of(self.items), self.batch_items),
                                         CostModel(AnalyticPrior(WAN21_T2V_1_3B)), self.switch_costs)
        self.plan_ms.append(1e3 * (time.perf_counter() - started))
        return self.balancer.plan

    def on_batch(self, timings, remaining):
        started = time.perf_counter()
        workload = horizon(runs_of(remaining), self.batch_items) if remaining else Workload(())
        self.balancer, decision = self.balancer.after_batch(timings, workload)
        self.plan_ms.append(1e3 * (time.perf_counter() - started))
        if decision is not None:
            self.decisions.append(decision)
        return decision.best if decision is not None and decision.switch else None


def render_order(items, cost) -> list:
    """``items`` as the engine hands them out (``runtime.engine.render_order``'s rule): longest predicted encode +
    denoise + decode first; among equal predictions each kind (here: the class) together, kinds in order of first
    appearance, each kind's items in file order."""
    seconds = {c: sum(cost.seconds(s, c) for s in ("encode", "denoise", "decode")) for c in set(items)}
    first = {}
    for position, c in enumerate(items):
        first.setdefault(c, position)
    return sorted(items, key=lambda c: (-seconds[c], first[c]))  # stable


ENGINE_BATCHES = {"auto_engine": ("grow+kind", True), "auto_engine_no_flow": ("grow+kind", False),
                  "auto_engine_grow": ("grow", False), "auto_engine_drain": ("fixed", False)}
"""Row key -> (how the simulated engine cuts batches (:class:`EngineBatches`), whether boundaries flow where the
plan's ranks are independent (``plan_sim.Simulation``'s ``flowing``; False: a drain at every batch end))."""


class EngineBatches:
    """The engine's batches over ``ordered`` items: a base of ``batch_s`` of a slowest predicted stage per DiT
    group, at least 2 items per group, then

    - "grow+kind": ``rebalance.next_batch`` / ``batches_since_change`` (batches double while the plan and the
      kind of item hold; a batch holds one kind) on ``rebalance.AutoPolicy.batch_items``'s base (the batch's own
      kind's stage, ``rebalance.batch_size_for``: a whole number of items per DiT group): the engine now;
    - "grow": doubling, but batches cross kinds, on the base before (the job's work class's stage; ``batch_s`` x
      groups / item seconds rounded up: not a whole number per group), an intermediate rule, for comparison;
    - "fixed": every batch the base before (the engine before batches grew).
    """

    def __init__(self, ordered, cost, work_class, batch_s: float, rule: str):
        self.ordered, self.cost, self.work_class, self.batch_s, self.rule = ordered, cost, work_class, batch_s, rule

    def size(self, plan, start: int, since_change: int) -> int:
        groups = len(plan.dit_groups)
        if self.rule == "grow+kind":  # the base from the batch's own kind (rebalance.AutoPolicy.batch_items)
            per_item = max(self.cost.item_seconds(self.ordered[start], plan.sp_degree).values())
            base = batch_size_for(self.batch_s, per_item, groups, minimum=2 * groups)
            return len(next_batch(self.ordered, start, base, since_change, kind=lambda c: c))
        per_item = max(self.cost.item_seconds(self.work_class, plan.sp_degree).values())  # the job's class
        base = max(2 * groups, math.ceil(self.batch_s / per_item * groups))  # batch_size_for before
        return batch_length(base, since_change if self.rule == "grow" else 0)

    def since(self, start: int, since_change: int, switched: bool) -> int:
        if self.rule == "grow+kind":
            return batches_since_change(self.ordered, start, since_change, switched, kind=lambda c: c)
        return 0 if switched else since_change + 1


def static_candidates(topology, phases, memory, gpu_bytes, speeds, keep=5):
    """The best (encoders, decoders) counts of ``roles.policy = "static"`` by the fluid model with true costs,
    summed over the job's sequential phases."""
    num = topology.num_ranks
    cost = TrueCost(speeds)
    works = [StageWork.of(w, cost, 1) for w in phases]
    classes = [c for w in phases for c in w.classes]
    fits = {m: memory.fits(stages_of_mask(m), classes, gpu_bytes, 1) for m in range(1, 8)}
    order, _ = place_ranks(topology, num, 1)  # plan_roles picks encoders, then decoders, in this order
    prefix = [0.0]
    for rank in order:
        prefix.append(prefix[-1] + speeds[rank])
    scored = {}

    def score(encoders: int, decoders: int) -> float:
        if (encoders, decoders) not in scored:
            dit_mask = DENOISE | (ENCODE if encoders == 0 else 0) | (DECODE if decoders == 0 else 0)
            num_dit = num - encoders - decoders
            if num_dit < 1 or not fits[dit_mask] or (encoders and not fits[ENCODE]) or \
                    (decoders and not fits[DECODE]):
                seconds = math.inf
            else:
                dit = prefix[-1] - prefix[encoders + decoders]
                pools = [(dit_mask, dit), (ENCODE, prefix[encoders]),
                         (DECODE, prefix[encoders + decoders] - prefix[encoders])]
                seconds = sum(predict_pools(w, pools, num_dit, dit / num_dit).seconds for w in works)
            scored[(encoders, decoders)] = seconds
        return scored[(encoders, decoders)]

    for encoders in range(0, min(num - 1, 2 + math.ceil(num * 0.03)) + 1):
        score(encoders, 0)
        lo, hi = 1, num - encoders - 1
        while hi - lo > 4:  # the time is unimodal in the number of decoders
            m1, m2 = lo + (hi - lo) // 3, hi - (hi - lo) // 3
            if score(encoders, m1) <= score(encoders, m2):
                hi = m2
            else:
                lo = m1
        for decoders in range(max(1, lo - 3), min(num - encoders - 1, hi + 3) + 1):
            score(encoders, decoders)
    scored = [(seconds, e, x) for (e, x), seconds in scored.items() if math.isfinite(seconds)]
    scored.sort()
    return scored[:keep]


def dedicated_bound(phases, memory, gpu_bytes, speeds, max_ranks=64):
    """A lower bound for schedules in which every GPU holds one stage for the whole job (no co-location, no
    role switch): each pool must do its stage's work, so the makespan is at least max over stages of work /
    the pool's summed speed, minimised over every integer assignment of ranks to pools (counts per distinct
    speed). None where stages co-locate (the bound does not apply), for several phases (a switch between them
    is allowed) or above ``max_ranks`` (the enumeration; the integer rounding is then small anyway)."""
    classes = [c for w in phases for c in w.classes]
    if len(phases) != 1 or len(speeds) > max_ranks or any(
            memory.fits(stages_of_mask(m), classes, gpu_bytes, 1) for m in (ENCODE | DENOISE, DENOISE | DECODE,
                                                                              ENCODE | DECODE)):
        return None
    work = StageWork.of(phases[0], TrueCost(), 1)
    kinds = sorted({v: sum(1 for x in speeds if x == v) for v in speeds}.items())
    best = math.inf

    def assign(index, left, caps):
        nonlocal best
        if index == len(kinds):
            if all(caps):
                best = min(best, max(w / c for w, c in zip((work.encode_s, work.denoise_s, work.decode_s), caps)))
            return
        speed, count = kinds[index]
        for e in range(count + 1):
            for d in range(count - e + 1):
                x = count - e - d
                assign(index + 1, left, (caps[0] + e * speed, caps[1] + x * speed, caps[2] + d * speed))

    assign(0, len(speeds), (0.0, 0.0, 0.0))
    return best


def phase_bound(topology, phases, memory, gpu_bytes, speeds):
    """Per phase, the best static split's fluid time (what re-planning between phases could reach at best)."""
    return sum(static_candidates(topology, [w], memory, gpu_bytes, speeds, 1)[0][0] for w in phases)


def run_scenario(name: str, num_gpus: int, seed: int = 0, global_switch: bool = False) -> dict:
    topology, items, phases, speeds, gpu_bytes = make_job(name, num_gpus, seed)
    memory = MemoryModel.for_model(WAN21_T2V_1_3B)
    batch_items = max(16, 2 * num_gpus)
    sim = Simulation(items, speeds, batch_items, memory, seed=seed)
    row = {"scenario": name, "gpus": num_gpus, "items": len(items), "batch_items": batch_items}
    work = sum(sum(true_seconds(s, c) for s in ("encode", "denoise", "decode", "write")) for c in items)
    row["lower_bound_s"] = max(work / sum(speeds), max(
        sum(true_seconds(s, c) for s in ("encode", "denoise", "decode", "write")) for c in items))
    row["phase_split_bound_s"] = phase_bound(topology, phases, memory, gpu_bytes, speeds)
    row["dedicated_bound_s"] = dedicated_bound(phases, memory, gpu_bytes, speeds)

    best = None
    for _, encoders, decoders in static_candidates(topology, phases, memory, gpu_bytes, speeds):
        result = sim.run(FixedPolicy(plan_roles(topology, encoders, decoders, 1)))
        if best is None or result.makespan_s < best[0].makespan_s:
            best = (result, encoders, decoders)
    row["static_s"] = best[0].makespan_s
    row["static_split"] = {"encoders": best[1], "decoders": best[2], "dit": num_gpus - best[1] - best[2]}

    one_fits = memory.fits(("encode", "denoise", "decode"), [c for w in phases for c in w.classes], gpu_bytes, 1)
    if one_fits and best[1] == 0 and best[2] == 0:
        row["one_pipeline_s"] = row["static_s"]  # the same plan: every GPU does everything
    elif one_fits:
        row["one_pipeline_s"] = sim.run(FixedPolicy(plan_roles(topology, 0, 0, 1))).makespan_s
    else:
        row["one_pipeline_s"] = None

    inputs = PlanInputs(topology, memory, gpu_bytes, PlannerSettings(sp_degrees=(1, 2, 4)))
    classes = [c for w in phases for c in w.classes]
    if not one_fits and memory.fits_time_shared(classes, gpu_bytes):
        shared = time_shared_plan(inputs, Workload.of(runs_of(sorted(items))))
        row["time_shared_s"] = sim.run(FixedPolicy(shared)).makespan_s
    else:
        row["time_shared_s"] = None
    if global_switch:  # the same job with every switch a global drain + barrier, and a planner that knows it
        barrier = Simulation(items, speeds, batch_items, memory, seed=seed, switch_mode="global")
        result = barrier.run(AutoPolicy(inputs, items, batch_items, SwitchCostModel(rolling=False)))
        row["auto_global_s"] = result.makespan_s
        row["auto_global_switches"] = result.num_switches
    # The engine: its render order, its batches (first about roles.batch_s, then growing; or all that long),
    # flowing boundaries where the plan's ranks are independent (or a drain at every batch's end), global
    # switches. Timings and batches are keyed by the job's most common class (the engine's work class: the job's
    # video settings; a tie goes to the class rendered first).
    ordered = render_order(items, CostModel(AnalyticPrior(WAN21_T2V_1_3B)))
    work_class = max(set(ordered), key=lambda c: (ordered.count(c), -ordered.index(c)))
    for key, (how, flowing) in ENGINE_BATCHES.items():
        rule = EngineBatches(ordered, CostModel(AnalyticPrior(WAN21_T2V_1_3B)), work_class, RolesConfig().batch_s, how)
        engine = Simulation(ordered, speeds, batch_items, memory, seed=seed, switch_mode="engine", batch_rule=rule,
                            flowing=flowing)
        policy = AutoPolicy(inputs, ordered, batch_items, SwitchCostModel())  # the engine's Rebalancer's default
        result = engine.run(policy)
        row[f"{key}_s"] = result.makespan_s
        row[f"{key}_switches"] = result.num_switches
        row[f"{key}_batches"] = result.num_batches
        row[f"{key}_plans"] = result.history
    auto = AutoPolicy(inputs, items, batch_items, SwitchCostModel())
    result = sim.run(auto)
    row["auto_s"] = result.makespan_s
    row["auto_switches"] = result.num_switches
    row["auto_stalled_s"] = round(result.stalled_s, 1)
    row["auto_plans"] = result.history
    row["auto_decisions"] = len(auto.decisions)
    row["planner_ms_max"] = round(max(auto.plan_ms), 2)
    row["planner_ms_median"] = round(sorted(auto.plan_ms)[len(auto.plan_ms) // 2], 2)
    lower = row["lower_bound_s"]
    for key in ENGINE_BATCHES:
        row[f"{key}_over_bound"] = row[f"{key}_s"] / lower
        row[f"static_over_{key}"] = row["static_s"] / row[f"{key}_s"]
    row["auto_over_bound"] = row["auto_s"] / lower
    row["auto_over_dedicated_bound"] = (row["auto_s"] / row["dedicated_bound_s"] if row["dedicated_bound_s"]
                                        else None)
    row["static_over_auto"] = row["static_s"] / row["auto_s"]
    row["one_pipeline_over_auto"] = row["one_pipeline_s"] / row["auto_s"] if row["one_pipeline_s"] else None
    row["time_shared_over_auto"] = row["time_shared_s"] / row["auto_s"] if row["time_shared_s"] else None
    return row


def targets(row: dict, key: str = "auto_engine") -> dict:
    """Issue 13's targets for the auto column ``key`` (the engine's by default)."""
    auto = row[f"{key}_s"]
    out = {"auto_within_10pct_of_bound": auto / row["lower_bound_s"] <= 1.10,
           "auto_not_worse_than_one_pipeline": (row["one_pipeline_s"] is None
                                                or auto <= row["one_pipeline_s"] * 1.001)}
    if row.get("dedicated_bound_s"):
        out["auto_within_10pct_of_dedicated_bound"] = auto / row["dedicated_bound_s"] <= 1.10
    if row["scenario"] in ("4step-then-50step", "drafts-then-finals"):
        out["auto_1.3x_static"] = row["static_s"] / auto >= 1.3
    return out


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_results(rows: list[dict], out_dir: Path, date: str, args, degree_rows: list[dict] = ()) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"simulate-plan-{date}{args.suffix}"
    config = {"date": date, "commit": _commit(), "python": platform.python_version(), "host": platform.node(),
              "scales": args.scales, "seed": args.seed, "memcap_gib": MEMCAP_GIB,
              "scenarios": {k: v["note"] for k, v in SCENARIOS.items() if k in args.scenarios},
              "planner": "PlannerSettings(sp_degrees=(1, 2, 4)), defaults otherwise",
              "model": WAN21_T2V_1_3B.describe()}
    for row in rows:
        row["targets"] = targets(row)
        row["targets_engine_no_flow"] = targets(row, "auto_engine_no_flow")
        row["targets_engine_drain"] = targets(row, "auto_engine_drain")
        row["targets_rolling"] = targets(row, "auto")
    config["degree_scenarios"] = {k: v["note"] for k, v in DEGREE_SCENARIOS.items() if k in args.degree_scenarios}
    config["degree_scales"] = args.degree_scales
    Path(f"{stem}.json").write_text(json.dumps({"config": config, "rows": rows, "degree_rows": list(degree_rows)},
                                               indent=1) + "\n")
    lines = [f"# Role planner simulation ({date})", "",
             f"Written by perf/simulate_plan.py at commit {config['commit']} (Python {config['python']}, "
             f"host {config['host']}); seed {args.seed}; {config['model']}.", "",
             "Makespans in seconds of simulated time. auto (engine) = what the engine does: items in its render "
             "order (longest first, each kind together), batches cut as each starts (the first, and the first after "
             "a re-plan or a new kind, about roles.batch_s = 300 s of that kind's work per DiT group; doubling "
             "while plan and kind hold; one kind per batch), the planner from the analytic prior refitted on the "
             "batches' timings, a global switch at a drained boundary (batches and switches in brackets); where the "
             "plan's ranks are independent (time-shared, or every stage on groups of one) batch boundaries flow: "
             "each rank goes on to the next batch once it has finished its items of this one, batch k's timings "
             "decide at cut k+1 (a re-plan lags one batch) and only a switch drains; other plans drain the "
             "pipeline at every batch's end; targets are checked on it. no flow = the same with a drain at every "
             "batch's end whatever the plan (the engine before flowing boundaries). "
             "drain/batch = the engine before batches grew: every batch 300 s long, crossing kinds, a drain at "
             "each end; grow only = doubling batches that cross kinds, a drain at each end. "
             "static = best fixed split searched with the true costs; "
             "one-pipe = every GPU runs all stages; time-shared = every GPU runs all stages of its pulled items, one "
             "stage's components on it at a time, in cycles of roles.stage_batch = 8 items (a fixed plan: "
             "roles.time_share = true; only where stages do not fit together); "
             "rolling (hypothetical, not the engine) = the planner "
             "from the analytic prior, refitted and re-planned per batch of max(16, 2 x GPUs) items in file order, "
             "no drain at a batch's end, a rolling switch (only ranks that change stop, to load what they newly "
             "hold); global (hypothetical) = the same with every switch a global drain + barrier + slowest load "
             "(switches "
             "in brackets); bound = total work / total GPU speed; "
             "phase-split = the best split per sequential phase in the fluid model (not a lower bound: context); "
             "dedicated = a lower bound for schedules in which every GPU holds one stage for the whole job "
             "(single-phase jobs whose stages cannot co-locate, up to 64 GPUs; see dedicated_bound).", ""]
    for name in args.scenarios:
        lines.append(f"- **{name}**: {SCENARIOS[name]['note']}")
    lines += ["", "| scenario | GPUs | items | bound | phase-split | dedicated | static (E/D/X) | one-pipe "
                  "| time-shared | **auto (engine)** | engine/bound | static/engine | engine, no flow | static/no flow "
                  "| engine, drain/batch | "
                  "drain/bound | static/drain | engine, grow only | rolling (hyp.) | rolling/bound | global (hyp.) "
                  "| planner ms (max) | targets (auto (engine)) |",
              "|---|---:|---:|---:|---:|---:|---|" + "---:|" * 15 + "---|"]
    for row in rows:
        split = row["static_split"]
        one = f"{row['one_pipeline_s']:,.0f}" if row["one_pipeline_s"] else "n/a (memory)"
        shared = f"{row['time_shared_s']:,.0f}" if row.get("time_shared_s") else ""
        marks = ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in row["targets"].items())
        glob = (f"{row['auto_global_s']:,.0f} ({row['auto_global_switches']})" if "auto_global_s" in row else "")
        dedicated = f"{row['dedicated_bound_s']:,.0f}" if row.get("dedicated_bound_s") else ""
        lines.append(f"| {row['scenario']} | {row['gpus']} | {row['items']:,} | {row['lower_bound_s']:,.0f} "
                     f"| {row['phase_split_bound_s']:,.0f} | {dedicated} | {row['static_s']:,.0f} ({split['encoders']}/"
                     f"{split['dit']}/{split['decoders']}) | {one} | {shared} "
                     f"| **{row['auto_engine_s']:,.0f}** ({row['auto_engine_batches']}/{row['auto_engine_switches']}) "
                     f"| {row['auto_engine_over_bound']:.3f} | {row['static_over_auto_engine']:.2f} "
                     f"| {row['auto_engine_no_flow_s']:,.0f} ({row['auto_engine_no_flow_batches']}/"
                     f"{row['auto_engine_no_flow_switches']}) | {row['static_over_auto_engine_no_flow']:.2f} "
                     f"| {row['auto_engine_drain_s']:,.0f} ({row['auto_engine_drain_batches']}/"
                     f"{row['auto_engine_drain_switches']}) | {row['auto_engine_drain_over_bound']:.3f} "
                     f"| {row['static_over_auto_engine_drain']:.2f} "
                     f"| {row['auto_engine_grow_s']:,.0f} ({row['auto_engine_grow_batches']}/"
                     f"{row['auto_engine_grow_switches']}) "
                     f"| {row['auto_s']:,.0f} ({row['auto_switches']}) | {row['auto_over_bound']:.3f} "
                     f"| {glob} | {row['planner_ms_max']:.1f} | {marks} |")
    lines += ["", "Plans over time (time s: role counts), auto (engine) / rolling (hypothetical):", ""]
    for row in rows:
        engine = "; ".join(f"{t:,.0f}: {counts}" for t, counts in row["auto_engine_plans"])
        plans = "; ".join(f"{t:,.0f}: {counts}" for t, counts in row["auto_plans"])
        lines.append(f"- {row['scenario']} @ {row['gpus']}: engine {engine} / rolling {plans}")
    if degree_rows:
        lines += _degree_lines(degree_rows, args)
    Path(f"{stem}.md").write_text("\n".join(lines) + "\n")
    written = [Path(f"{stem}.md"), Path(f"{stem}.json")]
    png = _plot(rows, args, Path(f"{stem}.png")) if rows else None
    if png:
        written.append(png)
    png = _plot_degree(degree_rows, Path(f"{stem}-degree.png")) if degree_rows else None
    if png:
        written.append(png)
    return written


def _degree_lines(rows, args) -> list[str]:
    lines = ["", "## Per-item SP degree (mixed jobs)", "",
             "Every GPU holds every stage (H200 memory); nodes of 8 GPUs (perf/plan_sim.DegreeSimulation). "
             "per-item = the engine's schedule (spmd_diff.runtime.item_groups.schedule_item_groups: "
             "plan.degree.pick_degree over the degrees Wan2.1-1.3B's 12 heads allow, 1, 2, 4; its cost model the "
             "measured degree-1 seconds with 0.94 efficiency per doubling), items started longest first, run with "
             "the true noisy times (the simulation runs the measured SP factors), each rank following its "
             "assignments in order; a schedule that widens no item runs as the engine runs it, static groups of 1 "
             "pulling the items longest first (runtime.item_groups.widens_any; \"pulled\" in the degrees column); "
             "per-item, file order = the same schedule with the items in prompts-file order. "
             "static d = the engine's fixed `dit.sp_degree = d` before its render order (12-03): static groups of d "
             "ranks pull items in file order, "
             "the group decodes together (group decode: VAE over 0.55 / 0.30 at 2 / 4 ranks, the leader's "
             "postprocess and write after). free-ranks d = a group of d formed from free ranks per item (file order; "
             "12-03's fixed degree). static, longest first = static groups pulling the items longest first: the "
             "engine's fixed path now (engine.render_order). The leader's decode and "
             "write hold its GPU in every column. bound = "
             "max(total work at degree 1 / GPUs, the longest item at degree 4).", ""]
    for name in args.degree_scenarios:
        lines.append(f"- **{name}**: {DEGREE_SCENARIOS[name]['note']}")
    lines += ["", "| scenario | GPUs | items | bound | per-item | degrees used (d: items) | per-item, file order "
                  "| static 1 | static 2 | static 4 | free-ranks 1 | free-ranks 2 | free-ranks 4 "
                  "| best static / per-item | best free-ranks / per-item | file order / per-item "
                  "| best static, longest first / per-item | per-item / bound |",
              "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        used = ", ".join(f"{d}: {n}" for d, n in row["per_item_degrees"].items())
        used += " (pulled)" if row.get("per_item_pulled") else ""
        cells = [f"{row[m][d]:,.0f}" if d in row[m] else "" for m in ("static_s", "free_ranks_s")
                 for d in ("1", "2", "4")]
        lines.append(f"| {row['scenario']} | {row['gpus']} | {row['items']:,} | {row['lower_bound_s']:,.0f} "
                     f"| {row['per_item_s']:,.0f} | {used} | {row['per_item_file_order_s']:,.0f} | "
                     + " | ".join(cells) +
                     f" | {row['best_static_over_per_item']:.3f} (d={row['best_static_degree']}) "
                     f"| {row['best_free_ranks_over_per_item']:.3f} (d={row['best_free_ranks_degree']}) "
                     f"| {row['file_order_over_per_item']:.3f} "
                     f"| {row['best_static_longest_first_over_per_item']:.3f} "
                     f"(d={row['best_static_longest_first_degree']}) | {row['per_item_over_bound']:.3f} |")
    walls = [r["per_item_schedule_wall_s"] for r in rows]
    lines += ["", f"Schedule time (schedule_item_groups, longest first, this machine): "
                  f"{min(walls):.2f}-{max(walls):.2f} s per job; simulator "
                  f"{sum(r['sim_wall_s'] for r in rows):,.0f} s in all."]
    return lines


def write_degree_results(rows: list[dict], out_dir: Path, date: str, args) -> list[Path]:
    """``--degree-only``: perf/results/simulate-degree-DATE.{md,json,png}."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"simulate-degree-{date}{args.suffix}"
    config = {"date": date, "commit": _commit(), "python": platform.python_version(), "host": platform.node(),
              "seed": args.seed, "degree_scenarios": {k: v["note"] for k, v in DEGREE_SCENARIOS.items()
                                                      if k in args.degree_scenarios},
              "degree_scales": args.degree_scales}
    Path(f"{stem}.json").write_text(json.dumps({"config": config, "degree_rows": rows}, indent=1) + "\n")
    lines = [f"# Per-item SP degree simulation ({date})", "",
             f"Written by `perf/simulate_plan.py --degree-only` at commit {config['commit']} (Python "
             f"{config['python']}, host {config['host']}); seed {args.seed}. Makespans in seconds of simulated "
             "time."]
    Path(f"{stem}.md").write_text("\n".join(lines + _degree_lines(rows, args)) + "\n")
    written = [Path(f"{stem}.md"), Path(f"{stem}.json")]
    png = _plot_degree(rows, Path(f"{stem}.png"))
    return written + ([png] if png else [])


def _plot_degree(rows, path: Path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    names = list(dict.fromkeys(r["scenario"] for r in rows))
    scales = sorted({r["gpus"] for r in rows})
    fig, axes = plt.subplots(1, len(scales), figsize=(5 * len(scales), 4), squeeze=False)
    for ax, gpus in zip(axes.flat, scales):
        mine = {r["scenario"]: r for r in rows if r["gpus"] == gpus}
        xs = range(len(names))
        ax.bar([x - 0.2 for x in xs], [mine[n]["best_static_over_per_item"] if n in mine else 0 for n in names],
               0.4, label="best static fixed degree / per-item")
        ax.bar([x + 0.2 for x in xs], [mine[n]["best_free_ranks_over_per_item"] if n in mine else 0 for n in names],
               0.4, label="best free-ranks fixed degree / per-item")
        ax.axhline(1.2, color="grey", lw=0.8, ls="--")
        ax.axhline(1.0, color="black", lw=0.5)
        ax.set_ylim(0.9, 1.6)
        ax.set_xticks(list(xs))
        ax.set_xticklabels(names, rotation=45, ha="right", fontsize=8)
        ax.set_title(f"{gpus} GPUs: makespan ratio (>1: per-item faster)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def _plot(rows, args, path: Path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot", file=sys.stderr)
        return None
    names = [n for n in args.scenarios if any(r["scenario"] == n for r in rows)]
    cols = 4
    fig, axes = plt.subplots(math.ceil(len(names) / cols), cols, figsize=(16, 4 * math.ceil(len(names) / cols)),
                             squeeze=False)
    for ax, name in zip(axes.flat, names):
        mine = sorted((r for r in rows if r["scenario"] == name), key=lambda r: r["gpus"])
        gpus = [r["gpus"] for r in mine]
        for key, label, style in (("static_s", "best static split", "s--"), ("one_pipeline_s", "one pipeline/GPU",
                                                                            "^:"),
                                  ("auto_engine_s", "auto (engine)", "o-"),
                                  ("auto_engine_no_flow_s", "auto (engine, no flow)", "s-."),
                                  ("auto_engine_drain_s", "auto (engine, drain per batch)", "v--"),
                                  ("auto_s", "auto (rolling, hypothetical)", "o:"),
                                  ("auto_global_s", "auto, global switch (hypothetical)", "x-."),
                                  ("time_shared_s", "time-shared (fixed)", "d:"),
                                  ("phase_split_bound_s", "best split per phase (fluid)", ".:")):
            ys = [r[key] / r["lower_bound_s"] if r.get(key) else math.nan for r in mine]
            if any(not math.isnan(y) for y in ys):
                ax.plot(gpus, ys, style, label=label)
        ax.axhline(1.10, color="grey", lw=0.8, ls="--")
        ax.set_xscale("log", base=2)
        ax.set_title(name)
        ax.set_xlabel("GPUs")
        ax.set_ylabel("makespan / lower bound")
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scales", type=int, nargs="+", default=list(SCALES))
    parser.add_argument("--scenarios", nargs="*", default=list(SCENARIOS), choices=list(SCENARIOS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--date", default=datetime.date.today().isoformat())
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--suffix", default="", help="appended to the results' file names (a second run in a day)")
    parser.add_argument("--jobs", type=int, default=1, help="scenario x scale runs in parallel processes")
    parser.add_argument("--degree-scales", type=int, nargs="*", default=list(DEGREE_SCALES),
                        help="GPU counts (multiples of 8) for the per-item degree scenarios")
    parser.add_argument("--degree-scenarios", nargs="*", default=list(DEGREE_SCENARIOS),
                        choices=list(DEGREE_SCENARIOS))
    parser.add_argument("--degree-only", action="store_true",
                        help="only the per-item degree scenarios; writes simulate-degree-DATE.{md,json,png}")
    args = parser.parse_args(argv)
    tasks = [(name, gpus, args.seed, name in GLOBAL_SWITCH_SCENARIOS) for name in args.scenarios
             for gpus in args.scales] if not args.degree_only else []
    if args.jobs > 1:
        from multiprocessing import Pool

        with Pool(args.jobs) as pool:
            rows = pool.starmap(_timed, tasks)
    else:
        rows = [_timed(*task) for task in tasks]
    degree_tasks = [(name, gpus, args.seed) for name in args.degree_scenarios for gpus in args.degree_scales]
    if args.jobs > 1 and args.degree_only:
        from multiprocessing import Pool

        with Pool(args.jobs) as pool:
            degree_rows = pool.starmap(_timed_degree, degree_tasks)
    else:
        degree_rows = [_timed_degree(*task) for task in degree_tasks]
    if args.degree_only:
        for path in write_degree_results(degree_rows, Path(args.out), args.date, args):
            print(path)
        return 0
    for path in write_results(rows, Path(args.out), args.date, args, degree_rows):
        print(path)
    return 0


def _timed_degree(name, gpus, seed):
    row = run_degree_scenario(name, gpus, seed)
    print(f"{name} @ {gpus}: per-item {row['per_item_s']:.0f} (file order {row['per_item_file_order_s']:.0f}) "
          f"static {row['static_s']} free-ranks {row['free_ranks_s']} "
          f"({row['best_static_over_per_item']:.3f}x best static) in {row['sim_wall_s']} s",
          file=sys.stderr, flush=True)
    return row


def _timed(name, gpus, seed, global_switch):
    started = time.perf_counter()
    row = run_scenario(name, gpus, seed, global_switch)
    row["sim_wall_s"] = round(time.perf_counter() - started, 1)
    print(f"{name} @ {gpus}: bound {row['lower_bound_s']:.0f} static {row['static_s']:.0f} engine "
          f"{row['auto_engine_s']:.0f} (no flow {row['auto_engine_no_flow_s']:.0f}, drain/batch "
          f"{row['auto_engine_drain_s']:.0f}) rolling {row['auto_s']:.0f} "
          f"({row['auto_over_bound']:.3f}x bound, {row['auto_switches']} switches) in {row['sim_wall_s']} s",
          file=sys.stderr, flush=True)
    return row


if __name__ == "__main__":
    sys.exit(main())
