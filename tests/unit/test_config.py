import pytest

from spmd_diff.config import build_job, load_job
from spmd_diff.errors import UserError


def test_demo_job_loads():
    job = load_job("jobs/demo.toml")
    assert job.model.path == "demo" and (job.video.num_frames - 1) % 4 == 0


def test_overrides_are_typed():
    job = build_job({}, "x.toml", ["video.height=128", "video.guidance_scale=1", "model.path=/models/wan",
                                   "video.negative_prompt='ugly'"])
    assert job.video.height == 128 and job.video.guidance_scale == 1.0
    assert job.model.path == "/models/wan" and job.video.negative_prompt == "ugly"


@pytest.mark.parametrize("data,overrides,message", [
    ({"vidoe": {}}, [], "unknown section [vidoe] (did you mean 'video'?)"),
    ({"video": {"hieght": 64}}, [], "unknown key video.hieght (did you mean 'height'?)"),
    ({"video": {"height": "64"}}, [], "video.height must be int"),
    ({"video": {"num_frames": 8}}, [], "4k+1"),
    ({"roles": {"encoders": -1}}, [], "roles.encoders"),
    ({}, ["video.height"], "expected section.key=value"),
    ({}, ["height=3"], "section.key"),
    ({"video": 3}, [], "must be a table"),
    ({"dit": {"sp_layout": "mesh"}}, [], "dit.sp_layout must be one of"),
])
def test_bad_jobs(data, overrides, message):
    with pytest.raises(UserError) as err:
        build_job(data, "job.toml", overrides)
    where = "--set" if overrides else "job.toml"
    assert message in str(err.value) and where in str(err.value)


def test_toml_syntax_error_names_file_and_line(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[video]\nheight = = 3\n")
    with pytest.raises(UserError, match=r"bad.toml: not valid TOML.*line 2"):
        load_job(path)


def test_missing_job_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_job(tmp_path / "nope.toml")
