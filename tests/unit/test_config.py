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
    ({"roles": {"group_decode": True, "decoders": 2}}, [], 'roles.group_decode = true needs roles.policy = "static"'),
    ({"roles": {"policy": "static", "group_decode": True}}, [], "roles.decoders >= 2"),
    ({"roles": {"group_decode": "yes"}}, [], "roles.group_decode must be bool"),
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


from hypothesis import given, settings, strategies as st  # noqa: E402

_VALUES = st.one_of(st.integers(-10, 10_000), st.floats(allow_nan=False, allow_infinity=False, width=32),
                    st.text(max_size=8), st.booleans(), st.lists(st.integers(), max_size=2))
_KEYS = st.sampled_from(["model", "video", "run", "roles", "dit", "world", "vidoe", "extra"])
_FIELDS = st.sampled_from(["path", "height", "width", "num_frames", "guidance_scale", "seed", "encoders",
                           "sp_degree", "transport", "hieght", "timeout_s", "events"])


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(_KEYS, st.one_of(_VALUES, st.dictionaries(_FIELDS, _VALUES, max_size=4)), max_size=4))
def test_job_parser_accepts_or_rejects_cleanly(data):
    """Any TOML-shaped input either builds a valid job or raises UserError naming the file; nothing else."""
    try:
        job = build_job(data, "fuzz.toml")
    except UserError as exc:
        assert "fuzz.toml" in str(exc)
    else:
        assert (job.video.num_frames - 1) % 4 == 0 and job.video.height >= 1 and job.roles.encoders >= 0


def test_group_decode_of_decoder_ranks():
    job = build_job({"roles": {"policy": "static", "decoders": 2, "group_decode": True}}, "job.toml")
    assert job.roles.group_decode and job.to_dict()["roles"]["group_decode"] is True  # job.json records it
    assert build_job({}, "job.toml").roles.group_decode is False
