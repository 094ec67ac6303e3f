"""``spmd-diff inspect OUT/``: what a result store holds, read with h5py alone.

The store's view ``OUT/videos.h5`` has ``/videos/<id>`` (uint8 [frames, height, width, 3], an external link to
``OUT/items/<xx>/<file>.h5:/video``, attributes ``id``, ``prompt``, ``seed``, ...) and, optionally,
``/failed/<id>`` (attributes ``error``, ``stage``, ``prompt``). ``OUT/job.json`` records the settings.

Links are resolved next to the view, never relative to the working directory, and every item file gets the
store's quick check (header, size): an item is "done", "corrupt" (with why), "missing" (its file is gone) or
"failed". Items moved aside by a run, ``merge`` or ``verify`` (OUT/corrupt/) are listed too.
"""

from __future__ import annotations

import json
import re
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import h5py
import numpy as np

from spmd_diff.errors import UserError
from spmd_diff.io import itemfile
from spmd_diff.io.view import resolve_link

__all__ = ["inspect_store", "StoreItem", "resolve_view", "iter_items", "read_item"]


@dataclass
class StoreItem:
    """One item of the view: a finished video, a failure, or a link whose target file is missing."""

    id: str
    status: str  # "done" | "failed" | "missing" | "corrupt"
    shape: tuple[int, ...] | None = None  # (frames, height, width, 3) for "done"
    attrs: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    link: str = ""  # "file:/path" of the external link, when there is one


def resolve_view(path: str | os.PathLike[str]) -> Path:
    """``OUT/`` or ``OUT/videos.h5`` -> the view file; UserError if it does not exist."""
    p = Path(path)
    view = p / "videos.h5" if p.is_dir() else p
    if not p.exists():
        raise UserError(f"no result store at {p}: it does not exist")
    if not view.is_file():
        hint = " (has the job finished, or been merged with `spmd-diff merge`?)" if p.is_dir() else ""
        raise UserError(f"no result store at {view}{hint}")
    if not h5py.is_hdf5(view):
        raise UserError(f"{view} is not an HDF5 file (give OUT/ or OUT/videos.h5)")
    return view


def open_view(view: Path) -> h5py.File:
    """The view, open for reading; UserError if it cannot be read or is not a spmd-diff view."""
    try:
        f = h5py.File(view, "r")
    except OSError as exc:
        raise UserError(f"cannot read {view}: {exc}") from None
    if "videos" not in f and "failed" not in f:
        f.close()
        raise UserError(f"{view} is not a spmd-diff view (no /videos or /failed group)")
    return f


