"""The HDF5 result store: exactly-once, crash-safe, readable with h5py alone.

Layout of OUT/::

    job.json                  settings that decide what a video looks like (a rerun must agree)
    items/<xx>/<sha1>.h5      one file per finished item: dataset ``video`` uint8 [F, H, W, 3] + attributes.
                              Written as a temporary file, fsynced, then renamed into place: a file under
                              this name is always complete. Its name is the SHA-1 of the item id, so
                              "is item X done" is a stat, and a resumed job never renders X again.
    failed/<sha1>.json        items whose stage failed (id, stage, error); a success later removes it
    videos.h5                 the view: /videos/<id> is an external link to the item's dataset,
                              /failed/<id> a group whose attributes say why. Rebuilt into a temporary file
                              and renamed, so a reader never sees a half-written view.

A crash can leave ``*.tmp*`` files behind; they are never visible under a final name and are removed by the
next run. No file is ever modified in place.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import time
from pathlib import Path
from typing import Iterable, Mapping

import h5py
import numpy as np

from spmd_diff.errors import UserError

VIDEO_ATTRS = ("id", "prompt", "negative_prompt", "seed", "num_inference_steps", "guidance_scale", "model",
               "height", "width", "num_frames")


def item_key(item_id: str) -> str:
    """File-system name of an item: SHA-1 of its id (ids may hold any character but '/')."""
    return hashlib.sha1(item_id.encode("utf-8")).hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _tmp_name(path: Path) -> Path:
    return path.with_name(f"{path.name}.tmp.{socket.gethostname()}.{os.getpid()}")


def atomic_write_text(path: Path, text: str) -> None:
    tmp = _tmp_name(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


class VideoStore:
    """One OUT directory. Any rank may write items; rank 0 writes job.json and rebuilds the view."""

    def __init__(self, out_dir: str | os.PathLike) -> None:
        self.root = Path(out_dir)
        self.items_dir = self.root / "items"
        self.failed_dir = self.root / "failed"
        self.view_path = self.root / "videos.h5"

    # -- setup ------------------------------------------------------------------------------------------------
    def check_can_write(self) -> None:
        """Whether OUT/ could be created or written, without creating or writing anything (a job refused later,
        for a bad model say, must leave OUT as it found it). Raises UserError naming the directory."""
        if self.root.exists() and not self.root.is_dir():
            raise UserError(f"output directory {self.root} is a file, not a directory; give another --out")
        existing = self.root
        while not existing.exists():
            if existing.parent == existing:
                break
            existing = existing.parent
        if existing.exists() and not existing.is_dir():
            raise UserError(f"output directory {self.root} cannot be created: {existing} is a file")
        if not os.access(existing, os.W_OK | os.X_OK):
            what = "is not writable" if existing == self.root else f"cannot be created: {existing} is not writable"
            raise UserError(f"output directory {self.root} {what}")

    def check_writable(self) -> None:
        """Create OUT/ and prove we can write there. Raises UserError naming the directory."""
        self.check_can_write()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = _tmp_name(self.root / ".write-probe")
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as exc:
            raise UserError(f"output directory {self.root} is not writable: {exc.strerror or exc}") from None

    def check_job(self, fingerprint: Mapping, force: bool = False) -> bool:
        """Whether OUT/job.json must be (re)written; raises UserError if OUT holds another job's videos.

        Reads only: a refused job leaves OUT untouched.
        """
        job_file = self.root / "job.json"
        if not job_file.exists():
            return True
        try:
            old = json.loads(job_file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            old = None
        new = json.loads(json.dumps(fingerprint))
        if old == new:
            return False
        if not force:
            raise UserError(f"{self.root} holds videos of a different job configuration "
                            f"({_describe_difference(old, new)}); use another --out, or --force to add to it anyway")
        return True

    def prepare(self, fingerprint: Mapping, force: bool = False) -> None:
        """Rank 0, before any item is written: record the job settings, refuse a mismatching OUT."""
        self.check_writable()
        write_job = self.check_job(fingerprint, force)
        self.items_dir.mkdir(exist_ok=True)
        self.failed_dir.mkdir(exist_ok=True)
        if write_job:
            atomic_write_text(self.root / "job.json", json.dumps(fingerprint, indent=2, sort_keys=True) + "\n")
        self.remove_stale_temporaries()

    def remove_stale_temporaries(self, max_age_s: float = 86400.0) -> int:
        """Delete temporary files a killed run left (never a final-named file).

        A temporary is named ``<final>.tmp.<host>.<pid>``. It is stale when its writer is gone: a process of
        this host that no longer exists, or (another host, which we cannot ask) older than ``max_age_s``. Job
        array tasks sharing OUT never delete each other's files in flight.
        """
        host, now, count = socket.gethostname(), time.time(), 0
        candidates = [*self.items_dir.glob("*/*.tmp.*"), *self.failed_dir.glob("*.tmp.*"),
                      *self.root.glob("videos.h5.tmp.*"), *self.root.glob("job.json.tmp.*")]
        for path in candidates:
            writer_host, _, pid = path.name.split(".tmp.", 1)[1].rpartition(".")
            try:
                if writer_host == host and pid.isdigit():
                    if _process_alive(int(pid)):
                        continue
                elif now - path.stat().st_mtime < max_age_s:
                    continue
                path.unlink()
                count += 1
            except FileNotFoundError:
                pass
        return count

    # -- items ------------------------------------------------------------------------------------------------
    def item_path(self, item_id: str) -> Path:
        key = item_key(item_id)
        return self.items_dir / key[:2] / f"{key}.h5"

    def done_keys(self) -> set[str]:
        """Keys (SHA-1 of id) of every finished item."""
        if not self.items_dir.is_dir():
            return set()
        return {p.name[:-3] for p in self.items_dir.glob("*/*.h5")}

    def is_done(self, item_id: str) -> bool:
        return self.item_path(item_id).exists()

    def write_item(self, item_id: str, video_FHWC: np.ndarray, attrs: Mapping) -> Path:
        """Write one finished video atomically. ``video_FHWC``: uint8 [frames, height, width, 3]."""
        if video_FHWC.dtype != np.uint8 or video_FHWC.ndim != 4 or video_FHWC.shape[-1] != 3:
            raise ValueError(f"video must be uint8 [F, H, W, 3], got {video_FHWC.dtype} {video_FHWC.shape}")
        path = self.item_path(item_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        # The HDF5 image is built in memory and written with one plain write: a full disk or quota then
        # surfaces as a clean OSError (ENOSPC/EDQUOT/EFBIG) instead of a half-broken HDF5 handle.
        buffer = io.BytesIO()
        with h5py.File(buffer, "w") as f:
            frame = (1,) + video_FHWC.shape[1:]
            ds = f.create_dataset("video", data=video_FHWC, chunks=frame)
            ds.attrs["id"] = item_id
            for key, value in attrs.items():
                ds.attrs[key] = "" if value is None else value
        tmp = _tmp_name(path)
        try:
            with open(tmp, "wb") as fh:
                fh.write(buffer.getbuffer())
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
            _fsync_dir(path.parent)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        failed = self.failed_dir / f"{item_key(item_id)}.json"
        failed.unlink(missing_ok=True)
        return path

    def write_failure(self, item_id: str, stage: str, error: str, prompt: str = "") -> None:
        """Record that an item failed; it stays pending for ``--retry-failed``."""
        self.failed_dir.mkdir(parents=True, exist_ok=True)
        record = {"id": item_id, "stage": stage, "error": error, "prompt": prompt}
        atomic_write_text(self.failed_dir / f"{item_key(item_id)}.json", json.dumps(record) + "\n")

    def failures(self) -> dict[str, dict]:
        out = {}
        if self.failed_dir.is_dir():
            for path in sorted(self.failed_dir.glob("*.json")):
                try:
                    record = json.loads(path.read_text(encoding="utf-8"))
                except (OSError, json.JSONDecodeError):
                    continue
                if not self.item_path(record["id"]).exists():
                    out[record["id"]] = record
        return out

    # -- the view ---------------------------------------------------------------------------------------------
    def build_view(self, ids: Iterable[str] | None = None) -> Path:
        """Rebuild OUT/videos.h5 over every finished item and every failure.

        ``ids``: the item ids the caller knows (the prompts file); finished files not among them are opened to
        read their id (``spmd-diff merge`` passes none and opens every file).
        """
        by_key = {item_key(i): i for i in ids} if ids is not None else {}
        entries: list[tuple[str, Path]] = []
        for key in sorted(self.done_keys()):
            path = self.items_dir / key[:2] / f"{key}.h5"
            item_id = by_key.get(key)
            if item_id is None:
                with h5py.File(path, "r") as f:
                    item_id = str(f["video"].attrs["id"])
            entries.append((item_id, path))
        failures = self.failures()
        tmp = _tmp_name(self.view_path)
        try:
            with h5py.File(tmp, "w", libver="latest") as f:
                videos = f.create_group("videos")
                for item_id, path in sorted(entries):
                    videos[item_id] = h5py.ExternalLink(str(path.relative_to(self.root)), "/video")
                failed = f.create_group("failed")
                for item_id, record in sorted(failures.items()):
                    group = failed.create_group(item_id)
                    for key in ("stage", "error", "prompt"):
                        group.attrs[key] = str(record.get(key, ""))
                f.attrs["num_videos"] = len(entries)
                f.attrs["num_failed"] = len(failures)
                job_file = self.root / "job.json"
                if job_file.exists():
                    f.attrs["job"] = job_file.read_text(encoding="utf-8")
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, self.view_path)
            _fsync_dir(self.root)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return self.view_path


def _describe_difference(old, new) -> str:
    if not isinstance(old, dict):
        return "its job.json is unreadable"
    diffs = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += [f"{key}.{k}: {a.get(k)!r} there, {b.get(k)!r} now" for k in sorted(set(a) | set(b))
                      if a.get(k) != b.get(k)]
        elif a != b:
            diffs.append(f"{key}: {a!r} there, {b!r} now")
    return "; ".join(diffs[:4]) or "settings differ"


def read_video(view_or_out: str | os.PathLike, item_id: str) -> np.ndarray:
    """uint8 [F, H, W, 3] of one item, through the view (for tests and tools)."""
    path = Path(view_or_out)
    if path.is_dir():
        path = path / "videos.h5"
    with h5py.File(path, "r") as f:
        return f["videos"][item_id][...]
