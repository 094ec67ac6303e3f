"""What a job did, from its merged event log: per-run spans, waits, roles, busy fractions and a verdict.

Pure Python + numpy; no plotting (``plots.py``) and no HTML (``report.py``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

__all__ = ["Span", "Wait", "RunData", "load_runs", "busy_by_rank", "role_busy", "verdict", "role_title",
           "completion_times", "stall"]

_STAGE_ROLE = {"encode": "encoder", "denoise": "dit", "decode": "decoder", "write": "decoder",
               "encode_video": "decoder"}
_ROLE_TITLE = {"encoder": "encoder", "dit": "DiT", "decoder": "decoder", "all": "single-rank"}


def role_title(role: str) -> str:
    """Display name of a role: ``dit`` -> ``DiT``."""
    return _ROLE_TITLE.get(role, role)


@dataclass(frozen=True)
class Span:
    """One finished stage on one rank: unix seconds ``t0``..``t1``; ``ok`` False if the stage raised."""

    rank: int
    stage: str
    item: str
    t0: float
    t1: float
    ok: bool = True
    cpu_s: float | None = None
    """CPU seconds the stage recorded (``encode_video``, ``write``), if any."""


@dataclass(frozen=True)
class Wait:
    """Time a rank was blocked on a channel: ``what`` = "credit" (producer, ring full) or "data" (consumer)."""

    rank: int
    channel: str
    what: str
    t0: float
    t1: float


@dataclass
class RunData:
    """Every record of one run (one ``job_start``) of a job, parsed."""

    run: int
    job_start: dict[str, Any] | None = None
    job_end: dict[str, Any] | None = None
    spans: list[Span] = field(default_factory=list)
    waits: list[Wait] = field(default_factory=list)
    handoffs: list[dict[str, Any]] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)
    replans: list[dict[str, Any]] = field(default_factory=list)
    moves: list[dict[str, Any]] = field(default_factory=list)
    """Time-shared ranks: one ``move`` record per stage's components moved to the GPU."""
    item_groups: list[dict[str, Any]] = field(default_factory=list)
    """Per-item SP degree (``dit.per_item_degree``): one ``item_group`` record per item, the group it ran on."""
    rank_start: dict[int, dict[str, Any]] = field(default_factory=dict)
    rank_end: dict[int, dict[str, Any]] = field(default_factory=dict)
    t_first: float = float("inf")
    t_last: float = float("-inf")
    ranks: list[int] = field(default_factory=list)
    """Every rank seen (or in ``job_start.world_size``), sorted; set by :meth:`finish`."""
    _timelines: dict[int, list[tuple[float, str]]] = field(default_factory=dict, repr=False)

    def finish(self) -> "RunData":
        """Compute the rank list and role timelines once all records are in."""
        ranks = set(self.rank_start) | {s.rank for s in self.spans} | {w.rank for w in self.waits}
        if self.job_start and isinstance(self.job_start.get("world_size"), int):
            ranks |= set(range(self.job_start["world_size"]))
        self.ranks = sorted(r for r in ranks if r >= 0)
        self._timelines = {r: self._role_timeline(r) for r in self.ranks}
        return self

    # ---------------------------------------------------------------- time
    @property
    def t_start(self) -> float:
        """Start of the run: its ``job_start`` record, else its first record."""
        return float(self.job_start["t"]) if self.job_start else self.t_first

    @property
    def t_end(self) -> float:
        """End of the run: its ``job_end`` record, else its last record (killed or still running)."""
        return float(self.job_end["t"]) if self.job_end else self.t_last

    @property
    def elapsed_s(self) -> float:
        return max(0.0, self.t_end - self.t_start)

    # ---------------------------------------------------------------- ranks and roles
    def host_of(self, rank: int) -> str:
        if rank in self.rank_start and self.rank_start[rank].get("host"):
            return str(self.rank_start[rank]["host"])
        hosts = (self.job_start or {}).get("hosts") or []
        return str(hosts[rank]) if 0 <= rank < len(hosts) else "?"

    def role_timeline(self, rank: int) -> list[tuple[float, str]]:
        """[(from time, role)] of a rank: the plan of ``job_start``, then each re-plan's ``new`` plan."""
        return self._timelines.get(rank) or self._role_timeline(rank)

    def _role_timeline(self, rank: int) -> list[tuple[float, str]]:
        out: list[tuple[float, str]] = []
        plans = [(self.t_start, (self.job_start or {}).get("plan"))]
        plans += [(float(r["t"]), r.get("new_plan")) for r in self.replans]
        for t, plan in plans:
            role = _role_in_plan(plan, rank, len(self.ranks))
            if role is not None and (not out or out[-1][1] != role):
                out.append((t, role))
        if not out:
            start = self.rank_start.get(rank, {})
            role = start.get("role") or _majority_role([s for s in self.spans if s.rank == rank])
            out.append((self.t_start, str(role)))
        return out

    def role_at(self, rank: int, t: float) -> str:
        role = "?"
        for since, r in self.role_timeline(rank):
            if since <= t or role == "?":
                role = r
        return role

    def dit_group_of(self, rank: int) -> int | None:
        """Index of the rank's DiT group in the ``job_start`` plan, if it is in one."""
        groups = ((self.job_start or {}).get("plan") or {}).get("dit_groups") or []
        return next((g for g, ranks in enumerate(groups) if rank in ranks), None)

    @property
    def num_dit_groups(self) -> int:
        return len(((self.job_start or {}).get("plan") or {}).get("dit_groups") or [])

    def roles_label(self, rank: int) -> str:
        """``encoder`` or, after re-plans, ``encoder→dit``."""
        return "→".join(role_title(r) for _, r in self.role_timeline(rank))

    @property
    def num_done(self) -> int:
        if self.job_end and isinstance(self.job_end.get("items_done"), int):
            return int(self.job_end["items_done"])
        return len(completion_times(self))

    @property
    def num_failed(self) -> int:
        if self.job_end and isinstance(self.job_end.get("items_failed"), int):
            return int(self.job_end["items_failed"])
        return len({f.get("item") for f in self.failures})