def _plain(value: Any) -> Any:
    """An HDF5 attribute value as a plain Python value."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def _attrs(obj: h5py.HLObject) -> dict[str, Any]:
    return {k: _plain(v) for k, v in obj.attrs.items()}


def _link_text(group: h5py.Group, name: str) -> str:
    link = group.get(name, getlink=True)
    return f"{link.filename}:{link.path}" if isinstance(link, h5py.ExternalLink) else ""


def item_file(f: h5py.File, key: str) -> Path | None:
    """The item file ``/videos/<key>`` links to, resolved next to the view (None: the view holds the data)."""
    link = f["videos"].get(key, getlink=True)
    if not isinstance(link, h5py.ExternalLink):
        return None
    return resolve_link(Path(f.filename), link)


def read_item(f: h5py.File, key: str, failed: bool = False) -> StoreItem:
    """The item stored under ``/videos/<key>`` (or ``/failed/<key>``) of an open view (quick check only)."""
    if failed:
        obj = f["failed"][key]
        attrs = _attrs(obj)
        return StoreItem(id=str(attrs.get("id", key)), status="failed", attrs=attrs, error=str(attrs.get("error", "")))
    link = _link_text(f["videos"], key)
    path = item_file(f, key)
    if path is None:  # a self-contained file: the dataset is in the view
        ds = f["videos"][key]
        attrs = _attrs(ds)
        return StoreItem(id=str(attrs.get("id", key)), status="done", shape=_frame_shape(tuple(ds.shape), attrs),
                         attrs=attrs)
    if not path.exists():
        return StoreItem(id=key, status="missing", error=f"its file {path} is gone", link=link)
    try:
        header = itemfile.read_header(path)
        if header.id != key:
            raise itemfile.CorruptItem(f"it holds item {header.id!r}")
        with h5py.File(path, "r") as item:
            ds = item["video"]
            attrs, shape = _attrs(ds), tuple(ds.shape)
    except itemfile.CorruptItem as exc:
        return StoreItem(id=key, status="corrupt", error=f"{path.name}: {exc}", link=link)
    except (OSError, KeyError) as exc:
        return StoreItem(id=key, status="corrupt", error=f"{path.name}: cannot be read as HDF5 ({exc})", link=link)
    return StoreItem(id=str(attrs.get("id", key)), status="done", shape=_frame_shape(shape, attrs), attrs=attrs,
                     link=link)


def _frame_shape(stored_shape: tuple[int, ...], attrs: dict[str, Any]) -> tuple[int, ...]:
    """(frames, height, width, 3) of a video: its dataset's shape, or for an encoded one (mp4 bytes) what its
    attributes record (not decoded here: inspect is a quick look)."""
    if not itemfile.is_encoded(attrs):
        return stored_shape
    return (int(attrs.get("frames", attrs.get("num_frames", 0))), int(attrs.get("height", 0)),
            int(attrs.get("width", 0)), 3)


def moved_aside(view: Path) -> list[dict[str, Any]]:
    """Notes of the item files moved to OUT/corrupt/ (file, reason, id, when)."""
    notes = []
    for path in sorted((view.parent / "corrupt").glob("*.json")):
        try:
            note = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(note, dict):
            notes.append(note)
    return notes


def iter_items(f: h5py.File, include_failed: bool = True) -> Iterator[StoreItem]:
    """Every item of an open view: finished videos first, then failures."""
    if "videos" in f:
        for key in sorted(f["videos"], key=natural_key):
            yield read_item(f, key)
    if include_failed and "failed" in f:
        for key in sorted(f["failed"], key=natural_key):
            yield read_item(f, key, failed=True)


def natural_key(item_id: str) -> list:
    """Ids in the order people count: "2" before "10", "item-9" before "item-10"."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", item_id)]


def _load_job(view: Path, f: h5py.File) -> dict[str, Any] | None:
    job_file = view.parent / "job.json"
    text = None
    if job_file.is_file():
        text = job_file.read_text(encoding="utf-8")
    elif "job" in f.attrs:
        text = _plain(f.attrs["job"])
    if not text:
        return None
    try:
        job = json.loads(text)
    except json.JSONDecodeError:
        return {"unparsed job.json": text[:2000]}
    return job if isinstance(job, dict) else {"job": job}


def _flatten(value: Any, prefix: str = "") -> list[tuple[str, str]]:
    """Nested dict -> sorted ("a.b.c", "value") pairs."""
    if isinstance(value, dict) and value:
        out: list[tuple[str, str]] = []
        for key in sorted(value, key=str):
            out += _flatten(value[key], f"{prefix}.{key}" if prefix else str(key))
        return out
    text = json.dumps(value, default=str, ensure_ascii=False) if not isinstance(value, str) else value
    return [(prefix or "job", text if len(text) <= 200 else text[:199] + "…")]


def _cell(value: Any, width: int) -> str:
    text = "" if value is None else str(value).replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"


def _format_table(rows: list[list[str]], header: list[str], widths: list[int]) -> list[str]:
    cols = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    cols = [min(c, w) for c, w in zip(cols, widths)]
    fmt = lambda r: "  ".join(_cell(v, w).ljust(w) for v, w in zip(r, cols)).rstrip()  # noqa: E731
    return [fmt(header), fmt(["-" * c for c in cols])] + [fmt(r) for r in rows]


