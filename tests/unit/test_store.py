"""The store on its own (no engine): content identity, verification, the view's link resolution, job.json."""

import json
import os
import shutil
import socket
import subprocess
import time

import h5py
import numpy as np
import pytest

from spmd_diff.errors import UserError
from spmd_diff.io import jobrecord
from spmd_diff.io.itemfile import HEADER_BYTES, CorruptItem
from spmd_diff.io.runplan import plan_run
from spmd_diff.io.store import VideoStore, item_key, open_store
from spmd_diff.io.view import build_view, read_video, verify


def _video(seed, frames=3):
    return np.random.default_rng(seed).integers(0, 256, (frames, 8, 8, 3), dtype=np.uint8)


def _attrs(item_id, seed=1, steps=4, prompt=None, fingerprint="f0"):
    return {"id": item_id, "prompt": prompt or f"prompt of {item_id}", "negative_prompt": "blurry", "seed": seed,
            "num_inference_steps": steps, "guidance_scale": 5.0, "model": "demo", "height": 8, "width": 8,
            "num_frames": 3, "max_sequence_length": 512, "dtype": "float32", "model_fingerprint": fingerprint,
            "dit_compile": False}


def _settings(attrs):
    return jobrecord.job_settings(attrs, "blurry")


def _render(store, expected, seeds=None, **kw):
    """Plan (apply) like a run's rank 0, then write every pending item; returns the plan."""
    first = next(iter(expected.values()))
    plan = plan_run(store, expected, _settings(first), apply=True, model_path="demo", job={}, **kw)
    for item_id in plan.pending:
        store.write_item(item_id, _video((seeds or {}).get(item_id, expected[item_id]["seed"])), expected[item_id])
    return plan


def _only_file(store, item_id):
    [ref] = store.item_refs()[item_key(item_id)]
    return ref.path


