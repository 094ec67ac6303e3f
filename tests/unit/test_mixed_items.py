"""Per-item video settings: parsing and checking them (file and line), what a rerun does when they change."""

from __future__ import annotations

import json

import numpy as np
import pytest

from spmd_diff.config import PER_ITEM_VIDEO_KEYS, build_job
from spmd_diff.errors import UserError
from spmd_diff.io.inputs import parse_prompts
from spmd_diff.io.runplan import plan_run
from spmd_diff.io.store import VideoStore
from spmd_diff.runtime.startup import item_attrs, job_settings, planning_job

FIRST = '{"id": "a", "prompt": "a cat"}\n'


def _items(*lines: str):
    return parse_prompts(FIRST + "".join(line + "\n" for line in lines), "dir/p.jsonl", 0)


def test_an_item_overrides_the_job_defaults_it_names_and_keeps_the_others():
    job = build_job({"video": {"height": 64, "width": 64, "num_frames": 9}}, "job.toml")
    a, b = _items('{"id": "b", "prompt": "x", "height": 32, "num_frames": 5, "guidance_scale": 1}')
    assert job.video.for_item(a) == job.video
    own = job.video.for_item(b)
    assert (own.height, own.width, own.num_frames, own.num_inference_steps) == (32, 64, 5, 4)
    assert own.guidance_scale == 1.0 and isinstance(own.guidance_scale, float)
    assert b.where == "dir/p.jsonl:2"


@pytest.mark.parametrize("key,value,message", [
    ("height", 0, "height must be >= 1, got 0"),
    ("width", 48.0, "width must be an integer, got float 48.0"),
    ("width", True, "width must be an integer, got bool True"),
    ("num_frames", 10, "num_frames must be 4k+1 for Wan (e.g. 9, 17, 81), got 10"),
    ("num_inference_steps", "4", "num_inference_steps must be an integer, got str '4'"),
    ("guidance_scale", -1, "guidance_scale must be >= 0, got -1"),
    ("guidance_scale", None, "guidance_scale must be a finite number, got NoneType None"),
])
def test_a_bad_item_value_names_the_file_and_the_line(key, value, message):
    with pytest.raises(UserError) as info:
        _items(json.dumps({"id": "b", "prompt": "x", key: value}))
    assert str(info.value) == f"dir/p.jsonl:2: {message}"


def test_the_job_and_an_item_are_checked_alike():
    """The same rule, the same words: video.<key> in the job file, <file>:<line>: <key> in the prompts file."""
    for key, bad in (("num_frames", 6), ("height", -16), ("guidance_scale", -0.5)):
        with pytest.raises(UserError) as job_error:
            build_job({"video": {key: bad}}, "job.toml")
        with pytest.raises(UserError) as item_error:
            _items(json.dumps({"prompt": "x", key: bad}))
        assert str(job_error.value).removeprefix("job.toml: video.") == \
            str(item_error.value).removeprefix("dir/p.jsonl:2: ")


def test_an_unknown_item_key_suggests_a_per_item_setting():
    with pytest.raises(UserError, match=r"dir/p.jsonl:2: unknown key 'num_frame' \(did you mean 'num_frames'\?\)"):
        _items('{"prompt": "x", "num_frame": 9}')
    assert set(PER_ITEM_VIDEO_KEYS) == {"height", "width", "num_frames", "num_inference_steps", "guidance_scale"}


def test_an_item_size_the_model_cannot_take_names_its_line(demo_model_dir):
    from spmd_diff.runtime.setup import build_setup
    from spmd_diff.runtime.startup import JobInputs

    job = build_job({"video": {"height": 64, "width": 64}}, "job.toml")
    items = tuple(_items('{"id": "b", "prompt": "x", "height": 32, "width": 40}'))
    inputs = JobInputs(job, items, None, None, str(demo_model_dir), items)
    with pytest.raises(UserError) as info:
        build_setup(inputs, None, "cpu")
    assert str(info.value).startswith("dir/p.jsonl:2: width 40 is not a multiple of 16")
    fine = tuple(_items('{"id": "b", "prompt": "x", "height": 32, "width": 48, "num_frames": 5}'))
    setup = build_setup(JobInputs(job, fine, None, None, str(demo_model_dir), fine), None, "cpu")
    assert len(setup.shapes) == 2 and setup.spec_of(fine[1]).width == 48
    assert setup.shapes[setup.spec_of(fine[1])].latents_shape == (1, 16, 2, 4, 6)