def _describe_one(view: Path, f: h5py.File, item_id: str) -> str:
    if "videos" in f and f["videos"].get(item_id, getlink=True) is not None:
        item = read_item(f, item_id)
    elif "failed" in f and f["failed"].get(item_id, getlink=True) is not None:
        item = read_item(f, item_id, failed=True)
    else:
        raise UserError(f"no item {item_id!r} in {view}")
    lines = [f"item {item.id!r} in {view}", f"  status: {item.status}"]
    if item.shape:
        lines.append(f"  video: {item.shape[0]} frames x {item.shape[1]}x{item.shape[2]} pixels, stored as "
                     f"{itemfile.describe_form(item.attrs)}")
    if item.link:
        lines.append(f"  file: {item.link}")
    if item.error:
        lines.append(f"  error: {item.error}")
    lines += [f"  {k}: {v!r}" for k, v in sorted(item.attrs.items())]
    return "\n".join(lines)


def inspect_store(path: str | os.PathLike[str], item_id: str | None = None, limit: int | None = 100) -> str:
    """Describe a result store (``OUT/`` or ``OUT/videos.h5``) as text.

    Without ``item_id``: the job config summary (from ``job.json``), counts of done / failed items,
    and a table (id, frames x H x W, seed, steps, guidance, status, error, prompt) of at most ``limit`` finished and
    ``limit`` failed items (None: all). With ``item_id``: every attribute of that item. UserError for a missing store or id.
    """
    view = resolve_view(path)
    with open_view(view) as f:
        if item_id is not None:
            return _describe_one(view, f, item_id)
        num_videos = len(f["videos"]) if "videos" in f else 0
        num_failed = len(f["failed"]) if "failed" in f else 0
        rows: list[list[str]] = []
        missing = corrupt = 0
        for group, failed in (("videos", False), ("failed", True)):  # up to ``limit`` of each: failures always show
            keys = sorted(f[group], key=natural_key) if group in f else []
            for key in keys if limit is None else keys[:limit]:  # a huge store opens only the files it lists
                item = read_item(f, key, failed=failed)
                missing += item.status == "missing"
                corrupt += item.status == "corrupt"
                shape = "x".join(str(n) for n in item.shape[:3]) if item.shape else "-"
                a = item.attrs
                rows.append([item.id, shape, a.get("seed", ""), a.get("num_inference_steps", ""),
                             a.get("guidance_scale", ""), item.status, item.error, a.get("prompt", "")])
        job = _load_job(view, f)
    lines = [f"store: {view}"]
    if job is not None:
        lines.append("job (job.json):")
        lines += [f"  {key} = {value}" for key, value in _flatten(job)]
    problems = [f"{missing} of the videos listed below have a missing file" if missing else "",
                f"{corrupt} of the videos listed below are corrupt (`spmd-diff verify` moves them aside; a rerun "
                "renders them again)" if corrupt else ""]
    lines.append(f"items: {num_videos + num_failed} ({num_videos} done, {num_failed} failed)"
                 + "".join(f"; {p}" for p in problems if p))
    header = ["id", "frames x H x W", "seed", "steps", "guidance", "status", "error", "prompt"]
    lines += _format_table([[str(v) for v in r] for r in rows], header, [40, 16, 12, 6, 8, 8, 60, 50])
    if num_videos + num_failed > len(rows):
        lines.append(f"... {num_videos + num_failed - len(rows)} more items not listed (limit={limit})")
    notes = moved_aside(view)
    if notes:
        lines.append(f"moved aside as corrupt ({view.parent / 'corrupt'}; the next run renders them again):")
        lines += [f"  {n.get('id') or '(id unknown)'!s}: {n.get('file')}: {n.get('reason')}" for n in notes[:20]]
        if len(notes) > 20:
            lines.append(f"  ... {len(notes) - 20} more")
    return "\n".join(lines)
