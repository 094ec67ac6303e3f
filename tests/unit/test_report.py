"""The report renders from synthetic events (and from a real demo run's, when the engine runs here)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from spmd_diff.errors import UserError
from spmd_diff.observe.analysis import load_runs, verdict
from spmd_diff.observe.events import EventLog, merge_event_logs
from spmd_diff.observe.report import summarise, write_report

pytest.importorskip("matplotlib")

REPO = Path(__file__).resolve().parents[2]
PLAN = {"encoders": [0], "dit_groups": [[1, 2]], "decoders": [3]}


def simulate(out: Path, num_items: int = 8, t_start: float = 1.8e9, denoise_s: float = 2.0, decode_s: float = 0.6,
             fail_item: int | None = 5, stall_s: float = 0.0, resumed: bool = False) -> float:
    """Events of a 4-rank pipeline (encoder 0, DiT group 1+2, decoder 3) as the engine would emit them.

    The DiT is the slow stage, so the verdict must say DiT-bound. Returns the job end time.
    """
    logs = {r: EventLog(out, r) for r in range(4)}
    roles = {0: "encoder", 1: "dit", 2: "dit", 3: "decoder"}
    t = t_start
    logs[0].emit("job_start", t=t, version="0.1.0", config={"model": {"path": "demo"}}, world_size=4, plan=PLAN,
                 hosts=["node-a", "node-a", "node-b", "node-b"], num_items=num_items, num_pending=num_items)
    for r in range(4):
        logs[r].emit("rank_start", t=t + 0.01, role=roles[r], host="node-a" if r < 2 else "node-b")
    t += 1.0  # model load
    enc_free = dit_free = dec_free = t
    for k in range(num_items):
        item = f"run{int(resumed)}-item-{k}"
        e0 = max(enc_free, t)
        e1 = e0 + 0.3
        for r, lg in ((0, logs[0]),):
            lg.emit("stage", t=e1, stage="encode", item=item, t0=e0, t1=e1, role="encoder")
        d0 = max(e1, dit_free)
        if d0 > e1 + 1e-3:
            logs[0].emit("wait", t=d0, channel="enc0->dit1", what="credit", t0=e1, t1=d0)
        if d0 > dit_free + 1e-3:
            for r in (1, 2):
                logs[r].emit("wait", t=d0, channel="enc0->dit1", what="data", t0=dit_free, t1=d0)
        logs[0].emit("handoff", t=d0 + 0.01, channel="enc0->dit1", src=0, dst=1, item=item, bytes=2_000_000,
                     t0=d0, t1=d0 + 0.01)
        d0 += 0.01
        d1 = d0 + denoise_s + (stall_s if k == num_items // 2 else 0.0)
        for r in (1, 2):
            logs[r].emit("stage", t=d1, stage="denoise", item=item, t0=d0, t1=d1, role="dit")
        dit_free = d1
        enc_free = d0  # a ring of one slot: the encoder is blocked until the DiT takes the item
        if fail_item is not None and k == fail_item:
            logs[1].emit("failure", t=d1, item=item, stage="denoise", error="FloatingPointError: NaN")
            continue
        x0 = max(d1, dec_free)
        if x0 > dec_free + 1e-3:
            logs[3].emit("wait", t=x0, channel="dit1->dec3", what="data", t0=dec_free, t1=x0)
        logs[1].emit("handoff", t=x0 + 0.005, channel="dit1->dec3", src=1, dst=3, item=item, bytes=500_000,
                     t0=x0, t1=x0 + 0.005)
        x1 = x0 + decode_s
        logs[3].emit("stage", t=x1, stage="decode", item=item, t0=x0, t1=x1, role="decoder")
        logs[3].emit("stage", t=x1 + 0.1, stage="write", item=item, t0=x1, t1=x1 + 0.1, role="decoder")
        dec_free = x1 + 0.1
    t_end = max(dec_free, dit_free) + 0.5
    for r in range(4):
        logs[r].emit("rank_end", t=t_end - 0.1, role=roles[r], items=num_items)
    logs[0].emit("job_end", t=t_end, status="complete", items_done=num_items - (fail_item is not None),
                 items_failed=int(fail_item is not None), elapsed_s=t_end - t_start)
    for lg in logs.values():
        lg.close()
    return t_end


def _check_report(out: Path, num_ranks: int) -> str:
    path = write_report(out)
    assert path == out / "report.html"
    text = path.read_text(encoding="utf-8")
    for name in ("timeline", "utilisation", "throughput", "waits"):
        png = out / "report" / f"{name}.png"
        assert png.stat().st_size > 10_000, png  # a real picture, not an empty canvas
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert text.count("data:image/png;base64,") == 4
    assert "<img" in text and "src='data:" in text and "http" not in text.split("<body>")[1].split("spmd-diff report")[0]
    rows = re.findall(r"<tr><td>(\d+)</td><td>([^<]*)</td><td>([^<]*)</td>", text)
    assert sorted(int(r[0]) for r in rows) == list(range(num_ranks)), rows  # one per-rank row per rank
    return text


def test_report_synthetic_dit_bound(tmp_path: Path) -> None:
    simulate(tmp_path)
    text = _check_report(tmp_path, 4)
    assert "DiT-bound: DiT ranks busy" in text
    [run] = load_runs(tmp_path / "events.jsonl").values()
    assert [run.roles_label(r) for r in run.ranks] == ["encoder", "DiT", "DiT", "decoder"]
    assert {s.stage for s in run.spans} == {"encode", "denoise", "decode", "write"}
    s = summarise(run)
    assert s["done"] == 7 and s["failed"] == 1 and s["roles"]["dit"]["busy"] > 0.9
    assert s["roles"]["decoder"]["busy"] < 0.5
    assert "FloatingPointError" in text and "enc0-&gt;dit1" in text


def test_report_decoder_bound_and_stalled(tmp_path: Path) -> None:
    simulate(tmp_path / "dec", denoise_s=0.3, decode_s=2.0, fail_item=None)
    assert verdict(next(iter(load_runs(merge_event_logs(tmp_path / "dec")).values()))).startswith("decoder-bound")
    simulate(tmp_path / "stall", stall_s=400.0, fail_item=None)
    text = write_report(tmp_path / "stall").read_text()
    assert "stalled: no stage progress for 40" in text


def test_report_two_runs(tmp_path: Path) -> None:
    t_end = simulate(tmp_path, num_items=4)
    simulate(tmp_path, num_items=3, t_start=t_end + 600, resumed=True, fail_item=None)
    runs = load_runs(merge_event_logs(tmp_path))
    assert list(runs) == [0, 1]
    assert {s.item.split("-")[0] for s in runs[1].spans} == {"run1"}
    assert {s.item.split("-")[0] for s in runs[0].spans} == {"run0"}
    text = write_report(tmp_path).read_text()
    assert "2 run(s) in the event log" in text and "Run 1" in text
    text_all = write_report(tmp_path, run="all").read_text()
    assert "Run 0" in text_all and "Run 1" in text_all
    with pytest.raises(UserError, match="no run 7"):
        write_report(tmp_path, run=7)


def test_report_without_events(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no event log"):
        write_report(tmp_path)


# ------------------------------------------------------------------------ a real demo run (the engine's events)

def _mpirun() -> str | None:
    return shutil.which("mpirun")


@pytest.fixture(scope="session")
def demo_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """OUT/ of a real 4-rank demo job (about 1-2 min on a small CPU machine; SPMD_DIFF_SKIP_DEMO=1 skips it)."""
    if os.environ.get("SPMD_DIFF_SKIP_DEMO") == "1":
        pytest.skip("SPMD_DIFF_SKIP_DEMO=1")
    if _mpirun() is None or not (REPO / "jobs" / "demo.toml").exists():
        pytest.skip("needs mpirun and jobs/demo.toml")
    out = tmp_path_factory.mktemp("demo") / "OUT"
    cmd = [_mpirun(), "--allow-run-as-root", "--oversubscribe", "-n", "4", sys.executable, "-m", "spmd_diff", "run",
           str(REPO / "jobs" / "demo.toml"), "--prompts", str(REPO / "jobs" / "demo_prompts.jsonl"), "--out", str(out)]
    env = {**os.environ, "OMPI_MCA_rmaps_base_oversubscribe": "1", "PYTHONPATH": str(REPO)}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    except subprocess.TimeoutExpired:
        pytest.skip("demo run did not finish in 600 s")
    if proc.returncode != 0 or not (out / "events.jsonl").exists():
        pytest.skip(f"demo run failed (rc {proc.returncode}): {proc.stderr[-1500:]}")
    return out


def test_report_from_real_demo_run(demo_out: Path) -> None:
    """One lane per rank, labelled with the role the plan gave it, with that role's stages on it."""
    [run] = load_runs(demo_out / "events.jsonl").values()
    text = _check_report(demo_out, 4)
    assert run.job_start is not None and run.job_end is not None and run.job_end["status"] == "complete"
    plan = run.job_start["plan"]
    expected = {r: "encoder" for r in plan["encoders"]} | {r: "decoder" for r in plan["decoders"]}
    expected |= {r: "DiT" for g in plan["dit_groups"] for r in g}
    assert {r: run.roles_label(r) for r in run.ranks} == expected
    want_stages = {"encoder": {"encode"}, "DiT": {"denoise"}, "decoder": {"decode", "write"}}
    for rank, role in expected.items():
        assert {s.stage for s in run.spans if s.rank == rank} == want_stages[role], (rank, role)
        host = run.host_of(rank)
        assert f"<td>{rank}</td><td>{role}</td><td>{host}</td>" in text
    assert run.num_done == len({s.item for s in run.spans if s.stage == "write"}) > 0
    assert re.search(r"class='verdict[^']*'>[^<]+(bound|bottleneck|stalled|under-utilised|balanced)", text)


