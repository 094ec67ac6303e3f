"""Double-ring channels over MpiRmaTransport on 4 ranks under mpirun (scripts in tests/mpi/scripts/).

Both Open MPI one-sided paths are covered: ``osc/sm`` (the window is plain shared memory) and ``^sm``
(osc/rdma over a btl, as between nodes; Open MPI 4.1 even prefers it on one node). Set
``SPMD_DIFF_MPI_EXTRA_OSC=1`` to also run over osc/ucx and osc/pt2pt (pt2pt needs MPI_THREAD_FUNNELED).
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from tests.mpi._mpirun import mpirun, mpirun_available

pytestmark = pytest.mark.skipif(not mpirun_available(), reason="needs mpirun and mpi4py")

SCRIPTS = Path(__file__).parent / "scripts"
TIMEOUT_S = 90  # hard limit per mpirun; a healthy run takes ~15 s on 2 loaded cores, mostly importing torch

OSC_CASES = [
    pytest.param({"osc": "sm"}, {}, id="osc-sm"),
    pytest.param({"osc": "^sm"}, {}, id="osc-not-sm"),
]
if os.environ.get("SPMD_DIFF_MPI_EXTRA_OSC") == "1":
    OSC_CASES += [
        pytest.param({"osc": "ucx"}, {}, id="osc-ucx"),
        pytest.param({"osc": "pt2pt"}, {"MPI4PY_RC_THREAD_LEVEL": "funneled"}, id="osc-pt2pt"),
    ]


@pytest.mark.parametrize("mca, env", OSC_CASES)
def test_many_to_many_with_wraparound_and_slow_consumer(mca, env):
    result = mpirun(4, str(SCRIPTS / "channel_traffic.py"), "--items", "60", "--heap-mib", "64",
                    timeout=TIMEOUT_S, mca=mca, env=env)
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    counts = re.search(r"items per consumer \[(\d+), (\d+)\]", result.stdout)
    assert counts, result.stdout
    assert int(counts[1]) + int(counts[2]) == 120 and "errors 0" in result.stdout


def test_dead_producer_times_out_and_job_exits_nonzero():
    started = time.monotonic()
    result = mpirun(4, str(SCRIPTS / "channel_deadline.py"), "--deadline", "2", timeout=TIMEOUT_S)
    elapsed = time.monotonic() - started
    assert result.returncode != 0, result.stdout
    assert "StageTimeout" in result.stderr, result.stderr
    assert "'enc0->dit2'" in result.stderr and "from producer rank 0" in result.stderr, result.stderr
    assert "rank 2: took 10 items, then waited 2.0" in result.stdout, result.stdout  # rank 1's items were not blocked
    assert elapsed < TIMEOUT_S - 30, elapsed  # ended by the abort, not by the hung rank's 120 s sleep
