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


# -- the loop, in process, with stand-in stages: order, failures, stop -------------------------------------------


class _Stages:
    """Stand-in time-shared stages: records calls; item ``bad`` fails to encode; a stop is requested after the
    encode of item ``stop_after``."""

    device = torch.device("cpu")
    time_shared = True

    def __init__(self, stop=None, stop_after: str = "") -> None:
        self.calls: list[tuple[str, str]] = []
        self.resident, self.stop, self.stop_after = None, stop, stop_after

    def use(self, stage: str):
        if stage == self.resident:
            return None
        self.calls.append(("move", stage))
        self.resident = stage
        return {"stage": stage, "components": [stage], "bytes": 1, "seconds": 0.0, "dropped": None}

    def encode(self, prompt, negative, spec):
        assert self.resident == "encode"
        self.calls.append(("encode", prompt))
        if prompt == "bad":
            raise ValueError("cannot encode")
        if prompt == self.stop_after:
            self.stop.request("SIGTERM")
        return {"prompt_embeds": torch.full((1, 2), float(len(prompt)))}

    def denoise(self, embeds, seed, spec):
        assert self.resident == "denoise"
        self.calls.append(("denoise", str(seed)))
        return embeds["prompt_embeds"] + seed

    def decode_uint8(self, latents):
        assert self.resident == "decode"
        self.calls.append(("decode", str(int(latents[0, 0]))))
        return torch.zeros((1, 2, 2, 3), dtype=torch.uint8) + int(latents[0, 0]) % 256


class _Store:
    def __init__(self) -> None:
        self.written, self.failed = {}, {}

    def write_item(self, item_id, video, attrs):
        assert item_id not in self.written
        self.written[item_id] = video

    def write_failure(self, item_id, stage, error, prompt):
        self.failed[item_id] = stage


class _Events:
    def __init__(self) -> None:
        self.records = []

    def emit(self, ev, **fields):
        self.records.append({"ev": ev, **fields})


def _run_loop(prompts: list[str], stage_batch: int, stop_after: str = ""):
    from spmd_diff.io.inputs import Item
    from spmd_diff.runtime.loops import RankContext
    from spmd_diff.runtime.signals import StopFlag
    from spmd_diff.runtime.time_shared import time_shared_loop

    items = [Item(i, f"id{i}", p, None, 10 * i) for i, p in enumerate(prompts)]
    stop = StopFlag()
    stages, store, events = _Stages(stop, stop_after), _Store(), _Events()
    ctx = RankContext(0, {it.index: it for it in items}, stages, lambda item: SPEC, "", store, events, stop, 60.0,
                      lambda item: {}, write_queue=1, overlap_decode=True)
    time_shared_loop(ctx, _Queue(len(items)), items, stage_batch, 1)
    return stages.calls, store, events.records


def test_the_loop_runs_each_stage_for_the_whole_cycle_and_records_failures() -> None:
    calls, store, records = _run_loop(["a", "bad", "ccc", "dd", "e"], 2)
    assert calls == [("move", "encode"), ("encode", "a"), ("encode", "bad"), ("move", "denoise"), ("denoise", "0"),
                     ("move", "decode"), ("decode", "1"),
                     ("move", "encode"), ("encode", "ccc"), ("encode", "dd"), ("move", "denoise"), ("denoise", "20"),
                     ("denoise", "30"), ("move", "decode"), ("decode", "23"), ("decode", "32"),
                     ("move", "encode"), ("encode", "e"), ("move", "denoise"), ("denoise", "40"), ("move", "decode"),
                     ("decode", "41")]
    assert sorted(store.written) == ["id0", "id2", "id3", "id4"] and store.failed == {"id1": "encode"}
    assert int(store.written["id3"][0, 0, 0, 0]) == 32
    moves = [r for r in records if r["ev"] == "move"]
    assert [m["stage"] for m in moves] == ["encode", "denoise", "decode"] * 3
    spans = [(r["stage"], r["item"]) for r in records if r["ev"] == "stage" and r["stage"] != "write"]
    assert spans[:3] == [("encode", "id0"), ("encode", "id1"), ("denoise", "id0")]
    assert [r["item"] for r in records if r["ev"] == "failure"] == ["id1"]


def test_a_stop_finishes_the_item_in_hand_and_leaves_the_rest_pending() -> None:
    calls, store, _ = _run_loop(["a", "bb", "ccc", "dd"], 2, stop_after="ccc")
    assert ("encode", "dd") not in calls and not any(stage == "denoise" and seed == "20" for stage, seed in calls)
    assert sorted(store.written) == ["id0", "id1"] and not store.failed  # id2 encoded, then nothing: pending


class _Held:
    def __init__(self, stages, time_shared):
        self.stages, self.time_shared, self.used, self.freed = frozenset(stages), time_shared, [], False

    def use(self, stage):
        self.used.append(stage)

    def free(self):
        self.freed = True


@pytest.mark.parametrize("held_shared, held, plan_shared, needed, kept, used", [
    (True, ("encode", "denoise", "decode"), True, ("encode", "denoise", "decode"), True, []),
    (False, ("encode", "denoise", "decode"), True, ("encode", "denoise", "decode"), True, []),  # they fitted together
    (True, ("encode", "denoise", "decode"), False, ("denoise",), True, ["denoise"]),
    (True, ("encode", "denoise", "decode"), False, ("denoise", "decode"), False, []),  # two at once: load anew
    (False, ("denoise",), True, ("encode", "denoise", "decode"), False, []),
])
def test_replans_keep_or_reload_components(monkeypatch, held_shared, held, plan_shared, needed, kept, used) -> None:
    from types import SimpleNamespace

    from spmd_diff.runtime import engine

    loaded = object()
    monkeypatch.setattr(engine, "_load_stages", lambda world, setup, plan: loaded)
    stages = _Held(held, held_shared)
    plan = SimpleNamespace(time_shared=plan_shared, stages_of=lambda rank: needed)
    got = engine._stages_for_plan(SimpleNamespace(rank=0), None, stages, plan)
    assert (got is stages) == kept and stages.freed == (not kept) and stages.used == used