def _store_run(tmp_path, job, items, **options):
    """Plan a run on OUT (tmp_path) as rank 0 does, and write every pending item (a dummy video)."""
    attrs_of = item_attrs(job, "", "float32", 1, on_gpu=False)
    expected = {item.id: attrs_of(item) for item in items}
    store = VideoStore(tmp_path)
    plan = plan_run(store, expected, job_settings(job, attrs_of, items), apply=True, model_path="demo", job={},
                    **options)
    for item_id in plan.pending:
        a = expected[item_id]
        store.write_item(item_id, np.zeros((a["num_frames"], a["height"], a["width"], 3), np.uint8), a)
    return plan


def test_a_rerun_with_an_items_settings_changed_is_refused_unless_forced_which_rerenders_exactly_it(tmp_path):
    job = build_job({"video": {"height": 64, "width": 64}}, "job.toml")
    items = _items('{"id": "b", "prompt": "x", "height": 32}', '{"id": "c", "prompt": "y", "num_inference_steps": 2}')
    assert _store_run(tmp_path, job, items).pending == ["a", "b", "c"]
    assert _store_run(tmp_path, job, items).pending == []  # the same items: done

    changed = _items('{"id": "b", "prompt": "x", "height": 48}', '{"id": "c", "prompt": "y", "num_inference_steps": 2}')
    with pytest.raises(UserError) as info:
        _store_run(tmp_path, job, changed)
    message = str(info.value)
    assert "holds other versions of 1 item(s)" in message and "'b' (height: 32 there, 48 now)" in message
    assert "--force to re-render exactly those 1 item(s)" in message
    forced = _store_run(tmp_path, job, changed, force=True)
    assert forced.pending == ["b"] and forced.rerendered == ["b"]
    assert _store_run(tmp_path, job, changed).pending == []


def test_job_json_records_the_jobs_defaults_not_the_first_items_own(tmp_path):
    job = build_job({"video": {"height": 64, "width": 64}}, "job.toml")
    first_own = parse_prompts('{"id": "z", "prompt": "x", "height": 32, "num_frames": 5}\n', "p.jsonl", 0)
    attrs_of = item_attrs(job, "", "float32", 1, on_gpu=False)
    settings = job_settings(job, attrs_of, first_own)
    assert settings["video.height"] == 64 and settings["video.num_frames"] == 9
    _store_run(tmp_path, job, first_own)
    # Another prompts file for the same job (its first item of the defaults) is no other job configuration.
    assert _store_run(tmp_path, job, _items()).pending == ["a"]
    # The job's defaults changing is: refused as another configuration (and the default item as changed).
    other = build_job({"video": {"height": 48, "width": 64}}, "job.toml")
    with pytest.raises(UserError, match=r"different job configuration \(video.height: 64 there, 48 now\)"):
        _store_run(tmp_path, other, first_own)


def test_the_planner_plans_for_the_heaviest_item():
    job = build_job({"video": {"height": 64, "width": 64, "num_inference_steps": 4}}, "job.toml")
    assert planning_job(job, _items('{"prompt": "x", "height": 32}')) is job
    heavy = planning_job(job, _items('{"prompt": "x", "height": 32}', '{"prompt": "y", "num_inference_steps": 50}'))
    assert heavy.video.num_inference_steps == 50 and heavy.video.height == 64


class _Cost:
    """Denoise seconds in proportion to tokens x forwards, 0.94 parallel efficiency per doubling; encode 0.1 s,
    decode 0.2 s, write 0.05 s."""

    def seconds(self, stage, work_class, sp_degree=1):
        if stage in ("encode", "decode", "write"):
            return {"encode": 0.1, "decode": 0.2, "write": 0.05}[stage]
        forwards = work_class.num_steps * (2 if work_class.cfg else 1)
        return work_class.num_tokens * forwards / 1000 / (sp_degree * 0.94 ** (sp_degree.bit_length() - 1))


def _classes(*specs):
    from spmd_diff.plan.workload import WorkClass

    return [(index, WorkClass(h, w, 81, steps, True)) for index, (h, w, steps) in enumerate(specs)]


