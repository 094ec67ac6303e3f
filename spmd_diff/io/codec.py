"""Video codecs: uint8 frames to mp4 bytes and back, in-process through PyAV (FFmpeg's libraries with libx264 and
libx265 in its wheel). The one home for encoding: the store's encoded output and ``spmd-diff export`` use it.

- :func:`encode_mp4` ``uint8 [F, H, W, 3]`` -> the bytes of an mp4 file (H.264 or HEVC, yuv420p so any player
  opens it; area-averaged chroma, which keeps colour edges ~0.2 dB better than FFmpeg's default
  bilinear), constant rate factor ``quality``, x264/x265 ``preset``, ``fps`` frames per second; the prompt and
  settings in its metadata). Odd heights or widths are padded by one edge pixel (yuv420p needs even sizes); the
  reader crops them back.
- :func:`decode_mp4` mp4 bytes -> ``uint8 [F, H, W, 3]``.
- :func:`missing_codecs` / :data:`CODECS`: which of our codec names the installed FFmpeg can encode.
- :func:`synthetic_clip`: a natural-looking test clip (moving shapes over moving gradients) for measuring codecs:
  the demo model's random weights make noise, which no codec compresses.
"""

from __future__ import annotations

import io
import json
from typing import Any, Mapping

import numpy as np

CODECS = {"h264": "libx264", "hevc": "libx265"}
"""``output.video`` name -> the FFmpeg encoder that makes it."""
PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow")
"""x264 and x265 presets (both take the same names): faster = bigger files at the same quality."""
DEFAULT_QUALITY = 17
"""Default constant rate factor (``output.quality``): keeps a natural-looking clip above 40 dB PSNR."""
DEFAULT_PRESET = "medium"
DEFAULT_FPS = 16
"""Wan2.1 renders 16 frames per second."""
MAX_QUALITY = 51
"""The largest constant rate factor x264 and x265 take (0 = lossless for x264, best for x265)."""


def _av():
    try:
        import av
    except ImportError as exc:  # a declared dependency; this only happens in a broken environment
        raise RuntimeError("encoded output needs PyAV: pip install 'av>=14'") from exc
    av.logging.set_level(av.logging.ERROR)
    return av


def missing_codecs(names) -> dict[str, str]:
    """``{name: why}`` for each codec name in ``names`` the installed FFmpeg (PyAV) cannot encode."""
    missing = {}
    for name in names:
        try:
            av = _av()
            av.codec.Codec(CODECS[name], "w")
        except Exception as exc:  # noqa: BLE001 - no PyAV, an unknown name, or av's own error types
            missing[name] = f"{CODECS.get(name, name)} not in the installed FFmpeg ({type(exc).__name__}: {exc})"
    return missing


