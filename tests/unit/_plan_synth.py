"""Synthetic per-rank timings of one batch on a role plan, for the planner's unit tests (pure Python)."""

import math
import random

from spmd_diff.plan.timings import RankTimings, StageSample


def synthetic_timings(plan, truth, batch, speeds=None, noise=0.0, seed=0):
    """What every rank would report after running ``batch`` (a Workload) on ``plan`` when stage ``s`` of an item
    of class ``c`` takes ``truth(s, c, degree)`` seconds on a rank of speed 1, times log-normal noise.

    Items are spread evenly over the ranks (or DiT groups) holding each stage; each member of a DiT group reports
    the group's wall time (its slowest member's)."""
    rng = random.Random(seed)
    speeds = speeds or [1.0] * plan.num_ranks
    sums: dict[tuple, list] = {}

    def add(rank, stage, key, degree, seconds):
        entry = sums.setdefault((rank, stage, key, degree), [0, 0.0])
        entry[0] += 1
        entry[1] += seconds

    def jitter():
        return math.exp(rng.gauss(0.0, noise)) if noise else 1.0

    groups = plan.dit_groups
    encoders = plan.ranks_with("encode")
    decoders = plan.ranks_with("decode")
    index = 0
    for work_class, num in batch.counts:
        for _ in range(num):
            rank = encoders[index % len(encoders)]
            add(rank, "encode", work_class.key, 1, truth("encode", work_class, 1) * jitter() / speeds[rank])
            group = groups[index % len(groups)]
            slowest = min(speeds[r] for r in group)
            wall = truth("denoise", work_class, len(group)) * jitter() / slowest
            for rank in group:
                add(rank, "denoise", work_class.key, len(group), wall)
            rank = decoders[index % len(decoders)]
            add(rank, "decode", work_class.key, 1, truth("decode", work_class, 1) * jitter() / speeds[rank])
            add(rank, "write", work_class.key, 1, truth("write", work_class, 1) * jitter() / speeds[rank])
            index += 1
    per_rank: dict[int, list] = {}
    for (rank, stage, key, degree), (num, seconds) in sorted(sums.items()):
        per_rank.setdefault(rank, []).append(StageSample(stage, key, degree, num, seconds))
    return [RankTimings(rank, tuple(per_rank.get(rank, ()))) for rank in range(plan.num_ranks)]
