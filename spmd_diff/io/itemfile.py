"""One finished item on disk: an HDF5 file with the video, its attributes, and a header that makes it checkable.

The file is an ordinary HDF5 file (h5py opens it as is: dataset ``/video``, attributes on the dataset; raw
videos are uint8 [F, H, W, 3], one chunk per frame, optionally gzip/lzf/zstd-filtered; encoded ones the bytes of
an mp4 file, uint8 [N], with ``codec``, ``quality``, ``preset``, ``fps``, ``frames`` attributes) whose first
``HEADER_BYTES`` are an HDF5 *user block*, which HDF5 skips. We keep a small text header there::

    spmd-diff item 1\\n{"id": ..., "key": ..., "identity": ..., "settings": ..., "token": ..., "shape": [F, H, W, 3]
    (or [N] mp4 bytes), "video_sha256": ..., "size": <bytes of the whole file>, "written": <unix time>,
    "form": "raw"}\\n<spaces> <crc32, 8 hex digits>

so the store can check an item without opening it as HDF5: the header must parse, its CRC-32 must match, its key,
identity and token must match the file's name and its ``size`` the file's size. That *quick check* (one read of
2 KiB and one ``fstat`` per file) catches truncated, extended, overwritten and misnamed files. The *full check*
also reads the video and compares its SHA-256 with the one recorded when it was written (``video_sha256``, in the
header and as an attribute), which catches damage anywhere in the data.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import h5py
import numpy as np

from spmd_diff.io.identity import clean_text

HEADER_BYTES = 2048
MAGIC = b"spmd-diff item 1\n"
_CRC_DIGITS = 8


class CorruptItem(Exception):
    """An item file that does not verify. ``str(exc)`` says why, in words."""


@dataclass(frozen=True)
class Header:
    """What an item file's header records."""

    id: str
    key: str
    identity: str
    settings: str
    token: str
    shape: tuple[int, ...]
    video_sha256: str
    size: int
    written: float
    form: str = "raw"
    """The video's output form in words (describe_form): "raw", "raw+zstd", "h264 crf 17 ..."."""


def video_digest(video: np.ndarray) -> str:
    """SHA-256 of the stored video's bytes in C order (uint8 [F, H, W, 3] frames or uint8 [N] mp4 bytes)."""
    return hashlib.sha256(np.ascontiguousarray(video).data).hexdigest()


def _encode_header(fields: Mapping[str, Any]) -> bytes:
    body = MAGIC + json.dumps(fields, sort_keys=True, ensure_ascii=False).encode("utf-8") + b"\n"
    room = HEADER_BYTES - 1 - _CRC_DIGITS
    if len(body) > room:
        raise ValueError(f"item header of {len(body)} bytes does not fit in {room}")
    body = body.ljust(room, b" ") + b" "
    return body + f"{zlib.crc32(body):08x}".encode("ascii")


def is_encoded(attrs: Mapping[str, Any]) -> bool:
    """Whether a video with these attributes is stored as mp4 bytes (``codec`` h264/hevc) rather than frames."""
    return str(attrs.get("codec", "raw")) != "raw"


def describe_form(attrs: Mapping[str, Any]) -> str:
    """``"raw"``, ``"raw+zstd"`` or ``"h264 crf 17 medium 16 fps"``: a video's output form in words."""
    if not is_encoded(attrs):
        compression = str(attrs.get("compression", "none"))
        return "raw" if compression in ("none", "") else f"raw+{compression}"
    return f"{attrs['codec']} crf {attrs.get('quality')} {attrs.get('preset')} {attrs.get('fps')} fps"


def load_filters() -> None:
    """Register the HDF5 filters of ``output.compression = "zstd"`` (hdf5plugin) with h5py, if installed."""
    try:
        import hdf5plugin  # noqa: F401 - importing registers the filters
    except ImportError:
        pass


def _filter_args(compression: str) -> dict[str, Any]:
    if compression in ("", "none"):
        return {}
    if compression == "zstd":
        import hdf5plugin

        return dict(hdf5plugin.Zstd())
    return {"compression": compression}  # gzip (level 4), lzf: built into h5py


