"""Image-to-video end to end on CPU ranks: videos equal diffusers' own WanImageToVideoPipeline on the I2V demo
model (4 ranks with a DiT group of 2, killed once and rerun to the end, and 1 rank), bad images fail their items
only, a rerun renders nothing, the killed run resumes exactly once, and a job whose items do not fit the model is refused on every rank."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from spmd_diff.io.store import item_key
from tests.mpi._mpirun import MPIRUN_FLAGS, mpirun, mpirun_available
from tests.mpi.test_faults import full_env, start_and_kill

pytestmark = pytest.mark.skipif(not mpirun_available(), reason="mpirun or mpi4py missing")

REPO = Path(__file__).resolve().parents[2]
JOB = REPO / "jobs/demo-i2v.toml"
DEMO_IMAGES = ["sunset.png", "checker.jpg", "circles.webp"]
NUM_GOOD = 8
BASE_SEED = 1234  # jobs/demo-i2v.toml run.seed
BAD = ["missing", "empty", "truncated", "not-an-image", "one-pixel", "cmyk", "animated"]


def _bad_images(folder: Path) -> dict[str, str]:
    """Item id -> file name of each bad-input case (written into ``folder``; "missing" is not)."""
    import PIL.Image

    png = io.BytesIO()
    PIL.Image.new("RGB", (40, 40), (10, 200, 30)).save(png, "PNG")
    (folder / "empty.png").write_bytes(b"")
    (folder / "truncated.png").write_bytes(png.getvalue()[: len(png.getvalue()) // 2])
    (folder / "not-an-image.png").write_text("this is text, not a picture\n")
    PIL.Image.new("RGB", (1, 1), (1, 2, 3)).save(folder / "one-pixel.png")
    PIL.Image.new("CMYK", (40, 40), (0, 100, 200, 0)).save(folder / "cmyk.jpg")
    frames = [PIL.Image.new("RGB", (40, 40), (k * 80, 0, 0)) for k in range(3)]
    frames[0].save(folder / "animated.png", save_all=True, append_images=frames[1:])
    return {"missing": "no-such-file.png", "empty": "empty.png", "truncated": "truncated.png",
            "not-an-image": "not-an-image.png", "one-pixel": "one-pixel.png", "cmyk": "cmyk.jpg",
            "animated": "animated.png"}


@pytest.fixture(scope="module")
def i2v_env(demo_model_dir):
    """The cache the session's demo model lives in, with the I2V demo model built there too (model.path =
    "demo-i2v" finds it)."""
    from spmd_diff.models.demo import demo_model_dir as build_in_cache

    build_in_cache(demo_model_dir.parent, task="i2v")
    return {"SPMD_DIFF_CACHE": str(demo_model_dir.parent)}


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    """8 good items (the demo images, relative paths) then the bad-image cases."""
    folder = tmp_path_factory.mktemp("i2v")
    (folder / "images").mkdir()
    for name in DEMO_IMAGES:
        shutil.copy(REPO / "jobs/demo-i2v-images" / name, folder / "images" / name)
    lines = [{"id": f"good-{k:02d}", "prompt": f"scene {k}: the camera moves slowly", "image":
              f"images/{DEMO_IMAGES[k % 3]}"} for k in range(NUM_GOOD)]
    lines[1]["negative_prompt"] = "static, blurry"
    lines += [{"id": f"bad-{case}", "prompt": "a broken input", "image": f"images/{name}"}
              for case, name in _bad_images(folder / "images").items()]
    path = folder / "prompts.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def run(num_ranks: int, prompts: Path, out: Path, env: dict, *extra: str, job: Path = JOB):
    return mpirun(num_ranks, "spmd_diff", "run", str(job), "--prompts", str(prompts), "--out", str(out), *extra,
                  timeout=300, env=env, cwd=REPO)


def videos(out: Path) -> dict[str, np.ndarray]:
    with h5py.File(out / "videos.h5", "r") as f:
        return {k: f["videos"][k][...] for k in f["videos"]}


@pytest.fixture(scope="module")
def four_rank_out(i2v_env, prompts, tmp_path_factory):
    """4 ranks with a DiT group of 2, a random rank SIGKILLed once some items are on disk, then the same command
    again to the end. Returns OUT and the number of items the killed run had written."""
    out = tmp_path_factory.mktemp("i2v4") / "out"
    cmd = ["mpirun", *MPIRUN_FLAGS, "-n", "4", sys.executable, "-m", "spmd_diff", "run", str(JOB), "--prompts",
           str(prompts), "--out", str(out), "--set", "dit.sp_degree=2"]
    killed = start_and_kill(cmd, full_env(i2v_env), out, seed=2)  # after the first item
    assert killed.returncode != 0
    partial = len(list((out / "items").glob("*/*.h5")))
    assert 0 < partial < NUM_GOOD
    rerun = subprocess.run(cmd, cwd=REPO, env=full_env(i2v_env), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    assert "1 group(s) of 2" in rerun.stderr, rerun.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def references(i2v_env, prompts) -> dict[str, np.ndarray]:
    """diffusers' WanImageToVideoPipeline on the first four good items."""
    from spmd_diff.config import load_job
    from spmd_diff.io.images import load_image
    from spmd_diff.models.demo import demo_model_dir
    from spmd_diff.models.shapes import VideoSpec
    from spmd_diff.models.wan_i2v import reference_i2v_video

    v = load_job(JOB).video
    spec = VideoSpec(v.height, v.width, v.num_frames, v.num_inference_steps, v.guidance_scale)
    model = demo_model_dir(i2v_env["SPMD_DIFF_CACHE"], task="i2v")
    refs = {}
    for index, line in enumerate(prompts.read_text().splitlines()[:4]):
        item = json.loads(line)
        image = load_image(str(prompts.parent / item["image"]))
        refs[item["id"]] = reference_i2v_video(model, image, item["prompt"], item.get("negative_prompt",
                                               v.negative_prompt), BASE_SEED + index, spec)
    return refs


