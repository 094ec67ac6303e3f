"""Export (mp4/gif/png) reads back with the right frames and size; inspect lists ids and statuses."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from spmd_diff.errors import UserError
from spmd_diff.io.store import VideoStore, item_key
from spmd_diff.io.view import build_view
from spmd_diff.observe.export import export_videos, safe_name
from spmd_diff.observe.inspect import inspect_store

imageio = pytest.importorskip("imageio.v2")
imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg")

ITEMS = {
    # id: (frames, height, width)
    "cat-0001": (9, 32, 48),
    "a dog, ünïcode?*": (5, 30, 42),
    "odd size": (4, 17, 23),
}


def _key(item_id: str) -> str:
    return item_id


def _frames(num_frames: int, height: int, width: int) -> np.ndarray:
    """Distinct frames: a moving gradient."""
    y, x = np.mgrid[0:height, 0:width]
    out = np.empty((num_frames, height, width, 3), np.uint8)
    for i in range(num_frames):
        out[i, ..., 0] = (x * 255 // max(1, width - 1) + 20 * i) % 256
        out[i, ..., 1] = (y * 255 // max(1, height - 1)) % 256
        out[i, ..., 2] = (30 * i) % 256
    return out


def _attrs(n: int, item_id: str, f: int, h: int, w: int) -> dict:
    return dict(id=item_id, prompt=f"prompt of {item_id} \"quoted\"", negative_prompt="", seed=100 + n,
                num_inference_steps=4, guidance_scale=5.0, model="demo", height=h, width=w, num_frames=f,
                max_sequence_length=512, dtype="float32", model_fingerprint="f0", dit_compile=False)


def make_store(out: Path) -> Path:
    """A tiny OUT/ written by the store itself: item files, a failure, the view (external links), job.json."""
    store = VideoStore(out)
    expected = {}
    for n, (item_id, (f, h, w)) in enumerate(ITEMS.items()):
        expected[item_id] = _attrs(n, item_id, f, h, w)
        store.write_item(item_id, _frames(f, h, w), expected[item_id])
    store.write_failure("bad-7", "denoise", "RuntimeError: NaN in latents", "a broken prompt")
    (out / "job.json").write_text(json.dumps({"model": "demo", "fps": 16}))
    build_view(store, expected, repair=False)
    return out


def item_path(out: Path, item_id: str) -> Path:
    [ref] = VideoStore(out).item_refs()[item_key(item_id)]
    return ref.path


@pytest.fixture()
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    out = make_store(tmp_path / "OUT")
    monkeypatch.chdir(tmp_path)  # external links must resolve relative to the view, not the cwd
    return out


def _read_mp4(path: Path) -> np.ndarray:
    """Decode every frame with imageio's ffmpeg reader (its len() is inf: no list(reader))."""
    with imageio.get_reader(str(path), format="FFMPEG") as reader:
        return np.stack([frame for frame in reader])


def _ffmpeg_metadata(path: Path) -> str:
    """ffmpeg -i prints the container metadata on stderr."""
    proc = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-i", str(path)],
                          capture_output=True, text=True)
    return proc.stderr


def test_export_mp4_reads_back(store: Path, tmp_path: Path) -> None:
    paths = export_videos(store, "mp4", None, tmp_path / "mp4", fps=8)
    assert len(paths) == len(ITEMS)
    for item_id, (f, h, w) in ITEMS.items():
        path = tmp_path / "mp4" / f"{safe_name(item_id)}.mp4"
        assert path in paths and path.stat().st_size > 0
        frames = _read_mp4(path)
        # yuv420p: odd sizes are padded by one pixel
        assert frames.shape == (f, h + h % 2, w + w % 2, 3)
        assert f"prompt of {item_id}" in _ffmpeg_metadata(path)


def test_export_mp4_pixels_close(store: Path, tmp_path: Path) -> None:
    [path] = export_videos(store / "videos.h5", "mp4", ["cat-0001"], tmp_path / "x")
    got = _read_mp4(path).astype(int)
    want = _frames(*ITEMS["cat-0001"]).astype(int)
    assert np.abs(got - want).mean() < 12  # lossy, but the same picture


def test_export_gif_reads_back(store: Path, tmp_path: Path) -> None:
    from PIL import Image

    paths = export_videos(store, "gif", ["cat-0001", _key("a dog, ünïcode?*")], tmp_path / "gif")
    for path, item_id in zip(paths, ["cat-0001", "a dog, ünïcode?*"]):
        f, h, w = ITEMS[item_id]
        frames = imageio.mimread(str(path))
        assert len(frames) == f and frames[0].shape[:2] == (h, w)
        with Image.open(path) as im:
            assert im.info["comment"].decode() == f"prompt of {item_id} \"quoted\""


def test_export_png_frames_and_sidecar(store: Path, tmp_path: Path) -> None:
    from PIL import Image

    [folder] = export_videos(store, "png", ["odd size"], tmp_path / "png")
    pngs = sorted(folder.glob("frame_*.png"))
    assert len(pngs) == 4
    with Image.open(pngs[0]) as im:
        assert im.size == (23, 17) and im.text["prompt"].startswith("prompt of odd size")
    meta = json.loads((folder / "metadata.json").read_text())
    assert meta["id"] == "odd size" and meta["seed"] == 102


def test_export_unknown_and_failed_ids(store: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"unknown ids: 'nope', 'also-nope'"):
        export_videos(store, "mp4", ["cat-0001", "nope", "also-nope"], tmp_path / "e")
    with pytest.raises(UserError, match="failed items have no video: 'bad-7'"):
        export_videos(store, "gif", ["bad-7"], tmp_path / "e")
    with pytest.raises(UserError, match="unknown export format"):
        export_videos(store, "avi", None, tmp_path / "e")
    with pytest.raises(UserError, match="no result store"):
        export_videos(tmp_path / "missing", "mp4", None, tmp_path / "e")


