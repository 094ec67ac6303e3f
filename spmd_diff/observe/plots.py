"""The report's figures (matplotlib, Agg canvas: headless, no pyplot state).

Every function takes the runs to draw (one, or all runs of a resumed job; the time axis starts at the first
run's start) and a path, and writes one PNG.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from spmd_diff.observe.analysis import RunData, busy_by_rank, completion_times, role_title, stall, verdict

__all__ = ["STAGE_COLORS", "ROLE_COLORS", "time_unit", "plot_timeline", "plot_utilisation", "plot_throughput",
           "plot_waits", "TimeAxis"]

STAGE_COLORS = {"encode": "#4C72B0", "denoise": "#DD8452", "decode": "#55A868", "write": "#8172B3",
                "encode_video": "#937860"}
ROLE_COLORS = {"encoder": "#4C72B0", "dit": "#DD8452", "decoder": "#55A868", "all": "#555555"}
_EXTRA = ["#937860", "#DA8BC3", "#8C8C8C", "#CCB974", "#64B5CD"]
_WAIT_COLORS = {"data": "#B0B0B0", "credit": "#E377C2"}
_WAIT_LABELS = {"data": "data (consumer waiting for input)", "credit": "credit (producer waiting for a free slot)"}
_DPI = 110


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path) -> Path:
    fig.savefig(path, dpi=_DPI)
    return path


def stage_color(stage: str, order: Sequence[str]) -> str:
    """Colour of a stage: fixed for the four known stages, then a palette in order of appearance."""
    if stage in STAGE_COLORS:
        return STAGE_COLORS[stage]
    extra = [s for s in order if s not in STAGE_COLORS]
    return _EXTRA[extra.index(stage) % len(_EXTRA)] if stage in extra else "#000000"


def time_unit(duration_s: float) -> tuple[str, float]:
    """(unit name, seconds per unit) that keeps the axis numbers readable."""
    if duration_s < 300:
        return "s", 1.0
    if duration_s < 5 * 3600:
        return "min", 60.0
    return "h", 3600.0


class TimeAxis:
    """Maps unix times to x positions: seconds/minutes/hours since the first run's start.

    Runs of a resumed job that started long after the previous one ended (gap > 10% of the plotted time)
    are moved closer: the gap is drawn as a short hatched band labelled with its real length.
    """

    def __init__(self, runs: Sequence[RunData]) -> None:
        self.runs = list(runs)
        starts = [r.t_start for r in self.runs]
        ends = [max(r.t_end, r.t_start + 1e-3) for r in self.runs]
        active = sum(e - s for s, e in zip(starts, ends))
        self.offsets: list[float] = []  # x-seconds at each run's start
        self.gaps: list[tuple[float, float, float]] = []  # (x0, x1, real seconds) of compressed gaps
        x = 0.0
        for k, (s0, e0) in enumerate(zip(starts, ends)):
            if k:
                gap = s0 - ends[k - 1]
                if gap > 0.1 * active:
                    spacer = 0.04 * active
                    self.gaps.append((x, x + spacer, gap))
                    x += spacer
                else:
                    x += max(gap, 0.0)
            self.offsets.append(x)
            x += e0 - s0
        self.starts = np.array(starts)
        self.unit, self.scale = time_unit(x)
        self.x_max = x / self.scale

    def x(self, t: Any) -> Any:
        """x position of unix time(s) ``t`` (scalar or array)."""
        t_arr = np.asarray(t, dtype=np.float64)
        k = np.clip(np.searchsorted(self.starts, t_arr, side="right") - 1, 0, len(self.starts) - 1)
        out = (np.asarray(self.offsets)[k] + (t_arr - self.starts[k])) / self.scale
        return float(out) if out.ndim == 0 else out

    def w(self, seconds: Any) -> Any:
        """Width on the axis of a duration."""
        return np.asarray(seconds, dtype=np.float64) / self.scale

    @property
    def label(self) -> str:
        first = "job start" if len(self.runs) == 1 else "the first run's start"
        broken = ", long gaps between runs shortened" if self.gaps else ""
        return f"time since {first} ({self.unit}{broken})"

    def decorate(self, ax: Any) -> None:
        """Limits, label, run starts (resumed jobs), shortened gaps and re-plans."""
        ax.set_xlim(0, self.x_max * 1.005)
        ax.set_xlabel(self.label)
        for x0, x1, real in self.gaps:
            ax.axvspan(x0 / self.scale, x1 / self.scale, color="#EEEEEE", lw=0)
            ax.annotate(f"{_width_text(real)} later", (0.5 * (x0 + x1) / self.scale, 0.5),
                        xycoords=("data", "axes fraction"), rotation=90, ha="center", va="center", fontsize=8,
                        color="#666666")
        for run in self.runs:
            if len(self.runs) > 1:
                x = self.x(run.t_start)
                ax.axvline(x, color="black", lw=1, ls="--")
                ax.annotate(f"run {run.run}", (x, 1.0), xycoords=("data", "axes fraction"), xytext=(3, -12),
                            textcoords="offset points", fontsize=8)
            for rp in run.replans:
                x = self.x(float(rp["t"]))
                ax.axvline(x, color="#D62728", lw=1, ls=":")
                ax.annotate("re-plan", (x, 1.0), xycoords=("data", "axes fraction"), xytext=(3, -24),
                            textcoords="offset points", fontsize=8, color="#D62728")


def _coalesce(intervals: list[tuple[float, float]], eps: float) -> list[tuple[float, float]]:
    """Merge intervals closer than ``eps`` (below a pixel): keeps huge jobs drawable."""
    out: list[list[float]] = []
    for t0, t1 in sorted(intervals):
        if out and t0 - out[-1][1] <= eps:
            out[-1][1] = max(out[-1][1], t1)
        else:
            out.append([t0, t1])
    return [(a, b) for a, b in out]


_MOVE_COLOR = "#3A3A3A"


def plot_timeline(runs: Sequence[RunData], path: Path) -> Path:
    """Gantt chart: one lane per rank ("rank r (role, host)"), stage bars coloured per stage, channel waits as
    thin bars under them, failures as red crosses."""
    from matplotlib.patches import Patch
    from matplotlib.lines import Line2D

    tx = TimeAxis(runs)
    last = runs[-1]
    ranks = sorted({r for run in runs for r in run.ranks})
    lane = {r: i for i, r in enumerate(ranks)}
    n = max(1, len(ranks))
    fig = _figure(13, min(60.0, 1.9 + 0.42 * n))
    ax = fig.add_subplot()
    eps = tx.x_max * tx.scale / 3000.0
    stages_seen: list[str] = []
    for run in runs:
        for s in run.spans:
            if s.stage not in stages_seen:
                stages_seen.append(s.stage)
    order = [s for s in STAGE_COLORS if s in stages_seen] + [s for s in stages_seen if s not in STAGE_COLORS]
    span_groups: dict[tuple[int, str], list[tuple[float, float]]] = {}
    wait_groups: dict[tuple[int, str], list[tuple[float, float]]] = {}
    failed_bars: list[tuple[int, float, float]] = []
    for run in runs:
        for s in run.spans:
            span_groups.setdefault((s.rank, s.stage), []).append((s.t0, s.t1))
            if not s.ok and s.rank in lane:
                failed_bars.append((lane[s.rank], tx.x(s.t0), tx.w(s.t1 - s.t0)))
        for w in run.waits:
            wait_groups.setdefault((w.rank, w.what), []).append((w.t0, w.t1))
    for (rank, stage), intervals in span_groups.items():
        if rank in lane:  # every item its own bar (white edges between) unless there are too many to draw
            merged = _coalesce(intervals, eps) if len(intervals) > 2000 else sorted(intervals)
            bars = [(tx.x(a), tx.w(b - a)) for a, b in merged]
            ax.broken_barh(bars, (lane[rank] - 0.36, 0.56), facecolors=stage_color(stage, order), edgecolor="white",
                           linewidth=0.6 if len(bars) < 400 else 0.0)  # white edges: where one item ends
    for (rank, what), intervals in wait_groups.items():
        if rank in lane:
            bars = [(tx.x(a), tx.w(b - a)) for a, b in _coalesce(intervals, eps)]
            ax.broken_barh(bars, (lane[rank] + 0.24, 0.14), facecolors=_WAIT_COLORS.get(what, "#777777"),
                           edgecolor="none")
    move_groups: dict[int, list[tuple[float, float]]] = {}
    for run in runs:  # a time-shared rank moving a stage's components to its GPU: dark bars between the stages
        for m in run.moves:
            t1 = float(m.get("t1", m["t"]))
            move_groups.setdefault(int(m.get("rank", -1)), []).append((float(m.get("t0", t1)), t1))
    for rank, intervals in move_groups.items():
        if rank in lane:
            bars = [(tx.x(a), tx.w(b - a)) for a, b in _coalesce(intervals, eps)]
            ax.broken_barh(bars, (lane[rank] - 0.36, 0.56), facecolors=_MOVE_COLOR, edgecolor="none")
    for y, x, w in failed_bars:
        ax.broken_barh([(x, w)], (y - 0.36, 0.56), facecolors="none", edgecolor="#D62728", hatch="///", lw=1)
    for run in runs:  # shade where nothing finished for long: the eye goes to the stall, not the long bars
        stalled = stall(run)
        if stalled is not None:
            gap, a, b = stalled
            ax.axvspan(tx.x(a), tx.x(b), color="#D62728", alpha=0.08, lw=0)
            ax.annotate(f"no stage finished for {gap:.0f} s", (0.5 * (tx.x(a) + tx.x(b)), 1.0),
                        xycoords=("data", "axes fraction"), xytext=(0, -4), textcoords="offset points",
                        ha="center", va="top", fontsize=9, color="#D62728",
                        bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "#D62728", "lw": 0.6})
    fails = [(float(f["t"]), int(f.get("rank", -1))) for run in runs for f in run.failures]
    fx = [tx.x(t) for t, r in fails if r in lane]
    fy = [lane[r] for t, r in fails if r in lane]
    if fx:
        ax.plot(fx, fy, "x", color="#D62728", ms=9, mew=2.2, zorder=5)
    labels = []
    hosts = {rank: next((r for r in reversed(runs) if rank in r.ranks), last).host_of(rank) for rank in ranks}
    short = {rank: h.split(".")[0] or h for rank, h in hosts.items()}
    if len(set(short.values())) < len(set(hosts.values())):  # the domain tells nodes apart: keep it
        short = hosts
    for rank in ranks:
        run = next((r for r in reversed(runs) if rank in r.ranks), last)
        host = short[rank] if len(short[rank]) <= 20 else short[rank][:19] + "…"
        role = run.roles_label(rank)
        group = run.dit_group_of(rank)
        if group is not None and run.num_dit_groups > 1 and role == "DiT":
            role = f"DiT g{group}"
        labels.append(f"rank {rank} ({role}, {host})")
    ax.set_yticks(range(n), labels, fontsize=9 if n <= 48 else 6)
    if n > 120:  # too many to read: label every k-th lane
        k = int(np.ceil(n / 120))
        ax.set_yticks(range(0, n, k), labels[::k], fontsize=6)
    ax.set_ylim(n - 0.4, -0.6)
    ax.grid(axis="x", color="#DDDDDD", lw=0.6)
    ax.set_axisbelow(True)
    tx.decorate(ax)
    handles = [Patch(color=stage_color(s, order), label=s) for s in order]
    handles += [Patch(color=_WAIT_COLORS[w], label=f"waiting: {_WAIT_LABELS[w]}") for w in ("data", "credit")
                if any(x.what == w for run in runs for x in run.waits)]
    if move_groups:
        handles.append(Patch(color=_MOVE_COLOR, label="moving a stage's components to the GPU"))
    if failed_bars or fx:
        handles.append(Line2D([], [], marker="x", color="#D62728", ls="none", mew=2, label="item failed"))
    title = "Stage timeline per rank"
    if len(runs) == 1:  # the PNG is often looked at alone: say what it shows
        title += f": {verdict(last)}" + (" (no job_start record)" if last.job_start is None else "")
    ax.set_title(title, loc="left", fontsize=11)
    fig.legend(handles=handles, loc="outside lower center", ncols=min(4, len(handles)), fontsize=8, frameon=False)
    return _save(fig, path)


def _bins(t0: float, t1: float, width: float) -> np.ndarray:
    """Bin edges from t0 to t1 of ``width``; the last bin ends at t1 (a sliver under a quarter bin is merged
    into the one before), so every bin's share or rate is over its real width."""
    edges = t0 + width * np.arange(int(np.ceil((t1 - t0) / width)) + 1)
    edges[-1] = t1
    if edges.size > 2 and edges[-1] - edges[-2] < 0.25 * width:
        edges = np.r_[edges[:-2], t1]
    return edges


