"""What is left to render: items counted per shape class. Pure Python.

A :class:`WorkClass` is everything about an item that changes how long its stages take (size, frames, steps,
classifier-free guidance). A :class:`Workload` counts pending items per class; the planner sizes roles for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

VAE_SCALE_TEMPORAL = 4
VAE_SCALE_SPATIAL = 8
PATCH = (1, 2, 2)
"""Wan2.1's VAE factors and transformer patch (frames, height, width): they turn pixels into tokens."""


@dataclass(frozen=True, order=True)
class WorkClass:
    """A shape class: items of one class cost the same in every stage."""

    height: int
    width: int
    num_frames: int
    num_steps: int
    cfg: bool
    """Classifier-free guidance on (two DiT forwards per step, two text embeddings)."""

    @property
    def key(self) -> str:
        """Printable and stable: ``"480x832x81/4s/cfg"``; the cost model and events use it."""
        return f"{self.height}x{self.width}x{self.num_frames}/{self.num_steps}s/{'cfg' if self.cfg else 'nocfg'}"

    @staticmethod
    def of_video(video) -> "WorkClass":
        """The class of items rendered with ``video`` (a ``config.VideoConfig`` or ``models.shapes.VideoSpec``:
        height, width, num_frames, num_inference_steps, guidance_scale; guidance above 1 is CFG)."""
        return WorkClass(video.height, video.width, video.num_frames, video.num_inference_steps,
                         video.guidance_scale > 1.0)

    @staticmethod
    def from_key(key: str) -> "WorkClass":
        size, steps, cfg = key.split("/")
        height, width, frames = (int(v) for v in size.split("x"))
        return WorkClass(height, width, frames, int(steps.rstrip("s")), cfg == "cfg")

    @property
    def num_pixels(self) -> int:
        """Output pixels of one video (frames x height x width)."""
        return self.num_frames * self.height * self.width

    @property
    def num_tokens(self) -> int:
        """Video tokens the DiT sees: latent frames x (height / 16) x (width / 16) for Wan2.1."""
        frames = (self.num_frames - 1) // VAE_SCALE_TEMPORAL + 1
        height = self.height // VAE_SCALE_SPATIAL // PATCH[1]
        width = self.width // VAE_SCALE_SPATIAL // PATCH[2]
        return frames // PATCH[0] * height * width

    @property
    def latent_bytes(self) -> int:
        """Float32 final latents handed from the DiT to the decoder (16 channels)."""
        frames = (self.num_frames - 1) // VAE_SCALE_TEMPORAL + 1
        return 16 * frames * (self.height // VAE_SCALE_SPATIAL) * (self.width // VAE_SCALE_SPATIAL) * 4


@dataclass(frozen=True)
class Workload:
    """Pending items per class, sorted by class (so equal workloads compare and print equal)."""

    counts: tuple[tuple[WorkClass, int], ...]

    def __post_init__(self) -> None:
        assert all(n >= 0 for _, n in self.counts), self.counts
        assert list(self.counts) == sorted(self.counts), "use Workload.of() to build one"

    @staticmethod
    def of(counts: Mapping[WorkClass, int] | Iterable[tuple[WorkClass, int]]) -> "Workload":
        merged: dict[WorkClass, int] = {}
        for work_class, num in (counts.items() if isinstance(counts, Mapping) else counts):
            merged[work_class] = merged.get(work_class, 0) + int(num)
        return Workload(tuple(sorted((c, n) for c, n in merged.items() if n > 0)))

    @staticmethod
    def uniform(work_class: WorkClass, num_items: int) -> "Workload":
        return Workload.of({work_class: num_items})

    @property
    def num_items(self) -> int:
        return sum(n for _, n in self.counts)

    @property
    def classes(self) -> tuple[WorkClass, ...]:
        return tuple(c for c, _ in self.counts)

    def __bool__(self) -> bool:
        return self.num_items > 0

    def to_dict(self) -> dict[str, int]:
        return {c.key: n for c, n in self.counts}

    def describe(self) -> str:
        return ", ".join(f"{n} x {c.key}" for c, n in self.counts) or "nothing"


def runs_of(classes: Sequence[WorkClass]) -> tuple[tuple[WorkClass, int], ...]:
    """Run-length encoding of the pending items' classes in rendering order."""
    runs: list[tuple[WorkClass, int]] = []
    for work_class in classes:
        if runs and runs[-1][0] == work_class:
            runs[-1] = (work_class, runs[-1][1] + 1)
        else:
            runs.append((work_class, 1))
    return tuple(runs)


def horizon(runs: Sequence[tuple[WorkClass, int]], batch_items: int) -> Workload:
    """The work a plan chosen now is expected to serve: the pending items, in order, while their classes are
    among those of the next batch (its first ``batch_items`` items).

    A job interleaving 4- and 50-step items plans for the whole mix; a job of a 4-step pass then a 50-step pass
    plans for the rest of the 4-step pass, and for the 50-step pass once its items reach the next batch.
    ``runs``: :func:`runs_of` the unfinished items -- every item not yet written, including those encoded or
    denoised already (their later stages are still to run) -- in rendering order.
    """
    if batch_items < 1:
        raise ValueError(f"batch_items must be >= 1, got {batch_items}")
    next_classes: set[WorkClass] = set()
    seen = 0
    for work_class, num in runs:
        if seen >= batch_items:
            break
        next_classes.add(work_class)
        seen += num
    counts: dict[WorkClass, int] = {}
    for work_class, num in runs:
        if work_class not in next_classes:
            break
        counts[work_class] = counts.get(work_class, 0) + num
    return Workload.of(counts)