def _role_in_plan(plan: Any, rank: int, num_ranks: int) -> str | None:
    if not isinstance(plan, dict):
        return None
    if plan.get("time_shared"):
        return "time-shared"
    if num_ranks == 1:
        return "all"
    if rank in (plan.get("encoders") or []):
        return "encoder"
    if rank in (plan.get("decoders") or []):
        return "decoder"
    if any(rank in group for group in plan.get("dit_groups") or []):
        return "dit"
    return None


def _majority_role(spans: list[Span]) -> str:
    totals: dict[str, float] = {}
    for s in spans:
        role = _STAGE_ROLE.get(s.stage, s.stage)
        totals[role] = totals.get(role, 0.0) + s.t1 - s.t0
    return max(totals, key=totals.__getitem__) if totals else "?"


def _records(path: Path) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and isinstance(rec.get("t"), (int, float)) and "ev" in rec:
                yield rec


def _num(rec: dict[str, Any], key: str, default: float) -> float:
    v = rec.get(key)
    return float(v) if isinstance(v, (int, float)) else default


def load_runs(events_path: str | Path) -> dict[int, RunData]:
    """Parse a merged event log into one :class:`RunData` per run (records without ``run`` are run 0)."""
    runs: dict[int, RunData] = {}
    for rec in _records(Path(events_path)):
        run_id = rec.get("run", 0) if isinstance(rec.get("run", 0), int) else 0
        run = runs.get(run_id)
        if run is None:
            run = runs[run_id] = RunData(run_id)
        t, ev, rank = float(rec["t"]), rec["ev"], int(rec.get("rank", -1))
        run.t_first, run.t_last = min(run.t_first, t), max(run.t_last, t)
        if ev == "stage":
            ok = rec.get("ok", True) is not False and not rec.get("error")
            t1 = _num(rec, "t1", t)
            cpu = rec.get("cpu_s")
            run.spans.append(Span(rank, str(rec.get("stage", "?")), str(rec.get("item", "")),
                                  _num(rec, "t0", t1), t1, ok, float(cpu) if isinstance(cpu, (int, float)) else None))
        elif ev == "wait":
            t1 = _num(rec, "t1", t)
            run.waits.append(Wait(rank, str(rec.get("channel", "?")), str(rec.get("what", "?")),
                                  _num(rec, "t0", t1), t1))
        elif ev == "handoff":
            run.handoffs.append(rec)
        elif ev == "failure":
            run.failures.append(rec)
        elif ev == "replan":
            run.replans.append(rec)
        elif ev == "move":
            run.moves.append(rec)
        elif ev == "item_group":
            run.item_groups.append(rec)
        elif ev == "rank_start":
            run.rank_start[rank] = rec
        elif ev == "rank_end":
            run.rank_end[rank] = rec
        elif ev == "job_start":
            run.job_start = rec
        elif ev == "job_end":
            run.job_end = rec if run.job_end is None or rec.get("status") != "failed" else run.job_end
    return {k: runs[k].finish() for k in sorted(runs)}