@pytest.mark.parametrize("order", ["file", "longest_first"])
def test_item_groups_never_overlap_on_a_rank_and_stay_in_one_node(order):
    from spmd_diff.runtime.item_groups import assignments_of, schedule_item_groups

    items = _classes(*[(480, 832, 4)] * 10, (720, 1280, 50), (720, 1280, 50))
    nodes = [[0, 1, 2, 3], [4, 5, 6, 7]]
    schedule = schedule_item_groups(items, nodes, _Cost(), (1, 2, 4), order)
    assert sorted(g.item for g in schedule) == list(range(len(items)))
    assert [g.start_s for g in schedule] == sorted(g.start_s for g in schedule)
    for group in schedule:
        assert group.degree in (1, 2, 4) and any(set(group.ranks) <= set(node) for node in nodes)
        assert list(group.ranks) == sorted(group.ranks)
        assert group.leader_s == pytest.approx(0.25)
    for rank in range(8):
        mine = assignments_of(schedule, rank)
        for before, after in zip(mine, mine[1:]):
            held = before.seconds + (before.leader_s if before.ranks[0] == rank else 0.0)
            assert before.start_s + held <= after.start_s + 1e-9, (rank, before, after)


def test_in_file_order_a_full_queue_runs_narrow_and_the_long_last_items_wide():
    from spmd_diff.runtime.item_groups import schedule_item_groups

    items = _classes(*[(480, 832, 4)] * 10, (720, 1280, 50), (720, 1280, 50))
    schedule = schedule_item_groups(items, [[0, 1, 2, 3], [4, 5, 6, 7]], _Cost(), (1, 2, 4), "file")
    assert [g.item for g in schedule] == list(range(len(items)))
    assert all(g.degree == 1 for g in schedule[:8])  # a full queue: every rank takes its own item
    assert {g.degree for g in schedule[-2:]} != {1}  # the two long 50-step items at the end run wider


def _makespan(schedule):
    return max(g.start_s + g.seconds + g.leader_s for g in schedule)


def test_longest_first_is_a_deterministic_permutation_longest_first_ties_in_file_order():
    import random

    from spmd_diff.runtime.item_groups import schedule_item_groups, start_order

    rng = random.Random(3)
    shapes = [(480, 832, 4), (480, 832, 50), (720, 1280, 4), (720, 1280, 50)]
    items = [(10 + k, wc) for k, (_, wc) in enumerate(_classes(*[rng.choice(shapes) for _ in range(60)]))]
    order = start_order(items, _Cost(), 1)
    assert sorted(order) == list(range(len(items)))
    keys = [_Cost().seconds("encode", items[k][1]) + _Cost().seconds("denoise", items[k][1]) for k in order]
    assert keys == sorted(keys, reverse=True)
    for a, b in zip(order, order[1:]):
        if keys[order.index(a)] == keys[order.index(b)]:
            assert a < b  # ties keep the file's order
    assert start_order(items, _Cost(), 1, "file") == list(range(len(items)))
    nodes = [list(range(0, 8)), list(range(8, 16))]
    schedule = schedule_item_groups(items, nodes, _Cost(), (1, 2, 4))
    assert schedule == schedule_item_groups(list(items), [list(n) for n in nodes], _Cost(), (1, 2, 4))
    assert sorted(g.item for g in schedule) == sorted(index for index, _ in items)  # every item once
    # Items start in that order, each as soon as a group for it is free.
    assert [g.item for g in schedule] == [items[k][0] for k in order]
    with pytest.raises(ValueError, match="unknown item order"):
        start_order(items, _Cost(), 1, "shortest_first")


def test_longest_first_ends_sooner_than_file_order_when_the_long_items_come_last():
    """40 short items, then 3 long ones (29x as long), on two nodes of 4 ranks: in file order the long items start
    last and end late even wide; longest first they overlap the short ones, near the work bound."""
    from spmd_diff.runtime.item_groups import schedule_item_groups

    items = _classes(*[(480, 832, 4)] * 40, *[(720, 1280, 50)] * 3)
    nodes = [[0, 1, 2, 3], [4, 5, 6, 7]]
    in_file_order = _makespan(schedule_item_groups(items, nodes, _Cost(), (1, 2, 4), "file"))
    longest = _makespan(schedule_item_groups(items, nodes, _Cost(), (1, 2, 4)))
    cost = _Cost()
    work = sum(sum(cost.seconds(s, wc) for s in ("encode", "denoise", "decode", "write")) for _, wc in items)
    assert longest < 0.8 * in_file_order, (longest, in_file_order)
    assert longest < 1.06 * work / 8, (longest, work / 8)  # near the work bound


