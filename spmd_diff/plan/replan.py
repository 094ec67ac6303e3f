"""Re-planning between batches, with hysteresis: switch only when it pays for itself by a margin. Pure Python.

After each batch the runtime allgathers every rank's :class:`RankTimings` and calls :meth:`Rebalancer.after_batch`
on every rank with the same arguments; each rank gets the same :class:`Replan` (deterministic), so all switch
or none do. A switch is taken only if

    predicted gain over the horizon  >  switch_cost_factor x switch cost  +  min_gain_fraction x remaining time

where the switch cost is what the job loses (:class:`SwitchCostModel`: by default a rolling switch, in which only
the ranks that change stop, to load what they newly hold; measured load times override the bytes / bandwidth
estimate). Noisy timings move the prediction by a few percent at most, under the margin, so a plan never
flip-flops between near-equal alternatives.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Sequence

from spmd_diff.plan.cost_model import CostModel
from spmd_diff.plan.memory import MemoryModel
from spmd_diff.plan.planner import PlanInputs, plan_auto, predict_plan
from spmd_diff.plan.roles import RolePlan
from spmd_diff.plan.throughput import HOST_TO_GPU_BYTES_PER_S, Prediction
from spmd_diff.plan.timings import RankTimings, summarize
from spmd_diff.plan.workload import WorkClass, Workload


@dataclass(frozen=True)
class SwitchCostModel:
    """Seconds of the job's wall time a switch of plan costs.

    ``rolling`` (default): only ranks whose stages or DiT group change stop pulling; each finishes the job it is
    running (useful work), loads what it newly holds, re-targets its channels and joins the new plan; the others
    never stop. The job loses those ranks' load time and the refill of their new role (``drain_fraction`` of an
    item's latency): summed over them / number of ranks.
    Not rolling (a global barrier): every rank drains (on average ``drain_fraction`` of an item's latency), then
    waits for the slowest load.
    """

    load_bytes_per_s: float = 2e9
    """Weights loaded from the node's page cache / local disk (or built on the device)."""
    fixed_s: float = 2.0
    """Per switching rank (rolling) or per switch (barrier): re-targeting channels, group set-up, barriers."""
    rolling: bool = True
    drain_fraction: float = 0.5
    measured_load_s: tuple[tuple[str, float], ...] = ()
    """(stage, seconds) a rank took to load that stage's component (the runtime measures it at start)."""

    def load_s(self, stage: str, memory: MemoryModel) -> float:
        measured = dict(self.measured_load_s)
        if stage in measured:
            return measured[stage]
        return memory.component_bytes(stage) / self.load_bytes_per_s

    def seconds(self, old: RolePlan, new: RolePlan, memory: MemoryModel, item_latency_s: float,
                move_bytes_per_s: float = HOST_TO_GPU_BYTES_PER_S) -> float:
        """``move_bytes_per_s``: host-to-GPU copies (``PlannerSettings.host_to_gpu_bytes_per_s``). A rank that
        starts time-sharing loads the components it did not hold (into host memory); one that stops copies the
        components of its new stages from host memory to its GPU."""
        if old.same_roles(new):
            return 0.0
        loads = {stage: self.load_s(stage, memory) for stage in ("encode", "denoise", "decode")}
        changed = changed_ranks(old, new)
        total = slowest = 0.0
        cache: dict[tuple, float] = {}
        for rank in changed:
            key = (old.stages_of(rank), new.stages_of(rank))
            if key not in cache:
                cache[key] = sum(loads[s] for s in key[1] if s not in key[0])
                if old.time_shared and not new.time_shared:
                    cache[key] += sum(memory.component_bytes(s) for s in key[1] if s in key[0]) / move_bytes_per_s
            total += self.fixed_s + cache[key]
            slowest = max(slowest, cache[key])
        if self.rolling:  # each rank that changes also starts its new role with nothing queued for it
            return (total + len(changed) * self.drain_fraction * item_latency_s) / new.num_ranks
        return self.fixed_s + self.drain_fraction * item_latency_s + slowest


@dataclass(frozen=True)
class Replan:
    """One re-planning decision and the data behind it (``to_event`` is the ``"ev": "replan"`` record)."""

    switch: bool
    reason: str
    current: RolePlan
    best: RolePlan
    current_prediction: Prediction
    best_prediction: Prediction
    switch_cost_s: float
    threshold_s: float
    workload: Workload
    timings: dict = field(default_factory=dict)
    cost: dict = field(default_factory=dict)
    behind_batches: int = 0
    """Batches in a row (this one included) the current plan was predicted behind by the persistent margin."""

    @property
    def plan(self) -> RolePlan:
        """The plan for the next batch."""
        return self.best if self.switch else self.current

    @property
    def gain_s(self) -> float:
        return self.current_prediction.seconds - self.best_prediction.seconds

    def to_event(self) -> dict:
        return {"switch": self.switch, "reason": self.reason, "old_plan": self.current.to_dict(),
                "new_plan": self.best.to_dict(), "old_predicted": self.current_prediction.to_dict(),
                "new_predicted": self.best_prediction.to_dict(), "gain_s": round(self.gain_s, 3),
                "switch_cost_s": round(self.switch_cost_s, 3), "threshold_s": round(self.threshold_s, 3),
                "behind_batches": self.behind_batches,
                "workload": self.workload.to_dict(), "timings": self.timings, "cost_model": self.cost}

    def describe(self) -> str:
        verb = "switch" if self.switch else "keep"
        return (f"replan: {verb} ({self.reason}); predicted {self.current_prediction.seconds:.1f} s -> "
                f"{self.best_prediction.seconds:.1f} s for {self.workload.describe()}, switch cost "
                f"{self.switch_cost_s:.1f} s, threshold {self.threshold_s:.1f} s")


def replan(inputs: PlanInputs, current: RolePlan, workload: Workload, cost: CostModel,
           switch_costs: SwitchCostModel = SwitchCostModel(), timings: Sequence[RankTimings] = (),
           behind_batches: int = 0) -> Replan:
    """Decide whether the next batch runs on ``current`` or on the best plan for ``workload`` (the horizon:
    ``workload.horizon``). ``behind_batches``: the previous decision's ``behind_batches`` (0 after a switch)."""
    best = plan_auto(inputs, workload, cost, current)
    best_prediction = predict_plan(best, workload, cost, True, inputs)
    current_prediction = predict_plan(current, workload, cost, True, inputs)
    latency = _item_latency_s(workload, cost, current.sp_degree)
    switch_cost = switch_costs.seconds(current, best, inputs.memory, latency, inputs.settings.host_to_gpu_bytes_per_s)
    settings = inputs.settings
    threshold = settings.switch_cost_factor * switch_cost + settings.min_gain_fraction * current_prediction.seconds
    gain = current_prediction.seconds - best_prediction.seconds
    steady = settings.switch_cost_factor * switch_cost + settings.persist_gain_fraction * current_prediction.seconds
    behind = behind_batches + 1 if gain > steady and not best.same_roles(current) else 0
    unfit = _cannot_run(inputs, current, workload)
    if best.same_roles(current):
        switch, reason = False, "the current plan is the best"
    elif unfit:
        switch, reason = True, unfit
    elif gain > threshold:
        switch, reason = True, f"gain {gain:.1f} s > threshold {threshold:.1f} s"
    elif behind >= settings.persist_batches:
        switch, reason = True, f"gain {gain:.1f} s > {steady:.1f} s for {behind} batches in a row"
    else:
        switch, reason = False, f"gain {gain:.1f} s <= threshold {threshold:.1f} s"
    return Replan(switch, reason, current, best, current_prediction, best_prediction, switch_cost, threshold,
                  workload, summarize(timings) if timings else {}, cost.summary(workload.classes, best.sp_degree),
                  0 if switch else behind)


@dataclass(frozen=True)
class Rebalancer:
    """The planner's state between batches: the inputs, the fitted cost model, the plan in force.

    The runtime, on every rank (the same arguments everywhere, so every rank reaches the same decision)::

        balancer = Rebalancer.start(inputs, horizon(runs_of(unfinished), batch_items),
                                    CostModel(AnalyticPrior(sizes)))
        ... run a batch on balancer.plan; gather every rank's RankTimings of it, in rank order
            (spmd_diff.runtime.rebalance.BatchCut: one allgather) ...
        balancer, decision = balancer.after_batch(timings, horizon(runs_of(unfinished), batch_items))
        if decision and decision.switch:   # rolling: only changed_ranks(decision.current, decision.best) stop,
            ...                             # finish their item, load what they newly hold, re-target, rejoin
        if rank == 0 and decision: events.emit("replan", **decision.to_event())

    ``unfinished``: the classes of every item not yet written, in rendering order (items already encoded or
    denoised included).
    """

    inputs: PlanInputs
    cost: CostModel
    plan: RolePlan
    switch_costs: SwitchCostModel = SwitchCostModel()
    num_switches: int = 0
    behind_batches: int = 0

    @staticmethod
    def start(inputs: PlanInputs, workload: Workload, cost: CostModel,
              switch_costs: SwitchCostModel = SwitchCostModel()) -> "Rebalancer":
        return Rebalancer(inputs, cost, plan_auto(inputs, workload, cost), switch_costs)

    def after_batch(self, timings: Sequence[RankTimings], workload: Workload) -> tuple["Rebalancer", Replan | None]:
        """Fold the batch's timings (and measured memory peaks) in; decide the next batch's plan.

        Returns the new state and the decision (None when no work is left).
        """
        cost = self.cost.refit(timings)
        memory = self.inputs.memory
        peaks: dict[tuple[str, str, int], int] = {}
        for rank in timings:
            for stage, key, degree, peak in rank.peaks:
                peaks[(stage, key, degree)] = max(peaks.get((stage, key, degree), 0), int(peak))
        for (stage, key, degree), peak in sorted(peaks.items()):
            memory = memory.with_measured_peak(stage, WorkClass.from_key(key), degree, peak)
        inputs = dataclasses.replace(self.inputs, memory=memory)
        state = dataclasses.replace(self, inputs=inputs, cost=cost)
        if not workload:
            return state, None
        decision = replan(inputs, self.plan, workload, cost, self.switch_costs, timings, self.behind_batches)
        state = dataclasses.replace(state, behind_batches=decision.behind_batches)
        if decision.switch:
            state = dataclasses.replace(state, plan=decision.best, num_switches=self.num_switches + 1)
        return state, decision


def changed_ranks(old: RolePlan, new: RolePlan) -> tuple[int, ...]:
    """Ranks whose stages or DiT group differ between the plans: those that stop, load and rejoin in a switch."""
    old_group = {r: g for g in old.dit_groups for r in g}
    new_group = {r: g for g in new.dit_groups for r in g}
    if old.time_shared != new.time_shared:
        return tuple(range(new.num_ranks))
    return tuple(r for r in range(new.num_ranks)
                 if old.stages_of(r) != new.stages_of(r) or old_group.get(r) != new_group.get(r))


def _item_latency_s(workload: Workload, cost: CostModel, sp_degree: int) -> float:
    total = 0.0
    for work_class, num in workload.counts:
        total += num * sum(cost.seconds(s, work_class, sp_degree if s == "denoise" else 1)
                           for s in ("encode", "denoise", "decode", "write"))
    return total / max(1, workload.num_items)


def _cannot_run(inputs: PlanInputs, plan: RolePlan, workload: Workload) -> str:
    """Why ``plan`` cannot run ``workload`` (a stage nobody holds, a rank over its memory), or ""."""
    if plan.num_ranks != inputs.topology.num_ranks:
        return f"the plan is for {plan.num_ranks} ranks, the job has {inputs.topology.num_ranks}"
    if plan.time_shared:
        if not inputs.memory.fits_time_shared(workload.classes, inputs.gpu_bytes):
            need = inputs.memory.time_shared_bytes(workload.classes) / 2**30
            return f"time-shared ranks would need {need:.1f} GiB for one stage, more than the GPU has"
        return ""
    held: set[str] = set()
    checked: set[tuple[str, ...]] = set()
    for rank in range(plan.num_ranks):
        stages = plan.stages_of(rank)
        held.update(stages)
        if stages in checked:
            continue
        checked.add(stages)
        if not inputs.memory.fits(stages, workload.classes, inputs.gpu_bytes, plan.sp_degree):
            need = inputs.memory.rank_bytes(stages, workload.classes, plan.sp_degree) / 2**30
            return f"ranks holding {'+'.join(stages)} would need {need:.1f} GiB, more than the GPU has"
    missing = [s for s in ("encode", "denoise", "decode") if s not in held]
    return f"no rank holds {', '.join(missing)}" if missing else ""
