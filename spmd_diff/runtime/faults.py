"""What keeps a bulk job honest when things go wrong: one writer per OUT, ranks that outlive their launcher
exit, and test hooks that make a rank hang, fail an item or die at a chosen point (off unless the environment
variable ``SPMD_DIFF_TEST_HOOKS`` holds them)."""

from __future__ import annotations

import fcntl
import json
import os
import resource
import socket
import sys
import threading
import time
from pathlib import Path

from spmd_diff.errors import UserError

HOOKS_ENV = "SPMD_DIFF_TEST_HOOKS"
DELAY_ENV = "SPMD_DIFF_INJECT_DELAY"
TESTING_ENV = (HOOKS_ENV, DELAY_ENV)
"""The testing aids' environment variables: read by the CLI only (``RunRequest.testing_aids``)."""


class OutLock:
    """``flock``s on OUT, held by rank 0 for the whole run.

    An unsharded job holds OUT/.lock exclusively. Array tasks (``--shard I/N``) share OUT/.lock and each holds
    OUT/.lock-shard-I-of-N exclusively: tasks of one array run side by side, while a second job on the same OUT
    (two submissions, N singleton ranks, orphans of a dead launcher, an unsharded run beside an array) is
    refused with the holder's host and pid instead of racing on the same items. Array tasks also share
    OUT/.lock-shards-of-N, and a task of another shard count M is refused while any task of N runs: shards 0/2 and
    0/3 overlap (items 0, 6, 12, ...), so they would render the same items twice.
    """

    def __init__(self, out_dir: str | os.PathLike, shard: tuple[int, int] | None) -> None:
        self.main = Path(out_dir) / ".lock"
        self.shard = Path(out_dir) / f".lock-shard-{shard[0]}-of-{shard[1]}" if shard else None
        self.count = Path(out_dir) / f".lock-shards-of-{shard[1]}" if shard else None
        self.shard_spec = f"{shard[0]}/{shard[1]}" if shard else ""
        self._fds: list[int] = []

    def acquire(self) -> None:
        if self.shard is None:
            self._take(self.main, fcntl.LOCK_EX)
            return
        # One task at a time looks at the other shard counts and takes its own, so two tasks of different
        # counts starting together cannot both miss each other.
        guard = os.open(self.main.with_name(".lock-guard"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(guard, fcntl.LOCK_EX)
            except OSError:
                pass  # no flock on this file system: _take says so
            self._take(self.main, fcntl.LOCK_SH)
            self._refuse_other_shard_counts()
            self._take(self.count, fcntl.LOCK_SH)
            self._take(self.shard, fcntl.LOCK_EX)
        finally:
            os.close(guard)

    def _refuse_other_shard_counts(self) -> None:
        for other in self.main.parent.glob(".lock-shards-of-*"):
            if other == self.count:
                continue
            fd = os.open(other, os.O_RDONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if not isinstance(exc, BlockingIOError):
                    continue
                count = other.name.rsplit("-", 1)[-1]
                self.release()
                raise UserError(f"tasks of another job array are writing {self.main.parent} with --shard I/{count}; "
                                f"this task (--shard {self.shard_spec}) would render some of their items again "
                                f"(different shard counts overlap): wait for them to end, or use --shard I/{count}"
                                ) from None
            finally:
                os.close(fd)

    def _take(self, path: Path, mode: int) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "an array task"
            os.close(fd)
            self.release()
            raise UserError(f"another spmd-diff job is writing {path.parent} ({holder}); wait for it to end "
                            "or use another --out") from None
        except OSError as exc:  # file systems without flock: warn, carry on
            print(f"spmd-diff: warning: cannot lock {path} ({exc.strerror}); make sure no other job writes "
                  "this OUT", file=sys.stderr)
        if mode == fcntl.LOCK_EX:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"host {socket.gethostname()} pid {os.getpid()}\n".encode(), 0)
        self._fds.append(fd)

    def release(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []


class LauncherWatchdog:
    """Exit if the process that launched this rank (mpirun, orted, slurmstepd) dies.

    Without it, ranks orphaned by a SIGKILLed launcher would keep rendering into OUT while a rerun starts.
    Finished items are safe (atomically renamed), so exiting at any point loses only the items in flight.
    """

    def __init__(self, interval_s: float = 1.0, exit_code: int = 143) -> None:
        self._parent = os.getppid()
        self._interval_s, self._exit_code = interval_s, exit_code
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="spmd-diff-watchdog", daemon=True)

    def start(self) -> "LauncherWatchdog":
        if self._parent > 1:
            self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(self._interval_s):
            if os.getppid() != self._parent:
                sys.stderr.write(f"spmd-diff: launcher (pid {self._parent}) is gone; exiting "
                                 "(finished items are safe; rerun to resume)\n")
                sys.stderr.flush()
                os._exit(self._exit_code)

    def stop(self) -> None:
        self._stop.set()


class TestHooks:
    """Fault injection for tests. ``SPMD_DIFF_TEST_HOOKS`` = JSON list of
    ``{"action": "hang"|"fail"|"exit"|"nan"|"limit_file_size", "stage": "encode"|"denoise"|"decode"|"write",
    "item": ID or "*", "rank": R (optional), "bytes": N (limit_file_size)}``: at the start of that stage of that
    item (on that rank), hang forever, raise, exit the process at once (os._exit, like a SIGKILL), poison the
    latents (``nan``, denoise only), or make the disk "full" for this process (``limit_file_size``: RLIMIT_FSIZE,
    so writes past N bytes fail with EFBIG; set after MPI started, whose own files it would break).

    Two more points are not stages of an item: ``"stage": "replan"`` (every rank, right after the plan for the
    next batch is chosen, before any rank switches) and ``"stage": "batch_start"`` (a batch whose channels and
    components are ready, before its first item); their ``item`` is ``"batch-N"`` (N counted from 0: the batch
    just finished, or the one starting)."""

    def __init__(self, rules: list[dict], rank: int) -> None:
        self.rules = [r for r in rules if r.get("rank", rank) == rank]

    @staticmethod
    def from_env(rank: int, env: dict[str, str]) -> "TestHooks":
        """Rules from ``env[SPMD_DIFF_TEST_HOOKS]`` (the CLI passes what it read), plus ``SPMD_DIFF_INJECT_DELAY=STAGE:SECONDS`` (a testing aid: every
        item's STAGE, one of encode, denoise, decode, takes SECONDS longer on every rank, so the re-planner sees
        that stage grow). Raises UserError for a malformed value."""
        text = env.get(HOOKS_ENV)
        rules = json.loads(text) if text else []
        delay = env.get(DELAY_ENV)
        if delay:
            stage, _, seconds = delay.partition(":")
            try:
                value = float(seconds)
            except ValueError:
                value = -1.0
            if stage not in ("encode", "denoise", "decode") or not value >= 0:
                raise UserError(f"{DELAY_ENV}={delay!r}: expected STAGE:SECONDS with STAGE one of encode, denoise, "
                                "decode, e.g. decode:0.5")
            rules.append({"action": "delay", "stage": stage, "item": "*", "seconds": value})
        return TestHooks(rules, rank)

    def __bool__(self) -> bool:
        return bool(self.rules)

    def at(self, stage: str, item_id: str) -> str | None:
        """Run the hook for (stage, item), if any; returns the action for actions the caller carries out."""
        for rule in self.rules:
            if rule.get("stage") == stage and str(rule.get("item")) in (item_id, "*"):
                action = rule["action"]
                if action == "delay":
                    time.sleep(float(rule["seconds"]))
                    continue
                if action == "limit_file_size":
                    resource.setrlimit(resource.RLIMIT_FSIZE, (rule["bytes"], resource.RLIM_INFINITY))
                    continue
                if action == "hang":
                    sys.stderr.write(f"spmd-diff: test hook: hanging in {stage} of {item_id!r}\n")
                    sys.stderr.flush()
                    while True:
                        time.sleep(3600)
                if action == "exit":
                    os._exit(137)
                if action == "fail":
                    raise RuntimeError(f"test hook: injected failure in {stage} of {item_id!r}")
                return action
        return None