def test_a_fixed_degree_gives_every_item_a_group_of_that_size():
    from spmd_diff.runtime.item_groups import schedule_item_groups

    schedule = schedule_item_groups(_classes(*[(480, 832, 4)] * 5), [[0, 1, 2, 3]], _Cost(), (2,))
    # The first two groups' members (1, 3) start the third item while their leaders (0, 2) decode.
    assert [g.ranks for g in schedule] == [(0, 1), (2, 3), (1, 3), (0, 2), (1, 2)]
    assert schedule[2].start_s == schedule[0].start_s + schedule[0].seconds < schedule[3].start_s
    with pytest.raises(ValueError, match="no node has 8 DiT ranks"):
        schedule_item_groups(_classes((480, 832, 4)), [[0, 1, 2, 3]], _Cost(), (8,))


def test_per_item_degree_needs_every_rank_to_hold_every_stage():
    with pytest.raises(UserError, match=r'dit.per_item_degree = true needs roles.policy = "static" with '
                                        r"roles.encoders = 0 and roles.decoders = 0"):
        build_job({"dit": {"per_item_degree": True}}, "job.toml")
    roles = {"policy": "static", "encoders": 0, "decoders": 0}
    job = build_job({"dit": {"per_item_degree": True}, "roles": roles}, "job.toml")
    assert job.dit.per_item_degree
    for compiled in ({"dit": {"per_item_degree": True, "compile": True}},  # compiled once per rank for the job
                     {"dit": {"per_item_degree": True}, "speed": {"tier": "fast"}}):
        build_job({**compiled, "roles": roles}, "job.toml")


def test_plan_prints_the_degree_each_item_would_run_at(tmp_path, capsys):
    from spmd_diff.cli import main

    prompts = tmp_path / "mixed.jsonl"
    lines = [{"prompt": f"p{k}", "height": 480, "width": 832, "num_frames": 81, "num_inference_steps": 4}
             for k in range(30)]
    lines += [{"prompt": f"q{k}", "height": 720, "width": 1280, "num_frames": 81, "num_inference_steps": 50}
              for k in range(2)]
    prompts.write_text("".join(json.dumps(line) + "\n" for line in lines))
    per_item = ["--set", "dit.per_item_degree=true", "--set", "roles.policy='static'", "--set", "roles.encoders=0",
                "--set", "roles.decoders=0"]
    job = "jobs/random-1.3b-480p.toml"
    assert main(["plan", job, "--gpus-per-node", "8", *per_item, "--prompts", str(prompts)]) == 0
    out = capsys.readouterr().out
    assert "per-item SP degree: 32 item(s), predicted denoise makespan" in out
    assert "480x832x81/4s/cfg: 30 at degree 1" in out
    wide = next(line for line in out.splitlines() if line.strip().startswith("720x1280x81/50s/cfg:"))
    assert "degree 1" not in wide, wide  # the long items at the end run wider
    assert "the DiT groups pull them" not in out
    uniform = tmp_path / "uniform.jsonl"
    uniform.write_text("".join(json.dumps(line) + "\n" for line in lines[:16]))
    assert main(["plan", job, "--gpus-per-node", "8", *per_item, "--prompts", str(uniform)]) == 0
    out = capsys.readouterr().out
    assert "480x832x81/4s/cfg: 16 at degree 1" in out
    assert "every item at dit.sp_degree = 1: the DiT groups pull them from the shared queue" in out
    # with dit.compile at degree 1 the per-item path compiles every item, the fixed path would not: run as scheduled
    assert main(["plan", job, "--gpus-per-node", "8", *per_item, "--set", "dit.compile=true",
                 "--prompts", str(uniform)]) == 0
    assert "the DiT groups pull them" not in capsys.readouterr().out
    assert main(["plan", job, "--gpus-per-node", "8", "--prompts", str(prompts)]) == 0
    assert "per-item SP degree: off (dit.per_item_degree); every item of" in capsys.readouterr().out


def test_which_per_item_schedules_run_pulled():
    from types import SimpleNamespace

    from spmd_diff.runtime.item_groups import runs_pulled

    def job(**dit):
        return build_job({"dit": {"per_item_degree": True, **dit},
                          "roles": {"policy": "static", "encoders": 0, "decoders": 0}}, "job.toml")

    narrow, widened = [SimpleNamespace(degree=1)] * 3, [SimpleNamespace(degree=d) for d in (1, 2, 1)]
    assert runs_pulled(narrow, job(), on_gpu=True) and runs_pulled(narrow, job(compile=True), on_gpu=False)
    assert not runs_pulled(widened, job(), on_gpu=True)
    assert not runs_pulled([], job(), on_gpu=True)
    assert not runs_pulled(narrow, job(compile=True), on_gpu=True)  # compiled per item, not on the fixed path
    pairs = [SimpleNamespace(degree=2)] * 3
    assert runs_pulled(pairs, job(sp_degree=2, compile=True), on_gpu=True)  # both paths compile groups of 2
    assert not runs_pulled(narrow, job(sp_degree=2), on_gpu=True)  # narrower than the fixed degree