def _tree(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_write_view_and_read_back_from_another_cwd(tmp_path, monkeypatch):
    store = VideoStore(tmp_path / "out")
    expected = {"a b": _attrs("a b", seed=1), "ü": _attrs("ü", seed=2)}
    _render(store, expected)
    store.write_failure("bad", "decode", "boom", "r")
    build_view(store, expected)
    monkeypatch.chdir("/")
    assert np.array_equal(read_video(tmp_path / "out", "a b"), _video(1))
    with h5py.File(tmp_path / "out" / "videos.h5", "r") as f:
        assert sorted(f["videos"]) == ["a b", "ü"]
        assert np.array_equal(f["videos"]["ü"][...], _video(2))  # plain h5py, through the link
        assert f["videos"]["a b"].attrs["prompt"] == "prompt of a b" and f["videos"]["a b"].attrs["seed"] == 1
        assert f["failed"]["bad"].attrs["error"] == "boom"


def test_a_view_never_reads_a_decoy_out_in_the_working_directory(tmp_path, monkeypatch):
    """HDF5 resolves an external link next to the view first, then relative to the cwd: a view copied alone (or
    one whose item file is gone) read from inside another job's OUT with the same ids must not return its videos."""
    mine, decoy = VideoStore(tmp_path / "mine"), VideoStore(tmp_path / "decoy")
    expected = {i: _attrs(i) for i in ("a", "b")}
    _render(mine, expected, seeds={"a": 1, "b": 2})
    _render(decoy, expected, seeds={"a": 101, "b": 102})  # same ids and settings, other videos
    build_view(mine, expected)
    build_view(decoy, expected)
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(mine.view_path, copy / "videos.h5")
    monkeypatch.chdir(decoy.root)
    with h5py.File(mine.view_path, "r") as f:  # in place: its own videos, whatever the cwd
        assert np.array_equal(f["videos"]["a"][...], _video(1))
    with h5py.File(copy / "videos.h5", "r") as f:  # copied alone: an error, never the decoy's video
        for item_id in ("a", "b"):
            with pytest.raises(KeyError):
                f["videos"][item_id]
    with pytest.raises(FileNotFoundError):
        read_video(copy, "a")
    _only_file(mine, "b").unlink()  # a file gone from the real OUT: the same
    with h5py.File(mine.view_path, "r") as f:
        with pytest.raises(KeyError):
            f["videos"]["b"]


def test_content_identity_refuses_changed_items_and_force_rerenders_exactly_them(tmp_path):
    store = VideoStore(tmp_path / "out")
    expected = {i: _attrs(i, seed=k) for k, i in enumerate(["a", "b", "c"])}
    _render(store, expected)
    before = _tree(store.root)
    changed = {**expected, "a": _attrs("a", seed=0, prompt="a NEW prompt"), "b": _attrs("b", seed=99)}
    with pytest.raises(UserError) as err:
        plan_run(store, changed, _settings(changed["a"]))
    message = str(err.value)
    assert "other versions of 2 item(s)" in message
    assert "'a' (prompt: 'prompt of a' there, 'a NEW prompt' now)" in message
    assert "'b' (seed: 1 there, 99 now)" in message and "'c'" not in message
    assert "--force to re-render exactly those 2 item(s)" in message
    assert _tree(store.root) == before, "a refused run leaves OUT untouched"
    plan = _render(store, changed, force=True)
    assert sorted(plan.pending) == ["a", "b"] and sorted(plan.rerendered) == ["a", "b"] and plan.done == 1
    assert len(store.item_refs()) == 3 and all(len(v) == 1 for v in store.item_refs().values())
    assert _only_file(store, "c").read_bytes() == before[str(_only_file(store, "c").relative_to(store.root))]
    assert plan_run(store, changed, _settings(changed["a"]), apply=True).pending == []


def test_other_settings_refused_with_the_job_level_difference(tmp_path):
    store = VideoStore(tmp_path / "out")
    _render(store, {"a": _attrs("a")})
    new = {"b": _attrs("b", steps=8)}  # a new item, other settings: OUT would hold a mix
    with pytest.raises(UserError, match=r"different job configuration \(video.num_inference_steps: 4 there, 8 now\)"):
        plan_run(store, new, _settings(new["b"]))
    other_weights = {"a": _attrs("a", fingerprint="f1")}
    with pytest.raises(UserError, match=r"model.fingerprint: 'f0' there, 'f1' now.*'a' \(model weights"):
        plan_run(store, other_weights, _settings(other_weights["a"]))


def test_job_json_counts_the_videos_of_each_setting_after_force(tmp_path):
    store = VideoStore(tmp_path / "out")
    old = {i: _attrs(i) for i in ("a", "b")}
    _render(store, old)
    build_view(store, old)
    assert json.loads(store.job_path.read_text())["num_videos"] == 2
    new = {"a": _attrs("a", steps=8)}  # --force: one item re-rendered with new settings, b keeps the old ones
    _render(store, new, force=True)
    build_view(store, new)
    record = json.loads(store.job_path.read_text())
    assert record["settings"]["video.num_inference_steps"] == 8 and record["num_videos"] == 1
    assert [(e["settings"]["video.num_inference_steps"], e["num_videos"]) for e in record["other_settings"]] == [(4, 1)]
    _render(store, {"b": _attrs("b", steps=8)}, force=True)
    build_view(store)
    record = json.loads(store.job_path.read_text())
    assert record["num_videos"] == 2 and record["other_settings"] == [], "no video has the old settings any more"


@pytest.mark.parametrize("damage", ["truncate", "garbage_same_size", "garbage_short", "empty", "header_only"])
def test_a_corrupt_item_is_reported_moved_aside_and_rendered_again(tmp_path, damage):
    store = VideoStore(tmp_path / "out")
    expected = {i: _attrs(i, seed=k) for k, i in enumerate(["a", "b"])}
    _render(store, expected)
    path = _only_file(store, "a")
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage_same_size": os.urandom(len(data)),
                      "garbage_short": os.urandom(300), "empty": b"",
                      "header_only": data[:HEADER_BYTES]}[damage])
    plan = plan_run(store, expected, _settings(expected["a"]), apply=True)
    assert plan.pending == ["a"] and plan.done == 1
    [corrupt] = plan.corrupt
    assert corrupt.item_id == "a" and corrupt.moved_to.startswith("corrupt/") and "item 'a' is corrupt" in \
        corrupt.describe()
    assert not path.exists() and (store.root / corrupt.moved_to).exists()
    assert json.loads((store.root / (corrupt.moved_to + ".json")).read_text())["id"] == "a"
    store.write_item("a", _video(0), expected["a"])
    view = build_view(store, expected)
    assert view.num_videos == 2 and view.corrupt == []
    assert np.array_equal(read_video(store.root, "a"), _video(0))