def _even(frames_FHWC: np.ndarray) -> np.ndarray:
    pad_h, pad_w = frames_FHWC.shape[1] % 2, frames_FHWC.shape[2] % 2
    if pad_h or pad_w:
        frames_FHWC = np.pad(frames_FHWC, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    return frames_FHWC


def encode_mp4(frames_FHWC: np.ndarray, codec: str, quality: int, preset: str, fps: int,
               metadata: Mapping[str, Any] | None = None, threads: int = 0) -> bytes:
    """The bytes of an mp4 file of ``frames_FHWC`` (uint8 [F, H, W, 3]) encoded with ``codec`` ("h264" or "hevc")
    at constant rate factor ``quality``. ``metadata``: its ``prompt`` becomes the file's title and comment, the
    whole mapping (JSON) its description. ``threads``: encoder threads (0 = FFmpeg's choice: about 1.5 per core).

    Raises OSError only for I/O (none here: the file is built in memory); ValueError for bad arguments.
    """
    av = _av()
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; choices: {', '.join(CODECS)}")
    frames = _even(np.ascontiguousarray(frames_FHWC, dtype=np.uint8))
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        if metadata:
            prompt = str(metadata.get("prompt", ""))
            container.metadata["title"] = prompt
            container.metadata["comment"] = prompt
            container.metadata["description"] = json.dumps(dict(metadata), ensure_ascii=False, default=str,
                                                           sort_keys=True)
        options = {"crf": str(int(quality)), "preset": preset}
        if codec == "hevc":
            options["x265-params"] = "log-level=error"
        stream = container.add_stream(CODECS[codec], rate=int(fps), options=options)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.codec_context.thread_count = int(threads)
        if codec == "hevc":
            stream.codec_context.codec_tag = "hvc1"  # plays in QuickTime/Safari too
        for index, frame in enumerate(frames):
            picture = av.VideoFrame.from_ndarray(frame, format="rgb24").reformat(format="yuv420p", interpolation="AREA")
            picture.pts = index  # in 1/fps: left unset, timestamps (and so the bitstream) are not reproducible
            for packet in stream.encode(picture):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def decode_mp4(data: bytes | memoryview | np.ndarray, height: int | None = None,
               width: int | None = None) -> np.ndarray:
    """uint8 [F, H, W, 3] of an mp4 file's first video stream; cropped to ``height`` x ``width`` when given
    (the encoder padded odd sizes). ValueError if the bytes are not a decodable video."""
    av = _av()
    raw = data.tobytes() if isinstance(data, np.ndarray) else bytes(data)
    try:
        with av.open(io.BytesIO(raw), mode="r") as container:
            frames = [frame.to_ndarray(format="rgb24", interpolation="AREA") for frame in container.decode(video=0)]
    except av.error.FFmpegError as exc:
        raise ValueError(f"not a decodable video ({exc})") from None
    if not frames:
        raise ValueError("the video holds no frames")
    video = np.stack(frames)
    return np.ascontiguousarray(video[:, :height, :width]) if height or width else video


def container_metadata(data: bytes | memoryview) -> dict[str, str]:
    """The metadata (title, comment, description, ...) of an mp4 file."""
    av = _av()
    with av.open(io.BytesIO(bytes(data)), mode="r") as container:
        return dict(container.metadata)


def psnr(reference: np.ndarray, test: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of two uint8 arrays of one shape (inf if equal)."""
    mse = np.mean((reference.astype(np.float64) - test.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))


def synthetic_clip(num_frames: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """uint8 [F, H, W, 3]: smooth colour gradients that drift, with a few soft-edged discs and rectangles
    moving across them and a little luminance grain (fixed, like a sensor's pattern), deterministic in ``seed``: a stand-in for natural video
    when measuring codecs."""
    rng = np.random.default_rng(seed)
    y = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None]
    x = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :]
    shapes = [(rng.uniform(0.1, 0.9, 2), rng.uniform(-0.01, 0.01, 2), rng.uniform(0.06, 0.2),
               rng.uniform(0.1, 0.95, 3).astype(np.float32), bool(rng.integers(2))) for _ in range(6)]
    grain = rng.normal(0.0, 1.5, (height, width, 1)).astype(np.float32)  # luminance grain
    video = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    img = np.empty((height, width, 3), dtype=np.float32)
    for f in range(num_frames):
        t = f / max(1, num_frames - 1)
        img[..., 0] = 0.5 + 0.4 * np.sin(np.float32(2.0 * np.pi) * (x * 0.8 + y * 0.3 + np.float32(0.3 * t)))
        img[..., 1] = 0.45 + 0.35 * np.cos(np.float32(2.0 * np.pi) * (y * 0.9 - np.float32(0.25 * t)))
        img[..., 2] = 0.3 + 0.5 * x * (1.0 - y) + np.float32(0.1 * t)
        for (cy, cx), (vy, vx), size, colour, disc in shapes:
            py, px = cy + vy * f, cx + vx * f
            # only the shape's bounding box is touched (alpha is 0 outside it)
            y0, y1 = np.searchsorted(y[:, 0], [py - size * width / height, py + size * width / height])
            x0, x1 = np.searchsorted(x[0], [px - size, px + size])
            if y0 >= y1 or x0 >= x1:
                continue
            yy, xx = (y[y0:y1] - py) * (height / width), x[:, x0:x1] - px
            if disc:
                dist = np.sqrt(yy * yy + xx * xx) / size
            else:
                dist = np.maximum(np.abs(yy), np.abs(xx)) / size
            alpha = np.clip((1.0 - dist) * 8.0, 0.0, 1.0)[..., None]
            box = img[y0:y1, x0:x1]
            box += alpha * (colour - box)
        frame = img * 255.0
        frame += grain
        np.rint(frame, out=frame)
        np.clip(frame, 0, 255, out=frame)
        video[f] = frame
    return video
