"""``spmd-diff report OUT/``: ``OUT/report.html`` (self-contained) and ``OUT/report/*.png`` from the event log.

The PNGs: ``timeline.png`` (one lane per rank, stages coloured, channel waits, failures), ``utilisation.png``
(busy share per role over time), ``throughput.png`` (items finished per minute and cumulative) and
``waits.png`` (seconds blocked per channel). The HTML embeds them (base64) with a summary table and a one-line
verdict ("DiT-bound: DiT ranks busy 97%, decoder 31%", "stalled: no stage progress for 300 s").
"""

from __future__ import annotations

import base64
import html
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any, Sequence

from spmd_diff.errors import UserError
from spmd_diff.observe.analysis import RunData, completion_times, load_runs, role_busy, role_title, verdict
from spmd_diff.observe.events import EVENTS_DIR, MERGED_NAME, merge_event_logs

__all__ = ["write_report", "REPORT_NAME", "FIGURES"]

REPORT_NAME = "report.html"
FIGURES = ("timeline", "utilisation", "throughput", "waits")


def _events_file(out: Path) -> Path:
    """``OUT/events.jsonl``, merged first if per-rank logs are missing from it or newer than it."""
    merged = out / MERGED_NAME
    rank_files = list((out / EVENTS_DIR).glob("rank-*.jsonl"))
    if rank_files and (not merged.exists() or max(p.stat().st_mtime for p in rank_files) > merged.stat().st_mtime):
        return merge_event_logs(out)
    if not merged.exists():
        raise UserError(f"no event log in {out}: neither {merged} nor {out / EVENTS_DIR}/rank-*.jsonl "
                        "(was the job run with events off?)")
    return merged


def _select(runs: dict[int, RunData], run: int | str) -> list[RunData]:
    if not runs:
        raise UserError("the event log holds no records")
    if run == "latest":
        return [runs[max(runs)]]
    if run == "all":
        return list(runs.values())
    if isinstance(run, int) and run in runs:
        return [runs[run]]
    raise UserError(f"no run {run!r} in the event log; runs: {', '.join(map(str, runs))}, 'latest' or 'all'")


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d} min" \
        if s >= 60 else f"{seconds:.1f} s"


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _e(x: Any) -> str:
    return html.escape(str(x))


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], cls: str = "") -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header) if any(header) else ""
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    thead = f"<thead><tr>{head}</tr></thead>" if head else ""
    return f'<table class="{cls}">{thead}<tbody>{body}</tbody></table>'


def summarise(run: RunData) -> dict[str, Any]:
    """Numbers of one run for the summary table (also handy for tests and scripts)."""
    done = completion_times(run)
    job = run.job_start or {}
    end = run.job_end or {}
    elapsed = run.elapsed_s
    num_done = run.num_done
    return {
        "run": run.run,
        "status": end.get("status", "no job_end record (killed, or still running)"),
        "version": job.get("version", "?"),
        "world_size": job.get("world_size", len(run.ranks)),
        "hosts": sorted(set(job.get("hosts") or [run.host_of(r) for r in run.ranks])),
        "num_items": job.get("num_items"),
        "num_pending": job.get("num_pending"),
        "done": num_done,
        "failed": run.num_failed,
        "elapsed_s": elapsed,
        "active_s": float(max(s.t1 for s in run.spans) - min(s.t0 for s in run.spans)) if run.spans else 0.0,
        "first_video_s": float(done[0] - run.t_start) if done.size else None,
        "videos_per_hour": num_done * 3600.0 / elapsed if elapsed > 0 else 0.0,
        "roles": role_busy(run),
        "verdict": verdict(run),
        "video_encoding": _encoding(run),
    }


def _encoding(run: RunData) -> dict[str, float] | None:
    """Medians per video of the ``encode_video`` stages (h264/hevc output): CPU and wall seconds; None if none."""
    spans = [sp for sp in run.spans if sp.stage == "encode_video" and sp.ok]
    if not spans:
        return None
    cpu = [sp.cpu_s for sp in spans if sp.cpu_s is not None]
    return {"videos": len(spans), "wall_s": statistics.median(sp.t1 - sp.t0 for sp in spans),
            "cpu_s": statistics.median(cpu) if cpu else float("nan")}


