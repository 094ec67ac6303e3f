"""Exactly-once means the right video, end to end through ``spmd-diff`` (one rank, demo model, 2 steps): changed
work is refused or re-rendered, never kept; corrupt files are found, named, moved aside and rendered again
bit-identically; the view never reads another OUT; unstorable text is refused up front; odd failure records and
overlapping array tasks are handled. All steps run in one process (tests/mpi/scripts/store_scenarios.py, ~15 s)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def steps(demo_model_dir, tmp_path_factory) -> dict[str, dict]:
    work = tmp_path_factory.mktemp("store-e2e")
    env = dict(os.environ, SPMD_DIFF_CACHE=str(demo_model_dir.parent), OMP_NUM_THREADS="1")
    for key in [k for k in env if k.startswith(("OMPI_COMM_WORLD", "PMIX_", "SLURM_"))]:
        env.pop(key)
    proc = subprocess.run([sys.executable, str(REPO / "tests/mpi/scripts/store_scenarios.py"), str(work / "w"),
                           str(REPO / "jobs/demo.toml")], capture_output=True, text=True, timeout=600, cwd=REPO,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {r["step"]: r for r in map(json.loads, proc.stdout.splitlines())}


def refused(record: dict) -> str:
    assert record["code"] == 2, record["stderr"]
    [line] = [line for line in record["stderr"].splitlines() if line.startswith("spmd-diff: error")]
    assert record.get("untouched", True), "a refused run must leave OUT as it was"
    return line


def test_base_run(steps):
    base = steps["base"]
    assert base["code"] == 0 and "3 to render" in base["stderr"], base["stderr"]
    assert sorted(base["videos"]) == ["a", "b", "c"]


@pytest.mark.parametrize("step,listed", [
    ("changed_prompt", "'a' (prompt: 'a red ball bounces' there, 'a red ball bounces twice' now)"),
    ("changed_seed", "'b' (seed: 7 there, 8 now)"),
    ("changed_run_seed", "other versions of 2 item(s) of this prompts file: 'a' (seed: 1234 there, 99 now), "
                         "'c' (seed: 1236 there, 101 now)"),
    ("changed_weights", "model.fingerprint: "),
])
def test_changed_content_is_refused_naming_the_items_and_the_change(steps, step, listed):
    line = refused(steps[step])
    assert listed in line and "--force to re-render exactly those" in line, line


def test_the_same_weights_elsewhere_are_the_same_model(steps):
    moved = steps["moved_model"]
    assert moved["code"] == 0 and "0 to render" in moved["stderr"] and moved["items_untouched"], moved["stderr"]


def test_force_rerenders_exactly_the_changed_items_bit_identical_to_a_clean_run(steps):
    force, clean = steps["force"], steps["clean_p2"]
    assert force["code"] == 0 and "1 to render" in force["stderr"], force["stderr"]
    assert "--force: rendering 1 changed item(s) again: 'a'" in force["stderr"]
    assert force["files"]["b"] == force["files_before"]["b"] and force["files"]["c"] == force["files_before"]["c"]
    assert force["files"]["a"] != force["files_before"]["a"] and "," not in force["files"]["a"], "old file deleted"
    assert clean["code"] == 0 and force["videos"] == clean["videos"]
    assert force["videos"]["a"] != steps["base"]["videos"]["a"]


def test_the_view_never_reads_a_decoy_out_in_the_working_directory(steps):
    decoy = steps["decoy_cwd"]
    assert decoy["in_place"] == steps["clean_p2"]["videos"]
    assert all(v.startswith("error") for v in decoy["copied"].values()), decoy["copied"]
    assert "is missing" in decoy["read_video"] and "copy the whole output directory" in decoy["read_video"]


def test_corrupt_items_are_reported_and_rendered_again_bit_identically(steps):
    corrupt = steps["corrupt"]
    assert corrupt["inspect_code"] == 0 and "2 of the videos listed below are corrupt" in corrupt["inspect"]
    assert "missing" not in corrupt["inspect"]
    assert corrupt["export_code"] == 1 and corrupt["exported"].strip().endswith("/c")
    assert "'a' not exported: truncated" in corrupt["export_stderr"]
    assert "'b' not exported: no spmd-diff item header" in corrupt["export_stderr"]
    assert corrupt["code"] == 0 and "2 to render" in corrupt["stderr"], corrupt["stderr"]
    assert "item 'a' is corrupt" in corrupt["stderr"] and "item 'b' is corrupt" in corrupt["stderr"]
    assert corrupt["videos"] == steps["clean_p2"]["videos"]
    assert all("," not in name for name in corrupt["files"].values()), "one file per item"
    assert len(corrupt["corrupt_dir"]) == 4, "both files moved aside, each with a note"


def test_a_corrupt_file_outside_the_run_never_blocks_publishing(steps):
    other = steps["corrupt_other"]
    assert other["code"] == 0 and "0 to render" in other["stderr"], other["stderr"]
    assert "item 'a' is corrupt" in other["stderr"] and "truncated" in other["stderr"]
    assert other["videos"] == ["b", "c"]
    assert other["merge_code"] == 0 and "2 video(s), 0 failed" in other["merge"]


def test_verify_finds_damaged_video_data(steps):
    verify = steps["verify"]
    assert verify["first_code"] == 0 and "3 verified, 0 corrupt" in verify["first"]
    assert verify["code_verify"] == 1 and "2 verified, 1 corrupt" in verify["verify"]
    assert "item 'c' is corrupt" in verify["verify_stderr"] and "checksum" in verify["verify_stderr"]
    assert verify["code"] == 0 and "1 to render" in verify["stderr"]
    assert verify["videos"] == steps["clean_p2"]["videos"]


def test_an_inserted_plain_text_line_is_the_only_new_item(steps):
    text = steps["plain_text"]
    assert text["first_code"] == 0 and "2 to render" in text["first_stderr"]
    assert text["code"] == 0 and "2 already in" in text["stderr"] and "1 to render" in text["stderr"]
    assert text["videos"] == sorted(text["ids"].values()) and text["num_files"] == 3


@pytest.mark.parametrize("name,message", [
    ("nul_prompt", "nul_prompt.jsonl:2: prompt contains a NUL character"),
    ("surrogate_prompt", "surrogate_prompt.jsonl:2: prompt contains a lone UTF-16 surrogate (\\ud83c)"),
    ("surrogate_id", "surrogate_id.jsonl:2: id contains a lone UTF-16 surrogate"),
    ("nul_id", "nul_id.jsonl:2: id contains a NUL character"),
])
def test_text_hdf5_cannot_store_is_refused_before_anything_is_written(steps, name, message):
    record = steps[f"bad_text_{name}"]
    assert message in refused(record) and not record["out_exists"]


def test_failure_records_with_unstorable_text_never_break_the_out(steps):
    poisoned = steps["poisoned"]
    assert poisoned["code"] == 0 and poisoned["merge_code"] == 0, poisoned["stderr"]
    assert poisoned["failed"] == {"x": {"error": "VLEN strings do not support embedded NULLs \\x00",
                                        "prompt": "sunset \\ud83c", "stage": "write"}}


def test_array_tasks_of_another_shard_count_are_refused(steps):
    shards = steps["mixed_shards"]
    assert "--shard I/2; this task (--shard 0/3)" in refused(shards)
    assert shards["code_after"] == 0, shards["stderr_after"]
