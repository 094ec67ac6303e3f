"""dit.cfg_parallel and dit.group_decode: the job keys, and how the role plans resolve them (pure, no model)."""

from __future__ import annotations

import pytest

from spmd_diff.config import build_job
from spmd_diff.errors import UserError
from spmd_diff.plan.for_job import group_options, static_plan
from spmd_diff.plan.roles import plan_roles, with_group_options
from spmd_diff.plan.topology import Topology


def _job(*overrides: str):
    return build_job({"model": {"path": "demo"}, "roles": {"policy": "static"}}, "job.toml", list(overrides))


def test_keys_take_true_false_or_auto() -> None:
    assert (_job().dit.cfg_parallel, _job().dit.group_decode) == ("auto", "auto")
    assert _job("dit.cfg_parallel=false", "dit.group_decode=true").dit.group_decode is True
    with pytest.raises(UserError, match='dit.cfg_parallel must be true, false or "auto"'):
        _job("dit.cfg_parallel=2")
    with pytest.raises(UserError, match="needs an even dit.sp_degree"):
        _job("dit.cfg_parallel=true", "dit.sp_degree=3")


def test_static_plans() -> None:
    topology = Topology.uniform(1, 4)
    both = static_plan(_job("dit.sp_degree=4", "roles.encoders=0", "roles.decoders=0"), topology)
    assert both.cfg_parallel and both.group_decode
    assert both.stages_of(3) == ("denoise", "decode")  # members load the VAE to decode their band
    assert "CFG parallel: halves of 2, groups decode together" in both.describe()
    assert both.to_dict()["cfg_parallel"] is True
    # no guidance: one branch, nothing to split; decoder ranks: the DiT group does not decode
    none = static_plan(_job("dit.sp_degree=2", "video.guidance_scale=1.0"), topology)
    assert (none.cfg_parallel, none.group_decode) == (False, False)
    assert none.stages_of(2) == ("denoise",)
    assert group_options(_job("video.guidance_scale=1.0")) == (False, "auto")
    with pytest.raises(UserError, match="dit.group_decode=true needs"):
        static_plan(_job("dit.sp_degree=2", "dit.group_decode=true"), topology)


def test_odd_groups_and_single_ranks_keep_both_off() -> None:
    plan = plan_roles(Topology.uniform(1, 3), 0, 0, sp_degree=3)
    resolved = with_group_options(plan, "auto", "auto")
    assert (resolved.cfg_parallel, resolved.group_decode) == (False, True)
    single = with_group_options(plan_roles(Topology.uniform(1, 2), 0, 0, sp_degree=1), "auto", "auto")
    assert (single.cfg_parallel, single.group_decode) == (False, False)
