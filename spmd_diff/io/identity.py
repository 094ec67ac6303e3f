"""What makes a video what it is: an item's content identity, the model's fingerprint, text HDF5 can store.

An item's **identity** is a digest of every attribute of its video except the purely informational ones
(``INFORMATIONAL``): id, prompt, negative prompt (when guidance is on), seed, size, frames, steps, guidance, text
length, dtype, the model's fingerprint, the output form (``codec`` raw/h264/hevc and its ``compression`` or
``quality``, ``preset``, ``fps``: what is stored, and for lossy codecs the pixels read back, depend on it; a
rerun with another form is refused unless ``--force``, which re-renders), an image-to-video item's image content
(``image_sha256``), and any per-item setting added later (it joins the identity by being an
attribute). Two items with the same identity make the same video, so a finished file whose identity differs from
what the prompts ask for is changed work, never finished work.

The **model fingerprint** is cheap: the names and sizes of the model directory's files, the whole bytes of the
small ones (configs, scheduler, tokenizer settings) and a fixed sample of the large ones (weights). Moving or
renaming the directory keeps it; other weights change it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

INFORMATIONAL = ("model", "identity", "video_sha256", "written", "spmd_diff_version", "frames", "image")
"""Item attributes that describe a video without deciding how it looks (``model`` is the path the job named;
``frames``, on encoded videos, repeats ``num_frames`` for readers of the mp4; ``image`` is the path of an
image-to-video item's image: its content, ``image_sha256``, is what counts)."""

WHOLE_FILE_BYTES = 1 << 20
"""Files up to this size are hashed whole; larger ones by ``SAMPLE_COUNT`` samples of ``SAMPLE_BYTES``."""
SAMPLE_COUNT = 16
SAMPLE_BYTES = 4096
_SKIPPED_SUFFIXES = (".md", ".rst", ".png", ".jpg", ".jpeg", ".gif", ".webp", ".mp4", ".lock")
_SKIPPED_PREFIXES = ("license", "notice", "readme")
_IDENTITY_DIGITS = 16


def clean_text(text: str) -> str:
    """``text`` as HDF5 and JSON can hold it: NUL becomes the 4 characters ``\\x00``, a lone surrogate ``\\udXXX``.

    Used on everything the store writes that it did not validate itself (error messages, prompts of failure
    records, attributes), so one odd string can never make an item or the view unwritable.
    """
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def plain(value: Any) -> Any:
    """An attribute value (numpy scalar, bytes, array) as a plain JSON-able Python value."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return value.tolist()
    return value


def identity_fields(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """The attributes that decide the video: every attribute but ``INFORMATIONAL``; the negative prompt only
    matters (and only counts) when classifier-free guidance is on (``guidance_scale`` > 1)."""
    fields = {key: plain(value) for key, value in attrs.items() if key not in INFORMATIONAL}
    fields = {key: ("" if value is None else value) for key, value in fields.items()}
    if "guidance_scale" in fields and float(fields["guidance_scale"]) <= 1.0:
        fields.pop("negative_prompt", None)
    return fields


def identity_of(attrs: Mapping[str, Any]) -> str:
    """The item's identity digest (16 hex digits of a SHA-256 over its identity fields as canonical JSON)."""
    text = json.dumps(identity_fields(attrs), sort_keys=True, ensure_ascii=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("ascii")).hexdigest()[:_IDENTITY_DIGITS]


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 4] + "...'"


def describe_changes(old_attrs: Mapping[str, Any], new_attrs: Mapping[str, Any]) -> str:
    """``"seed: 5 there, 6 now; prompt: 'a cat' there, 'a dog' now"`` over the identity fields that differ."""
    old, new = identity_fields(old_attrs), identity_fields(new_attrs)
    parts = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            label = "model weights (fingerprint)" if key == "model_fingerprint" else key
            parts.append(f"{label}: {_short(old.get(key, 'unset'))} there, {_short(new.get(key, 'unset'))} now")
    return "; ".join(parts) or "settings differ"


def _model_files(root: Path) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            lower = name.lower()
            if not name.startswith(".") and not lower.endswith(_SKIPPED_SUFFIXES) \
                    and not lower.startswith(_SKIPPED_PREFIXES):
                files.append(Path(dirpath) / name)
    return files


def _hash_file(digest, path: Path, size: int) -> None:
    with open(path, "rb") as fh:
        if size <= WHOLE_FILE_BYTES:
            digest.update(fh.read())
            return
        step = (size - SAMPLE_BYTES) / (SAMPLE_COUNT - 1)
        for k in range(SAMPLE_COUNT):
            fh.seek(int(k * step))
            digest.update(fh.read(SAMPLE_BYTES))


@functools.lru_cache(maxsize=8)
def model_fingerprint(model_dir: str) -> str:
    """Fingerprint of a model directory (16 hex digits): every file's relative path and size, the bytes of files
    up to 1 MiB (configs, scheduler, tokenizer settings) and 16 samples of 4 KiB of each larger file (weights,
    big tokenizer files), at fixed offsets from its start to its end. Hidden files and documents (README,
    LICENSE, NOTICE, .md, images) are left out.

    Costs a directory walk plus at most 64 KiB read per large file; cached per process.
    """
    root = Path(model_dir)
    digest = hashlib.sha256()
    for path in _model_files(root):
        size = path.stat().st_size
        digest.update(f"{path.relative_to(root).as_posix()}\0{size}\0".encode("utf-8", "backslashreplace"))
        _hash_file(digest, path, size)
    return digest.hexdigest()[:_IDENTITY_DIGITS]