# ---------------------------------------------------------------------------- busy time


def _union(intervals: list[tuple[float, float]]) -> tuple[np.ndarray, np.ndarray]:
    """Sorted, merged, non-overlapping (t0, t1) arrays."""
    if not intervals:
        return np.zeros(0), np.zeros(0)
    arr = np.array(sorted(intervals), dtype=np.float64)
    t0, t1 = arr[:, 0], np.maximum.accumulate(arr[:, 1])
    starts = np.r_[True, t0[1:] > t1[:-1]]
    ends = np.r_[starts[1:], True]
    return t0[starts], t1[ends]


def _cumulative_busy(t0: np.ndarray, t1: np.ndarray, at: np.ndarray) -> np.ndarray:
    """Busy seconds before each time in ``at``, for merged intervals t0..t1."""
    if t0.size == 0:
        return np.zeros_like(at)
    c0 = np.r_[0.0, np.cumsum(t0)]
    c1 = np.r_[0.0, np.cumsum(t1)]
    n0 = np.searchsorted(t0, at, side="right")
    n1 = np.searchsorted(t1, at, side="right")
    return (n0 * at - c0[n0]) - (n1 * at - c1[n1])


def busy_by_rank(run: RunData, edges: np.ndarray) -> dict[int, np.ndarray]:
    """Busy seconds of each rank in each bin ``edges[i]..edges[i+1]`` (any stage; overlaps counted once)."""
    per_rank: dict[int, list[tuple[float, float]]] = {r: [] for r in run.ranks}
    for s in run.spans:
        per_rank.setdefault(s.rank, []).append((s.t0, s.t1))
    out = {}
    for rank, intervals in per_rank.items():
        t0, t1 = _union(intervals)
        out[rank] = np.diff(_cumulative_busy(t0, t1, edges))
    return out


def role_busy(run: RunData, t0: float | None = None, t1: float | None = None) -> dict[str, dict[str, Any]]:
    """Per role: ``ranks`` (count), ``busy`` (fraction of rank-time in any stage over t0..t1, default the
    active window: first stage start to last stage end) and ``stages`` {stage: fraction of rank-time}."""
    if not run.spans:
        return {}
    t0 = min(s.t0 for s in run.spans) if t0 is None else t0
    t1 = max(s.t1 for s in run.spans) if t1 is None else t1
    width = max(t1 - t0, 1e-9)
    mid = 0.5 * (t0 + t1)
    role_of = {r: run.role_at(r, mid) for r in run.ranks}
    busy = busy_by_rank(run, np.array([t0, t1]))
    out: dict[str, dict[str, Any]] = {}
    for rank, role in role_of.items():
        entry = out.setdefault(role, {"ranks": 0, "busy_s": 0.0, "stages": {}})
        entry["ranks"] += 1
        entry["busy_s"] += float(busy[rank][0])
    for s in run.spans:
        entry = out.get(role_of.get(s.rank, "?"))
        if entry is not None:
            overlap = max(0.0, min(s.t1, t1) - max(s.t0, t0))
            entry["stages"][s.stage] = entry["stages"].get(s.stage, 0.0) + overlap
    for entry in out.values():
        denom = width * max(1, entry["ranks"])
        entry["busy"] = entry.pop("busy_s") / denom
        entry["stages"] = {k: v / denom for k, v in sorted(entry["stages"].items(), key=lambda kv: -kv[1])}
    return out