def encode_item(video: np.ndarray, attrs: Mapping[str, Any], *, item_id: str, key: str, identity: str,
                settings: str, token: str) -> memoryview:
    """The bytes of an item file: header, then the HDF5 image (built in memory, so a full disk surfaces as one
    clean OSError when the caller writes these bytes). A view of the in-memory image: no copy of the video.

    ``video``: uint8 [F, H, W, 3] frames (one chunk per frame, with the lossless filter ``attrs["compression"]``
    names) or, for an encoded video, the mp4 file's bytes as uint8 [N] (io/frames.py ``stored_form``). The
    checksum covers exactly what is stored."""
    digest = video_digest(video)
    written = time.time()
    form = describe_form(attrs)
    buffer = io.BytesIO()
    with h5py.File(buffer, "w", userblock_size=HEADER_BYTES) as f:
        if video.ndim == 4:
            ds = f.create_dataset("video", data=video, chunks=(1,) + video.shape[1:],
                                  **_filter_args(str(attrs.get("compression", "none"))))
        else:
            ds = f.create_dataset("video", data=video)
        for name, value in attrs.items():
            ds.attrs[name] = clean_text(value) if isinstance(value, str) else ("" if value is None else value)
        ds.attrs["id"] = item_id
        ds.attrs["identity"] = identity
        ds.attrs["video_sha256"] = digest
        ds.attrs["written"] = written
    data = buffer.getbuffer()
    fields = {"id": item_id, "key": key, "identity": identity, "settings": settings, "token": token,
              "shape": list(video.shape), "video_sha256": digest, "size": len(data), "written": written,
              "form": form}
    data[:HEADER_BYTES] = _encode_header(fields)
    return data


def parse_header(raw: bytes) -> Header:
    """The header of an item file from its first ``HEADER_BYTES``; CorruptItem if they are not one."""
    if len(raw) < HEADER_BYTES:
        raise CorruptItem(f"only {len(raw)} bytes, shorter than an item header")
    if not raw.startswith(MAGIC):
        raise CorruptItem("no spmd-diff item header (overwritten, or not an item file)")
    body, crc = raw[: HEADER_BYTES - _CRC_DIGITS], raw[HEADER_BYTES - _CRC_DIGITS: HEADER_BYTES]
    try:
        if int(crc, 16) != zlib.crc32(body):
            raise CorruptItem("its header's checksum does not match (damaged header)")
        fields = json.loads(body[len(MAGIC):].decode("utf-8"))
        return Header(str(fields["id"]), fields["key"], fields["identity"], fields["settings"], fields["token"],
                      tuple(int(n) for n in fields["shape"]), fields["video_sha256"], int(fields["size"]),
                      float(fields["written"]), str(fields.get("form", "raw")))
    except CorruptItem:
        raise
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptItem(f"its header cannot be read ({exc})") from None


def read_header(path: Path) -> Header:
    """Quick check: header parses, and the file has the size it records. CorruptItem (why) otherwise."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(HEADER_BYTES)
            size = os.fstat(fh.fileno()).st_size
    except OSError as exc:
        raise CorruptItem(f"cannot be read ({exc.strerror or exc})") from None
    header = parse_header(raw)
    if size != header.size:
        what = "truncated" if size < header.size else "longer than written"
        raise CorruptItem(f"{what}: {size} bytes, {header.size} when written")
    return header


def read_video(path: Path, header: Header | None = None, verify: bool = True) -> np.ndarray:
    """The stored video of an item file: uint8 [F, H, W, 3] frames, or an encoded video's mp4 bytes uint8 [N]
    (io/frames.py turns either into frames); with ``verify`` its SHA-256 must be the recorded one."""
    header = header if header is not None else read_header(path)
    load_filters()
    try:
        with h5py.File(path, "r") as f:
            video = f["video"][...]
    except (OSError, KeyError, ValueError) as exc:
        raise CorruptItem(f"its HDF5 content cannot be read ({exc})") from None
    if video.dtype != np.uint8 or tuple(video.shape) != header.shape:
        raise CorruptItem(f"its video is {video.dtype} {tuple(video.shape)}, uint8 {header.shape} when written")
    if verify and video_digest(video) != header.video_sha256:
        raise CorruptItem("its video data does not match the checksum recorded when it was written")
    return video


def read_attrs(path: Path) -> dict[str, Any]:
    """The attributes of an item file's video (plain Python values); CorruptItem if they cannot be read."""
    from spmd_diff.io.identity import plain

    try:
        with h5py.File(path, "r") as f:
            return {name: plain(value) for name, value in f["video"].attrs.items()}
    except (OSError, KeyError, ValueError) as exc:
        raise CorruptItem(f"its HDF5 content cannot be read ({exc})") from None


def verify_file(path: Path) -> Header:
    """Full check: the quick check, the HDF5 structure, and the video's checksum. CorruptItem (why) otherwise."""
    header = read_header(path)
    read_video(path, header, verify=True)
    return header
