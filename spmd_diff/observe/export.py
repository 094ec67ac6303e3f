"""``spmd-diff export OUT/ DIR --format mp4|gif|png|webdataset``: playable files and training shards from the store.

- mp4: an encoded video's stored bytes are copied as they are (no re-encoding: the file is the one written at
  render time, H.264 or HEVC); a raw video is encoded here, H.264 yuv420p (any player opens it) at the default
  ``output.quality``/``output.preset``, through the same encoder (spmd_diff/io/codec.py, PyAV). ``title`` and
  ``comment`` metadata hold the prompt, ``description`` a JSON of the item's settings. yuv420p needs an even
  width and height: an odd one is padded by one pixel (edge copied).
- webdataset: tar shards ``shard-000000.tar`` ... of ``--shard-size`` items each, every item two members
  ``<key>.mp4`` (as for mp4) and ``<key>.json`` (id, prompt, negative prompt, seed, the job-wide settings, the
  video's form), in a stable order (ids sorted), and ``manifest.json`` (the shards, their items and SHA-256). The
  ``webdataset`` package reads them (``webdataset.WebDataset(urls)``); ``<key>`` is the id's safe file name
  without dots (WebDataset splits keys at the first dot).
- gif: through Pillow, looping, the prompt in the GIF comment extension. Identical consecutive frames are
  merged by the encoder (their durations add), so such a GIF has fewer frames but plays the same.
- png: a folder per item, ``frame_00000.png`` ..., each with tEXt chunks (``prompt``, ``id``, ``settings``),
  and ``metadata.json`` beside them.

Every video is read from the item file its link names, resolved next to the view (never relative to the working
directory), and checked against the checksum recorded when it was written; frames of any form come from
``spmd_diff.io.frames``. A video that is missing or corrupt is skipped and reported; the others are still exported.

File names come from the id: kept as is when it is made of ``[A-Za-z0-9._-]`` (and not too long), otherwise
reduced to those characters and suffixed with 8 hex digits of the id's SHA-1, so distinct ids never collide.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
import unicodedata
from pathlib import Path
from typing import Any, Sequence

import h5py
import numpy as np

from spmd_diff.errors import UserError
from spmd_diff.io import codec, itemfile
from spmd_diff.io.frames import describe_form, frames_of, is_encoded
from spmd_diff.io.jobrecord import settings_of
from spmd_diff.io.store import atomic_write_bytes, atomic_write_text
from spmd_diff.observe.inspect import item_file, open_view, resolve_view

__all__ = ["export_videos", "safe_name", "FORMATS"]

FORMATS = ("mp4", "gif", "png", "webdataset")
_SAFE_RE = re.compile(r"[A-Za-z0-9._-]+")
_MAX_NAME = 100


def safe_name(item_id: str) -> str:
    """A file name for ``item_id`` that is safe on any file system and distinct for distinct ids."""
    if _SAFE_RE.fullmatch(item_id) and len(item_id) <= _MAX_NAME and not item_id.startswith("."):
        return item_id
    ascii_text = unicodedata.normalize("NFKD", item_id).encode("ascii", "ignore").decode("ascii")
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", ascii_text).strip("._")[:_MAX_NAME - 9] or "item"
    return f"{stem}-{hashlib.sha1(item_id.encode('utf-8')).hexdigest()[:8]}"


def _settings(attrs: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in attrs.items():
        if isinstance(v, bytes):
            v = v.decode("utf-8", "replace")
        elif isinstance(v, np.generic):
            v = v.item()
        elif isinstance(v, np.ndarray):
            v = v.tolist()
        out[k] = v
    return out


def _mp4_bytes(stored: np.ndarray, attrs: dict[str, Any], meta: dict[str, Any], fps: float) -> bytes:
    """The mp4 of a video: an encoded one's stored bytes as they are; a raw one encoded (H.264, default quality)."""
    if is_encoded(attrs):
        return stored.tobytes()
    return codec.encode_mp4(stored, "h264", codec.DEFAULT_QUALITY, codec.DEFAULT_PRESET, round(fps), metadata=meta)


def _write_gif(path: Path, frames_FHWC: np.ndarray, meta: dict[str, Any], fps: float) -> None:
    from PIL import Image

    images = [Image.fromarray(frame) for frame in frames_FHWC]
    comment = str(meta.get("prompt", "")).encode("utf-8")[:65000]
    images[0].save(path, format="GIF", save_all=True, append_images=images[1:], loop=0,
                   duration=max(20, round(1000.0 / fps)), comment=comment, optimize=False)