def test_every_run_is_reported_and_a_run_with_nothing_to_do_says_so(tmp_path):
    """A rendering run, then a rerun that found every item done (what startup.finish_without_work records)."""
    end = simulate(tmp_path, num_items=4, fail_item=None)
    rerun = EventLog(tmp_path, 0)
    rerun.emit("job_start", t=end + 60, config={"model": {"path": "demo"}}, world_size=1, plan=PLAN, num_items=4,
               num_pending=0)
    rerun.emit("job_end", t=end + 60.5, status="nothing to do", items_done=0, items_failed=0, elapsed_s=0.5)
    rerun.close()
    merge_event_logs(tmp_path)
    runs = load_runs(tmp_path / "events.jsonl")
    assert sorted(runs) == [0, 1]
    assert verdict(runs[0]).startswith("DiT-bound"), verdict(runs[0])
    assert verdict(runs[1]).startswith("nothing to do"), verdict(runs[1])
    html = write_report(tmp_path, "all").read_text()
    assert "Run 0 (" in html and "Run 1 (" in html and "nothing to do: every item" in html
    latest = write_report(tmp_path, "latest").read_text()
    assert "nothing to do: every item" in latest and "Run 0 (" not in latest


def test_a_replan_changes_the_roles_on_the_timeline(tmp_path):
    """The engine's replan record (plan.replan.Replan.to_event: old_plan / new_plan) moves ranks between roles."""
    end = simulate(tmp_path, num_items=4, fail_item=None)
    log = EventLog(tmp_path, 0)
    new_plan = {"encoders": [0], "dit_groups": [[1], [3]], "decoders": [2]}
    log.emit("replan", t=end - 0.5, batch=0, switch=True, reason="gain", old_plan=PLAN, new_plan=new_plan)
    log.close()
    merge_event_logs(tmp_path)
    run = load_runs(tmp_path / "events.jsonl")[0]
    assert [role for _, role in run.role_timeline(3)] == ["decoder", "dit"]
    import html as html_module
    import json as json_module

    page = write_report(tmp_path, "all").read_text()
    assert html_module.escape(json_module.dumps(new_plan)) in page  # the re-plan's new plan is listed


