"""NVSHMEM transport on GPUs (one rank per GPU, up to 4): collectives against numpy references on both data
paths, the one-kernel all-to-all against the host path, channels under back-pressure (tests/gpu/scripts)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.gpu._gpu import has_nvshmem, num_gpus
from tests.mpi._mpirun import mpirun, mpirun_available

pytestmark = pytest.mark.skipif(num_gpus() < 2 or not has_nvshmem() or not mpirun_available(),
                                reason="needs 2+ GPUs, nvshmem4py and mpirun")

SCRIPT = Path(__file__).parent / "scripts" / "nvshmem_checks.py"


def test_nvshmem_collectives_and_channels():
    result = mpirun(min(4, num_gpus()), str(SCRIPT), timeout=300)
    print(result.stdout[-3000:])
    assert result.returncode == 0, f"stdout:\n{result.stdout[-6000:]}\nstderr:\n{result.stderr[-6000:]}"
    assert "gpu checks ok" in result.stdout