def _write_pngs(folder: Path, frames_FHWC: np.ndarray, meta: dict[str, Any]) -> None:
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    folder.mkdir(parents=True, exist_ok=True)
    info = PngInfo()
    info.add_itxt("prompt", str(meta.get("prompt", "")))
    info.add_itxt("id", str(meta.get("id", "")))
    info.add_itxt("settings", json.dumps(meta, ensure_ascii=False, default=str))
    for i, frame in enumerate(frames_FHWC):
        Image.fromarray(frame).save(folder / f"frame_{i:05d}.png", pnginfo=info)
    (folder / "metadata.json").write_text(
        json.dumps({**meta, "num_frames_written": int(frames_FHWC.shape[0])}, indent=2, ensure_ascii=False,
                   default=str) + "\n", encoding="utf-8")


def _select(f: h5py.File, ids: Sequence[str] | None, view: Path) -> list[str]:
    """Keys under /videos to export; UserError naming every unknown or failed id."""
    keys = list(f["videos"]) if "videos" in f else []
    if ids is None:
        return keys
    known = set(keys)
    failed = set(f["failed"]) if "failed" in f else set()
    unknown = [i for i in ids if i not in known and i not in failed]
    no_video = [i for i in ids if i not in known and i in failed]
    problems = []
    if unknown:
        sample = ", ".join(repr(k) for k in keys[:5]) + (" ..." if len(keys) > 5 else "")
        problems.append(f"unknown ids: {', '.join(map(repr, unknown))} (the store has {len(keys)} videos: {sample})")
    if no_video:
        problems.append(f"failed items have no video: {', '.join(map(repr, no_video))}")
    if problems:
        raise UserError(f"cannot export from {view}: " + "; ".join(problems))
    return list(dict.fromkeys(ids))


def _read(f: h5py.File, key: str) -> tuple[np.ndarray, dict[str, Any]]:
    """The stored video (checked against its checksum: frames, or an encoded video's mp4 bytes) and attributes of
    ``/videos/<key>``; CorruptItem if unusable."""
    path = item_file(f, key)
    if path is None:  # a self-contained file holds the data
        itemfile.load_filters()
        ds = f["videos"][key]
        return np.asarray(ds[...]), dict(ds.attrs)
    if not path.exists():
        raise itemfile.CorruptItem(f"its file {path} is missing")
    header = itemfile.read_header(path)
    if header.id != key:
        raise itemfile.CorruptItem(f"{path.name} holds item {header.id!r}")
    stored = itemfile.read_video(path, header, verify=True)
    return stored, itemfile.read_attrs(path)


def _check_stored(stored: np.ndarray, attrs: dict[str, Any]) -> str | None:
    """Why a stored video is not one (None if it is)."""
    if is_encoded(attrs):
        return None if stored.dtype == np.uint8 and stored.ndim == 1 and stored.size else \
            f"not mp4 bytes: {stored.dtype} {stored.shape}"
    if stored.dtype != np.uint8 or stored.ndim != 4 or stored.shape[-1] != 3 or stored.shape[0] == 0:
        return f"not a uint8 [frames, height, width, 3] video: {stored.dtype} {stored.shape}"
    return None


def wds_key(item_id: str) -> str:
    """A WebDataset sample key for ``item_id``: its safe name without dots (WebDataset splits at the first dot),
    suffixed with 8 hex digits of the id's SHA-1 whenever a dot had to go, so distinct ids never collide."""
    name = safe_name(item_id)
    if "." not in name:
        return name
    return f"{name.replace('.', '_')}-{hashlib.sha1(item_id.encode('utf-8')).hexdigest()[:8]}"


def _sample_json(item_id: str, attrs: dict[str, Any]) -> dict[str, Any]:
    return {"id": item_id, "prompt": attrs.get("prompt", ""), "negative_prompt": attrs.get("negative_prompt", ""),
            "seed": attrs.get("seed"), "settings": settings_of(attrs), "form": describe_form(attrs),
            "frames": attrs.get("frames", attrs.get("num_frames")), "height": attrs.get("height"),
            "width": attrs.get("width"), "fps": attrs.get("fps"), "model": attrs.get("model"),
            "video_sha256": attrs.get("video_sha256")}


