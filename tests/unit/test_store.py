import os
import socket
import subprocess
import time

import h5py
import numpy as np
import pytest

from spmd_diff.errors import UserError
from spmd_diff.io.store import VideoStore, item_key, read_video


def _video(seed, frames=3):
    return np.random.default_rng(seed).integers(0, 256, (frames, 8, 8, 3), dtype=np.uint8)


def test_write_view_and_read_back_from_another_cwd(tmp_path, monkeypatch):
    store = VideoStore(tmp_path / "out")
    store.prepare({"model": "demo"})
    store.write_item("a b", _video(1), {"prompt": "p", "seed": 3, "negative_prompt": None})
    store.write_item("ü", _video(2), {"prompt": "q", "seed": 4})
    store.write_failure("bad", "decode", "boom", "r")
    store.build_view(["a b", "ü", "bad"])
    monkeypatch.chdir("/")
    assert np.array_equal(read_video(tmp_path / "out", "a b"), _video(1))
    with h5py.File(tmp_path / "out" / "videos.h5", "r") as f:
        assert sorted(f["videos"]) == ["a b", "ü"]
        assert f["videos"]["a b"].attrs["prompt"] == "p" and f["videos"]["a b"].attrs["seed"] == 3
        assert f["failed"]["bad"].attrs["error"] == "boom"


def test_done_keys_and_stale_temporaries(tmp_path):
    store = VideoStore(tmp_path)
    store.prepare({})
    store.write_item("x", _video(0), {})
    host = socket.gethostname()
    dead = _dead_pid()
    stale = store.item_path("y").with_name(f"{store.item_path('y').name}.tmp.{host}.{dead}")
    live = store.item_path("z").with_name(f"{store.item_path('z').name}.tmp.{host}.{os.getpid()}")
    remote = store.item_path("w").with_name(f"{store.item_path('w').name}.tmp.otherhost.1")
    for path in (stale, live, remote):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half")
    assert store.done_keys() == {item_key("x")}
    assert store.remove_stale_temporaries() == 1 and not stale.exists()
    assert live.exists() and remote.exists(), "a writer still alive (or unknowable, on another host) keeps its file"
    old = time.time() - 2 * 86400
    os.utime(remote, (old, old))
    assert store.remove_stale_temporaries() == 1 and not remote.exists()


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_success_clears_failure(tmp_path):
    store = VideoStore(tmp_path)
    store.prepare({})
    store.write_failure("x", "denoise", "nan")
    assert "x" in store.failures()
    store.write_item("x", _video(0), {})
    assert store.failures() == {}


def test_mismatching_job_refused_unless_forced(tmp_path):
    store = VideoStore(tmp_path)
    store.prepare({"video": {"height": 64}})
    with pytest.raises(UserError, match="video.height: 64 there, 128 now"):
        store.prepare({"video": {"height": 128}})
    store.prepare({"video": {"height": 128}}, force=True)


def test_merge_without_ids_reads_them_from_files(tmp_path):
    store = VideoStore(tmp_path)
    store.prepare({})
    for k in range(3):
        store.write_item(f"id{k}", _video(k), {})
    store.build_view()
    with h5py.File(store.view_path, "r") as f:
        assert sorted(f["videos"]) == ["id0", "id1", "id2"] and f.attrs["num_videos"] == 3


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_out(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    with pytest.raises(UserError, match="not writable"):
        VideoStore(ro / "out").check_writable()


def test_bad_video_shape_rejected(tmp_path):
    with pytest.raises(ValueError):
        VideoStore(tmp_path).write_item("x", np.zeros((2, 2, 3), np.uint8), {})
