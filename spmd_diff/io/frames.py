"""Frames in, stored form out, and back: the one reader of videos for every output form.

- :func:`stored_form` frames uint8 [F, H, W, 3] + a video's attributes -> what the item file stores: the frames
  themselves (``codec`` "raw"; the HDF5 filter is applied by itemfile), or the mp4 bytes uint8 [N] and the
  ``frames`` attribute (``codec`` "h264"/"hevc", encoded by io/codec.py).
- :func:`frames_of` a stored video + its attributes -> uint8 [F, H, W, 3].
- :func:`read_frames` OUT (or its videos.h5) + an id -> uint8 [F, H, W, 3], checked against the checksum recorded
  when it was written, whatever the form.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np

from spmd_diff.io import codec
from spmd_diff.io.itemfile import describe_form, is_encoded  # noqa: F401 - re-exported
from spmd_diff.io.view import read_stored


def stored_form(frames_FHWC: np.ndarray, attrs: Mapping[str, Any], threads: int = 0,
                metadata: Mapping[str, Any] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """(what the item file stores, attributes to add) for ``frames_FHWC`` in the form ``attrs`` name.
    ``metadata`` (prompt, settings) goes into an mp4's metadata; ``threads`` encoder threads (0 = FFmpeg's)."""
    if not is_encoded(attrs):
        return np.ascontiguousarray(frames_FHWC), {}
    data = codec.encode_mp4(frames_FHWC, str(attrs["codec"]), int(attrs["quality"]), str(attrs["preset"]),
                            int(attrs["fps"]), metadata=metadata, threads=threads)
    return np.frombuffer(data, dtype=np.uint8), {"frames": int(frames_FHWC.shape[0])}


def frames_of(stored: np.ndarray, attrs: Mapping[str, Any]) -> np.ndarray:
    """uint8 [F, H, W, 3] of a stored video (raw frames returned as they are; mp4 bytes decoded and cropped to
    the video's ``height`` x ``width``). ValueError if an mp4 does not decode to ``frames`` frames."""
    if not is_encoded(attrs):
        return stored
    height, width = attrs.get("height"), attrs.get("width")
    video = codec.decode_mp4(stored, int(height) if height else None, int(width) if width else None)
    expected = attrs.get("frames")
    if expected is not None and video.shape[0] != int(expected):
        raise ValueError(f"the mp4 decodes to {video.shape[0]} frames, {int(expected)} when written")
    return video


def read_frames(view_or_out: str | os.PathLike, item_id: str, check: bool = True) -> np.ndarray:
    """uint8 [F, H, W, 3] of one item of an OUT directory (or its videos.h5), any form; the stored bytes are
    checked against the checksum recorded when they were written (CorruptItem if not; KeyError: unknown id)."""
    return frames_of(*read_stored(view_or_out, item_id, check=check))