def test_per_item_degrees_are_counted_and_listed(tmp_path):
    """``item_group`` records (dit.per_item_degree) give the report a count of items per SP degree and each
    item's group."""
    end = simulate(tmp_path, num_items=4, fail_item=None)
    log = EventLog(tmp_path, 0)
    groups = [("a", [0]), ("b", [1, 2]), ("c", [3]), ("d", [0, 1])]
    for k, (item, ranks) in enumerate(groups):
        log.emit("item_group", t=end - 1 + 0.1 * k, item=item, degree=len(ranks), ranks=ranks, predicted_start_s=0.0)
    log.close()
    merge_event_logs(tmp_path)
    run = load_runs(tmp_path / "events.jsonl")[0]
    assert [r["item"] for r in run.item_groups] == ["a", "b", "c", "d"]
    page = write_report(tmp_path, "all").read_text()
    assert "Per-item parallel degree" in page
    assert "<tr><td>1</td><td>2</td></tr>" in page and "<tr><td>2</td><td>2</td></tr>" in page
    assert "<td>b</td><td>2</td><td>1 2</td>" in page


def test_time_shared_ranks_and_their_moves(tmp_path):
    """A time-shared plan's ranks are "time-shared" on the timeline, its move records are read (drawn between the
    stages), and the verdict says where the ranks' time went."""
    logs = {r: EventLog(tmp_path, r) for r in range(2)}
    t = 1.8e9
    plan = {"encoders": [], "dit_groups": [[0], [1]], "decoders": [], "time_shared": True, "stage_batch": 2}
    logs[0].emit("job_start", t=t, version="0.1.0", config={}, world_size=2, plan=plan, hosts=["a", "a"],
                 num_items=4, num_pending=4)
    for r, lg in logs.items():
        lg.emit("rank_start", t=t, role="time-shared", host="a")
        now = t + 1.0
        for stage, seconds in (("encode", 0.1), ("denoise", 2.0), ("decode", 1.0)):
            lg.emit("move", t=now + 0.2, stage=stage, components=[stage], bytes=10, seconds=0.2, dropped=None,
                    t0=now, t1=now + 0.2)
            now += 0.2
            for k in range(2):
                item = f"r{r}-{k}"
                lg.emit("stage", t=now + seconds, stage=stage, item=item, t0=now, t1=now + seconds, ok=True)
                now += seconds
                if stage == "decode":
                    lg.emit("stage", t=now + 0.05, stage="write", item=item, t0=now, t1=now + 0.05, ok=True)
        lg.emit("rank_end", t=now, role="time-shared", items=2, failed=0)
    logs[0].emit("job_end", t=t + 10, status="complete", items_done=4, items_failed=0)
    for lg in logs.values():
        lg.close()
    merge_event_logs(tmp_path)
    run = load_runs(tmp_path / "events.jsonl")[0]
    assert len(run.moves) == 6 and run.roles_label(1) == "time-shared"
    assert verdict(run).startswith("time-shared ranks: busy")
    assert "time-shared ranks: busy" in write_report(tmp_path, "all").read_text()
