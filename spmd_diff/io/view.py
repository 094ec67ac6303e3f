"""OUT/videos.h5, the view: built from the item files that pass the quick check, read without HDF5's search.

``/videos/<id>`` is an external link to ``items/<xx>/<file>.h5:/video``, ``/failed/<id>`` a group whose attributes
say why (text cleaned so any record can be stored). ``/forms/<form>`` lists the ids of the videos stored in each
output form ("raw", "raw+zstd", "h264 crf 17 medium 16 fps", ...: a raw video's dataset is its uint8
[F, H, W, 3] frames, an encoded one's the bytes of an mp4 file; ``frames.read_frames`` reads either), and the
attribute ``forms`` counts them (JSON). HDF5 resolves a link next to the view first and, only if
the file is not there, relative to the reader's working directory; item file names carry this OUT's token and
the item's identity, so no other OUT has them, and ``read_video`` resolves links itself, next to the view.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import h5py
import numpy as np

from spmd_diff.io import itemfile, jobrecord
from spmd_diff.io.identity import clean_text, identity_of, plain
from spmd_diff.io.itemfile import CorruptItem, Header
from spmd_diff.io.store import (CorruptFile, ItemRef, VideoStore, atomic_write_text, fsync_dir, id_from_header,
                                item_key, tmp_name)


@dataclass
class ViewReport:
    path: Path
    num_videos: int
    num_failed: int
    corrupt: list[CorruptFile]
    num_superseded: int = 0
    identities: dict[str, str] = field(default_factory=dict)
    """Item id -> content identity of every video in the view."""


@dataclass
class VerifyReport:
    num_files: int
    num_bytes: int
    corrupt: list[CorruptFile]
    elapsed_s: float
    view: ViewReport | None


def build_view(store: VideoStore, expected: Mapping[str, Mapping] | None = None, repair: bool = True) -> ViewReport:
    """Rebuild OUT/videos.h5 over every item file that passes the quick check, and every failure.

    ``expected``: the attributes of the run's items by id (to prefer, for an item with several files, the
    one of the content asked for; else the newest). With ``repair``, corrupt files are moved to corrupt/ and
    superseded ones deleted; job.json's video counts are refreshed.
    """
    store.refuse_legacy()
    wanted = {item_key(i): identity_of({**a, "id": i}) for i, a in (expected or {}).items()}
    ids_by_key = {item_key(i): i for i in (expected or {})}
    chosen: dict[str, tuple[ItemRef, Header]] = {}
    corrupt: list[CorruptFile] = []
    superseded = 0
    counts: dict[str, int] = {}
    for key, refs in sorted(store.item_refs().items()):
        good = []
        for ref in refs:
            try:
                good.append((ref, store.check_header(ref)))
            except CorruptItem as exc:
                item_id = ids_by_key.get(key) or id_from_header(ref.path)
                corrupt.append(store.quarantine(ref, str(exc), item_id, move=repair))
        if not good:
            continue
        good.sort(key=lambda rh: (rh[0].identity == wanted.get(key), rh[1].written), reverse=True)
        chosen[key] = good[0]
        counts[good[0][1].settings] = counts.get(good[0][1].settings, 0) + 1
        for ref, _ in good[1:]:
            superseded += 1
            if repair:
                ref.path.unlink(missing_ok=True)
    videos = {header.id: ref for ref, header in chosen.values()}
    forms = {header.id: header.form for _, header in chosen.values()}
    failures = {i: r for i, r in store.failures().items() if i not in videos}
    if repair:
        record = jobrecord.read(store.job_path)
        if record:
            refreshed = jobrecord.with_counts(record, counts)
            if refreshed != record:
                atomic_write_text(store.job_path, json.dumps(refreshed, indent=2, sort_keys=True) + "\n")
    _write_view(store, videos, failures, len(corrupt), forms)
    return ViewReport(store.view_path, len(videos), len(failures), corrupt, superseded,
                      {item_id: ref.identity for item_id, ref in videos.items()})


def _write_view(store: VideoStore, videos: Mapping[str, ItemRef], failures: Mapping[str, dict],
                num_corrupt: int, forms: Mapping[str, str]) -> None:
    tmp = tmp_name(store.view_path)
    try:
        with h5py.File(tmp, "w", libver="latest") as f:
            group = f.create_group("videos")
            for item_id in sorted(videos):
                group[item_id] = h5py.ExternalLink(videos[item_id].path.relative_to(store.root).as_posix(),
                                                   "/video")
            by_form: dict[str, list[str]] = {}
            for item_id in sorted(videos):
                by_form.setdefault(forms.get(item_id, "raw"), []).append(item_id)
            form_group = f.create_group("forms")
            for form, ids in sorted(by_form.items()):
                form_group.create_dataset(form.replace("/", "_"), data=ids, dtype=h5py.string_dtype())
            f.attrs["forms"] = json.dumps({form: len(ids) for form, ids in sorted(by_form.items())})
            failed = f.create_group("failed")
            for item_id, record in sorted(failures.items()):
                entry = failed.create_group(item_id)
                for name in ("stage", "error", "prompt"):
                    entry.attrs[name] = clean_text(str(record.get(name, "")))
            f.attrs["num_videos"] = len(videos)
            f.attrs["num_failed"] = len(failures)
            f.attrs["num_corrupt_found"] = num_corrupt
            token = store.read_token()
            if token:
                f.attrs["store_token"] = token
            if store.job_path.exists():
                f.attrs["job"] = clean_text(store.job_path.read_text(encoding="utf-8", errors="replace"))
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, store.view_path)
        fsync_dir(store.root)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def verify(store: VideoStore, repair: bool = True,
           progress: Callable[[int, int], None] | None = None) -> VerifyReport:
    """Full check of every item file (itemfile.verify_file: header, size, HDF5, the video's checksum); corrupt
    files are reported and, with ``repair``, moved aside, and the view rebuilt without them."""
    store.refuse_legacy()
    started = time.monotonic()
    refs = [ref for group in store.item_refs().values() for ref in group]
    corrupt, num_bytes = [], 0
    for n, ref in enumerate(refs, start=1):
        try:
            header = store.check_header(ref)
            itemfile.read_video(ref.path, header, verify=True)
            num_bytes += header.size
        except CorruptItem as exc:
            item_id = id_from_header(ref.path)
            corrupt.append(store.quarantine(ref, str(exc), item_id, move=repair))
        if progress is not None:
            progress(n, len(refs))
    view = build_view(store, repair=repair) if repair else None
    return VerifyReport(len(refs), num_bytes, corrupt, time.monotonic() - started, view)


def resolve_link(view_path: Path, link: h5py.ExternalLink) -> Path:
    """The file an external link of the view names, relative to the view's own directory (never the cwd)."""
    target = Path(link.filename)
    return target if target.is_absolute() else view_path.parent / target


def read_stored(view_or_out: str | os.PathLike, item_id: str, check: bool = True) -> tuple[np.ndarray, dict]:
    """(stored video, attributes) of one item, through the view, resolved next to the view and checked against
    the checksum recorded when it was written (CorruptItem if it does not match; KeyError for an unknown id).
    The stored video is uint8 [F, H, W, 3] frames or an encoded video's mp4 bytes uint8 [N] (``codec``
    attribute); ``frames.read_frames`` returns frames for either."""
    path = Path(view_or_out)
    if path.is_dir():
        path = path / "videos.h5"
    with h5py.File(path, "r") as f:
        link = f["videos"].get(item_id, getlink=True)
        if link is None:
            raise KeyError(f"no video {item_id!r} in {path}")
        if not isinstance(link, h5py.ExternalLink):  # a self-contained file holds the data itself
            itemfile.load_filters()
            ds = f["videos"][item_id]
            return ds[...], {name: plain(value) for name, value in ds.attrs.items()}
    file = resolve_link(path, link)
    if not file.exists():
        raise FileNotFoundError(f"{file}: the file of item {item_id!r} is missing (a view needs the items/ folder "
                                "next to it: copy the whole output directory)")
    header = itemfile.read_header(file)
    if header.id != item_id:
        raise CorruptItem(f"{file} holds item {header.id!r}, not {item_id!r}")
    return itemfile.read_video(file, header, verify=check), itemfile.read_attrs(file)


def read_video(view_or_out: str | os.PathLike, item_id: str, check: bool = True) -> np.ndarray:
    """The stored video of one item (see :func:`read_stored`): uint8 [F, H, W, 3] for a raw video."""
    return read_stored(view_or_out, item_id, check)[0]