def _summary_html(run: RunData, s: dict[str, Any]) -> str:
    rows = [
        ("status", s["status"]),
        ("items", f"{s['done']} written, {s['failed']} failed"
         + (f" (this run had {s['num_pending']} to render of {s['num_items']})" if s["num_pending"] is not None else "")),
        ("elapsed", f"{_duration(s['elapsed_s'])} (job start to end), {_duration(s['active_s'])} with stages running"),
        ("first video after", "-" if s["first_video_s"] is None else _duration(s["first_video_s"])),
        ("videos per hour", f"{s['videos_per_hour']:.1f}"),
        ("ranks", f"{s['world_size']} on {len(s['hosts'])} host(s): {', '.join(s['hosts'][:8])}"
         + (" …" if len(s["hosts"]) > 8 else "")),
        ("version", s["version"]),
    ]
    if s.get("video_encoding"):
        e = s["video_encoding"]
        rows.append(("video encoding", f"{e['videos']} videos on the writer threads, median {e['cpu_s']:.2f} CPU s, "
                                       f"{e['wall_s']:.2f} s wall per video"))
    out = _table(("", ""), rows, "kv")
    role_rows = [(role_title(role), e["ranks"], f"{e['busy']:.0%}",
                  ", ".join(f"{stage} {frac:.0%}" for stage, frac in e["stages"].items()) or "-")
                 for role, e in sorted(s["roles"].items(), key=lambda kv: -kv[1]["busy"])]
    out += "<h3>Busy share per role (while stages ran)</h3>"
    out += _table(("role", "ranks", "busy", "by stage"), role_rows)
    return out


def _ranks_html(run: RunData) -> str:
    window = (min(s.t0 for s in run.spans), max(s.t1 for s in run.spans)) if run.spans else (run.t_start, run.t_end)
    width = max(window[1] - window[0], 1e-9)
    stats: dict[int, dict[str, Any]] = {r: {"busy": 0.0, "wait": 0.0, "stages": {}} for r in run.ranks}
    for sp in run.spans:
        st = stats.setdefault(sp.rank, {"busy": 0.0, "wait": 0.0, "stages": {}})
        st["busy"] += sp.t1 - sp.t0
        st["stages"][sp.stage] = st["stages"].get(sp.stage, 0) + 1
    for w in run.waits:
        stats.setdefault(w.rank, {"busy": 0.0, "wait": 0.0, "stages": {}})["wait"] += w.t1 - w.t0
    rows = [(r, run.roles_label(r), run.host_of(r), f"{min(1.0, st['busy'] / width):.0%}", f"{st['wait']:.1f}",
             ", ".join(f"{k}×{v}" for k, v in st["stages"].items()) or "-")
            for r, st in sorted(stats.items())]
    table = _table(("rank", "role", "host", "busy", "waited (s)", "stages finished"), rows)
    return f"<details {'open' if len(rows) <= 32 else ''}><summary>Per rank ({len(rows)})</summary>{table}</details>"


def _channels_html(run: RunData) -> str:
    per: dict[str, dict[str, float]] = {}
    for h in run.handoffs:
        e = per.setdefault(str(h.get("channel", "?")), {"n": 0, "bytes": 0.0, "s": 0.0})
        e["n"] += 1
        e["bytes"] += float(h.get("bytes") or 0)
        e["s"] += max(0.0, float(h.get("t1", 0) or 0) - float(h.get("t0", 0) or 0))
    if not per:
        return ""
    rows = [(c, int(e["n"]), _bytes(e["bytes"]), f"{e['s']:.3f}",
             f"{e['bytes'] / e['s'] / 2**20:.1f}" if e["s"] > 0 else "-") for c, e in sorted(per.items())]
    return ("<details><summary>Handoffs per channel</summary>"
            + _table(("channel", "handoffs", "bytes", "time in put (s)", "MiB/s"), rows) + "</details>")


