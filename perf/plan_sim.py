"""Discrete-event simulation of the engine running a role plan with pulled work (helper of simulate_plan.py).

What is simulated: ranks holding stages per a ``RolePlan``; DiT groups that denoise one item at a time; items
flowing encode -> denoise -> decode+write through bounded queues (two slots per DiT group, like the rings);
whoever is free pulls work (decode first, then denoise, then encode, so items in flight stay few). Stage times
come from the measured figures (:func:`true_seconds`) divided by each rank's speed, with log-normal noise.

Re-planning: at every ``batch_items`` finished items the policy sees each rank's ``RankTimings`` of that batch and
may return a new plan. Two ways to switch:

- ``"rolling"`` (default): ranks whose stages or group change finish the job they are running, load what they
  newly hold (bytes / ``LOAD_BYTES_PER_S``) plus ``SWITCH_FIXED_S``, then pull under the new plan; the other ranks
  never stop. Items already encoded or denoised stay queued for the new plan.
- ``"global"``: no job starts until every running job has finished; then every rank waits for the slowest load
  (plus ``SWITCH_FIXED_S``); queued items stay queued.
- ``"engine"``: what ``runtime.engine._run_rank`` does. The items (already in the engine's render order) run in
  batches cut as each starts, ``batch_rule.size(plan, first item, batches since a change)`` items each (the policy's
  ``batch_items`` and ``rebalance.next_batch``; ``batch_rule.since(...)`` the count after a batch); a switch is a
  global one at a drained boundary (every rank idle already: the slowest load plus ``SWITCH_FIXED_S``).
  ``batch_items`` is unused. Two boundary rules:

  - a drain (plans whose ranks depend on each other: channels, DiT groups; every plan with ``flowing=False``): no
    item of the next batch is encoded before every item of this one is written (time-shared ranks finish their
    cycles); then the batch's timings go to the policy (``on_batch``, the items after the batch remaining) and the
    next batch is cut under the plan it returns;
  - flowing (``RolePlan.ranks_independent`` plans, with ``flowing=True``): each worker (one rank) pulls batch k's
    items until batch k has none left and finishes every job it took (a time-shared rank its whole cycle): its
    "cut k", where it posts its own timings since its cut k-1 (elapsed: that window). At cut k >= 1 it waits until
    every rank has cut k-1 (normally long done), and batch k-1's gathered timings go to the policy (once per batch:
    the remaining items are those after batch k, the items in no batch cut yet); at cut 0, or when batch k-1's
    timings were decided on at a drain already, the plan holds. If the plan holds, the worker goes on to batch k+1
    at once (the first worker past cut k cuts it, as after a batch without a change); if the decision switches, the
    worker waits until every rank has cut k (a drain of batch k), then the switch, and batch k+1 is the first after
    a change. So a re-plan lags one batch, and a boundary where the plan holds costs no wait. A group of one holding
    every stage pulls from the shared queues like every non-time-shared worker (an item in a queue may be finished
    by another worker than the one that took it; the engine's ranks each finish their own: an approximation).

Time-shared plans (``RolePlan.time_shared``): every rank runs cycles on its own. It pulls up to ``stage_batch``
items (at most ceil(items left / ranks) near the end; items a previous plan left encoded or denoised first),
encodes them all, moves the DiT in, denoises them all, moves the VAE in, decodes and writes them all; the next
cycle moves the text encoder back in. A move copies the component from host memory at ``MOVE_BYTES_PER_S``
(only when another stage's component is on the GPU). A switch away from time-sharing puts the items of unfinished
cycles back in the queues (to encode, to denoise, to decode) for the new plan.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from dataclasses import dataclass, field

from spmd_diff.plan.roles import RolePlan
from spmd_diff.plan.timings import RankTimings, StageSample
from spmd_diff.plan.workload import WorkClass

C480_4 = WorkClass(480, 832, 81, 4, True)
C480_4_NOCFG = WorkClass(480, 832, 81, 4, False)
C480_50 = WorkClass(480, 832, 81, 50, True)
C720_4 = WorkClass(720, 1280, 81, 4, True)

FORWARD_S = {480: 0.625, 720: 2.449}
"""One DiT forward on one H200 (DESIGN.md: 0.628 s at 480p (engine: 5.03 s for 8 forwards), 2.449 s at 720p)."""
SP_FACTOR = {480: {1: 1.0, 2: 0.539, 4: 0.283, 8: 0.150}, 720: {1: 1.0, 2: 0.521, 4: 0.271, 8: 0.141}}
"""Forward time at degree S over degree 1 (perf/results/sp-2026-11-22*: ours-ulysses 646/348/183 ms at 480p,
2568/1337/696 ms at 720p; 8 extrapolated at the same efficiency loss per doubling)."""
DECODE_S = {480: 2.77 + 0.73, 720: 4.183 * 2.77 / 1.829 + 0.73 * 1280 * 720 / (832 * 480)}
"""float32 VAE + CPU postprocess: 2.77 + 0.73 s at 480p (DESIGN.md); at 720p the bf16 4.18 s scaled by the
measured float32/bf16 ratio, postprocess by pixels."""
WRITE_S = {480: 0.34, 720: 0.34 * 224 / 97}
ENCODE_S = {True: 0.09, False: 0.05}
LOAD_BYTES_PER_S = 1.5e9
"""True load bandwidth in the simulation (the planner assumes 2e9: its switch-cost estimate is off on purpose)."""
SWITCH_FIXED_S = 2.0
MOVE_BYTES_PER_S = 8e9
"""True host-to-GPU bandwidth of a time-shared rank's moves (the planner assumes 10e9: off on purpose, like loads)."""
SHARED_ORDER = ("encode", "denoise", "decode")