def test_the_view_leaves_out_corrupt_files_of_items_not_in_this_run(tmp_path):
    """A run (or merge) whose prompts do not include a corrupt item names it, moves it aside and publishes."""
    store = VideoStore(tmp_path / "out")
    expected = {i: _attrs(i, seed=k) for k, i in enumerate(["a", "b", "c"])}
    _render(store, expected)
    path_a, path_b = _only_file(store, "a"), _only_file(store, "b")
    path_a.write_bytes(path_a.read_bytes()[:-1000])
    path_b.write_bytes(os.urandom(path_b.stat().st_size))
    view = build_view(store, {"c": expected["c"]})
    assert view.num_videos == 1 and {c.item_id for c in view.corrupt} == {"a", None}
    assert not path_a.exists() and not path_b.exists()
    with h5py.File(store.view_path, "r") as f:
        assert list(f["videos"]) == ["c"] and f.attrs["num_corrupt_found"] == 2


def test_verify_catches_damage_the_quick_check_cannot_see(tmp_path):
    store = VideoStore(tmp_path / "out")
    expected = {i: _attrs(i, seed=k) for k, i in enumerate(["a", "b"])}
    _render(store, expected)
    path = _only_file(store, "a")
    data = bytearray(path.read_bytes())
    start = data.find(_video(0)[1].tobytes())  # frame 1, as stored (one uncompressed chunk per frame)
    assert start > HEADER_BYTES
    data[start + 10:start + 60] = bytes(50)  # zeros inside the video data: header and size still fine
    path.write_bytes(bytes(data))
    assert plan_run(store, expected, _settings(expected["a"]), apply=True).pending == []  # quick check passes
    build_view(store, expected)
    with pytest.raises(CorruptItem, match="does not match the checksum"):
        read_video(store.root, "a")
    report = verify(store, repair=False)
    assert [c.item_id for c in report.corrupt] == ["a"] and path.exists()
    report = verify(store)
    assert [c.item_id for c in report.corrupt] == ["a"] and not path.exists() and report.view.num_videos == 1
    assert plan_run(store, expected, _settings(expected["a"]), apply=True).pending == ["a"]


def test_unstorable_text_in_failure_records_never_breaks_the_view(tmp_path):
    store = VideoStore(tmp_path / "out")
    _render(store, {"a": _attrs("a")})
    store.write_failure("b", "write", "ValueError: embedded NUL \x00 and \ud83c", "sunset \ud83c and \x00")
    # What an older version left behind: escapes json.loads turns into NUL and a lone surrogate, a foreign record.
    (store.failed_dir / f"{item_key('c')}.json").write_text(
        '{"id": "c", "stage": "decode", "error": "bad \\u0000 \\ud83c", "prompt": "x\\ud83c"}')
    (store.failed_dir / f"{item_key('x')}.json").write_text('{"id": "x\\ud83c", "stage": "s", "error": "e"}')
    (store.failed_dir / "garbage.json").write_text("{not json")
    view = build_view(store)
    assert view.num_videos == 1 and view.num_failed == 2
    with h5py.File(store.view_path, "r") as f:
        assert sorted(f["failed"]) == ["b", "c"]
        assert f["failed"]["b"].attrs["error"] == "ValueError: embedded NUL \\x00 and \\ud83c"
        assert f["failed"]["c"].attrs["prompt"] == "x\\ud83c"


