"""Double-ring channels over MpiRmaTransport on 4 ranks under mpirun (scripts in tests/mpi/scripts/).

Three Open MPI one-sided paths are covered: ``osc/sm`` (the window is plain shared memory), ``^sm`` (osc/rdma
over btl/vader here; Open MPI 4.1 prefers it even on one node) and, in the deadline test, osc/pt2pt over
btl/tcp, where every put is applied only when the target enters MPI, as between nodes over TCP (pt2pt needs
MPI_THREAD_FUNNELED; Open MPI 5 has no pt2pt, and then the deadline test runs on the default path).
``SPMD_DIFF_MPI_EXTRA_OSC=1`` adds traffic runs over osc/ucx and pt2pt-over-tcp.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.mpi._mpirun import mpirun, mpirun_available

pytestmark = pytest.mark.skipif(not mpirun_available(), reason="needs mpirun and mpi4py")

SCRIPTS = Path(__file__).parent / "scripts"
TIMEOUT_S = 90  # hard limit per mpirun; a healthy run takes ~15 s on 2 loaded cores, mostly importing torch

TCP_PT2PT = ({"pml": "ob1", "btl": "self,tcp", "osc": "pt2pt"}, {"MPI4PY_RC_THREAD_LEVEL": "funneled"})


def has_osc_pt2pt() -> bool:
    try:
        listing = subprocess.run(["ompi_info"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    return re.search(r"MCA osc: pt2pt", listing) is not None


OSC_CASES = [
    pytest.param({"osc": "sm"}, {}, id="osc-sm"),
    pytest.param({"osc": "^sm"}, {}, id="osc-not-sm"),
]
if os.environ.get("SPMD_DIFF_MPI_EXTRA_OSC") == "1":
    OSC_CASES += [
        pytest.param({"osc": "ucx"}, {}, id="osc-ucx"),
        pytest.param(*TCP_PT2PT, id="osc-pt2pt-over-tcp"),
    ]


@pytest.mark.parametrize("mca, env", OSC_CASES)
def test_many_to_many_with_wraparound_and_slow_consumer(mca, env, tmp_path):
    result_file = tmp_path / "traffic.json"
    result = mpirun(4, str(SCRIPTS / "channel_traffic.py"), "--items", "60", "--heap-mib", "64",
                    "--result", str(result_file), timeout=TIMEOUT_S, mca=mca, env=env)
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    report = json.loads(result_file.read_text())
    assert report["errors"] == [], report["errors"]
    assert len(report["items_per_consumer"]) == 2 and sum(report["items_per_consumer"]) == 120, report
    assert report["num_received"] == 120, report


def test_dead_producer_times_out_and_job_exits_nonzero(tmp_path):
    mca, env = TCP_PT2PT if has_osc_pt2pt() else ({}, {})
    result_file = tmp_path / "deadline.json"
    started = time.monotonic()
    result = mpirun(4, str(SCRIPTS / "channel_deadline.py"), "--deadline", "2", "--result", str(result_file),
                    timeout=TIMEOUT_S, mca=mca, env=env)
    elapsed = time.monotonic() - started
    assert result.returncode != 0, result.stdout
    assert "StageTimeout" in result.stderr, result.stderr
    assert "'enc0->dit2'" in result.stderr and "from producer rank 0" in result.stderr, result.stderr
    timed_out = json.loads(result_file.read_text())  # written by rank 2 as it timed out
    assert timed_out["rank"] == 2 and timed_out["items_taken"] == 10, timed_out  # rank 1's items were not blocked
    assert f"{timed_out['waited_s']:.2f}".startswith("2.0"), timed_out
    assert "'enc0->dit2'" in timed_out["error"] and "from producer rank 0" in timed_out["error"], timed_out
    assert elapsed < TIMEOUT_S - 30, elapsed  # ended by the abort, not by the hung rank's 120 s sleep
