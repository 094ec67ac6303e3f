"""OUT/job.json: which settings the videos in OUT were made with, and the check that keeps a job from mixing others in.

The *settings* of a video are the job-wide part of its identity (size, frames, steps, guidance, text length, dtype,
model fingerprint, compiled blocks, output form), named as in the job file (``video.height``, ``model.fingerprint``, ...), plus
the job's default negative prompt. A run records its job's settings (``[video]``'s defaults); an item of a mixed
job with settings of its own has other settings, and its video is counted under them. job.json holds::

    {"settings": {...}, "model": <model.path of the newest run>, "num_videos": <videos with these settings>,
     "other_settings": [{"settings": {...}, "num_videos": n}, ...], "job": <the newest run's whole job config>}

``settings`` are the newest run's; ``other_settings`` are older ones that some videos in OUT still have (after a
``--force`` run with new settings). The counts are refreshed whenever the view is rebuilt, and settings no video
has any more are dropped, so job.json never names settings none of the videos have without saying so (a count
of 0 for the newest run's settings means it has not finished a video yet).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

from spmd_diff.io.identity import identity_fields

SETTING_NAMES = {
    "height": "video.height", "width": "video.width", "num_frames": "video.num_frames",
    "num_inference_steps": "video.num_inference_steps", "guidance_scale": "video.guidance_scale",
    "max_sequence_length": "video.max_sequence_length", "dtype": "model.dtype",
    "model_fingerprint": "model.fingerprint", "dit_compile": "dit.compile", "tier": "speed.tier",
    "speed": "speed.resolved", "codec": "output.video", "compression": "output.compression",
    "quality": "output.quality", "preset": "output.preset", "fps": "output.fps",
}
"""Item attribute -> setting name (as in the job file) for the job-wide attributes."""
DEFAULT_NEGATIVE = "video.negative_prompt"


def settings_of(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """The job-wide settings of an item, from its attributes."""
    fields = identity_fields(attrs)
    return {SETTING_NAMES[key]: value for key, value in fields.items() if key in SETTING_NAMES}


def job_settings(attrs: Mapping[str, Any], default_negative: str) -> dict[str, Any]:
    """The settings a run records in job.json and compares with it: ``settings_of`` one of its items, and the
    job's default negative prompt when guidance is on (it decides the video of every item without its own)."""
    settings = settings_of(attrs)
    if float(attrs.get("guidance_scale", 0.0)) > 1.0:
        settings[DEFAULT_NEGATIVE] = default_negative
    return settings


def settings_digest(settings: Mapping[str, Any]) -> str:
    """16 hex digits naming a set of settings (the default negative prompt left out: items record their own)."""
    core = {k: v for k, v in settings.items() if k != DEFAULT_NEGATIVE}
    text = json.dumps(core, sort_keys=True, ensure_ascii=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("ascii")).hexdigest()[:16]


def read(job_file: Path) -> dict[str, Any] | None:
    """job.json as a dict in the current layout (an older layout converted); None if missing; {} if unreadable."""
    try:
        record = json.loads(job_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    if not isinstance(record, dict):
        return {}
    if "settings" not in record and isinstance(record.get("video"), dict):  # round 1: {"model", "dtype", "video"}
        settings = {f"video.{k}": v for k, v in record["video"].items()}
        if record.get("dtype") not in (None, "auto"):
            settings["model.dtype"] = record["dtype"]
        record = {"settings": settings, "model": record.get("model")}
    return record


def difference(old: Mapping[str, Any] | None, settings: Mapping[str, Any]) -> str | None:
    """How ``settings`` differ from the newest settings recorded in job.json (``old``), or None if they agree.

    Settings job.json does not record (an older layout) are not compared; an unreadable job.json differs.
    """
    if old is None:
        return None
    recorded = old.get("settings")
    if not isinstance(recorded, dict):
        return "its job.json is unreadable"
    diffs = [f"{key}: {recorded[key]!r} there, {settings[key]!r} now" for key in sorted(settings)
             if key in recorded and recorded[key] != settings[key]]
    if len(diffs) > 4:
        diffs = diffs[:4] + [f"{len(diffs) - 4} more"]
    return "; ".join(diffs) or None


def updated(old: Mapping[str, Any] | None, settings: Mapping[str, Any], model_path: str,
            job: Mapping[str, Any]) -> dict[str, Any]:
    """job.json after a run with ``settings`` started: they become the newest; the previous newest settings join
    ``other_settings`` (the next view rebuild drops them if no video has them)."""
    others = [dict(entry) for entry in (old or {}).get("other_settings", []) if isinstance(entry, dict)]
    previous = (old or {}).get("settings")
    if isinstance(previous, dict) and settings_digest(previous) != settings_digest(settings):
        others.insert(0, {"settings": previous, "num_videos": (old or {}).get("num_videos")})
    digest = settings_digest(settings)
    others = [e for e in others if not isinstance(e.get("settings"), dict) or settings_digest(e["settings"]) != digest]
    same = isinstance(previous, dict) and settings_digest(previous) == digest
    return {"settings": dict(settings), "model": model_path,
            "num_videos": (old or {}).get("num_videos", 0) if same else 0, "other_settings": others, "job": dict(job)}


def with_counts(record: Mapping[str, Any], counts: Mapping[str, int]) -> dict[str, Any]:
    """job.json with the number of videos per settings (``counts``: settings digest -> videos) filled in; older
    settings no video has are dropped, and settings job.json never recorded are listed by their digest."""
    record = dict(record)
    known = set()
    if isinstance(record.get("settings"), dict):
        digest = settings_digest(record["settings"])
        record["num_videos"] = counts.get(digest, 0)
        known.add(digest)
    others = []
    for entry in record.get("other_settings", []):
        if isinstance(entry, dict) and isinstance(entry.get("settings"), dict):
            digest = settings_digest(entry["settings"])
            if counts.get(digest, 0) and digest not in known:
                others.append({"settings": entry["settings"], "num_videos": counts[digest]})
                known.add(digest)
    for digest, count in sorted(counts.items()):
        if digest not in known and count:
            others.append({"settings": None, "settings_digest": digest, "num_videos": count,
                           "note": "settings not recorded in job.json (items' own settings of a mixed job, "
                                   "or an older run's)"})
    record["other_settings"] = others
    return record