class _ShardWriter:
    """Tar shards of ``shard_size`` samples, each written aside and renamed when full; the manifest at the end."""

    def __init__(self, dest: Path, shard_size: int, source: Path) -> None:
        self.dest, self.shard_size, self.source = dest, shard_size, source
        self.shards: list[dict[str, Any]] = []
        self._members: list[tuple[str, bytes, float]] = []
        self._items: list[dict[str, str]] = []

    def add(self, item_id: str, mp4: bytes, meta: dict[str, Any], mtime: float) -> None:
        key = wds_key(item_id)
        text = json.dumps(meta, ensure_ascii=False, sort_keys=True, default=str).encode("utf-8")
        self._members += [(f"{key}.mp4", mp4, mtime), (f"{key}.json", text, mtime)]
        self._items.append({"id": item_id, "key": key})
        if len(self._items) == self.shard_size:
            self.flush()

    def flush(self) -> None:
        if not self._items:
            return
        name = f"shard-{len(self.shards):06d}.tar"
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for member, data, mtime in self._members:
                info = tarfile.TarInfo(member)
                info.size, info.mtime, info.mode = len(data), int(mtime), 0o644
                tar.addfile(info, io.BytesIO(data))
        data = buffer.getvalue()
        atomic_write_bytes(self.dest / name, data)
        self.shards.append({"name": name, "num_items": len(self._items), "bytes": len(data),
                            "sha256": hashlib.sha256(data).hexdigest(), "items": self._items})
        self._members, self._items = [], []

    def close(self) -> Path:
        self.flush()
        manifest = {"format": "webdataset", "source": str(self.source), "shard_size": self.shard_size,
                    "num_shards": len(self.shards), "num_items": sum(s["num_items"] for s in self.shards),
                    "members": ["mp4", "json"], "order": "item ids sorted", "shards": self.shards}
        path = self.dest / "manifest.json"
        atomic_write_text(path, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
        return path


def export_videos(
    out_dir_or_h5: str | os.PathLike[str],
    fmt: str,
    ids: Sequence[str] | None,
    dest_dir: str | os.PathLike[str],
    fps: float = codec.DEFAULT_FPS,
    skipped: list[tuple[str, str]] | None = None,
    shard_size: int = 1000,
) -> list[Path]:
    """Write ``ids`` (None: every finished video) of a store as ``fmt`` files into ``dest_dir``.

    Returns the written paths in order: ``DEST/<name>.mp4`` / ``.gif``, the folder ``DEST/<name>/`` of PNG
    frames (``<name> = safe_name(id)``), or for webdataset the shards then ``manifest.json``. ``fps``: frame rate
    of gifs and of raw videos encoded to mp4 (an encoded video keeps its own). A video that is missing, corrupt
    or not a video is skipped: appended to ``skipped`` as (id, why) when a list is given, else reported by a
    UserError once the others are written. UserError for an unknown format, unknown or failed ids, a bad
    ``shard_size`` or a missing encoder.
    """
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if not fps or fps <= 0:
        raise UserError(f"fps must be positive, got {fps}")
    if fmt == "webdataset" and (not isinstance(shard_size, int) or shard_size < 1):
        raise UserError(f"--shard-size must be >= 1, got {shard_size}")
    view = resolve_view(out_dir_or_h5)
    dest = Path(dest_dir)
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the export directory {dest}: {exc.strerror or exc}") from None
    written: list[Path] = []
    problems: list[tuple[str, str]] = []
    shards = _ShardWriter(dest, shard_size, view) if fmt == "webdataset" else None
    with open_view(view) as f:
        keys = _select(f, ids, view)
        for key in sorted(keys) if shards is not None else keys:
            try:
                stored, attrs = _read(f, key)
                why = _check_stored(stored, attrs)
                if why is not None:
                    problems.append((key, why))
                    continue
                meta = _settings(attrs)
                meta.setdefault("id", key)
                name = safe_name(str(meta["id"]))
                if shards is not None:
                    shards.add(str(meta["id"]), _mp4_bytes(stored, meta, meta, fps), _sample_json(key, meta),
                               float(meta.get("written", 0) or 0))
                    continue
                if fmt == "mp4":
                    path = dest / f"{name}.mp4"
                    atomic_write_bytes(path, _mp4_bytes(stored, meta, meta, fps))
                elif fmt == "gif":
                    path = dest / f"{name}.gif"
                    _write_gif(path, frames_of(stored, meta), meta, fps)
                else:
                    path = dest / name
                    _write_pngs(path, frames_of(stored, meta), meta)
            except (itemfile.CorruptItem, ValueError) as exc:  # ValueError: an mp4 that does not decode
                problems.append((key, str(exc)))
                continue
            written.append(path)
    if shards is not None:
        manifest = shards.close()
        written += [dest / s["name"] for s in shards.shards] + [manifest]
    if skipped is not None:
        skipped.extend(problems)
    elif problems:
        listed = "; ".join(f"{key!r}: {why}" for key, why in problems[:10])
        raise UserError(f"exported {len(written)} video(s) into {dest}, but skipped {len(problems)} that could not "
                        f"be read from {view}: {listed}")
    return written
