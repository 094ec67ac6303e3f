"""Table-driven: malformed jobs, prompts, models and OUT directories. Each gets its message, exit code 2, and
nothing written. All cases run in one subprocess (tests/unit/scripts/bad_input_driver.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
GOOD_JOB = (REPO / "jobs/demo.toml").read_text()
GOOD_PROMPTS = '{"id": "a", "prompt": "a cat"}\n{"id": "b", "prompt": "a dog"}\n'


def case(name, message, job=GOOD_JOB, prompts=GOOD_PROMPTS, extra=(), files=None, job_name="job.toml",
         prompts_name="prompts.jsonl"):
    all_files = {job_name: job, prompts_name: prompts, **(files or {})}
    args = ["run", "{work}/" + job_name, "--prompts", "{work}/" + prompts_name, "--out", "{work}/out", *extra]
    return {"name": name, "args": args, "files": all_files, "expect": message}


CASES = [
    case("job_missing", "job file {work}/nojob.toml does not exist", extra=()) | {
        "args": ["run", "{work}/nojob.toml", "--prompts", "{work}/prompts.jsonl", "--out", "{work}/out"]},
    case("toml_syntax", "job.toml: not valid TOML", job="[video]\nheight = = 3\n"),
    case("unknown_section", "unknown section [vidoe] (did you mean 'video'?)", job="[vidoe]\nheight = 64\n"),
    case("unknown_key", "unknown key video.hieght (did you mean 'height'?)", job="[video]\nhieght = 64\n"),
    case("wrong_type", "video.height must be int, got str '64'", job='[video]\nheight = "64"\n'),
    case("frames_not_4k1", "video.num_frames must be 4k+1", job="[video]\nnum_frames = 10\n"),
    case("height_not_multiple", "height", job=GOOD_JOB.replace("height = 64", "height = 72")),
    case("negative_width", "video.width must be >= 1", job="[video]\nwidth = -16\n"),
    case("bad_layout", "dit.sp_layout must be one of", job='[dit]\nsp_layout = "mesh"\n'),
    case("bad_codec", "output.video must be one of raw, h264, hevc, got 'av1'", job='[output]\nvideo = "av1"\n'),
    case("bad_compression", "output.compression must be one of none, gzip, lzf, zstd, got 'bzip2'",
         extra=["--set", "output.compression=bzip2"]),
    case("time_share_with_encoders", 'roles.time_share = true with roles.policy = "static" makes every rank hold',
         extra=["--set", "roles.time_share=true"]),
    case("compression_with_codec", "output.compression applies to output.video = \"raw\" only",
         extra=["--set", "output.video=hevc", "--set", "output.compression=zstd"]),
    case("bad_preset", "output.preset must be one of ultrafast, superfast", extra=["--set", "output.preset=quick"]),
    case("bad_quality", "output.quality (constant rate factor) must be in 0..51, got 60",
         extra=["--set", "output.video=h264", "--set", "output.quality=60"]),
    case("negative_guidance", "video.guidance_scale must be >= 0", job="[video]\nguidance_scale = -1.0\n"),
    case("sp_too_large", "dit.sp_degree=2 needs at least 2 ranks", job="[dit]\nsp_degree = 2\n"),
    case("model_missing", "model directory /nonexistent/model does not exist", extra=["--model", "/nonexistent/model"]),
    case("model_not_wan", "model_index.json", extra=["--model", "{work}/emptymodel"],
         files={"emptymodel/README": "not a model"}),
    case("prompts_missing", "prompts file {work}/nope.jsonl does not exist") | {
        "args": ["run", "{work}/job.toml", "--prompts", "{work}/nope.jsonl", "--out", "{work}/out"]},
    case("prompts_empty", "prompts.jsonl: no prompts", prompts=""),
    case("prompts_bad_json", "prompts.jsonl:3: not valid JSON", prompts=GOOD_PROMPTS + '{"id": "c", "prompt": \n'),
    case("prompts_duplicate", "prompts.jsonl:2: duplicate id 'a' (first on line 1)",
         prompts='{"id": "a", "prompt": "x"}\n{"id": "a", "prompt": "y"}\n'),
    case("prompts_blank_line", "prompts.jsonl:2: empty line", prompts='{"id": "a", "prompt": "x"}\n\n{"id": "b", "prompt": "y"}\n'),
    case("prompts_unknown_key", "prompts.jsonl:1: unknown key 'negative' (did you mean 'negative_prompt'?)",
         prompts='{"id": "a", "prompt": "x", "negative": "y"}\n'),
    case("prompt_not_string", "prompts.jsonl:1: prompt must be a non-empty string", prompts='{"id": "a", "prompt": 3}\n'),
    case("seed_negative", "prompts.jsonl:2: seed must be in [0, 2^63)",
         prompts='{"id": "a", "prompt": "x"}\n{"id": "b", "prompt": "y", "seed": -5}\n'),
    case("id_with_slash", "prompts.jsonl:1: id 'a/b' may not contain '/'", prompts='{"id": "a/b", "prompt": "x"}\n'),
    case("prompts_not_utf8", "is not UTF-8 text", prompts=list(b'{"id": "a", "prompt": "\xff\xfe"}\n')),
    case("bad_override", "--set 'video.height': expected section.key=value", extra=["--set", "video.height"]),
    case("bad_shard", "--shard '2/2': need 0 <= I < N", extra=["--shard", "2/2"]),
    case("other_job_out", "holds videos of a different job configuration (video.height: 128 there, 64 now",
         files={"out/job.json": json.dumps({"model": "demo", "dtype": "auto", "video": {
             "height": 128, "width": 64, "num_frames": 9, "num_inference_steps": 4, "guidance_scale": 5.0,
             "negative_prompt": "blurry, low quality", "max_sequence_length": 512}})}),
    # The model's configs are fine and the weights are not: the failure comes while loading, and OUT (which did
    # not exist) must still not exist afterwards.
    case("model_weights_corrupt", "cannot load transformer", extra=["--model", "{work}/model"]) | {
        "model_copy": {"transformer/diffusion_pytorch_model.safetensors": "not a safetensors file"}},
    case("out_is_a_file", "output directory {work}/out/sub is a file, not a directory", extra=["--out", "{work}/out/sub"],
         files={"out/sub": "a file where a directory should be"}),
]


@pytest.fixture(scope="module")
def results(demo_model_dir, tmp_path_factory):
    table = tmp_path_factory.mktemp("bad") / "cases.json"
    table.write_text(json.dumps(CASES))
    env = dict(os.environ, SPMD_DIFF_CACHE=str(demo_model_dir.parent), OMP_NUM_THREADS="1")
    for key in [k for k in env if k.startswith(("OMPI_COMM_WORLD", "PMIX_", "SLURM_"))]:
        env.pop(key)
    proc = subprocess.run([sys.executable, str(REPO / "tests/unit/scripts/bad_input_driver.py"), str(table)],
                          capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {r["name"]: r for r in map(json.loads, proc.stdout.splitlines())}


def test_table_has_at_least_twenty_cases():
    assert len(CASES) >= 20


@pytest.mark.parametrize("spec", CASES, ids=[c["name"] for c in CASES])
def test_bad_input(spec, results):
    result = results[spec["name"]]
    stderr = result["stderr"]
    assert result["code"] == 2, (spec["name"], result)
    lines = [line for line in stderr.splitlines() if line.startswith("spmd-diff: error")]
    assert len(lines) == 1, stderr
    expected = spec["expect"].split("{work}")
    assert all(part in lines[0] for part in expected), (expected, lines[0])
    assert not result["out_changed"], f"OUT changed: {result['out_files']}"
    assert not any(f.startswith("items/") or f == "videos.h5" for f in result["out_files"])
