"""``spmd-diff export OUT/ --format mp4|gif|png``: playable files from the result store.

- mp4: H.264 (yuv420p, so any player opens it) through the ffmpeg binary of the ``imageio-ffmpeg`` package;
  ``title`` and ``comment`` metadata hold the prompt, ``description`` a JSON of the item's settings.
  yuv420p needs an even width and height: an odd one is padded by one pixel (edge copied).
- gif: through Pillow, looping, the prompt in the GIF comment extension. Identical consecutive frames are
  merged by the encoder (their durations add), so such a GIF has fewer frames but plays the same.
- png: a folder per item, ``frame_00000.png`` ..., each with tEXt chunks (``prompt``, ``id``, ``settings``),
  and ``metadata.json`` beside them.

Every video is read from the item file its link names, resolved next to the view (never relative to the working
directory), and checked against the checksum recorded when it was written. A video that is missing or corrupt is
skipped and reported; the others are still exported.

File names come from the id: kept as is when it is made of ``[A-Za-z0-9._-]`` (and not too long), otherwise
reduced to those characters and suffixed with 8 hex digits of the id's SHA-1, so distinct ids never collide.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import unicodedata
from pathlib import Path
from typing import Any, Sequence

import h5py
import numpy as np

from spmd_diff.errors import UserError
from spmd_diff.io import itemfile
from spmd_diff.observe.inspect import item_file, open_view, resolve_view

__all__ = ["export_videos", "safe_name", "FORMATS"]

FORMATS = ("mp4", "gif", "png")
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


def _even(frames_FHWC: np.ndarray) -> np.ndarray:
    """Pad height/width by one edge pixel where odd (yuv420p needs even sizes)."""
    pad_h, pad_w = frames_FHWC.shape[1] % 2, frames_FHWC.shape[2] % 2
    if pad_h or pad_w:
        frames_FHWC = np.pad(frames_FHWC, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    return frames_FHWC


def _write_mp4(path: Path, frames_FHWC: np.ndarray, meta: dict[str, Any], fps: float) -> None:
    try:
        import imageio.v2 as imageio
    except ImportError as exc:
        raise UserError("mp4 export needs imageio and its ffmpeg binary: pip install imageio imageio-ffmpeg") from exc
    prompt = str(meta.get("prompt", ""))
    description = json.dumps(meta, ensure_ascii=False, default=str)
    params = ["-metadata", f"title={prompt}", "-metadata", f"comment={prompt}",
              "-metadata", f"description={description}", "-movflags", "+faststart"]
    try:
        writer = imageio.get_writer(str(path), format="FFMPEG", mode="I", fps=fps, codec="libx264",
                                    pixelformat="yuv420p", quality=8, macro_block_size=1, output_params=params)
    except (ImportError, RuntimeError) as exc:
        raise UserError(f"mp4 export needs the ffmpeg binary: pip install imageio-ffmpeg ({exc})") from exc
    with writer:
        for frame in _even(frames_FHWC):
            writer.append_data(frame)


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
    """The video (checked against its checksum) and attributes of ``/videos/<key>``; CorruptItem if unusable."""
    path = item_file(f, key)
    if path is None:  # a self-contained file holds the data
        ds = f["videos"][key]
        return np.asarray(ds[...]), dict(ds.attrs)
    if not path.exists():
        raise itemfile.CorruptItem(f"its file {path} is missing")
    header = itemfile.read_header(path)
    if header.id != key:
        raise itemfile.CorruptItem(f"{path.name} holds item {header.id!r}")
    frames = itemfile.read_video(path, header, verify=True)
    return frames, itemfile.read_attrs(path)


def export_videos(
    out_dir_or_h5: str | os.PathLike[str],
    fmt: str,
    ids: Sequence[str] | None,
    dest_dir: str | os.PathLike[str],
    fps: float = 16,
    skipped: list[tuple[str, str]] | None = None,
) -> list[Path]:
    """Write ``ids`` (None: every finished video) of a store as ``fmt`` files into ``dest_dir``.

    Returns the written paths in order: ``DEST/<name>.mp4`` / ``.gif``, or the folder ``DEST/<name>/`` of
    PNG frames, ``<name> = safe_name(id)``. A video that is missing, corrupt or not a video is skipped: appended
    to ``skipped`` as (id, why) when a list is given, else reported by a UserError once the others are written.
    UserError for an unknown format, unknown or failed ids, or a missing encoder.
    """
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if not fps or fps <= 0:
        raise UserError(f"fps must be positive, got {fps}")
    view = resolve_view(out_dir_or_h5)
    dest = Path(dest_dir)
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the export directory {dest}: {exc.strerror or exc}") from None
    written: list[Path] = []
    problems: list[tuple[str, str]] = []
    with open_view(view) as f:
        for key in _select(f, ids, view):
            try:
                frames, attrs = _read(f, key)
            except itemfile.CorruptItem as exc:
                problems.append((key, str(exc)))
                continue
            if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
                problems.append((key, f"not a uint8 [frames, height, width, 3] video: {frames.dtype} {frames.shape}"))
                continue
            meta = _settings(attrs)
            meta.setdefault("id", key)
            name = safe_name(str(meta["id"]))
            if fmt == "mp4":
                path = dest / f"{name}.mp4"
                _write_mp4(path, frames, meta, fps)
            elif fmt == "gif":
                path = dest / f"{name}.gif"
                _write_gif(path, frames, meta, fps)
            else:
                path = dest / name
                _write_pngs(path, frames, meta)
            written.append(path)
    if skipped is not None:
        skipped.extend(problems)
    elif problems:
        listed = "; ".join(f"{key!r}: {why}" for key, why in problems[:10])
        raise UserError(f"exported {len(written)} video(s) into {dest}, but skipped {len(problems)} that could not "
                        f"be read from {view}: {listed}")
    return written