def _durations_by_stage(run: RunData) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for sp in run.spans:
        out.setdefault(sp.stage, []).append(sp.t1 - sp.t0)
    return out


def _role_order(role: str) -> tuple[int, str]:
    """Pipeline order: encoder, DiT, decoder, then others."""
    order = list(ROLE_COLORS)
    return (order.index(role) if role in order else len(order), role)


def _nice_width(seconds: float) -> float:
    """The smallest of 1, 2, 5, 10, 15, 30 s, 1, 2, 5, 10, 15, 30 min, 1, 2, 3, 6, 12 h, 1 day >= seconds."""
    for w in (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400):
        if w >= seconds:
            return float(w)
    return float(np.ceil(seconds / 86400) * 86400)


def _secs(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.1f} s"


def _width_text(seconds: float) -> str:
    return f"{seconds / 3600:g} h" if seconds >= 3600 else f"{seconds / 60:g} min" if seconds >= 60 else f"{seconds:g} s"


def plot_utilisation(runs: Sequence[RunData], path: Path) -> Path:
    """Busy fraction (any stage) of each role's ranks over time, one line per role."""
    tx = TimeAxis(runs)
    fig = _figure(13, 4.2)
    ax = fig.add_subplot()
    series: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] = {}
    bin_width = 0.0
    for run in runs:
        t_end = max(run.t_end, run.t_start + 1e-3)
        # bins no shorter than the slowest stage's typical span: shorter ones only show items starting and ending
        typical = max((float(np.median(d)) for d in _durations_by_stage(run).values()), default=1.0)
        edges = _bins(run.t_start, t_end, _nice_width(max((t_end - run.t_start) / 120, typical)))
        if edges.size < 2:
            continue
        bin_width = max(bin_width, float(edges[1] - edges[0]))
        busy = busy_by_rank(run, edges)
        mids = 0.5 * (edges[:-1] + edges[1:])
        width = np.diff(edges)
        roles = {r: np.array([run.role_at(r, m) for m in mids]) for r in run.ranks} if run.replans else \
            {r: np.full(mids.size, run.role_at(r, run.t_start), dtype=object) for r in run.ranks}
        for role in sorted({x for arr in roles.values() for x in arr}, key=_role_order):
            num = np.zeros(mids.size)
            cnt = np.zeros(mids.size)
            for r in run.ranks:
                mask = roles[r] == role
                num += np.where(mask, busy.get(r, np.zeros(mids.size)), 0.0)
                cnt += mask
            frac = np.where(cnt > 0, num / np.maximum(cnt, 1) / width, np.nan)
            xs, ys = series.setdefault(role, ([], []))
            xs += [tx.x(edges), np.array([np.nan])]
            ys += [np.r_[frac, frac[-1:]] * 100, np.array([np.nan])]
    for role, (xs, ys) in series.items():
        counts = {len([r for r in run.ranks if run.role_at(r, run.t_start) == role]) for run in runs}
        n = "/".join(str(c) for c in sorted(counts))
        ax.step(np.concatenate(xs), np.concatenate(ys), where="post", lw=1.6,
                color=ROLE_COLORS.get(role, "#000000"), label=f"{role_title(role)} ({n} rank{'s' if n != '1' else ''})")
    ax.set_ylim(-3, 105)
    ax.set_ylabel("ranks busy in a stage (%)")
    ax.grid(color="#DDDDDD", lw=0.6)
    tx.decorate(ax)
    ax.set_title(f"Utilisation per role (share of the role's rank-time spent in a stage; bins of "
                 f"{_width_text(bin_width)})", loc="left", fontsize=11)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=9, frameon=False)
    return _save(fig, path)


