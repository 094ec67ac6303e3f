"""Random collective schedules and their numpy references, shared by the unit (threads) and MPI tests.

Every rank builds the same schedule from a seed: a list of operations, each on a random group (2 to 4 ranks in
random order, overlapping the previous ones), with random per-pair sizes (zeros and uneven splits included) and
dtypes. Message contents are numpy arrays that are a pure function of (seed, op, source, destination), so every
receiver knows exactly what it must get.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

DTYPES = ("float32", "bfloat16", "int64", "uint8", "float16")


@dataclass(frozen=True)
class Op:
    index: int
    kind: str
    """"a2a", "a2a_into", "gather", "bcast" or "barrier"."""
    ranks: tuple[int, ...]
    counts: tuple[tuple[int, ...], ...]
    """counts[i][j]: elements position i sends to position j."""
    dtype: str
    root: int


def schedule(world_size: int, seed: int, num_ops: int, max_count: int = 3000, max_group: int = 4) -> list[Op]:
    rng = np.random.default_rng(seed)
    ops = []
    kinds = ("a2a", "a2a", "a2a_into", "gather", "bcast", "barrier")
    for index in range(num_ops):
        size = int(rng.integers(2, min(max_group, world_size) + 1))
        ranks = tuple(int(r) for r in rng.permutation(world_size)[:size])
        counts = rng.integers(0, max_count, size=(size, size))
        counts[rng.random((size, size)) < 0.15] = 0
        ops.append(Op(index, kinds[int(rng.integers(len(kinds)))], ranks,
                      tuple(tuple(int(c) for c in row) for row in counts), DTYPES[int(rng.integers(len(DTYPES)))],
                      int(rng.integers(size))))
    return ops


def message(seed: int, op: Op, src: int, dst: int) -> np.ndarray:
    """The numpy reference of what position ``src`` sends to ``dst`` in ``op`` (bf16 as its int16 bits)."""
    rng = np.random.default_rng((seed, op.index, src, dst))
    count = op.counts[src][dst]
    if op.dtype in ("int64", "uint8"):
        return rng.integers(0, 250, size=count).astype(op.dtype)
    values = rng.standard_normal(count).astype(np.float32)
    if op.dtype == "bfloat16":
        return torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy()
    return values.astype(op.dtype)


def to_tensor(array: np.ndarray, dtype: str, device: str) -> torch.Tensor:
    tensor = torch.from_numpy(array.copy())
    if dtype == "bfloat16":
        tensor = tensor.view(torch.bfloat16)
    return tensor.to(device)


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.view(torch.int16)
    return tensor.numpy()


def run_op(group, seed: int, op: Op, device: str = "cpu") -> None:
    """Run ``op`` on this rank's ``group`` and check the result against the numpy reference."""
    me, size = group.rank_in_group, group.size
    if op.kind == "barrier":
        group.barrier()
        return
    if op.kind == "gather":
        # all_gather: position i contributes its row-i message to position (i+1) % size, shape (count, 1)
        mine = to_tensor(message(seed, op, me, (me + 1) % size), op.dtype, device).reshape(-1, 1)
        got = group.all_gather(mine)
        for i in range(size):
            expect = message(seed, op, i, (i + 1) % size)
            check(to_numpy(got[i]).reshape(-1), expect, op, i, me)
            assert tuple(got[i].shape) == (expect.size, 1), (op, i, got[i].shape)
        return
    if op.kind == "bcast":
        expect = message(seed, op, op.root, op.root)
        if me == op.root:
            out = group.broadcast(to_tensor(expect, op.dtype, device), op.root)
        elif op.index % 2:
            out = group.broadcast(None, op.root)
        else:
            buffer = torch.full((expect.size,), 7, dtype=getattr(torch, op.dtype), device=device)
            out = group.broadcast(buffer, op.root)
            assert out is buffer
        check(to_numpy(out), expect, op, op.root, me)
        return
    send = [to_tensor(message(seed, op, me, j), op.dtype, device) for j in range(size)]
    if op.kind == "a2a":
        got = group.all_to_all(send)
    else:
        got = [torch.full((op.counts[i][me],), 3, dtype=getattr(torch, op.dtype), device=device)
               for i in range(size)]
        if op.index % 2:  # persistent (all_to_all_init): started twice, the buffers wiped in between
            persistent = group.all_to_all_init(send, got)
            persistent.start()
            for tensor in got:
                tensor.fill_(3)
            returned = persistent.start()
        else:
            returned = group.all_to_all_into(send, got)
        assert all(a is b for a, b in zip(returned, got))
    for i in range(size):
        check(to_numpy(got[i]), message(seed, op, i, me), op, i, me)


def check(got: np.ndarray, expect: np.ndarray, op: Op, src: int, me: int) -> None:
    if got.shape != expect.shape or not np.array_equal(got, expect):
        raise AssertionError(f"op {op.index} ({op.kind} on {op.ranks}, {op.dtype}): position {me} got a wrong "
                             f"message from position {src}: shape {got.shape} vs {expect.shape}")


def run_schedule(coll, seed: int, ops: list[Op], device: str = "cpu") -> int:
    """Run the ops this rank is part of; returns how many it ran."""
    ran = 0
    for op in ops:
        if coll.rank in op.ranks:
            run_op(coll.group(op.ranks), seed, op, device)
            ran += 1
    return ran
