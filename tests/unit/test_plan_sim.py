"""Checks of the simulator's engine mode (``perf/plan_sim.py``) with flowing batch boundaries: the model the
committed simulate-plan figures rest on."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "perf"))
from plan_sim import C480_4_NOCFG, Simulation  # noqa: E402

from spmd_diff.plan.memory import MemoryModel, capacity_bytes
from spmd_diff.plan.model_sizes import WAN21_T2V_1_3B
from spmd_diff.plan.planner import PlanInputs, PlannerSettings, time_shared_plan
from spmd_diff.plan.roles import plan_roles
from spmd_diff.plan.topology import Topology
from spmd_diff.plan.workload import Workload, runs_of

MEMORY = MemoryModel.for_model(WAN21_T2V_1_3B)
TOPOLOGY = Topology.uniform(1, 4, 4)


class FixedBatches:
    """Every batch ``items`` long (the engine's ``batch_rule`` interface)."""

    def __init__(self, items: int):
        self.items = items

    def size(self, plan, start, since_change):
        return self.items

    def since(self, start, since_change, switched):
        return 0 if switched else since_change + 1


class Scripted:
    """The initial plan, then one answer per decision (None: hold); records what each decision saw."""

    def __init__(self, plans):
        self.plans, self.seen = list(plans), []

    def initial_plan(self):
        return self.plans.pop(0)

    def on_batch(self, timings, remaining):
        self.seen.append((timings, len(remaining)))
        return self.plans.pop(0) if self.plans else None


def _time_shared(items):
    inputs = PlanInputs(TOPOLOGY, MEMORY, capacity_bytes(14.0), PlannerSettings(sp_degrees=(1,)))
    plan = time_shared_plan(inputs, Workload.of(runs_of(items)))
    assert plan.time_shared and plan.ranks_independent
    return plan


def _run(items, plans, batch, flowing, speeds=(0.5, 1.0, 1.0, 1.0)):
    sim = Simulation(items, list(speeds), 0, MEMORY, noise=0.0, switch_mode="engine",
                     batch_rule=FixedBatches(batch), flowing=flowing)
    policy = Scripted(plans)
    result = sim.run(policy)
    assert all(sim.finished) and sim.done == len(items)  # every item rendered, and once (done counts writes)
    return result, policy, sim


def test_flowing_boundary_beats_a_drain_with_a_slow_rank():
    """Two batches on 4 time-shared ranks, one at half speed: with a drain the fast ranks wait for the slow one
    at the boundary; flowing, they go on to the second batch."""
    items = [C480_4_NOCFG] * 64
    plan = _time_shared(items)
    drained, _, _ = _run(items, [plan], 32, flowing=False)
    flowing, _, _ = _run(items, [plan], 32, flowing=True)
    assert drained.num_batches == flowing.num_batches == 2
    assert flowing.makespan_s < 0.8 * drained.makespan_s, (flowing.makespan_s, drained.makespan_s)


@pytest.mark.parametrize("flowing", [False, True])
def test_replan_lags_one_batch_when_boundaries_flow(flowing):
    """Batches of 24 of 96 items: drained, batch k's timings decide at its own end (items after batch k
    remaining); flowing, at cut k+1 (items after batch k+1 remaining), and the switch drains batch k+1 first.
    After the switch to a plan of dependent ranks (encoder / DiT / decoder) every boundary drains again."""
    items = [C480_4_NOCFG] * 96
    shared = _time_shared(items)
    split = plan_roles(TOPOLOGY, 1, 1, 1)
    assert not split.ranks_independent
    result, policy, sim = _run(items, [shared, None, split], 24, flowing)
    remaining = [seen[1] for seen in policy.seen]
    # flowing: cut 1 batch 0's timings (hold), cut 2 batch 1's (switch once batch 2 drained), batch 3 the last;
    # drained: after batch 0 (hold), batch 1 (switch), batch 2 (a drain under the new plan), batch 3 the last
    assert remaining == ([48, 24] if flowing else [72, 48, 24])
    assert result.num_switches == 1 and sim.batch_ends == [24, 48, 72, 96]
    first_timings = policy.seen[0][0]  # batch 0's timings: its 24 items' encodes, over every rank
    assert sorted(t.rank for t in first_timings) == [0, 1, 2, 3]
    encoded = sum(s.num_items for t in first_timings for s in t.samples if s.stage == "encode")
    assert encoded == 24
    assert all(t.elapsed_s > 0 for t in first_timings)
