"""roles.policy and world.gpu_memory_gib in the job, and `spmd-diff plan` printing plans and predictions."""

import pytest

from spmd_diff.cli import main
from spmd_diff.config import build_job
from spmd_diff.errors import UserError

JOB = "jobs/random-1.3b-480p.toml"


def test_policy_and_gpu_memory_are_typed_and_validated():
    job = build_job({}, "x.toml")
    assert job.roles.policy == "auto" and job.world.gpu_memory_gib == 0.0
    job = build_job({}, "x.toml", ["roles.policy='static'", "world.gpu_memory_gib=40"])
    assert job.roles.policy == "static" and job.world.gpu_memory_gib == 40.0
    with pytest.raises(UserError, match="roles.policy must be auto or static, got 'dynamic'"):
        build_job({"roles": {"policy": "dynamic"}}, "x.toml")
    with pytest.raises(UserError, match="world.gpu_memory_gib must be >= 0"):
        build_job({"world": {"gpu_memory_gib": -1}}, "x.toml")


def test_plan_prints_static_and_auto_plans_with_predictions(capsys):
    assert main(["plan", JOB, "--nodes", "1", "--gpus-per-node", "4", "--set", "roles.policy='static'"]) == 0
    static = capsys.readouterr().out
    assert "encoders :     1" in static and "bottleneck: decode" in static and "channel heap: up to 32.0 MiB" in static
    assert main(["plan", JOB, "--nodes", "1", "--gpus-per-node", "4", "--set", "roles.policy='auto'"]) == 0
    auto = capsys.readouterr().out
    assert "all             :     4 rank(s) holding encode+denoise+decode" in auto
    predicted = [float(line.split()[1].replace(",", "")) for line in auto.splitlines()
                 if line.startswith("predicted:")]
    static_rate = [float(line.split()[1].replace(",", "")) for line in static.splitlines()
                   if line.startswith("predicted:")]
    assert predicted[0] > 1.5 * static_rate[0]


def test_plan_honours_the_gpu_memory_cap(capsys):
    assert main(["plan", JOB, "--nodes", "2", "--gpus-per-node", "8", "--set", "roles.policy='auto'",
                 "--set", "world.gpu_memory_gib=14"]) == 0
    out = capsys.readouterr().out
    assert "GPU capacity 14.0 GiB" in out and "denoise+decode           14.5 GiB  does not fit" in out
    # No stage fits with another: the ranks time-share their GPUs between the stages (roles.time_share "auto").
    assert "time-shared     :    16 rank(s) holding encode+denoise+decode" in out and "all " not in out
    assert "8 item(s) per cycle" in out and "host memory 13.8 GiB per rank" in out
    assert main(["plan", JOB, "--nodes", "2", "--gpus-per-node", "8", "--set", "roles.policy='auto'",
                 "--set", "world.gpu_memory_gib=14", "--set", "roles.time_share=false"]) == 0
    out = capsys.readouterr().out
    assert "encoder" in out and "decoder" in out and "time-shared     :" not in out
    assert main(["plan", JOB, "--nodes", "1", "--gpus-per-node", "1", "--set", "roles.policy='auto'",
                 "--set", "world.gpu_memory_gib=14", "--set", "roles.time_share=false"]) == 2
    err = capsys.readouterr().err
    assert "no role plan fits" in err and 'roles.time_share = "auto" or true' in err
    assert main(["plan", JOB, "--nodes", "1", "--gpus-per-node", "1", "--set", "roles.policy='auto'",
                 "--set", "world.gpu_memory_gib=14"]) == 0
    assert "time-shared     :     1 rank(s)" in capsys.readouterr().out
