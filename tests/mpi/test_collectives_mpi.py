"""Group-free collectives over MpiRmaTransport on 4 ranks under mpirun, against numpy references.

One mpirun runs every case (tests/mpi/scripts/collectives_traffic.py): three random schedules (groups of 2-4 ranks
in random order, overlapping, uneven and empty splits, five dtypes, many epochs), one with 256-byte chunks.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.mpi._mpirun import mpirun, mpirun_available

pytestmark = pytest.mark.skipif(not mpirun_available(), reason="needs mpirun and mpi4py")

SCRIPT = Path(__file__).parent / "scripts" / "collectives_traffic.py"


def test_collectives_match_numpy_on_four_ranks():
    result = mpirun(4, str(SCRIPT), timeout=240)
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    found = re.search(r"collectives ok: (\d+) rank-operations checked", result.stdout)
    assert found and int(found[1]) > 300, result.stdout