def true_seconds(stage: str, work_class: WorkClass, sp_degree: int = 1) -> float:
    """Measured seconds of one item on one H200 (for denoise: the group's wall time at ``sp_degree``)."""
    res = work_class.height
    if stage == "encode":
        return ENCODE_S[work_class.cfg]
    if stage == "denoise":
        forwards = work_class.num_steps * (2 if work_class.cfg else 1)
        return forwards * FORWARD_S[res] * SP_FACTOR[res][sp_degree] + 0.03
    if stage == "decode":
        return DECODE_S[res]
    if stage == "write":
        return WRITE_S[res]
    raise ValueError(stage)


class TrueCost:
    """``seconds(stage, class, S)`` from the measured figures: the oracle a static split is searched with."""

    def __init__(self, speeds=None):
        self._speeds = speeds

    def seconds(self, stage, work_class, sp_degree=1):
        return true_seconds(stage, work_class, sp_degree)

    def speeds(self, num_ranks):
        return tuple(self._speeds) if self._speeds else (1.0,) * num_ranks




@dataclass
class Worker:
    """A DiT group (or a non-DiT rank: a group of one) and the stages its ranks hold."""

    index: int
    ranks: tuple[int, ...]
    stages: frozenset
    is_group: bool
    jobs: int = 0
    waiting: int = 0
    """Ranks not yet available (finishing an old plan's job, or loading components)."""
    idle: bool = False
    epoch: int = 0
    held: int | None = None
    """A denoised item the group cannot hand off (decode queue full)."""
    shared: bool = False
    """A time-shared rank (its own cycles; ``todo`` and ``on_gpu`` below)."""
    todo: dict = field(default_factory=dict)
    """Time-shared: stage -> items of the current cycle waiting for that stage."""
    on_gpu: str | None = None
    """Time-shared: the stage whose component is on the GPU."""
    batch: int = 0
    """Engine mode: the batch (index into ``Simulation.batch_ends``) the worker pulls from."""
    cut: int | None = None
    """Flowing boundaries: the batch the worker has cut and waits after (None while it works)."""


@dataclass
class SimResult:
    makespan_s: float
    num_switches: int
    history: list = field(default_factory=list)
    """(time, role counts) of every plan that ran."""
    stalled_s: float = 0.0
    """GPU-seconds lost to switches (ranks loading or waiting at a barrier), divided by the number of GPUs."""
    num_batches: int = 0


