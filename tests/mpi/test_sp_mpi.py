"""Sequence-parallel DiT groups on 4 MPI ranks against one-rank denoising (one mpirun launch; see the script).

S = 2 (two groups at once) and S = 4 with Ulysses and ring, the torus 2 x 2 from a virtual topology of 2 nodes x
2 ranks, "auto", a group listed out of rank order; latents within 1e-5 (relative) and decoded videos within 1
uint8 level of the one-rank result; then the attention over ``TorchSeqComm`` (gloo), the GPU code path.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.mpi._mpirun import mpirun, mpirun_available

pytestmark = pytest.mark.skipif(not mpirun_available(), reason="needs mpirun and mpi4py")

SCRIPT = Path(__file__).parent / "scripts" / "sp_denoise.py"
TIMEOUT_S = 400  # ~15 s of imports per rank; on 2 shared cores 4 ranks take 1-2 minutes, the work ~15 s


def test_sp_groups_match_one_rank(demo_model_dir: Path, tmp_path: Path) -> None:
    result_file = tmp_path / "sp_denoise.json"
    result = mpirun(4, str(SCRIPT), str(demo_model_dir), str(result_file), timeout=TIMEOUT_S)
    print(result.stdout)
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr[-4000:]}"
    report = json.loads(result_file.read_text())
    assert report["failures"] == 0, report
    groups = report["groups"]  # one row per group leader per case: latents within 1e-5, video within 1 level
    assert all(row["ok"] and row["latents_rel_err"] < 1e-5 and row["video_max_levels"] <= 1 for row in groups), groups
    assert sorted({row["layout"].split()[0] for row in groups}) == ["ring", "torus", "ulysses"], groups
    assert len(groups) == 9, groups
    attention = report["torch_comm_attention"]
    assert len(attention) == 6 and all(row["ok"] and row["max_abs_err"] < 1e-12 for row in attention), attention
    denoise = report["torch_comm_denoise"]
    assert len(denoise) == 3 and all(row["ok"] and row["latents_rel_err"] < 1e-5 for row in denoise), denoise
