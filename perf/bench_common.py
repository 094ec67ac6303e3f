"""What every benchmark in perf/ shares: the header of its results file (date, host, CPU, commit, versions).

Each benchmark is one script run as ``python3 perf/bench_NAME.py`` (its folder is then on ``sys.path``, so
``import bench_common`` finds this file); ``spmd_diff`` comes from the installed package or ``PYTHONPATH``.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import socket
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMMIT_FILE = REPO / ".bench_commit"
"""Written by the copy of a worktree made for a GPU machine (no ``.git`` there): the commit, and "+dirty"."""


def cpu_name() -> str:
    """The CPU model from ``/proc/cpuinfo`` ("model name"), else what ``platform`` knows, else "?"."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def commit() -> str:
    """The commit measured: ``.bench_commit`` if present, else ``git rev-parse --short HEAD`` ("" if neither)."""
    if COMMIT_FILE.is_file():
        return " ".join(COMMIT_FILE.read_text().split())
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def versions(*packages: str) -> dict[str, str]:
    """``{"python": ..., package: version}`` for each of ``packages`` that is installed (distribution names)."""
    found = {"python": platform.python_version()}
    for name in packages:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


def utc_now() -> str:
    """The current UTC time, ``2026-12-03T05:30:00+00:00``."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def results_header(*packages: str) -> dict:
    """The fields every results file starts with: ``date`` (UTC), ``host``, ``cpu``, ``cores``, ``platform``,
    ``commit`` and ``versions`` (python and ``packages``)."""
    return {"date": utc_now(), "host": socket.gethostname(), "cpu": cpu_name(), "cores": os.cpu_count(),
            "platform": platform.platform(), "commit": commit(), "versions": versions(*packages)}


def header_line(header: dict) -> str:
    """One Markdown line naming what a results file's header holds."""
    packages = ", ".join(f"{name} {version}" for name, version in header["versions"].items())
    return (f"{header['date']} on {header['host']} ({header['cpu']}, {header['cores']} cores); commit "
            f"{header['commit'] or '?'}; {packages}.")
