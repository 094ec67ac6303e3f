"""Conditioning images of image-to-video items: their content hash (part of an item's identity) and loading them.

An image is read once, as bytes: the SHA-256 of those bytes is checked against the one the item's identity was
made from (so the video is of the image its identity names, even if the file changed during the run), then the
same bytes are decoded. What diffusers' ``load_image`` does follows (EXIF orientation applied, converted to RGB);
what it would accept silently but the job cannot mean is refused: another format than PNG, JPEG or WebP, an
animated file, a CMYK (or other non-RGB colour model) file, a truncated file, an image smaller than
``MIN_SIDE`` pixels on a side. Every refusal is an :class:`ImageError` naming the file: the item fails, the job
goes on. No torch here.
"""

from __future__ import annotations

import functools
import hashlib
import io
from pathlib import Path

FORMATS = ("PNG", "JPEG", "WEBP")
"""Pillow format names of the accepted files."""
MIN_SIDE = 8
"""Smallest accepted width and height (pixels): a 1x1 or 2x2 'image' is a broken export, not a first frame."""
MODES = ("RGB", "RGBA", "L", "LA", "P", "I;16", "1")
"""Pillow modes converted to RGB as diffusers' ``load_image`` does; others (CMYK, YCbCr, LAB, float) are refused."""


class ImageError(ValueError):
    """An item's image cannot be used; the message names the file and why."""


@functools.lru_cache(maxsize=65536)
def image_sha256(path: str) -> str:
    """SHA-256 (hex) of the file's bytes, or "" when it cannot be read (the item then fails when it is encoded).
    Cached per process: an item's identity is computed several times."""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return ""


def load_image(path: str, expected_sha256: str | None = None):
    """The image at ``path`` as an RGB ``PIL.Image.Image``, fully decoded; :class:`ImageError` if it is unusable
    or (``expected_sha256`` given) its bytes are not the ones the item's identity was made from."""
    import PIL.Image
    import PIL.ImageOps

    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise ImageError(f"image {path} does not exist") from None
    except IsADirectoryError:
        raise ImageError(f"image {path} is a directory") from None
    except OSError as exc:
        raise ImageError(f"cannot read image {path}: {exc.strerror or exc}") from None
    if not data:
        raise ImageError(f"image {path} is an empty file (0 bytes)")
    if expected_sha256 is not None and hashlib.sha256(data).hexdigest() != expected_sha256:
        raise ImageError(f"image {path} changed during the run (its SHA-256 is not the one this item's identity "
                         "was made from); rerun to render it from the new file")
    try:
        image = PIL.Image.open(io.BytesIO(data))
    except PIL.Image.DecompressionBombError as exc:
        raise ImageError(f"image {path} is too large: {exc}") from None
    except (PIL.UnidentifiedImageError, OSError, ValueError):
        raise ImageError(f"{path} is not an image Pillow can read (PNG, JPEG or WebP expected)") from None
    if image.format not in FORMATS:
        raise ImageError(f"image {path} is {image.format}; only {', '.join(FORMATS)} are accepted")
    if getattr(image, "is_animated", False) or getattr(image, "n_frames", 1) > 1:
        raise ImageError(f"image {path} is animated ({getattr(image, 'n_frames', '?')} frames); give one still "
                         "frame")
    if image.mode not in MODES:
        raise ImageError(f"image {path} is in colour mode {image.mode}; convert it to RGB (e.g. a CMYK JPEG "
                         "exported for print)")
    width, height = image.size
    if width < MIN_SIDE or height < MIN_SIDE:
        raise ImageError(f"image {path} is {width}x{height} pixels; at least {MIN_SIDE}x{MIN_SIDE} is needed")
    try:
        image.load()
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageError(f"image {path} is truncated or corrupt: {exc}") from None
    image = PIL.ImageOps.exif_transpose(image)
    return image.convert("RGB")
