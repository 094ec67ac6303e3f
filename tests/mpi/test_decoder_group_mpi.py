"""Two decoder ranks decoding as one group over the project's collectives on MPI RMA, against the one-rank decode
(one mpirun launch; see the script): every item within one uint8 level, delivered to the rank that held it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.mpi._mpirun import mpirun, mpirun_available

pytestmark = pytest.mark.skipif(not mpirun_available(), reason="needs mpirun and mpi4py")

SCRIPT = Path(__file__).parent / "scripts" / "decoder_group.py"


def test_decoder_group_of_two_matches_one_rank(demo_model_dir: Path) -> None:
    result = mpirun(2, str(SCRIPT), str(demo_model_dir), timeout=300)
    print(result.stdout)
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr[-4000:]}"
    assert "decoder_group: all ok" in result.stdout
    lines = re.findall(r"^rank (\d) item (\d) .* ok$", result.stdout, flags=re.M)
    assert sorted(lines) == [("0", "0"), ("0", "2"), ("0", "3"), ("1", "1")], result.stdout
