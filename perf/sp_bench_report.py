"""perf/bench_sp.py's results file: ``bench_sp.md`` (tables, ratios against the targets) and ``bench_sp.json``
(every row), from the phases' ``*.jsonl``. Pure Python: runs anywhere on a copied results folder."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

CASES = ("1.3B-480p", "1.3B-720p", "14B-480p", "14B-720p")
OURS = ("ours-ulysses", "ours-ulysses-pipe", "ours-ring", "ours-torus",
        "coll-ulysses", "coll-ulysses-pipe", "coll-ring", "coll-torus")
PEERS_PREFIX = ("diffusers-", "xfuser-")


def load_rows(out: Path) -> list[dict]:
    rows = []
    for path in sorted(out.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                rows.append(json.loads(line))
    return rows


def summarize(rows: list[dict]) -> dict:
    """``{case: {method: {degree: row}}}`` plus the derived figures of the issue's targets, per case."""
    table: dict = {}
    for row in rows:
        if row.get("case") in CASES and "median_s" in row:
            table.setdefault(row["case"], {}).setdefault(row["method"], {})[row["degree"]] = row
    derived = {}
    for case, methods in table.items():
        t = lambda method, degree: methods.get(method, {}).get(degree, {}).get("median_s")  # noqa: E731
        info: dict = {}
        for degree in (2, 4):
            ours = {m: t(m, degree) for m in OURS if t(m, degree)}
            peers = {m: t(m, degree) for m in methods if m.startswith(PEERS_PREFIX) and t(m, degree)}
            if ours:
                best = min(ours, key=ours.get)
                info[f"ours_best_{degree}"] = (best, ours[best])
            if peers:
                best_peer = min(peers, key=peers.get)
                info[f"peer_best_{degree}"] = (best_peer, peers[best_peer])
            if ours and peers:
                info[f"ratio_vs_peer_{degree}"] = ours[best] / peers[best_peer]
        plain = t("diffusers", 1)
        ours1 = t("ours", 1)
        if "ours_best_4" in info:
            if plain:
                info["efficiency_4_vs_plain"] = plain / (4 * info["ours_best_4"][1])
            if ours1:
                info["efficiency_4_vs_ours1"] = ours1 / (4 * info["ours_best_4"][1])
        uly = min(filter(None, (t("ours-ulysses", 4), t("ours-ulysses-pipe", 4))), default=None)
        torus, bare, exchange = t("ours-torus", 4), t("ours-torus-no-exchange", 4), t("torus-exchange-only", 4)
        if torus and uly:
            info["torus_over_ulysses"] = torus / uly
        if torus and bare and exchange:
            info["torus_hidden_fraction"] = max(0.0, min(1.0, 1.0 - (torus - bare) / exchange))
            info["torus_exposed_s"] = max(0.0, torus - bare)
            info["torus_exchange_s"] = exchange
        derived[case] = info
    return {"table": table, "derived": derived}


def _fmt(seconds) -> str:
    return "" if seconds is None else f"{seconds * 1e3:,.0f}"


def write_report(out: Path, status: dict, args: dict) -> None:
    rows = load_rows(out)
    summary = summarize(rows)
    env = next((r for r in rows if r.get("method") == "environment"), {})
    errors = [r for r in rows if "error" in r]
    lines = ["# Sequence-parallel Wan2.1 DiT: forward time per step", "",
             f"Written {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC} by perf/bench_sp.py.", "",
             f"- hardware: {env.get('gpus')} x {env.get('gpu')} ({env.get('host')})",
             f"- versions: {json.dumps(env.get('versions'))}",
             f"- commit: {env.get('commit')}; args: {json.dumps(args.get('args', args), default=str)}",
             f"- phases: {json.dumps(status)}",
             "- random weights, bf16 (fp32 where diffusers keeps it), batch 1, one forward = one step without CFG, "
             "81 frames; medians over timed reps after one warm-up; each rep starts on a group barrier and counts "
             "the slowest rank; 14B measured with fewer blocks and scaled to 40 (see `layers`/`scale` in the JSON).",
             f"- our local attention kernels (probed): "
             f"{json.dumps({k: v for k, v in (env.get('attention_probe') or {}).items() if k != 'errors'})}", ""]
    for case in CASES:
        methods = summary["table"].get(case)
        if not methods:
            continue
        lines += [f"## {case}", "", "| method | 1 GPU ms | 2 GPUs ms | 4 GPUs ms | rel. err vs 1-GPU diffusers |",
                  "|---|---:|---:|---:|---:|"]
        for method, by_degree in sorted(methods.items()):
            errs = [r.get("rel_err_vs_1gpu") for r in by_degree.values() if r.get("rel_err_vs_1gpu") is not None]
            cells = " | ".join(_fmt(by_degree.get(d, {}).get("median_s")) for d in (1, 2, 4))
            lines.append(f"| {method} | {cells} | {f'{max(errs):.2e}' if errs else ''} |")
        info = summary["derived"].get(case, {})
        lines.append("")
        for degree in (2, 4):
            if f"ratio_vs_peer_{degree}" in info:
                ours, peer = info[f"ours_best_{degree}"], info[f"peer_best_{degree}"]
                lines.append(f"- {degree} GPUs: ours best {ours[0]} {_fmt(ours[1])} ms vs best peer {peer[0]} "
                             f"{_fmt(peer[1])} ms: ratio **{info[f'ratio_vs_peer_{degree}']:.3f}** (target <= 0.9)")
        if "efficiency_4_vs_plain" in info:
            lines.append(f"- scaling efficiency at 4 GPUs: {info['efficiency_4_vs_plain']:.1%} vs 1-GPU plain "
                         f"diffusers, {info.get('efficiency_4_vs_ours1', float('nan')):.1%} vs ours on 1 GPU "
                         "(target >= 85% for 1.3B-720p)")
        if "torus_over_ulysses" in info:
            lines.append(f"- torus 2x2 / Ulysses (4 GPUs, one machine): {info['torus_over_ulysses']:.3f} "
                         "(target <= 1.10)")
        if "torus_hidden_fraction" in info:
            lines.append(f"- torus inter-row exchange hidden behind compute: {info['torus_hidden_fraction']:.1%} "
                         f"(exchange alone {_fmt(info['torus_exchange_s'])} ms per step, exposed "
                         f"{_fmt(info['torus_exposed_s'])} ms)")
        lines.append("")
    if errors:
        lines += ["## What failed", ""]
        lines += [f"- {r.get('phase')} {r.get('case')} S={r.get('degree')} {r.get('method')}: {r['error']}"
                  for r in errors]
        lines.append("")
    (out / "bench_sp.md").write_text("\n".join(lines))
    (out / "bench_sp.json").write_text(json.dumps({"status": status, "rows": rows, "derived": summary["derived"]},
                                                  indent=1, default=str))
    print("\n".join(lines), flush=True)
