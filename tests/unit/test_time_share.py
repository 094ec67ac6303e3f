"""Time-shared ranks: components that move between host and device (one stage's at a time, weights unchanged),
the static plan of ``roles.time_share = true`` and the combinations it refuses, and a cycle's share of the queue."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
import torch

from spmd_diff.config import build_job
from spmd_diff.errors import UserError
from spmd_diff.models.shapes import VideoSpec
from spmd_diff.models.wan import WanStages
from spmd_diff.plan.for_job import static_plan
from spmd_diff.plan.topology import Topology
from spmd_diff.runtime.time_shared import take_cycle

pytestmark = pytest.mark.usefixtures("one_thread")

SPEC = VideoSpec(height=64, width=64, num_frames=9, num_inference_steps=2, guidance_scale=5.0)
STAGE_COMPONENTS = {"encode": ("text_encoder",), "denoise": ("transformer",), "decode": ("vae",)}


def _tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers()]


def _on_device_copy(stages: WanStages, attribute: str) -> bool:
    """Whether the component's tensors are device copies (not the host copies it was parked in)."""
    stage = next(s for s, names in STAGE_COMPONENTS.items() if attribute in names)
    hosts = {t.data_ptr() for t in stages._host_copies[stage][attribute].host_tensors()}
    ptrs = {t.data_ptr() for t in _tensors(getattr(stages, attribute))}
    assert not (ptrs & hosts) or ptrs == hosts
    return not (ptrs & hosts)


def test_one_stage_on_the_device_at_a_time_and_weights_unchanged(demo_model_dir: pathlib.Path) -> None:
    plain = WanStages(demo_model_dir, {"encode", "denoise", "decode"})
    shared = WanStages(demo_model_dir, {"encode", "denoise", "decode"}, time_shared=True)
    try:
        hosts_before = {a: [t.clone() for t in shared._host_copies[s][a].host_tensors()]
                        for s, names in STAGE_COMPONENTS.items() for a in names}
        assert shared.resident_stage is None
        assert not any(_on_device_copy(shared, a) for names in STAGE_COMPONENTS.values() for a in names)
        with pytest.raises(RuntimeError, match="call use"):
            shared.encode("x", None, SPEC)
        for cycle in range(3):
            for stage in ("encode", "denoise", "decode"):
                moved = shared.use(stage)
                assert moved["stage"] == stage and moved["components"] == list(STAGE_COMPONENTS[stage])
                assert moved["bytes"] == sum(t.numel() * t.element_size()
                                             for t in _tensors(getattr(shared, STAGE_COMPONENTS[stage][0])))
                assert moved["dropped"] == (None if cycle == 0 and stage == "encode" else
                                            {"encode": "decode", "denoise": "encode", "decode": "denoise"}[stage])
                assert shared.use(stage) is None  # already there
                for other, names in STAGE_COMPONENTS.items():
                    assert all(_on_device_copy(shared, a) == (other == stage) for a in names), (stage, other)
                    assert shared.on_device(other) == (other == stage)
        for stage, names in STAGE_COMPONENTS.items():
            shared.use(stage)
            for attribute in names:
                ours, theirs = getattr(shared, attribute).state_dict(), getattr(plain, attribute).state_dict()
                assert ours.keys() == theirs.keys()
                assert all(torch.equal(ours[k], theirs[k]) for k in ours), attribute
                hosts = shared._host_copies[stage][attribute].host_tensors()
                assert all(torch.equal(a, b) for a, b in zip(hosts, hosts_before[attribute]))
        # the same video, stage by stage
        shared.use("encode")
        embeds = shared.encode("A cat on a wall.", "blurry", SPEC)
        shared.use("denoise")
        latents = shared.denoise(embeds, 7, SPEC)
        with pytest.raises(RuntimeError, match="'decode' runs while 'denoise'"):
            shared.decode_uint8(latents)
        shared.use("decode")
        video = shared.decode_uint8(latents).numpy()
        expected = plain.decode_uint8(plain.denoise(plain.encode("A cat on a wall.", "blurry", SPEC), 7, SPEC))
        assert np.array_equal(video, expected.numpy()) and video.std() > 1.0
    finally:
        plain.free()
        shared.free()


def _job(*overrides: str):
    return build_job({"model": {"path": "demo"}, "roles": {"policy": "static"}}, "job.toml", list(overrides))


def test_static_time_shared_plan() -> None:
    job = _job("roles.time_share=true", "roles.stage_batch=3", "roles.encoders=0", "roles.decoders=0")
    plan = static_plan(job, Topology.uniform(2, 2, 2))
    assert plan.time_shared and plan.stage_batch == 3 and plan.dit_groups == ((0,), (1,), (2,), (3,))
    assert all(plan.stages_of(r) == ("encode", "denoise", "decode") for r in range(4))
    assert plan.role_counts() == {"time-shared": 4} and not plan.channel_edges(None, None)
    assert plan.to_dict()["time_shared"] is True and plan.to_dict()["stage_batch"] == 3
    assert "every rank time-shared" in plan.describe() and "3 item(s) per cycle" in plan.describe()
    assert not static_plan(_job("roles.encoders=0", "roles.decoders=0"), Topology.uniform(1, 2)).time_shared
    with pytest.raises(UserError, match="has 4 ranks but 2 GPUs"):
        static_plan(job, Topology.uniform(1, 4, 2))


@pytest.mark.parametrize("overrides, named", [
    ((), "roles.encoders = 1, roles.decoders = 1"),
    (("roles.encoders=0", "roles.decoders=0", "dit.sp_degree=2"), "dit.sp_degree = 2"),
    (("roles.encoders=0", "roles.decoders=0", "dit.per_item_degree=true"), "dit.per_item_degree = true"),
    (("roles.encoders=0", "roles.decoders=2", "roles.group_decode=true"), "roles.group_decode = true"),
])
def test_time_share_refuses_what_it_cannot_run(overrides, named) -> None:
    with pytest.raises(UserError, match="roles.time_share = true") as error:
        _job("roles.time_share=true", *overrides)
    assert named in str(error.value)


class _Queue:
    def __init__(self, num_items: int) -> None:
        self.next, self.num_items = 0, num_items

    def take(self):
        if self.next >= self.num_items:
            return None
        self.next += 1
        return self.next - 1


def test_a_cycle_takes_its_share_of_what_remains() -> None:
    pending = list(range(20))
    queue = _Queue(20)
    sizes = []
    while cycle := take_cycle(queue, pending, 8, 3):
        sizes.append(len(cycle))
    assert sizes == [7, 5, 3, 2, 1, 1, 1]  # ceil(20/3), ceil(13/3), ... never more than stage_batch
    queue = _Queue(40)
    assert [len(take_cycle(queue, list(range(40)), 4, 2)) for _ in range(3)] == [4, 4, 4]
