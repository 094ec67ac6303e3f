"""The data plane's switches: a typed ``[dataplane]`` job section (and ``world.force_cpu``), the CLI's documented
environment overrides, and nothing below the CLI reading them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import spmd_diff
from spmd_diff.cli import ENV_OVERRIDES, env_overrides
from spmd_diff.comm import run_local
from spmd_diff.comm.collectives import GroupCollectives
from spmd_diff.config import build_job
from spmd_diff.errors import UserError

REPO = Path(spmd_diff.__file__).resolve().parents[1]


def test_defaults_and_typed_values():
    job = build_job({}, "x.toml")
    assert (job.dataplane.p2p_kernel, job.dataplane.put_kernel, job.dataplane.a2a_blocks) == ("cuda", True, "")
    assert job.dataplane.a2a_block_counts() is None and job.world.force_cpu is False
    job = build_job({"dataplane": {"p2p_kernel": "triton", "put_kernel": False, "a2a_blocks": "64,16"}}, "x.toml")
    assert job.dataplane.a2a_block_counts() == (64, 16) and job.to_dict()["dataplane"]["p2p_kernel"] == "triton"


@pytest.mark.parametrize("table, message", [
    ({"p2p_kernel": "nccl"}, "dataplane.p2p_kernel must be one of cuda, triton, off"),
    ({"a2a_blocks": "64"}, "dataplane.a2a_blocks must be two positive block counts"),
    ({"a2a_blocks": "0,16"}, "dataplane.a2a_blocks must be two positive block counts"),
    ({"put_kernel": "yes"}, "dataplane.put_kernel must be bool"),
    ({"p2p_kernal": "off"}, "did you mean 'p2p_kernel'"),
])
def test_bad_values_name_the_key(table, message):
    with pytest.raises(UserError, match=re.escape(message)):
        build_job({"dataplane": table}, "x.toml")


def test_environment_overrides_come_before_set():
    env = {"SPMD_DIFF_P2P_KERNEL": "off", "SPMD_DIFF_PUT_KERNEL": "0", "SPMD_DIFF_A2A_BLOCKS": "32,8",
           "SPMD_DIFF_FORCE_CPU": "1", "SPMD_DIFF_UNRELATED": "x"}
    job = build_job({}, "x.toml", env_overrides(env))
    assert (job.dataplane.p2p_kernel, job.dataplane.put_kernel, job.dataplane.a2a_block_counts(),
            job.world.force_cpu) == ("off", False, (32, 8), True)
    job = build_job({}, "x.toml", env_overrides(env) + ["dataplane.p2p_kernel=triton"])
    assert job.dataplane.p2p_kernel == "triton"  # --set wins
    assert env_overrides({"SPMD_DIFF_P2P_KERNEL": ""}) == []
    with pytest.raises(UserError, match="dataplane.p2p_kernel must be one of"):
        build_job({}, "x.toml", env_overrides({"SPMD_DIFF_P2P_KERNEL": "nccl"}))


def test_only_the_cli_reads_the_switches_and_only_select_writes_the_environment():
    """The variables of ENV_OVERRIDES appear in no file of the package or the kernels but the CLI (and no one
    writes ``os.environ`` but ``comm/select.py``, for NVSHMEM's heap size before it starts)."""
    readers, writers = [], []
    for path in sorted((REPO / "spmd_diff").rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
        if path.name != "cli.py" and any(re.search(rf"[\"']{name}[\"']", code) for name in ENV_OVERRIDES):
            readers.append(path.name)
        if re.search(r"os\.environ\[[^]]+\]\s*=(?!=)|os\.environ\.(setdefault|update)\(|os\.putenv\(", code):
            writers.append(path.relative_to(REPO).as_posix())
    assert readers == []
    assert writers == ["spmd_diff/comm/select.py"]


def test_kernel_choice_is_an_argument_of_the_collectives():
    """On a host heap the one-kernel path never runs, whatever is chosen; a bad choice is refused; epochs
    taken back by ``rewind_epochs`` keep a rank in step (the replay path's recovery)."""
    def body(transport):
        coll = GroupCollectives(transport, 0, 1 << 16, max_ranks=2, kernel="triton", a2a_blocks=(8, 2))
        assert coll.fused.kernel_choice == "triton" and coll.fused.a2a_blocks == (8, 2)
        assert coll.fused_kernel() is None and not coll.fused.allowed  # host heap
        with pytest.raises(ValueError, match="must be one of cuda, triton, off"):
            coll.use_kernel("nccl")
        with pytest.raises(ValueError, match="two positive block counts"):
            coll.use_kernel("cuda", (0, 4))
        coll.use_kernel("off")
        peer = 1 - transport.rank
        before = coll.epoch(peer)
        coll.next_epoch(peer)
        coll.rewind_epochs([peer])
        assert coll.epoch(peer) == before
        import torch

        got = coll.group([0, 1]).all_to_all([torch.full((3,), transport.rank * 10 + j) for j in range(2)])
        return [t.tolist() for t in got]

    results = run_local(2, 1 << 16, body)
    assert results == [[[0, 0, 0], [10, 10, 10]], [[1, 1, 1], [11, 11, 11]]]
