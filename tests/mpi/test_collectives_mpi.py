"""Group-free collectives over MpiRmaTransport on 4 ranks under mpirun, against numpy references.

One mpirun runs every case (tests/mpi/scripts/collectives_traffic.py): three random schedules (groups of 2-4 ranks
in random order, overlapping, uneven and empty splits, five dtypes, many epochs), one with 256-byte chunks.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.mpi._mpirun import mpirun, mpirun_available

pytestmark = pytest.mark.skipif(not mpirun_available(), reason="needs mpirun and mpi4py")

SCRIPT = Path(__file__).parent / "scripts" / "collectives_traffic.py"


def test_collectives_match_numpy_on_four_ranks(tmp_path):
    result_file = tmp_path / "collectives.json"
    result = mpirun(4, str(SCRIPT), str(result_file), timeout=240)
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    report = json.loads(result_file.read_text())  # written by rank 0 once every schedule was checked
    assert report["num_ranks"] == 4
    assert sorted(report["schedule_s"]) == ["11", "12", "13"], report
    assert report["rank_operations_checked"] > 300, report
