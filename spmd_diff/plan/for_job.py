"""What the auto planner needs for one job: the model's sizes, the work class of its items, the memory and cost
models, the planner's settings. One home for ``spmd-diff plan`` and the engine. Pure Python (configs are dicts)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from spmd_diff.config import JobConfig
from spmd_diff.plan.cost_model import AnalyticPrior, CostModel
from spmd_diff.plan.memory import MemoryModel, capacity_bytes
from spmd_diff.plan.model_sizes import ModelSizes
from spmd_diff.plan.planner import PlanInputs, PlannerSettings, candidate_degrees
from spmd_diff.plan.roles import RolePlan, plan_roles, plan_time_shared, with_group_options
from spmd_diff.plan.topology import Topology
from spmd_diff.plan.workload import WorkClass, Workload


@dataclass(frozen=True)
class JobPlanning:
    """The planner's view of a job on an allocation."""

    inputs: PlanInputs
    work_class: WorkClass
    cost: CostModel
    sizes: ModelSizes

    def workload(self, num_items: int) -> Workload:
        return Workload.uniform(self.work_class, max(1, num_items))


def job_planning(job: JobConfig, topology: Topology, configs: tuple[Mapping[str, Any], Mapping[str, Any],
                 Mapping[str, Any]], on_gpu: bool, *, separate_aux: bool = False,
                 device_bytes: int | None = None, image_encoder: Mapping[str, Any] | None = None) -> JobPlanning:
    """``configs``: the transformer's, text encoder's and VAE's ``config.json`` contents; ``image_encoder``: for an
    image-to-video model its CLIP config ({} without one; :func:`read_image_encoder_config`), else None. ``separate_aux``: only the
    plan shapes the engine's role loops run (see :class:`PlannerSettings`). ``device_bytes``: the GPU's memory
    as measured (None: an H200)."""
    dtype = job.model.dtype if job.model.dtype != "auto" else ("bfloat16" if on_gpu else "float32")
    v = job.video
    sizes = ModelSizes.from_configs(*configs, dtype=dtype, text_len=v.max_sequence_length, name=job.model.path,
                                    image_encoder=image_encoder)
    work_class = WorkClass.of_video(v)
    cost = CostModel(AnalyticPrior(sizes, "cuda" if on_gpu else "cpu"))
    degrees = candidate_degrees(job.dit.sp_degree, len(topology.ranks_on_node(0)), topology.num_ranks)
    if separate_aux:
        degrees = (job.dit.sp_degree,)  # the engine keeps one SP degree for the job (per-item degrees: later)
    cfg_parallel, group_decode = group_options(job)
    settings = PlannerSettings(sp_degrees=degrees, sp_layout=job.dit.sp_layout, colocate=job.roles.colocate,
                               separate_aux=separate_aux, cfg_parallel=cfg_parallel, group_decode=group_decode,
                               time_share=job.roles.time_share, stage_batch=job.roles.stage_batch)
    inputs = PlanInputs(topology, MemoryModel.for_model(sizes), capacity_bytes(job.world.gpu_memory_gib,
                                                                                 device_bytes), settings)
    return JobPlanning(inputs, work_class, cost, sizes)


def group_options(job: JobConfig) -> tuple[bool | str, bool | str]:
    """``(cfg_parallel, group_decode)`` requests of the job's DiT groups: ``dit.cfg_parallel`` (False without
    guidance: there is one branch) and ``dit.group_decode``, for :func:`spmd_diff.plan.roles.with_group_options`."""
    return (job.dit.cfg_parallel if job.video.guidance_scale > 1.0 else False), job.dit.group_decode


def static_plan(job: JobConfig, topology: Topology) -> RolePlan:
    """The role plan of ``roles.policy = "static"``: the counts of ``[roles]`` and ``[dit]``, group options
    resolved (true where they cannot apply is a UserError); with ``roles.time_share = true`` every rank
    time-shared (the combinations it excludes are refused by ``config.validate_job``)."""
    if job.roles.time_share is True:
        return plan_time_shared(topology, job.roles.stage_batch)
    plan = plan_roles(topology, job.roles.encoders, job.roles.decoders, job.dit.sp_degree, job.dit.sp_layout)
    return with_group_options(plan, *group_options(job), strict=True)


def read_model_configs(model_dir: str | Path) -> tuple[dict, dict, dict]:
    """The transformer's, text encoder's and VAE's ``config.json`` of a diffusers directory ({} where missing)."""

    def read(component: str) -> dict:
        path = Path(model_dir) / component / "config.json"
        try:
            return json.loads(path.read_text()) if path.is_file() else {}
        except (OSError, ValueError):
            return {}  # the model's own loading reports a broken config, naming the file

    return read("transformer"), read("text_encoder"), read("vae")


def read_image_encoder_config(model_dir: str | Path) -> dict | None:
    """None for a text-to-video directory; for an image-to-video one (``WanImageToVideoPipeline``) its image
    encoder's ``config.json`` ({} if it has none, or it cannot be read)."""
    try:
        index = json.loads((Path(model_dir) / "model_index.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(index, dict) or index.get("_class_name") != "WanImageToVideoPipeline":
        return None
    try:
        config = json.loads((Path(model_dir) / "image_encoder" / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return config.get("vision_config", config) if isinstance(config, dict) else {}
