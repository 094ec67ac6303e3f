"""NVSHMEM transport on GPUs (one rank per GPU, up to 4): collectives against numpy references on both data
paths, the one-kernel all-to-all against the host path, channels under back-pressure (tests/gpu/scripts)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.gpu._gpu import has_nvshmem, num_gpus
from tests.mpi._mpirun import mpirun, mpirun_available

pytestmark = pytest.mark.skipif(num_gpus() < 2 or not has_nvshmem() or not mpirun_available(),
                                reason="needs 2+ GPUs, nvshmem4py and mpirun")

SCRIPT = Path(__file__).parent / "scripts" / "nvshmem_checks.py"


def test_nvshmem_collectives_and_channels(tmp_path):
    num_ranks = min(4, num_gpus())
    result_file = tmp_path / "nvshmem_checks.json"
    result = mpirun(num_ranks, str(SCRIPT), str(result_file), timeout=300)
    print(result.stdout[-3000:])
    assert result.returncode == 0, f"stdout:\n{result.stdout[-6000:]}\nstderr:\n{result.stderr[-6000:]}"
    report = json.loads(result_file.read_text())  # written by rank 0 once every check passed
    assert report["num_ranks"] == num_ranks
    ops = report["collectives"]["schedule_ops"]
    assert sorted(ops) == ["nvshmem", "p2p"] and min(ops.values()) > 0, ops
    assert report["collectives"]["all_to_all_into_cases"] == ["small", "multi-chunk", "uneven, empty, odd"]
    channels = report["channels"]
    assert sum(channels["items_per_consumer"]) == channels["items_sent"] == (2 if num_ranks >= 4 else 1) * 40
