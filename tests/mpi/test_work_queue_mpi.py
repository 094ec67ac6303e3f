"""The pull queue (spmd_diff/comm/work_queue.py) on 4 ranks, two batches pulled without a barrier between: every
item of each batch handed out exactly once, in order per rank, and a slow rank takes fewer items than a fast one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.mpi._mpirun import mpirun, mpirun_available

pytestmark = pytest.mark.skipif(not mpirun_available(), reason="needs mpirun and mpi4py")

SCRIPT = Path(__file__).parent / "scripts" / "work_queue_pull.py"


def test_every_item_pulled_exactly_once_and_slow_ranks_take_fewer(tmp_path):
    result_file = tmp_path / "taken.json"
    result = mpirun(4, str(SCRIPT), str(result_file), timeout=120)
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    ranks = {entry["rank"]: entry for entry in json.loads(result_file.read_text())}
    assert sorted(ranks) == [0, 1, 2, 3]
    for number, num_items in enumerate((200, 50)):
        taken = [index for entry in ranks.values() for index in entry["taken"][number]]
        assert sorted(taken) == list(range(num_items))  # all of them, none twice
        for entry in ranks.values():
            assert entry["taken"][number] == sorted(entry["taken"][number])
            assert entry["after"][number] == [None, None, None]
    assert len(ranks[0]["taken"][0]) > len(ranks[3]["taken"][0]), {r: len(e["taken"][0]) for r, e in ranks.items()}
