"""An in-process stand-in for the collectives' ``Group`` API, for sequence-parallel unit tests: S ranks on threads.

``ThreadWorld(S).collectives(rank).group(ranks)`` has ``ranks``, ``rank_in_group``, ``all_to_all(send)``,
``all_gather(tensor)``, ``broadcast(tensor, root)`` and ``barrier()`` with the semantics of
``spmd_diff.comm.collectives.Group`` (messages are copies; groups are formed locally; every rank of a group calls
the same operations in the same order). ``run_ranks(S, fn)`` runs ``fn(rank, world)`` on S threads.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from typing import Callable, Sequence, TypeVar

import torch

T = TypeVar("T")


class ThreadWorld:
    def __init__(self, num_ranks: int, timeout_s: float = 60.0) -> None:
        self.num_ranks = num_ranks
        self.timeout_s = timeout_s
        self._boxes: dict = {}
        self._cond = threading.Condition()
        self.failed = False

    def collectives(self, rank: int) -> "ThreadCollectives":
        return ThreadCollectives(self, rank)

    def post(self, key, tensor: torch.Tensor) -> None:
        with self._cond:
            assert key not in self._boxes, key
            self._boxes[key] = tensor
            self._cond.notify_all()

    def take(self, key) -> torch.Tensor:
        deadline = time.monotonic() + self.timeout_s
        with self._cond:
            while key not in self._boxes:
                if self.failed:
                    raise RuntimeError("another rank failed")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no message for {key}")
                self._cond.wait(min(left, 0.5))
            return self._boxes.pop(key)

    def fail(self) -> None:
        with self._cond:
            self.failed = True
            self._cond.notify_all()


class ThreadCollectives:
    def __init__(self, world: ThreadWorld, rank: int) -> None:
        self.world = world
        self.rank = rank
        self.counts: dict = defaultdict(int)

    def group(self, ranks: Sequence[int]) -> "ThreadGroup":
        return ThreadGroup(self, ranks)


class ThreadGroup:
    def __init__(self, coll: ThreadCollectives, ranks: Sequence[int]) -> None:
        self.coll = coll
        self.ranks = tuple(ranks)
        self.size = len(self.ranks)
        self.rank_in_group = self.ranks.index(coll.rank)

    def _op(self) -> tuple:
        key = self.ranks
        self.coll.counts[key] += 1
        return (key, self.coll.counts[key])

    def all_to_all(self, send: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        assert len(send) == self.size
        op = self._op()
        me = self.coll.rank
        for peer, tensor in zip(self.ranks, send):
            assert tensor.device.type == "cpu" and tensor.is_contiguous()
            self.coll.world.post((op, me, peer), tensor.clone())
        return [self.coll.world.take((op, peer, me)) for peer in self.ranks]

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        return self.all_to_all([tensor] * self.size)

    def broadcast(self, tensor: torch.Tensor | None, root: int = 0) -> torch.Tensor:
        op = self._op()
        me = self.coll.rank
        if self.rank_in_group == root:
            for peer in self.ranks:
                if peer != me:
                    self.coll.world.post((op, me, peer), tensor.clone())
            return tensor
        received = self.coll.world.take((op, self.ranks[root], me))
        if tensor is None:
            return received
        tensor.copy_(received)
        return tensor

    def barrier(self) -> None:
        self.all_to_all([torch.zeros(1)] * self.size)


def run_ranks(num_ranks: int, fn: Callable[[int, ThreadWorld], T], timeout_s: float = 120.0) -> list[T]:
    """``fn(rank, world)`` on ``num_ranks`` threads; results by rank; the first failure is re-raised."""
    world = ThreadWorld(num_ranks, timeout_s)
    results: list = [None] * num_ranks
    errors: list = [None] * num_ranks

    def body(rank: int) -> None:
        try:
            results[rank] = fn(rank, world)
        except BaseException as error:  # re-raised below
            errors[rank] = error
            world.fail()

    threads = [threading.Thread(target=body, args=(r,), daemon=True) for r in range(num_ranks)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout_s
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    if any(thread.is_alive() for thread in threads):
        world.fail()
        raise TimeoutError(f"ranks still running after {timeout_s} s")
    real = [e for e in errors if e is not None and "another rank failed" not in str(e)]
    if real or any(errors):
        raise (real or [e for e in errors if e is not None])[0]
    return results