def test_a_mixed_job_hands_out_its_longest_items_first_and_a_uniform_one_keeps_the_files_order(demo_model_dir):
    from spmd_diff.plan.for_job import static_plan
    from spmd_diff.plan.topology import Topology
    from spmd_diff.runtime.engine import render_order
    from spmd_diff.runtime.setup import build_setup
    from spmd_diff.runtime.startup import JobInputs

    job = build_job({"video": {"height": 32, "width": 32, "num_frames": 5, "num_inference_steps": 2}}, "job.toml")
    mixed = tuple(_items('{"id": "b", "prompt": "x", "num_inference_steps": 8}',  # more steps: longer
                         '{"id": "c", "prompt": "y"}',
                         '{"id": "d", "prompt": "z", "height": 64, "num_inference_steps": 8}',  # more tokens too
                         '{"id": "e", "prompt": "w", "guidance_scale": 1.0}'))  # no CFG: shortest
    topology = Topology((0,), gpus_per_node=0)
    plan = static_plan(job, topology)

    def order(items):
        setup = build_setup(JobInputs(job, items, plan, topology, str(demo_model_dir), items), plan, "cpu")
        by_index = {item.index: item.id for item in items}
        return [by_index[i] for i in render_order(setup, list(items), "cpu")]

    assert order(mixed) == ["d", "b", "a", "c", "e"]  # "a" (the job's defaults) and "c" tie: file order
    uniform = tuple(_items(*(f'{{"id": "u{k}", "prompt": "p{k}"}}' for k in range(5))))
    assert order(uniform) == ["a", "u0", "u1", "u2", "u3", "u4"]


def test_equal_predictions_of_different_kinds_are_handed_out_kind_by_kind(demo_model_dir):
    """Items of two kinds with the same predicted cost (a tall and a wide frame) are not interleaved: each kind
    together (in the order the kinds first appear), so a batch can hold one kind (rebalance.next_batch)."""
    from spmd_diff.plan.for_job import static_plan
    from spmd_diff.plan.topology import Topology
    from spmd_diff.runtime.engine import item_kind, render_order
    from spmd_diff.runtime.setup import build_setup
    from spmd_diff.runtime.startup import JobInputs

    job = build_job({"video": {"height": 32, "width": 32, "num_frames": 5, "num_inference_steps": 2}}, "job.toml")
    items = tuple(_items(*(f'{{"id": "{name}", "prompt": "x", "height": {h}, "width": {w}}}'
                           for name, h, w in (("tall1", 64, 32), ("wide1", 32, 64), ("tall2", 64, 32),
                                              ("wide2", 32, 64)))))
    topology = Topology((0,), gpus_per_node=0)
    plan = static_plan(job, topology)
    setup = build_setup(JobInputs(job, items, plan, topology, str(demo_model_dir), items), plan, "cpu")
    by_index = {item.index: item for item in items}
    ordered = [by_index[i] for i in render_order(setup, list(items), "cpu")]
    assert [item.id for item in ordered] == ["tall1", "tall2", "wide1", "wide2", "a"]
    assert item_kind(setup, ordered[0]) == item_kind(setup, ordered[1]) != item_kind(setup, ordered[2])


def test_dit_compile_is_recorded_only_where_blocks_compile():
    """A video's dit_compile says whether its blocks ran compiled: GPU DiT groups, or every item under a per-item
    degree; never on CPU ranks (nothing compiles there) nor for a single-rank DiT without per_item_degree."""
    item = tuple(_items('{"id": "b", "prompt": "x"}'))[0]

    def recorded(on_gpu, sp_degree, **dit):
        roles = {"policy": "static", "encoders": 0, "decoders": 0}
        job = build_job({"dit": {"compile": True, **dit}, "roles": roles}, "job.toml")
        return item_attrs(job, "", "bfloat16", sp_degree, on_gpu=on_gpu)(item)["dit_compile"]

    assert recorded(True, 2) and recorded(True, 1, per_item_degree=True)
    assert not recorded(True, 1)
    assert not recorded(False, 2) and not recorded(False, 1, per_item_degree=True)