class Simulation:
    """One job: ``items`` (classes, in rendering order) on ranks of ``speeds`` under a policy."""

    def __init__(self, items: list[WorkClass], speeds: list[float], batch_items: int, memory, seed: int = 0,
                 noise: float = 0.03, switch_mode: str = "rolling", batch_rule=None, flowing: bool = True):
        """``flowing`` (engine mode): boundaries of plans whose ranks are independent flow; False: a drain at
        every batch end whatever the plan (the engine before flowing boundaries)."""
        assert switch_mode in ("rolling", "global", "engine"), switch_mode
        assert (batch_rule is not None) == (switch_mode == "engine"), "batch_rule: the engine mode's batches"
        self.items, self.speeds, self.batch_items, self.memory = items, speeds, batch_items, memory
        self.seed, self.noise, self.switch_mode, self.batch_rule = seed, noise, switch_mode, batch_rule
        self.flowing = flowing and switch_mode == "engine"

    def run(self, policy) -> SimResult:
        self.rng = random.Random(self.seed)
        self.t = 0.0
        self.events: list = []
        self.seq = 0
        self.next_item = self.in_flight = self.encoding = self.done = 0
        self.finished = [False] * len(self.items)
        self.q_enc: deque = deque()
        """Items pulled but not encoded when a time-shared plan was switched away from."""
        self.q_den: deque = deque()
        self.q_dec: deque = deque()
        self.blocked: deque = deque()
        self.rank_busy = [False] * len(self.speeds)
        self.loading = self.running = self.stale = 0
        self.pending_plan = None
        self.window: dict = {rank: {} for rank in range(len(self.speeds))}
        """rank -> {(stage, class key, degree): (count, seconds)} since the rank's last timings."""
        self.window_start = [0.0] * len(self.speeds)
        self.next_boundary = self.batch_items
        self.plan_epoch = 0
        self.result = SimResult(0.0, 0)
        self.policy = policy
        plan = policy.initial_plan()
        self.since_replan = 0
        self.batch_ends = [len(self.items)]
        """Engine mode: the end of every batch cut so far (batch k: items ``batch_ends[k-1]:batch_ends[k]``); other
        modes: one batch, the whole job."""
        if self.switch_mode == "engine":
            self.batch_ends = [min(len(self.items), self.batch_rule.size(plan, 0, 0))]
        self.cut_ranks = [0]
        """Per batch: the ranks that have cut it (flowing), or all of them once it drained."""
        self.gathered: list[dict] = [{}]
        """Per batch: rank -> its RankTimings posted at its cut (flowing)."""
        self.decided: set[int] = set()
        """Batches whose timings went to the policy."""
        self.decisions: dict[int, RolePlan | None] = {}
        """Flowing: k -> the policy's answer at cut k (None: the plan holds)."""
        self.waiting_on: dict[int, list[Worker]] = {}
        """Flowing: k -> workers waiting until every rank has cut batch k."""
        self.to_advance: deque = deque()
        self.advancing = False
        self.result.num_batches = 1
        self._install(plan, changed=set())
        while self.events:
            self.t, _, kind, payload = heapq.heappop(self.events)
            if kind == "job":
                self._job_done(*payload)
            elif kind == "ready":
                self._rank_ready(payload)
            elif kind == "global":
                self._install(payload, changed=set(), old=self.global_old)
        assert self.done == len(self.items), (self.done, len(self.items))
        self.result.makespan_s = self.t
        return self.result

    # ---- plans --------------------------------------------------------------------------------------------------

    def _install(self, plan: RolePlan, changed: set[int], old: RolePlan | None = None) -> None:
        """Workers of ``plan``; ranks in ``changed`` load first; busy ranks join when their job ends."""
        self.plan = plan
        self.plan_epoch += 1
        batch = len(self.batch_ends) - 1
        workers = [Worker(i, tuple(g), frozenset(plan.stages_of(g[0])), True, batch=batch)
                   for i, g in enumerate(plan.dit_groups)]
        if plan.time_shared:
            for worker in workers:
                worker.shared = True
                worker.todo = {stage: deque() for stage in SHARED_ORDER}
                held = old.stages_of(worker.ranks[0]) if old is not None and not old.time_shared else ()
                worker.on_gpu = held[0] if len(held) == 1 else None
        dit = set(plan.dit_ranks)
        for rank in range(plan.num_ranks):
            if rank not in dit:
                workers.append(Worker(len(workers), (rank,), frozenset(plan.stages_of(rank)), False, batch=batch))
        self.workers = workers
        self.worker_of = {r: w for w in workers for r in w.ranks}
        self.q_den_cap = self.q_dec_cap = 2 * len(plan.dit_groups)
        self.idle = {k: deque() for k in ("decode_aux", "decode_dit", "denoise", "encode_aux", "encode_dit")}
        self.result.history.append((round(self.t, 3), plan.role_counts()))
        for worker in workers:
            worker.waiting = len(worker.ranks)
        for rank in range(plan.num_ranks):
            if not self.rank_busy[rank]:
                self._rank_free(rank, rank in changed)
        self.changed = changed

    def _load_s(self, rank: int, old: RolePlan, new: RolePlan) -> float:
        gained = [s for s in new.stages_of(rank) if s not in old.stages_of(rank)]
        seconds = SWITCH_FIXED_S + sum(self.memory.component_bytes(s) for s in gained) / LOAD_BYTES_PER_S
        if old.time_shared and not new.time_shared:  # its new stages' components come from host memory
            seconds += sum(self.memory.component_bytes(s) for s in new.stages_of(rank)) / MOVE_BYTES_PER_S
        return seconds

    def _rank_free(self, rank: int, must_load: bool) -> None:
        if must_load:
            self.loading += 1
            seconds = self.load_s[rank]
            self.result.stalled_s += seconds / len(self.speeds)
            self.seq += 1
            heapq.heappush(self.events, (self.t + seconds, self.seq, "ready", rank))
        else:
            self._available(rank)

    def _rank_ready(self, rank: int) -> None:
        self.loading -= 1
        self._available(rank)

    def _available(self, rank: int) -> None:
        worker = self.worker_of[rank]
        worker.waiting -= 1
        if worker.waiting == 0:
            self._pull(worker)

    def _switch(self, new: RolePlan) -> None:
        old = self.plan
        self.result.num_switches += 1
        for worker in self.workers:
            worker.idle = False
            if worker.shared:  # the items of its unfinished cycle go back to the queues, in order
                self.q_enc.extendleft(reversed(worker.todo["encode"]))
                self.q_den.extendleft(reversed(worker.todo["denoise"]))
                self.q_dec.extendleft(reversed(worker.todo["decode"]))
                for queue in worker.todo.values():
                    queue.clear()
            if worker.held is not None:  # a latent waiting for room: it joins the queue the new plan decodes from
                self.q_dec.append(worker.held)
                worker.held = None
        self.blocked.clear()
        if self.switch_mode == "rolling":
            self.stale = self.running  # every running job now belongs to an earlier plan
            groups = {r: g for g in old.dit_groups for r in g}
            new_groups = {r: g for g in new.dit_groups for r in g}
            changed = {r for r in range(new.num_ranks)
                       if old.stages_of(r) != new.stages_of(r) or groups.get(r) != new_groups.get(r)}
            self.load_s = {r: self._load_s(r, old, new) for r in changed}
            self._install(new, changed, old)
        else:
            self.pending_plan = new
            self.drain_start = self.t
            self.workers = []  # nothing new starts; running jobs finish
            if not any(self.rank_busy):
                self._global_switch()

    def _global_switch(self) -> None:
        new, self.pending_plan = self.pending_plan, None
        stall = max(self._load_s(r, self.plan, new) for r in range(new.num_ranks))
        self.result.stalled_s += self.t - self.drain_start + stall
        self.seq += 1
        self.global_old = self.plan
        heapq.heappush(self.events, (self.t + stall, self.seq, "global", new))

    # ---- scheduling ---------------------------------------------------------------------------------------------

    def _duration(self, stage: str, work_class: WorkClass, ranks: tuple[int, ...]) -> float:
        base = true_seconds(stage, work_class, len(ranks) if stage == "denoise" else 1)
        sigma = self.noise * (5 if stage == "write" else 1)
        return base * math.exp(self.rng.gauss(0.0, sigma)) / min(self.speeds[r] for r in ranks)

    def _start(self, worker: Worker, stage: str, item: int, ranks: tuple[int, ...]) -> None:
        work_class = self.items[item]
        seconds = self._duration(stage, work_class, ranks)
        self._record(ranks, stage, work_class, len(ranks) if stage == "denoise" else 1, seconds)
        if stage == "decode":
            write = self._duration("write", work_class, ranks)
            self._record(ranks, "write", work_class, 1, write)
            seconds += write
        for rank in ranks:
            self.rank_busy[rank] = True
        self.running += 1
        worker.jobs += 1
        worker.idle = False
        self.seq += 1
        heapq.heappush(self.events, (self.t + seconds, self.seq, "job",
                                     (self.plan_epoch, worker.index, stage, item, ranks)))

    def _pull(self, worker: Worker) -> None:
        if worker.jobs or worker.waiting or worker.held is not None or self.pending_plan is not None \
                or worker.cut is not None:
            return
        if worker.shared:
            self._pull_shared(worker)
            return
        stages = worker.stages
        if "decode" in stages and self.q_dec:
            for rank in worker.ranks:
                if not self.q_dec:
                    break
                self._start(worker, "decode", self._pop_dec(), (rank,))
            return
        if "denoise" in stages and self.q_den:
            self._start(worker, "denoise", self.q_den.popleft(), worker.ranks)
            self._wake_encoder()
            return
        if "encode" in stages:
            for rank in worker.ranks:
                if not self._unencoded() or len(self.q_den) + self.encoding >= self.q_den_cap:
                    break
                self.encoding += 1
                self._start(worker, "encode", self._take_unencoded(), (rank,))
            if worker.jobs:
                return
        if self._flows() and not self.q_dec and not self.q_den and not self._unencoded(worker):
            self._cut(worker)  # nothing left of its batch for it (every stage held: nothing it cannot take)
            return
        worker.idle = True
        worker.epoch += 1
        entry = (worker.index, worker.epoch)
        kind = "dit" if worker.is_group else "aux"
        for stage, category in (("decode", f"decode_{kind}"), ("denoise", "denoise"), ("encode", f"encode_{kind}")):
            if stage in stages:
                self.idle[category].append(entry)

    def _unencoded(self, worker: Worker | None = None) -> int:
        """Items not yet pulled that may be pulled: up to the end of the worker's batch when boundaries flow (the
        batch's own counter), else of the newest batch."""
        end = self.batch_ends[worker.batch if worker is not None and self._flows() else -1]
        return len(self.q_enc) + max(0, end - self.next_item)

    def _flows(self) -> bool:
        """Batch boundaries flow: engine mode with ``flowing`` and a plan whose ranks are independent."""
        return self.flowing and self.plan.ranks_independent

    def _take_unencoded(self) -> int:
        if self.q_enc:
            return self.q_enc.popleft()
        self.next_item += 1
        self.in_flight += 1
        return self.next_item - 1

    def _pull_shared(self, worker: Worker) -> None:
        """A time-shared rank: the next job of its cycle (a move, or one item's stage); a new cycle when done."""
        todo = worker.todo
        if not any(todo.values()):
            left = len(self.q_dec) + len(self.q_den) + self._unencoded(worker)
            take = min(self.plan.stage_batch, math.ceil(left / len(self.workers)))
            while take and self.q_dec:
                todo["decode"].append(self.q_dec.popleft())
                take -= 1
            while take and self.q_den:
                todo["denoise"].append(self.q_den.popleft())
                take -= 1
            while take and self._unencoded(worker):
                todo["encode"].append(self._take_unencoded())
                take -= 1
        stage = next((s for s in SHARED_ORDER if todo[s]), None)
        if stage is None:
            if self._flows():
                self._cut(worker)
            else:
                worker.idle = True
            return
        rank = worker.ranks[0]
        if worker.on_gpu != stage:
            seconds = self.memory.component_bytes(stage) / MOVE_BYTES_PER_S  # PCIe, not the GPU: no speed
            self.rank_busy[rank] = True
            self.running += 1
            worker.jobs += 1
            self.seq += 1
            heapq.heappush(self.events, (self.t + seconds, self.seq, "job",
                                         (self.plan_epoch, worker.index, "move", stage, worker.ranks)))
            return
        if stage == "encode":
            self.encoding += 1
        self._start(worker, stage, todo[stage].popleft(), worker.ranks)

    def _wake(self, *categories: str) -> None:
        for category in categories:
            queue = self.idle[category]
            while queue:
                index, epoch = queue.popleft()
                worker = self.workers[index] if index < len(self.workers) else None
                if worker is not None and worker.idle and worker.epoch == epoch:
                    self._pull(worker)
                    return

    def _wake_encoder(self) -> None:
        if self._unencoded():
            self._wake("encode_aux", "encode_dit")

    def _pop_dec(self) -> int:
        item = self.q_dec.popleft()
        if self.blocked:
            worker = self.blocked.popleft()
            self.q_dec.append(worker.held)
            worker.held = None
            self._pull(worker)
        return item

    # ---- completions --------------------------------------------------------------------------------------------

    def _job_done(self, epoch: int, index: int, stage: str, item: int, ranks: tuple[int, ...]) -> None:
        current = epoch == self.plan_epoch and self.pending_plan is None
        worker = self.workers[index] if current else None
        self.running -= 1
        if epoch != self.plan_epoch:
            self.stale -= 1
        for rank in ranks:
            self.rank_busy[rank] = False
        if stage == "move":
            if current:
                worker.on_gpu = item
        elif current and worker.shared:  # the item stays in the rank's cycle
            if stage == "encode":
                self.encoding -= 1
                worker.todo["denoise"].append(item)
            elif stage == "denoise":
                worker.todo["decode"].append(item)
            else:
                self.done += 1
                self.in_flight -= 1
                self.finished[item] = True
        elif stage == "encode":
            self.encoding -= 1
            self.q_den.append(item)
            self._wake("denoise")
        elif stage == "denoise":
            if "decode" in self.plan.stages_of(ranks[0]) or len(self.q_dec) < self.q_dec_cap or worker is None:
                self.q_dec.append(item)
                self._wake("decode_aux", "decode_dit")
            else:
                worker.held = item
                self.blocked.append(worker)
        else:
            self.done += 1
            self.in_flight -= 1
            self.finished[item] = True
        if self.pending_plan is not None:  # a global switch waits for every running job
            if not any(self.rank_busy):
                self._global_switch()
            return
        if not current:  # the job belonged to an earlier plan: its ranks join the new one
            for rank in ranks:
                self._rank_free(rank, rank in self.changed)
        else:
            worker.jobs -= 1
            if worker.jobs == 0 and worker.held is None:
                self._pull(worker)
        if self.switch_mode == "engine":
            if stage == "decode" and self.done == self.batch_ends[-1] < len(self.items) and not self._flows():
                self._engine_boundary()
        elif stage == "decode" and self.done >= self.next_boundary and self.done < len(self.items) \
                and self.loading == 0 and self.stale == 0:
            self._batch_boundary()

    def _record(self, ranks, stage, work_class, degree, seconds) -> None:
        for rank in ranks:
            key = (stage, work_class.key, degree)
            count, total = self.window[rank].get(key, (0, 0.0))
            self.window[rank][key] = (count + 1, total + seconds)

    def _engine_boundary(self) -> None:
        """A drain: every item of the batch is written and every rank idle: gather, decide, cut the next batch."""
        assert not any(self.rank_busy) and self.in_flight == 0, "the batch has drained"
        batch = len(self.batch_ends) - 1
        self.cut_ranks[batch] = len(self.speeds)
        self.decided.add(batch)
        new_plan = self.policy.on_batch(self._window_timings(), self.items[self.done:])
        self._next_batch(new_plan)
        if new_plan is not None:
            self._switch(new_plan)
        else:
            for worker in self.workers:
                self._pull(worker)

    def _next_batch(self, new_plan: RolePlan | None) -> None:
        """Cut the batch after the newest one (the first after a change when ``new_plan`` switches)."""
        start = self.batch_ends[-1]
        self.since_replan = self.batch_rule.since(start, self.since_replan, new_plan is not None)
        size = self.batch_rule.size(new_plan or self.plan, start, self.since_replan)
        self.batch_ends.append(min(len(self.items), start + size))
        self.cut_ranks.append(0)
        self.gathered.append({})
        self.result.num_batches += 1

    # ---- flowing boundaries -------------------------------------------------------------------------------------

    def _cut(self, worker: Worker) -> None:
        """``worker`` has nothing left of its batch and no job running: it posts its timings (no wait) and goes on
        as far as the others' cuts allow (:meth:`_advance`)."""
        k = worker.batch
        for rank in worker.ranks:
            self.gathered[k][rank] = self._rank_timings(rank)
        self.cut_ranks[k] += len(worker.ranks)
        worker.cut, worker.idle = k, False
        self.to_advance.append(worker)
        if self.cut_ranks[k] == len(self.speeds):  # every rank has cut k: release who waited on that
            self.to_advance.extend(self.waiting_on.pop(k, ()))
        if not self.advancing:  # one loop at a time: a worker that goes on may cut again at once
            self.advancing = True
            while self.to_advance:
                self._advance(self.to_advance.popleft())
            self.advancing = False

    def _advance(self, worker: Worker) -> None:
        """A worker at cut k: done if no items follow batch k; else wait for every rank's cut k-1, take the
        decision, and go on to batch k+1 (a hold) or wait for every rank's cut k and switch."""
        k = worker.cut
        if k is None or worker.index >= len(self.workers) or self.workers[worker.index] is not worker:
            return  # a worker of a plan switched away from (every one of them waited for the switch)
        n = len(self.speeds)
        if self.batch_ends[k] == len(self.items):
            return  # the last batch: the worker is done
        if k >= 1 and k - 1 not in self.decided and self.cut_ranks[k - 1] < n:
            self.waiting_on.setdefault(k - 1, []).append(worker)
            return
        if k not in self.decisions:
            decision = None
            if k >= 1 and k - 1 not in self.decided:
                timings = [self.gathered[k - 1][rank] for rank in range(n)]
                self.decided.add(k - 1)
                decision = self.policy.on_batch(timings, self.items[self.batch_ends[k]:])
            self.decisions[k] = decision
        decision = self.decisions[k]
        if decision is None:  # the plan holds: on to batch k+1 at once
            if len(self.batch_ends) == k + 1:
                self._next_batch(None)
            worker.batch, worker.cut = k + 1, None
            self._pull(worker)
            return
        if self.cut_ranks[k] < n:  # a switch: batch k drains first
            self.waiting_on.setdefault(k, []).append(worker)
            return
        self._next_batch(decision)
        self._switch(decision)

    # ---- timings ------------------------------------------------------------------------------------------------

    def _rank_timings(self, rank: int) -> RankTimings:
        """``rank``'s timings since its last ones (elapsed: that window); a new window starts now."""
        samples = tuple(StageSample(stage, key, degree, count, total)
                        for (stage, key, degree), (count, total) in self.window[rank].items())
        timings = RankTimings(rank, samples, elapsed_s=self.t - self.window_start[rank])
        self.window[rank] = {}
        self.window_start[rank] = self.t
        return timings

    def _window_timings(self) -> list[RankTimings]:
        return [self._rank_timings(rank) for rank in range(len(self.speeds))]

    def _batch_boundary(self) -> None:
        self.next_boundary = self.done + self.batch_items
        timings = self._window_timings()
        unfinished = [c for c, done in zip(self.items, self.finished) if not done]
        new_plan = self.policy.on_batch(timings, unfinished)
        if new_plan is not None:
            self._switch(new_plan)