def plot_throughput(runs: Sequence[RunData], path: Path) -> Path:
    """Items finished per minute (bars) and cumulative items finished / failed (lines) over time."""
    tx = TimeAxis(runs)
    fig = _figure(13, 4.2)
    ax = fig.add_subplot()
    ax2 = ax.twinx()
    total = total_failed = 0
    bars_drawn = False
    rates: list[float] = []
    for k, run in enumerate(runs):
        done = completion_times(run)
        duration = max(run.t_end - run.t_start, 1e-3)
        # wide enough to hold a few items each: narrow bins of a slow job read as bursts of a fast one
        width = _nice_width(max(duration / 40.0, 4.0 * duration / max(1, done.size)))
        edges = _bins(run.t_start, run.t_start + duration, width)
        counts, _ = np.histogram(done, bins=edges)
        widths = np.diff(edges)
        per_min = counts / (np.maximum(widths, 1e-9) / 60.0)
        if widths.size >= 4:  # with fewer bins, one bar across the plot reads as a background, not a rate
            ax.bar(tx.x(edges[:-1]), per_min, width=tx.w(widths), align="edge",
                   color="#8DB3D9", edgecolor="white", lw=0.5,
                   label=f"finished per minute (bins of {_width_text(width)})" if not bars_drawn else None)
            bars_drawn = True
        rates.append(done.size / max(duration / 60.0, 1e-9))
        xs = np.r_[run.t_start, done, run.t_end]
        ys = total + np.r_[0, np.arange(1, done.size + 1), done.size]
        ax2.step(tx.x(xs), ys, where="post", color="#1F3F66", lw=1.8,
                 label="finished, cumulative" if k == 0 else None)
        total += int(done.size)
        fails = np.sort(np.array([float(f["t"]) for f in run.failures]))
        if fails.size:
            fx = np.r_[run.t_start, fails, run.t_end]
            fy = total_failed + np.r_[0, np.arange(1, fails.size + 1), fails.size]
            total_failed += int(fails.size)
            ax2.step(tx.x(fx), fy, where="post", color="#D62728", lw=1.4,
                     label="failed, cumulative" if k == 0 else None)
    ax.set_ylabel("items finished per minute")
    if not bars_drawn:  # too few items for a rate over time: say the mean rate instead
        ax.set_yticks([])
        ax.set_ylabel("")
        ax.annotate("too few items for a rate over time; mean " + ", ".join(f"{r:.1f}" for r in rates)
                    + " items/min", (0.01, 0.92), xycoords="axes fraction", fontsize=9, color="#444444")
    ax2.set_ylabel("items (cumulative)")
    ax2.set_ylim(bottom=0)
    ax.grid(axis="y", color="#EEEEEE", lw=0.6)
    tx.decorate(ax)
    ax.set_title("Throughput (an item is finished when its last stage, write, ends)", loc="left", fontsize=11)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    fig.legend(h1 + h2, l1 + l2, loc="outside lower center", ncols=3, fontsize=9, frameon=False)
    return _save(fig, path)


