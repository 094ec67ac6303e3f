"""Sequence-parallel DiT groups on 4 MPI ranks against one-rank denoising (one mpirun launch; see the script).

S = 2 (two groups at once) and S = 4 with Ulysses and ring, the torus 2 x 2 from a virtual topology of 2 nodes x
2 ranks, "auto", a group listed out of rank order; latents within 1e-5 (relative) and decoded videos within 1
uint8 level of the one-rank result; then the attention over ``TorchSeqComm`` (gloo), the GPU code path.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.mpi._mpirun import mpirun, mpirun_available

pytestmark = pytest.mark.skipif(not mpirun_available(), reason="needs mpirun and mpi4py")

SCRIPT = Path(__file__).parent / "scripts" / "sp_denoise.py"
TIMEOUT_S = 400  # ~15 s of imports per rank; on 2 shared cores 4 ranks take 1-2 minutes, the work ~15 s


def test_sp_groups_match_one_rank(demo_model_dir: Path) -> None:
    result = mpirun(4, str(SCRIPT), str(demo_model_dir), timeout=TIMEOUT_S)
    print(result.stdout)
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr[-4000:]}"
    assert "sp_denoise: all ok" in result.stdout
    cases = re.findall(r"^case \d+ (\w+).*ok$", result.stdout, flags=re.M)
    assert sorted(set(cases)) == ["ring", "torus", "ulysses"] and len(cases) == 9, result.stdout
    assert len(re.findall(r"^TorchSeqComm .* ok$", result.stdout, flags=re.M)) == 6, result.stdout
    assert len(re.findall(r"^SPDenoiser over TorchSeqComm .* ok$", result.stdout, flags=re.M)) == 3, result.stdout