C720_50 = WorkClass(720, 1280, 81, 50, True)


GROUP_DECODE_BAND = {1: 1.0, 2: 0.55, 4: 0.30}
"""The VAE decode on a group of S ranks (``dit.group_decode``: each member a band of rows) over one rank's
(perf/results/latency-2026-12-03.md: one band of 2 alone 1.53 s, of 4 0.83 s, against 2.79 s; the rows' exchange
not measured); degrees not listed: 1.1 / S."""
VAE_S = {480: 2.77, 720: 4.183 * 2.77 / 1.829}
"""The float32 VAE part of :data:`DECODE_S` (the rest is the CPU postprocess, on the leader)."""


class DegreeSimulation:
    """Mixed items on DiT groups, every rank holding every stage, three ways to form the groups.

    - :meth:`run_schedule` (``dit.per_item_degree``): the engine's schedule (``runtime.item_groups``: every group
      and its order, computed before the job from the predicted costs), run with the true, noisy times: each rank
      takes part in its assignments in schedule order, a group starting when its last member is free (the
      engine's members wait in the group's first collective); the leader encodes, the group denoises, then the
      leader decodes and writes while the members go on.
    - :meth:`run_static_groups` (``dit.sp_degree = S``, per-item degree off): the plan's static groups of S ranks
      (consecutive ranks of a node, as ``plan.dit_groups``); whichever group is free pulls the next item in file
      order; the group encodes (on its leader), denoises, decodes together (``dit.group_decode`` "auto": each
      member a band, :data:`GROUP_DECODE_BAND`), then the leader postprocesses and writes; the group's next item
      waits for all of it.
    - :meth:`run_free_ranks`: items in file order, each group formed from the free ranks when the item starts at
      the degree ``policy`` picks at that (true) moment (with one degree: a fixed degree whose groups are formed
      afresh per item, which the engine's fixed groups are not).

    Times: :func:`true_seconds` with log-normal noise (degrees outside ``SP_FACTOR``: the table's efficiency per
    doubling); the leader's decode and write hold its GPU (the engine decodes on another thread of the same GPU).
    """

    def __init__(self, items: list[WorkClass], topology, seed: int = 0, noise: float = 0.03):
        self.items, self.topology, self.seed, self.noise = items, topology, seed, noise

    def _duration(self, rng):
        def duration(stage, work_class, degree=1):
            return _sp_seconds(stage, work_class, degree) * math.exp(rng.gauss(0.0, self.noise))
        return duration

    def run_schedule(self, schedule) -> dict:
        """Run ``schedule`` (``runtime.item_groups.ItemGroup`` in start order; ``item`` indexes ``self.items``)."""
        duration = self._duration(random.Random(self.seed))
        ready = [0.0] * self.topology.num_ranks
        degrees: dict[int, int] = {}
        busy_s = 0.0
        for group in schedule:  # one total order every rank follows: a group starts when its last member is free
            work_class = self.items[group.item]
            start = max(ready[rank] for rank in group.ranks)
            denoise = duration("encode", work_class) + duration("denoise", work_class, group.degree)
            decode = duration("decode", work_class) + duration("write", work_class)
            for rank in group.ranks:
                ready[rank] = start + denoise
            ready[group.ranks[0]] += decode
            busy_s += denoise * group.degree + decode
            degrees[group.degree] = degrees.get(group.degree, 0) + 1
        makespan = max(ready)
        return {"makespan_s": makespan, "degrees": dict(sorted(degrees.items())),
                "busy_fraction": busy_s / (makespan * self.topology.num_ranks)}

    def run_static_groups(self, degree: int, order=None) -> dict:
        """The engine's fixed degree: static groups of ``degree`` ranks pulling items in file order (or in
        ``order``: positions in ``self.items``)."""
        duration = self._duration(random.Random(self.seed))
        groups = [ranks[k:k + degree] for ranks in self.topology.node_ranks
                  for k in range(0, len(ranks) - degree + 1, degree)]
        free = [(0.0, g) for g in range(len(groups))]  # (free at, group): the earliest free pulls, lowest first
        busy_s = 0.0
        for position in (range(len(self.items)) if order is None else order):
            work_class = self.items[position]
            start, g = heapq.heappop(free)
            res = work_class.height
            denoise = duration("encode", work_class) + duration("denoise", work_class, degree)
            noisy = duration("decode", work_class) / DECODE_S[res]
            vae = VAE_S[res] * GROUP_DECODE_BAND.get(degree, 1.1 / degree) * noisy
            post = (DECODE_S[res] - VAE_S[res]) * noisy + duration("write", work_class)
            heapq.heappush(free, (start + denoise + vae + post, g))
            busy_s += (denoise + vae) * degree + post
        makespan = max(t for t, _ in free)
        return {"makespan_s": makespan, "degrees": {degree: len(self.items)},
                "busy_fraction": busy_s / (makespan * self.topology.num_ranks)}

    def run_free_ranks(self, policy, min_degree: int = 1) -> dict:
        """Groups formed from free ranks as each item starts (file order), at the degree ``policy(work_class,
        free_per_node, queued_s, running_s, busy_until)`` picks (a ``DegreeChoice``; an item that waits holds the
        queue and asks again when ranks free up); ``min_degree``: the smallest degree ``policy`` allows."""
        rng = random.Random(self.seed)
        work = {c: sum(true_seconds(s, c) for s in ("encode", "denoise", "decode", "write")) for c in set(self.items)}
        queued = sum(work[c] for c in self.items)
        free = [list(ranks) for ranks in self.topology.node_ranks]
        pool = self.topology.num_ranks
        events: list = []
        predicted: dict[int, tuple[float, int, float]] = {}
        """item -> (predicted end of its current stage, ranks it holds, predicted decode+write seconds after)."""
        t, seq, next_item, done = 0.0, 0, 0, 0
        degrees: dict[int, int] = {}
        busy_s = 0.0

        duration = self._duration(rng)

        def running_left():
            return sum(max(0.0, end - t) * num + after for end, num, after in predicted.values())

        free_at: dict[int, float] = {}
        """Busy rank -> predicted time it is free."""

        while True:
            while next_item < len(self.items) and any(free):
                work_class = self.items[next_item]
                queued_after = max(0.0, queued - work[work_class])
                free_counts = tuple(len(f) for f in free)
                running_s = running_left()
                # The busy ranks' ends matter only when the item would not start now at the smallest degree
                # (a choice that does is the same with them): ask without them first.
                choice = policy(work_class, free_counts, queued_after, running_s, ())
                if choice.waits or choice.degree != min_degree or choice.seconds > choice.finish_s:
                    busy_until = [[] for _ in free]
                    for rank, end in free_at.items():
                        busy_until[self.topology.node_of_rank[rank]].append(max(0.0, end - t))
                    choice = policy(work_class, free_counts, queued_after, running_s,
                                    tuple(tuple(b) for b in busy_until))
                if choice.waits:
                    break
                ranks = tuple(free[choice.node][: choice.degree])
                del free[choice.node][: choice.degree]
                queued = queued_after
                degrees[choice.degree] = degrees.get(choice.degree, 0) + 1
                denoise = duration("encode", work_class, 1) + duration("denoise", work_class, choice.degree)
                decode = duration("decode", work_class, 1) + duration("write", work_class, 1)
                busy_s += denoise * len(ranks) + decode
                after = true_seconds("decode", work_class) + true_seconds("write", work_class)
                predicted[next_item] = (t + true_seconds("encode", work_class) +
                                        _sp_seconds("denoise", work_class, len(ranks)), len(ranks), after)
                for rank in ranks:
                    free_at[rank] = predicted[next_item][0] + (after if rank == ranks[0] else 0.0)
                seq += 1
                heapq.heappush(events, (t + denoise, seq, "denoised", (next_item, ranks, decode)))
                next_item += 1
            if not events:
                break
            t, _, kind, (item, ranks, decode) = heapq.heappop(events)
            node = self.topology.node_of_rank[ranks[0]]
            if kind == "denoised":
                free[node].extend(ranks[1:])
                free[node].sort()
                for rank in ranks[1:]:
                    free_at.pop(rank)
                free_at[ranks[0]] = t + predicted[item][2]
                seq += 1
                heapq.heappush(events, (t + decode, seq, "written", (item, ranks[:1], 0.0)))
                predicted[item] = (t + predicted[item][2], 1, 0.0)
            else:
                free[node].append(ranks[0])
                free[node].sort()
                free_at.pop(ranks[0])
                predicted.pop(item)
                done += 1
        assert done == len(self.items), (done, len(self.items))
        return {"makespan_s": t, "degrees": dict(sorted(degrees.items())), "busy_fraction": busy_s / (t * pool)}


def _sp_seconds(stage: str, work_class: WorkClass, degree: int) -> float:
    """:func:`true_seconds`, and for degrees the measured table lacks, its 8-rank efficiency per doubling."""
    if stage != "denoise" or degree in SP_FACTOR[work_class.height]:
        return true_seconds(stage, work_class, degree)
    res = work_class.height
    per_doubling = (SP_FACTOR[res][8] * 8) ** (1 / 3)
    forwards = work_class.num_steps * (2 if work_class.cfg else 1)
    return forwards * FORWARD_S[res] * per_doubling ** math.log2(degree) / degree + 0.03