def plot_waits(runs: Sequence[RunData], path: Path, max_channels: int = 30) -> Path:
    """Horizontal bars: seconds blocked per channel, split into data waits and credit waits."""
    totals: dict[str, dict[str, float]] = {}
    waiters: dict[tuple[str, str], set[int]] = {}
    for run in runs:
        for w in run.waits:
            entry = totals.setdefault(w.channel, {"data": 0.0, "credit": 0.0})
            entry[w.what] = entry.get(w.what, 0.0) + (w.t1 - w.t0)
            waiters.setdefault((w.channel, w.what), set()).add(w.rank)
    channels = sorted(totals, key=lambda c: -sum(totals[c].values()))[:max_channels]
    fig = _figure(11, min(30.0, 1.6 + 0.34 * max(3, len(channels))))
    ax = fig.add_subplot()
    elapsed = sum(r.elapsed_s for r in runs) or 1.0  # the waiters' available time, per rank
    if not channels:
        ax.text(0.5, 0.5, "no channel waits recorded (one rank, or no wait longer than the logging threshold)",
                ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    else:
        y = np.arange(len(channels))
        left = np.zeros(len(channels))
        for what in ("data", "credit"):
            vals = np.array([totals[c].get(what, 0.0) for c in channels])
            if vals.any():
                ax.barh(y, vals, left=left, color=_WAIT_COLORS[what], label=_WAIT_LABELS[what], height=0.65)
            left += vals
        for yi, c in zip(y, channels):
            notes = []
            for what in ("credit", "data"):
                secs, who = totals[c].get(what, 0.0), sorted(waiters[(c, what)]) if (c, what) in waiters else []
                if secs > 0 and who:
                    share = secs / (elapsed * len(who))
                    notes.append(f"{what} {_secs(secs)} on rank{'s' if len(who) > 1 else ''} "
                                 f"{','.join(map(str, who[:4]))}{'…' if len(who) > 4 else ''}"
                                 f" ({share:.0%} of {'their' if len(who) > 1 else 'its'} time)")
            ax.annotate("; ".join(notes), (sum(totals[c].values()), yi), xytext=(4, 0),
                        textcoords="offset points", va="center", fontsize=8)
        labels = list(channels)
        ax.set_yticks(y, labels, fontsize=9)
        ax.set_ylim(len(channels) - 0.4, -0.6)
        ax.set_xlim(0, left.max() * 1.9)  # room for the notes right of the bars
        ax.set_xlabel("seconds blocked (summed over the run)")
        fig.legend(loc="outside lower center", ncols=2, fontsize=9, frameon=False)
        ax.grid(axis="x", color="#EEEEEE", lw=0.6)
    more = f" (the {len(channels)} longest of {len(totals)})" if len(totals) > len(channels) else ""
    ax.set_title(f"Time spent waiting on each channel{more}", loc="left", fontsize=11)
    return _save(fig, path)
