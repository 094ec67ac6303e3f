"""What every rank decides before the first channel exists (:class:`Setup`): the job, its items, every distinct
item spec with its checked shapes, the first batch's role plan, the dtype and the topology. Identical on every
rank; built by :func:`build_setup` after the model's configs are read (no weights)."""

from __future__ import annotations

from dataclasses import dataclass

from spmd_diff.config import JobConfig
from spmd_diff.errors import UserError
from spmd_diff.io.inputs import Item
from spmd_diff.models.shapes import VideoSpec, WanShapes, read_shapes
from spmd_diff.plan.roles import RolePlan
from spmd_diff.plan.topology import Topology
from spmd_diff.runtime.startup import JobInputs, dtype_name


@dataclass(frozen=True)
class Setup:
    """Everything decided before the first channel exists; identical on every rank."""

    job: JobConfig
    model_dir: str
    items: tuple[Item, ...]
    shapes: dict[VideoSpec, WanShapes]
    """Every distinct item spec of the job (the job's ``[video]`` defaults included) -> its checked shapes."""
    spec: VideoSpec
    """The job's ``[video]`` defaults (an item that gives no settings of its own is rendered with it)."""
    plan: RolePlan
    dtype: str
    topology: Topology
    """What the plan was made for: the world's topology, or the virtual one of ``world.ranks_per_node``."""

    def spec_of(self, item: Item) -> VideoSpec:
        """The item's own :class:`VideoSpec`: the job's defaults with the item's settings in their place."""
        return item_spec(self.job, item)


def item_spec(job: JobConfig, item: Item | None) -> VideoSpec:
    """``VideoSpec`` of ``item`` (``VideoConfig.for_item``); of the job's defaults for ``None``."""
    v = job.video if item is None else job.video.for_item(item)
    return VideoSpec(v.height, v.width, v.num_frames, v.num_inference_steps, v.guidance_scale, v.max_sequence_length)


def build_setup(inputs: JobInputs, plan: RolePlan, device: str) -> Setup:
    """The model-dependent half of the setup: the job's video spec and every item's own checked against the
    model's configs (an item's error names its prompts-file line); ``plan``: the plan of the first batch."""
    spec = item_spec(inputs.job, None)
    shapes = {spec: read_shapes(inputs.model_dir, spec)}
    for item in inputs.items:
        item_own = item_spec(inputs.job, item)
        if item_own not in shapes:
            try:
                shapes[item_own] = read_shapes(inputs.model_dir, item_own)
            except UserError as exc:
                raise UserError(f"{item.where or f'item {item.id!r}'}: {exc} (the item's own settings)") from None
    return Setup(inputs.job, inputs.model_dir, inputs.items, shapes, spec, plan,
                 dtype_name(inputs.job, device.startswith("cuda")), inputs.topology)
