"""The store commands (merge, verify, report, export, inspect) on OUTs that are missing, files, not stores, not
writable or damaged: exit 2 and one message, never a traceback; corrupt items are reported and the rest goes on."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from spmd_diff.cli import main
from spmd_diff.io.store import VideoStore, item_key
from spmd_diff.io.view import build_view

COMMANDS = {
    "merge": lambda out, tmp: ["merge", str(out)],
    "verify": lambda out, tmp: ["verify", str(out)],
    "report": lambda out, tmp: ["report", str(out)],
    "export": lambda out, tmp: ["export", str(out), str(tmp / "dest"), "--format", "png"],
    "inspect": lambda out, tmp: ["inspect", str(out)],
}


def _attrs(item_id):
    return {"prompt": f"p {item_id}", "negative_prompt": "", "seed": 1, "num_inference_steps": 2,
            "guidance_scale": 5.0, "model": "demo", "height": 8, "width": 8, "num_frames": 3,
            "max_sequence_length": 512, "dtype": "float32", "model_fingerprint": "f0", "dit_compile": False}


def _store(root: Path, ids=("a", "b", "c")) -> VideoStore:
    store = VideoStore(root)
    for k, item_id in enumerate(ids):
        store.write_item(item_id, np.full((3, 8, 8, 3), k, np.uint8), _attrs(item_id))
    build_view(store)
    return store


def _run(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("case", ["missing", "a_file", "not_a_store", "view_not_hdf5"])
def test_bad_out_exits_2_with_one_message(command, case, tmp_path, capsys):
    out = tmp_path / "out"
    if case == "a_file":
        out.write_text("a file")
    elif case == "not_a_store":
        out.mkdir()
        (out / "notes.txt").write_text("hello")
    elif case == "view_not_hdf5":
        out.mkdir()
        (out / "items").mkdir()
        (out / "videos.h5").write_text("not HDF5")
        (out / "events.jsonl").write_text("not json\n")
    code, _, err = _run(COMMANDS[command](out, tmp_path), capsys)
    if case == "view_not_hdf5" and command in ("merge", "verify"):  # they rebuild the view: that repairs it
        assert code == 0 and (out / "videos.h5").read_bytes().startswith(b"\x89HDF"), err
        return
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("spmd-diff: error")]
    assert len(lines) == 1 and "Traceback" not in err, err


@pytest.mark.parametrize("command", ["merge", "verify", "report"])
def test_read_only_out_exits_2(command, tmp_path, capsys, monkeypatch):
    out = _store(tmp_path / "out").root
    (out / "events.jsonl").write_text("")
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: not mode & os.W_OK)  # as if mounted read-only
    code, _, err = _run(COMMANDS[command](out, tmp_path), capsys)
    assert code == 2 and "not writable (read-only)" in err and "Traceback" not in err, err


def test_a_write_that_fails_anyway_is_a_message_not_a_traceback(tmp_path, capsys):
    out = _store(tmp_path / "out").root
    (out / "videos.h5").unlink()
    (out / "videos.h5").mkdir()  # something in the way of the view
    (out / "videos.h5" / "x").write_text("x")
    code, _, err = _run(["merge", str(out)], capsys)
    assert code == 2 and "spmd-diff: error: merge:" in err and "Traceback" not in err, err


def test_merge_and_verify_report_corrupt_items_and_carry_on(tmp_path, capsys):
    store = _store(tmp_path / "out")
    [ref_a] = store.item_refs()[item_key("a")]
    ref_a.path.write_bytes(ref_a.path.read_bytes()[:-100])
    code, out, err = _run(["merge", str(store.root)], capsys)
    assert code == 0 and "2 video(s), 0 failed, 1 corrupt" in out
    assert "item 'a' is corrupt" in err and "truncated" in err and "moved to corrupt/" in err
    code, out, err = _run(["verify", str(store.root)], capsys)
    assert code == 0 and "2 verified, 0 corrupt" in out, (out, err)
    [ref_b] = store.item_refs()[item_key("b")]
    data = bytearray(ref_b.path.read_bytes())
    start = data.find(np.full((8, 8, 3), 1, np.uint8).tobytes())
    data[start] ^= 0xFF
    ref_b.path.write_bytes(bytes(data))
    code, out, err = _run(["verify", "--no-move", str(store.root)], capsys)
    assert code == 1 and "1 corrupt" in out and "item 'b' is corrupt" in err and ref_b.path.exists()
    code, out, err = _run(["verify", str(store.root)], capsys)
    assert code == 1 and not ref_b.path.exists() and "rebuilt" in out
    code, out, err = _run(["inspect", str(store.root)], capsys)
    assert code == 0 and "items: 1 (1 done, 0 failed)" in out and "moved aside as corrupt" in out
    assert "a: items/" in out and "b: items/" in out


def test_export_skips_corrupt_items_with_exit_1(tmp_path, capsys):
    store = _store(tmp_path / "out")
    [ref] = store.item_refs()[item_key("b")]
    ref.path.write_bytes(os.urandom(ref.path.stat().st_size))
    code, out, err = _run(["export", str(store.root), str(tmp_path / "dest"), "--format", "png"], capsys)
    assert code == 1 and len(out.splitlines()) == 2 and "'b' not exported" in err and "Traceback" not in err


def test_launch_without_a_command(capsys):
    code, _, err = _run(["launch"], capsys)
    assert code == 2 and "give the launcher command" in err