def completion_times(run: RunData) -> np.ndarray:
    """Sorted times at which items were finished (their ``write``, else ``decode``, stage ended successfully)."""
    last_stage = "write" if any(s.stage == "write" for s in run.spans) else "decode"
    done: dict[str, float] = {}
    for s in run.spans:
        if s.stage == last_stage and s.ok:
            done[s.item] = max(done.get(s.item, 0.0), s.t1)
    return np.sort(np.fromiter(done.values(), dtype=np.float64, count=len(done)))


def stall(run: RunData) -> tuple[float, float, float] | None:
    """(gap seconds, from, to) of the longest time without any stage finishing, if it looks like a stall:
    longer than 30 s and than 3x the typical (median) duration of the slowest kind of stage. Counts the
    tail up to the run's end (a hang that ended in a timeout or a kill)."""
    if not run.spans:
        return None
    ends = np.sort(np.array([s.t1 for s in run.spans]))
    points = np.r_[min(s.t0 for s in run.spans), ends, max(run.t_end, ends[-1])]
    gaps = np.diff(points)
    k = int(np.argmax(gaps))
    by_stage: dict[str, list[float]] = {}
    for s in run.spans:
        by_stage.setdefault(s.stage, []).append(s.t1 - s.t0)
    typical = max(float(np.median(d)) for d in by_stage.values())
    gap = float(gaps[k])
    if gap > 30.0 and gap > 3.0 * typical:
        return gap, float(points[k]), float(points[k + 1])
    return None


def verdict(run: RunData) -> str:
    """One line a reader can act on: which role bounds the job, or that it stalled."""
    if not run.spans:
        if (run.job_end or {}).get("status") == "nothing to do":
            return "nothing to do: every item of this run was already in OUT (no model was loaded)"
        return "no stage finished: the job never got going (see the job's log for the error)"
    tail = "" if run.job_end else " (no job_end record: the job was killed or is still running)"
    stalled = stall(run)
    if stalled is not None:
        gap, a, _ = stalled
        return (f"stalled: no stage progress for {gap:.0f} s (from {a - run.t_start:.0f} s after the start)"
                + tail)
    roles = role_busy(run)
    if set(roles) in ({"all"}, {"time-shared"}):  # every rank runs every stage: say where its time goes
        role = next(iter(roles))
        entry = roles[role]
        parts = ", ".join(f"{k} {v:.0%}" for k, v in entry["stages"].items())
        who = "single rank" if role == "all" else "time-shared ranks"
        return f"{who}: busy {entry['busy']:.0%} ({parts})" + tail
    ranked = sorted(((e["busy"], r) for r, e in roles.items() if r in _ROLE_TITLE), reverse=True)
    if not ranked:
        ranked = sorted(((e["busy"], r) for r, e in roles.items()), reverse=True)
    desc = ", ".join(f"{role_title(r)} {b:.0%}" for b, r in ranked)
    top, top_role = ranked[0]
    others = [b for b, _ in ranked[1:]]
    if top >= 0.75 and all(b <= top - 0.15 for b in others):
        return f"{role_title(top_role)}-bound: {role_title(top_role)} ranks busy {top:.0%}" + (
            ", " + ", ".join(f"{role_title(r)} {b:.0%}" for b, r in ranked[1:]) if others else "") + tail
    if top >= 0.75:
        return f"balanced: several roles near full ({desc})" + tail
    if top < 0.5:
        waited = sum(w.t1 - w.t0 for w in run.waits)
        return (f"under-utilised: no role busy half the time ({desc}); {waited:.0f} s waiting on channels, "
                "see the wait chart" + tail)
    return f"no single bottleneck: busy {desc}" + tail