def _assert_matches(got: dict[str, np.ndarray], references: dict[str, np.ndarray]) -> None:
    for key, reference in references.items():
        diff = np.abs(got[key].astype(np.int16) - reference.astype(np.int16))
        assert diff.max() <= 1, f"{key}: {diff.max()} uint8 levels from WanImageToVideoPipeline"
        assert reference.std() > 2.0, "degenerate video: the comparison would prove nothing"
    first, second = references["good-00"], references["good-03"]  # same image, other prompt and seed
    assert np.abs(first.astype(np.int16) - references["good-01"].astype(np.int16)).mean() > 1.0
    assert not np.array_equal(first, second)


def test_four_ranks_with_a_dit_group_of_two_match_the_pipeline(four_rank_out, references):
    got = videos(four_rank_out)
    assert sorted(got) == [f"good-{k:02d}" for k in range(NUM_GOOD)]
    _assert_matches(got, references)
    with h5py.File(four_rank_out / "videos.h5", "r") as f:
        attrs = f["videos"]["good-00"].attrs
        assert len(attrs["image_sha256"]) == 64 and attrs["image"].endswith("images/sunset.png")


def test_bad_images_fail_their_items_and_the_job_goes_on(four_rank_out):
    failed = {p.stem: json.loads(p.read_text()) for p in (four_rank_out / "failed").glob("*.json")}
    records = {record["id"]: record for record in failed.values()}
    assert sorted(records) == sorted(f"bad-{case}" for case in BAD)
    expected = {"missing": "does not exist", "empty": "empty file", "truncated": "truncated",
                "not-an-image": "not an image", "one-pixel": "1x1 pixels", "cmyk": "colour mode CMYK",
                "animated": "animated"}
    for case, words in expected.items():
        record = records[f"bad-{case}"]
        assert record["stage"] == "encode" and words in record["error"], record


def test_one_rank_matches_a_rerun_renders_nothing_and_a_changed_image_is_refused(i2v_env, prompts, references,
                                                                                   four_rank_out, tmp_path):
    folder = tmp_path / "job"
    shutil.copytree(prompts.parent, folder)
    lines = (folder / "prompts.jsonl").read_text().splitlines()[:4]
    (folder / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out1"
    first = run(1, folder / "prompts.jsonl", out, i2v_env)
    assert first.returncode == 0, first.stderr[-3000:]
    got = videos(out)
    _assert_matches(got, references)
    four = videos(four_rank_out)
    for key in got:  # SP changes only the attention's reassociation: within one level of the 1-rank video
        assert np.abs(got[key].astype(np.int16) - four[key].astype(np.int16)).max() <= 1, key
    before = sorted(p.name for p in (out / "items").rglob("*.h5"))
    again = run(1, folder / "prompts.jsonl", out, i2v_env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "nothing to render" in again.stderr, again.stderr[-2000:]
    assert sorted(p.name for p in (out / "items").rglob("*.h5")) == before
    shutil.copy(folder / "images" / "checker.jpg", folder / "images" / "sunset.png")  # good-00's image changes
    refused = run(1, folder / "prompts.jsonl", out, i2v_env)
    assert refused.returncode == 2 and "image_sha256" in refused.stderr, refused.stderr[-2000:]
    assert sorted(p.name for p in (out / "items").rglob("*.h5")) == before


def test_the_killed_job_rerun_holds_each_item_once(four_rank_out):
    files = sorted(p.name for p in (four_rank_out / "items").glob("*/*"))
    assert all(name.endswith(".h5") and ".tmp." not in name for name in files), f"leftovers: {files}"
    assert sorted(name.split(".")[0] for name in files) == sorted(item_key(f"good-{k:02d}") for k in range(NUM_GOOD))


@pytest.mark.parametrize("model, with_images", [("demo", True), ("demo-i2v", False)])
def test_items_that_do_not_fit_the_model_are_a_job_error_on_every_rank(i2v_env, prompts, tmp_path, model,
                                                                       with_images):
    lines = [json.loads(line) for line in prompts.read_text().splitlines()[:3]]
    if not with_images:
        for line in lines:
            line.pop("image")
    path = prompts.parent / f"fit-{model}.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "out"
    result = run(2, path, out, i2v_env, "--model", model, "--set", "roles.policy=auto")
    assert result.returncode == 2, result.stderr[-2000:]
    problem = "give an image, but the model is text-to-video" if with_images else "give no image"
    assert result.stderr.count(problem) >= 2, result.stderr[-2000:]  # the same message from both ranks
    assert not out.exists()
