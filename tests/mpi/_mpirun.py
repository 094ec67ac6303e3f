"""Launch a Python script or module under ``mpirun`` with a hard timeout, for tests that need several ranks.

A hang fails the test (``MpirunTimeout``, with the output so far) instead of hanging CI: the whole process
group (mpirun and its ranks) is terminated, then killed.

    result = mpirun(4, "tests/mpi/scripts/channel_traffic.py", "--items", "40", timeout=60)
    assert result.returncode == 0, result.stderr
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Mapping, Optional, Sequence

MPIRUN_FLAGS = ("--allow-run-as-root", "--oversubscribe")


class MpirunTimeout(AssertionError):
    """``mpirun`` ran past its timeout and was killed. ``stdout``/``stderr`` hold what it printed."""

    def __init__(self, command: Sequence[str], timeout: float, stdout: str, stderr: str) -> None:
        self.command, self.timeout, self.stdout, self.stderr = list(command), timeout, stdout, stderr
        super().__init__(f"killed after {timeout} s: {' '.join(command)}\n--- stdout (tail)\n{stdout[-4000:]}"
                         f"\n--- stderr (tail)\n{stderr[-4000:]}")


def mpirun_available() -> bool:
    """Whether ``mpirun`` is on PATH and mpi4py is importable (without initialising MPI here)."""
    if shutil.which("mpirun") is None:
        return False
    try:
        import importlib.util

        return importlib.util.find_spec("mpi4py") is not None
    except ImportError:
        return False


def mpirun(num_ranks: int, target: str, *args: str, timeout: float,
           env: Optional[Mapping[str, Optional[str]]] = None, cwd: Optional[os.PathLike | str] = None,
           mca: Optional[Mapping[str, str]] = None, mpirun_args: Sequence[str] = (),
           python: str = sys.executable) -> subprocess.CompletedProcess:
    """Run ``python target args...`` on ``num_ranks`` ranks; return the finished process (never raises on rc).

    Args:
        num_ranks: ``-n`` for mpirun.
        target: a path to a ``.py`` file (relative paths resolved against ``cwd``), else a module run with ``-m``.
        args: arguments for the script.
        timeout: seconds before mpirun and its ranks are killed and ``MpirunTimeout`` is raised.
        env: overrides on top of ``os.environ``; a value of None removes the variable. ``OMP_NUM_THREADS=1``
            and ``PYTHONUNBUFFERED=1`` are set unless overridden.
        cwd: working directory (default: the current one).
        mca: Open MPI MCA parameters, e.g. ``{"osc": "^sm"}`` -> ``--mca osc ^sm``.
        mpirun_args: further mpirun flags.
        python: the interpreter for the ranks.

    Returns:
        ``CompletedProcess`` with ``returncode``, ``stdout`` and ``stderr`` (text).
    """
    full_env = dict(os.environ)
    full_env["OMP_NUM_THREADS"] = "1"
    full_env["PYTHONUNBUFFERED"] = "1"
    for key, value in (env or {}).items():
        if value is None:
            full_env.pop(key, None)
        else:
            full_env[key] = value
    base = Path(cwd) if cwd is not None else Path.cwd()
    script = Path(target) if os.path.isabs(target) else base / target
    program = [python, str(script)] if target.endswith(".py") or script.is_file() else [python, "-m", target]
    command = ["mpirun", *MPIRUN_FLAGS, "-n", str(num_ranks)]
    for key, value in (mca or {}).items():
        command += ["--mca", key, str(value)]
    command += [*mpirun_args, *program, *map(str, args)]
    process = subprocess.Popen(command, cwd=cwd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stdout, stderr = _kill_group(process)
        raise MpirunTimeout(command, timeout, stdout, stderr) from None
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def _kill_group(process: subprocess.Popen) -> tuple[str, str]:
    """SIGTERM mpirun's process group (mpirun forwards it to its ranks), then SIGKILL its whole session.

    Open MPI puts each rank in a process group of its own, but they stay in mpirun's session, which
    ``start_new_session`` made ours alone.
    """
    output = ("", "")
    for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            pass
        try:
            output = process.communicate(timeout=grace)
            break
        except subprocess.TimeoutExpired:
            continue
    for pid in _session_members(process.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return output


def _session_members(session_id: int) -> list[int]:
    """Processes of session ``session_id`` still alive (Linux /proc; empty elsewhere)."""
    members = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if os.getsid(int(entry.name)) == session_id:
                members.append(int(entry.name))
        except (OSError, ValueError):
            continue
    return members
