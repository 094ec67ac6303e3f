import pytest

from spmd_diff.errors import UserError
from spmd_diff.runtime.faults import OutLock


def test_out_lock_exclusive_vs_shards(tmp_path):
    whole = OutLock(tmp_path, None)
    whole.acquire()
    with pytest.raises(UserError, match="another spmd-diff job is writing"):
        OutLock(tmp_path, (0, 2)).acquire()
    whole.release()
    a, b = OutLock(tmp_path, (0, 2)), OutLock(tmp_path, (1, 2))
    a.acquire()
    b.acquire()  # tasks of one array share OUT
    with pytest.raises(UserError, match="pid"):
        OutLock(tmp_path, (0, 2)).acquire()  # the same shard twice
    with pytest.raises(UserError):
        OutLock(tmp_path, None).acquire()  # an unsharded run beside the array
    a.release()
    b.release()
    OutLock(tmp_path, None).acquire()


def test_inject_delay_parses_and_sleeps_inside_the_stage():
    import time

    from spmd_diff.runtime.faults import TestHooks

    hooks = TestHooks.from_env(0, {"SPMD_DIFF_INJECT_DELAY": "decode:0.2"})
    t0 = time.monotonic()
    assert hooks.at("decode", "any-item") is None
    assert time.monotonic() - t0 >= 0.2
    t0 = time.monotonic()
    hooks.at("denoise", "any-item")
    assert time.monotonic() - t0 < 0.1
    for bad in ("decode", "write:1", "decode:-1", "decode:soon"):
        with pytest.raises(UserError, match="SPMD_DIFF_INJECT_DELAY"):
            TestHooks.from_env(0, {"SPMD_DIFF_INJECT_DELAY": bad})


def test_out_lock_refuses_array_tasks_of_another_shard_count(tmp_path):
    """Shards 0/2 and 0/3 overlap (items 0, 6, 12, ...): running both on one OUT would render those twice."""
    two = OutLock(tmp_path, (0, 2))
    two.acquire()
    with pytest.raises(UserError, match=r"--shard I/2; this task \(--shard 0/3\) would render some of their items"):
        OutLock(tmp_path, (0, 3)).acquire()
    other_task = OutLock(tmp_path, (1, 2))
    other_task.acquire()  # the same count is still welcome
    two.release()
    with pytest.raises(UserError, match="--shard I/2"):
        OutLock(tmp_path, (2, 3)).acquire()  # while any task of the first array runs
    other_task.release()
    three = OutLock(tmp_path, (0, 3))
    three.acquire()
    three.release()


def test_the_testing_aids_are_read_by_the_cli_only():
    """``faults.py`` parses what it is given; the CLI is the one reader of the aids' variables."""
    import re
    from pathlib import Path

    from spmd_diff.runtime.faults import TESTING_ENV

    package = Path(__file__).resolve().parents[2] / "spmd_diff"
    readers = [path.relative_to(package).as_posix() for path in sorted(package.rglob("*.py"))
               if "os.environ" in path.read_text(encoding="utf-8")
               and re.search("|".join(TESTING_ENV) + "|HOOKS_ENV|DELAY_ENV|TESTING_ENV", path.read_text())]
    assert readers == ["cli.py"]