def test_safe_name() -> None:
    assert safe_name("cat-0001") == "cat-0001"
    names = {safe_name(i) for i in ["a b", "a_b", "a/b", "ünï", "..", "x" * 300, "日本"]}
    assert len(names) == 7
    for n in names:
        assert all(c.isascii() and (c.isalnum() or c in "._-") for c in n) and len(n) <= 100
        assert not n.startswith(".")


def test_inspect_lists_items_and_failures(store: Path) -> None:
    text = inspect_store(store)
    assert "items: 4 (3 done, 1 failed)" in text
    for item_id, (f, h, w) in ITEMS.items():
        assert item_id[:20] in text and f"{f}x{h}x{w}" in text
    assert "bad-7" in text and "failed" in text and "NaN in latents" in text
    assert "model = demo" in text and "fps = 16" in text  # job.json


def test_inspect_one_item_and_limit(store: Path) -> None:
    text = inspect_store(store / "videos.h5", item_id="cat-0001")
    assert "status: done" in text and "seed: 100" in text and "9 frames x 32x48" in text
    assert "status: failed" in inspect_store(store, item_id="bad-7")
    with pytest.raises(UserError, match="no item 'zzz'"):
        inspect_store(store, item_id="zzz")
    limited = inspect_store(store, limit=1)
    assert "more items not listed" in limited


def test_inspect_missing_item_file(store: Path) -> None:
    item_path(store, "odd size").unlink()
    text = inspect_store(store)
    assert "1 of the videos listed below have a missing file" in text
    assert "missing" in inspect_store(store, item_id="odd size")


def _damage(store: Path) -> None:
    cat, dog = item_path(store, "cat-0001"), item_path(store, "a dog, ünïcode?*")
    cat.write_bytes(cat.read_bytes()[:5000])  # truncated
    dog.write_bytes(os.urandom(dog.stat().st_size))  # garbage of the same size


def test_corrupt_items_are_reported_and_the_rest_still_works(store: Path, tmp_path: Path) -> None:
    """inspect names the corrupt items (not "missing file"); export skips them, says why, exports the rest."""
    _damage(store)
    text = inspect_store(store)
    assert "2 of the videos listed below are corrupt" in text and "missing" not in text
    one = inspect_store(store, item_id="cat-0001")
    assert "status: corrupt" in one and "truncated" in one
    skipped: list = []
    paths = export_videos(store, "png", None, tmp_path / "png", skipped=skipped)
    assert [p.name for p in paths] == [safe_name("odd size")]
    assert sorted(i for i, _ in skipped) == ["a dog, ünïcode?*", "cat-0001"]
    assert any("truncated" in why for _, why in skipped) and any("item header" in why for _, why in skipped)
    with pytest.raises(UserError, match="exported 1 video.*skipped 2"):
        export_videos(store, "png", None, tmp_path / "png2")


def test_export_checks_the_data_checksum(store: Path, tmp_path: Path) -> None:
    path = item_path(store, "odd size")
    data = bytearray(path.read_bytes())
    start = data.find(_frames(*ITEMS["odd size"])[2].tobytes())
    data[start:start + 30] = bytes(30)
    path.write_bytes(bytes(data))
    skipped: list = []
    export_videos(store, "png", ["odd size"], tmp_path / "png", skipped=skipped)
    assert skipped == [("odd size", "its video data does not match the checksum recorded when it was written")]


def test_a_copied_view_never_reads_a_decoy_in_the_working_directory(store: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    decoy = VideoStore(tmp_path / "decoy")  # another job's OUT with the same ids and settings, other videos
    for n, (item_id, (f, h, w)) in enumerate(ITEMS.items()):
        decoy.write_item(item_id, 255 - _frames(f, h, w), _attrs(n, item_id, f, h, w))
    build_view(decoy)
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(store / "videos.h5", alone / "videos.h5")
    monkeypatch.chdir(decoy.root)
    skipped: list = []
    assert export_videos(alone, "png", None, tmp_path / "png", skipped=skipped) == []
    assert len(skipped) == 3 and all("missing" in why for _, why in skipped)
    assert "3 of the videos listed below have a missing file" in inspect_store(alone)


@pytest.mark.parametrize("make,message", [
    (lambda p: None, "does not exist"),
    (lambda p: p.write_text("not hdf5"), "is not an HDF5 file"),
    (lambda p: p.mkdir(), "has the job finished"),
])
def test_not_a_store(tmp_path: Path, make, message) -> None:
    target = tmp_path / "thing"
    make(target)
    for call in (lambda: inspect_store(target), lambda: export_videos(target, "png", None, tmp_path / "e")):
        with pytest.raises(UserError, match=message):
            call()


def test_ids_are_listed_in_counting_order(tmp_path: Path):
    from spmd_diff.observe.inspect import natural_key

    ids = ["10", "2", "1", "item-10", "item-9", "b", "a", "0"]
    assert sorted(ids, key=natural_key) == ["0", "1", "2", "10", "a", "b", "item-9", "item-10"]
    store, expected = VideoStore(tmp_path / "OUT"), {}
    for n, item_id in enumerate(["10", "2", "1", "11", "0"]):
        expected[item_id] = _attrs(n, item_id, 1, 16, 16)
        store.write_item(item_id, _frames(1, 16, 16), expected[item_id])
    build_view(store, expected, repair=False)
    lines = inspect_store(tmp_path / "OUT").splitlines()
    listed = [line.split()[0] for line in lines if line.split() and line.split()[0] in expected]
    assert listed == ["0", "1", "2", "10", "11"], lines