def test_a_failure_counts_only_for_the_content_that_failed(tmp_path):
    store = VideoStore(tmp_path / "out")
    expected = {"a": _attrs("a")}
    store.expect(lambda item_id: expected[item_id])
    store.write_failure("a", "denoise", "nan")
    settings = _settings(expected["a"])
    assert plan_run(store, expected, settings, apply=True).pending == []
    assert plan_run(store, expected, settings, apply=True, retry_failed=True).pending == ["a"]
    fixed = {"a": _attrs("a", prompt="a fixed prompt")}
    plan = plan_run(store, fixed, settings, apply=True)
    assert plan.pending == ["a"] and plan.stale_failures == 1
    store.write_item("a", _video(0), fixed["a"])
    assert store.failures() == {}


def test_stale_temporaries(tmp_path):
    store = VideoStore(tmp_path)
    store.write_item("x", _video(0), _attrs("x"))
    host = socket.gethostname()
    dead = _dead_pid()
    final = _only_file(store, "x")
    stale = final.with_name(f"{final.name}.tmp.{host}.{dead}")
    live = final.with_name(f"{final.name}.tmp.{host}.{os.getpid()}")
    remote = final.with_name(f"{final.name}.tmp.otherhost.1")
    for path in (stale, live, remote):
        path.write_bytes(b"half")
    assert list(store.item_refs()) == [item_key("x")]
    assert store.remove_stale_temporaries() == 1 and not stale.exists()
    assert live.exists() and remote.exists(), "a writer still alive (or unknowable, on another host) keeps its file"
    old = time.time() - 2 * 86400
    os.utime(remote, (old, old))
    assert store.remove_stale_temporaries() == 1 and not remote.exists()


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_merge_without_ids_reads_them_from_the_headers(tmp_path):
    store = VideoStore(tmp_path)
    for k in range(3):
        store.write_item(f"id{k}", _video(k), _attrs(f"id{k}"))
    store.write_item("id1", _video(9), _attrs("id1", seed=9))  # a newer version replaces the old file
    view = build_view(store)
    assert view.num_videos == 3 and len(store.item_refs()[item_key("id1")]) == 1
    with h5py.File(store.view_path, "r") as f:
        assert sorted(f["videos"]) == ["id0", "id1", "id2"] and f.attrs["num_videos"] == 3
    assert np.array_equal(read_video(tmp_path, "id1"), _video(9))


def test_store_token_is_made_once_and_names_every_file(tmp_path):
    a, b = VideoStore(tmp_path), VideoStore(tmp_path)
    assert a.token == b.token and len(a.token) == 8
    a.write_item("x", _video(0), _attrs("x"))
    assert _only_file(a, "x").name.endswith(f".{a.token}.h5")
    assert VideoStore(tmp_path / "other").token != a.token


def test_older_layout_is_refused_not_misread(tmp_path):
    store = VideoStore(tmp_path)
    legacy = store.items_dir / "ab" / f"{item_key('x')}.h5"
    legacy.parent.mkdir(parents=True)
    legacy.write_bytes(b"round-1 file")
    with pytest.raises(UserError, match="older spmd-diff"):
        plan_run(store, {"x": _attrs("x")}, None)
    with pytest.raises(UserError, match="older spmd-diff"):
        build_view(store)


def test_open_store_says_what_is_wrong(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="does not exist"):
        open_store(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        open_store(tmp_path / "file")
    with pytest.raises(UserError, match="not a spmd-diff output directory"):
        open_store(tmp_path)
    VideoStore(tmp_path / "out").write_item("x", _video(0), _attrs("x"))
    assert open_store(tmp_path / "out" / "videos.h5").root == tmp_path / "out"
    monkeypatch.setattr(os, "access", lambda *a, **k: False)
    with pytest.raises(UserError, match="not writable"):
        open_store(tmp_path / "out", write=True)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_out(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    with pytest.raises(UserError, match="not writable"):
        VideoStore(ro / "out").check_writable()


def test_bad_video_shape_rejected(tmp_path):
    with pytest.raises(ValueError):
        VideoStore(tmp_path).write_item("x", np.zeros((2, 2, 3), np.uint8), {})
