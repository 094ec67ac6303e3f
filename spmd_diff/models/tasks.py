"""Which task a model directory does, from its ``model_index.json`` alone (no torch: startup reads it).

``WanPipeline`` is text-to-video ("t2v"); ``WanImageToVideoPipeline`` is image-to-video ("i2v"): every item of an
i2v job needs an image and no item of a t2v job may have one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from spmd_diff.errors import UserError

PIPELINE_TASKS = {"WanPipeline": "t2v", "WanImageToVideoPipeline": "i2v"}
"""diffusers pipeline class (``model_index.json``'s ``_class_name``) -> task."""


def model_task(model_dir: str | Path) -> str:
    """"t2v" or "i2v" for the diffusers directory ``model_dir``; UserError for another pipeline or a bad index."""
    path = Path(model_dir) / "model_index.json"
    try:
        index = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"model directory {model_dir} is not a diffusers pipeline directory "
                        f"({path} not found)") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None
    name = index.get("_class_name") if isinstance(index, dict) else None
    if name not in PIPELINE_TASKS:
        raise UserError(f"model directory {model_dir} holds a {name!r} pipeline; supported: "
                        f"{', '.join(PIPELINE_TASKS)}")
    return PIPELINE_TASKS[name]


def check_items_fit_task(task: str, items: Iterable, model_path: str) -> None:
    """UserError naming the first offending items when ``items`` (with an ``image`` attribute: a path or None)
    do not fit ``task``: an image given to a text-to-video model, or none to an image-to-video model."""
    items = list(items)
    if task == "t2v":
        wrong = [item.id for item in items if item.image is not None]
        problem = "give an image, but the model is text-to-video (WanPipeline)"
    else:
        wrong = [item.id for item in items if item.image is None]
        problem = "give no image, but the model is image-to-video (WanImageToVideoPipeline): every item needs one"
    if wrong:
        shown = ", ".join(repr(i) for i in wrong[:5]) + (f" and {len(wrong) - 5} more" if len(wrong) > 5 else "")
        raise UserError(f"{len(wrong)} item(s) ({shown}) {problem}; model.path = {model_path!r}")