def _events_list_html(run: RunData) -> str:
    out = ""
    if run.failures:
        rows = [(f"{float(f['t']) - run.t_start:.1f}", f.get("rank"), f.get("item"), f.get("stage"),
                 str(f.get("error", ""))[:300]) for f in run.failures[:200]]
        more = f" (first 200 of {len(run.failures)})" if len(run.failures) > 200 else ""
        out += f"<h3>Failures{more}</h3>" + _table(("at (s)", "rank", "item", "stage", "error"), rows)
    if run.item_groups:
        by_degree: dict[int, int] = {}
        for rec in run.item_groups:
            by_degree[int(rec.get("degree", 0))] = by_degree.get(int(rec.get("degree", 0)), 0) + 1
        rows = [(f"{float(r['t']) - run.t_start:.1f}", r.get("item"), r.get("degree"),
                 " ".join(str(x) for x in r.get("ranks", []))) for r in run.item_groups[:200]]
        more = f" (first 200 of {len(run.item_groups)})" if len(run.item_groups) > 200 else ""
        out += ("<h3>Per-item parallel degree</h3>"
                + _table(("SP degree", "items"), sorted(by_degree.items()))
                + f"<details><summary>Each item's group{more}</summary>"
                + _table(("started at (s)", "item", "degree", "ranks"), rows) + "</details>")
    if run.replans:
        rows = [(f"{float(r['t']) - run.t_start:.1f}", r.get("reason", ""), json.dumps(r.get("new_plan"))[:300])
                for r in run.replans]
        out += "<h3>Re-plans</h3>" + _table(("at (s)", "reason", "new plan"), rows)
    return out


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1500px}
h1{font-size:22px;margin-bottom:4px} h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ddd}
h3{font-size:15px;margin:18px 0 6px}
.verdict{font-size:17px;padding:10px 14px;border-left:5px solid #DD8452;background:#FFF6EE;margin:12px 0}
.verdict.stalled{border-color:#D62728;background:#FDECEC}
table{border-collapse:collapse;font-size:13px;margin:6px 0}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top} th{background:#f4f4f4}
table.kv td:first-child{font-weight:600;background:#fafafa}
img{max-width:100%;border:1px solid #eee;margin:6px 0} .muted{color:#777;font-size:12px}
pre{background:#f7f7f7;padding:8px;overflow:auto;font-size:12px}
"""


def _html(out: Path, runs: list[RunData], all_runs: dict[int, RunData], figures: dict[str, Path]) -> str:
    last = runs[-1]
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>spmd-diff report: {_e(out.name)}</title>"
             f"<style>{_CSS}</style></head><body>",
             f"<h1>spmd-diff report: {_e(out)}</h1>",
             f"<div class='muted'>generated {_e(time.strftime('%Y-%m-%d %H:%M:%S'))}; "
             f"{len(all_runs)} run(s) in the event log"
             + (f", showing {'all' if len(runs) > 1 else 'run ' + str(last.run)}" if len(all_runs) > 1 else "")
             + "</div>"]
    for run in runs:
        s = summarise(run)
        stalled = " stalled" if s["verdict"].startswith("stalled") else ""
        if len(runs) > 1 or len(all_runs) > 1:
            parts.append(f"<h2>Run {run.run} (started {_e(time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(run.t_start)))})</h2>")
        parts.append(f"<div class='verdict{stalled}'>{_e(s['verdict'])}</div>")
        parts.append(_summary_html(run, s))
        parts.append(_ranks_html(run))
        parts.append(_channels_html(run))
        parts.append(_events_list_html(run))
    captions = {
        "timeline": "Each lane is one rank; bars are stages of items, thin bars under them are waits on channels.",
        "utilisation": "A role whose line stays near 100% is the bottleneck; the others wait for it.",
        "throughput": "Bars: items finished per minute in each time bin. Lines: items finished (failed) so far.",
        "waits": "data waits: a consumer had nothing to do (upstream slow); credit waits: a producer's ring "
                 "was full (downstream slow).",
    }
    parts.append("<h2>Figures</h2>")
    for name, path in figures.items():
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        parts.append(f"<h3>{_e(name.capitalize())}</h3><div class='muted'>{_e(captions.get(name, ''))}</div>"
                     f"<img alt='{_e(name)}' src='data:image/png;base64,{data}'>")
    config = (last.job_start or {}).get("config")
    if config is not None:
        parts.append("<details><summary>Job configuration (job_start)</summary><pre>"
                     + _e(json.dumps(config, indent=2, sort_keys=True, default=str)) + "</pre></details>")
    parts.append("</body></html>")
    return "\n".join(p for p in parts if p)


def write_report(out_dir: str | os.PathLike[str], run: int | str = "latest") -> Path:
    """Write ``OUT/report.html`` and ``OUT/report/{timeline,utilisation,throughput,waits}.png``; returns the HTML path.

    Reads ``OUT/events.jsonl`` (merging ``OUT/events/rank-*.jsonl`` first when they are newer or it is missing).
    ``run``: ``"latest"`` (default), ``"all"`` (every run of a resumed job on one time axis) or a run index.
    UserError if there is no event log.
    """
    out = Path(out_dir)
    if not out.is_dir():
        raise UserError(f"{out} is not a directory")
    all_runs = load_runs(_events_file(out))
    runs = _select(all_runs, run)
    try:
        from spmd_diff.observe import plots
    except ImportError as exc:  # matplotlib missing
        raise UserError(f"the report needs matplotlib: pip install matplotlib ({exc})") from None
    fig_dir = out / "report"
    fig_dir.mkdir(exist_ok=True)
    figures = {
        "timeline": plots.plot_timeline(runs, fig_dir / "timeline.png"),
        "utilisation": plots.plot_utilisation(runs, fig_dir / "utilisation.png"),
        "throughput": plots.plot_throughput(runs, fig_dir / "throughput.png"),
        "waits": plots.plot_waits(runs, fig_dir / "waits.png"),
    }
    target = out / REPORT_NAME
    tmp = target.with_name(f".{REPORT_NAME}.tmp-{os.getpid()}")
    tmp.write_text(_html(out, runs, all_runs, figures), encoding="utf-8")
    os.replace(tmp, target)
    return target
