"""How long a plan takes for a workload: a fluid model of ranks pulling work. Pure Python.

Ranks come in pools; a pool's ranks hold the same stages. With work pulled by whoever is free, a set of stages
T can only be served by the pools holding any stage of T, so the workload takes at least
``work(T) / capacity(pools touching T)`` for every T (and by Hall's theorem the largest of these bounds is
achievable by a fluid schedule). Two terms keep it honest for finite work: DiT granularity (a group denoises one
item at a time: fewer items than groups still take one item's time, which favours larger groups) and the
pipeline's fill and drain (DiT groups start together, so the first wave waits for its encodes; items of one class
take the same time, so groups finish together and the last wave's decodes run after everything else).

Work is in rank-seconds at speed 1.0 (the cost model's reference); a pool's capacity is the sum of its ranks' speeds (a DiT
rank counts at its group's slowest member's speed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Iterable, Sequence

from spmd_diff.plan.workload import Workload

ENCODE, DENOISE, DECODE = 1, 2, 4
STAGE_BITS = {"encode": ENCODE, "denoise": DENOISE, "decode": DECODE}
ALL_STAGES = ENCODE | DENOISE | DECODE


def mask_of(stages: Iterable[str]) -> int:
    mask = 0
    for stage in stages:
        mask |= STAGE_BITS.get(stage, 0)
    return mask


def stages_of_mask(mask: int) -> tuple[str, ...]:
    return tuple(stage for stage, bit in STAGE_BITS.items() if mask & bit)


@dataclass(frozen=True)
class StageWork:
    """What a workload costs per stage, for DiT groups of ``sp_degree`` ranks."""

    encode_s: float
    denoise_s: float
    """Rank-seconds: group wall time x ``sp_degree``."""
    decode_s: float
    """Decode and write (the rank that decodes writes)."""
    denoise_wall_s: float
    num_items: int
    sp_degree: int

    @staticmethod
    def of(workload: Workload, cost, sp_degree: int) -> "StageWork":
        """``cost``: anything with ``seconds(stage, work_class, sp_degree)`` (a :class:`CostModel`)."""
        encode = denoise_wall = decode = 0.0
        for work_class, num in workload.counts:
            encode += num * cost.seconds("encode", work_class, 1)
            denoise_wall += num * cost.seconds("denoise", work_class, sp_degree)
            decode += num * (cost.seconds("decode", work_class, 1) + cost.seconds("write", work_class, 1))
        return StageWork(encode, denoise_wall * sp_degree, decode, denoise_wall, workload.num_items, sp_degree)

    def by_bit(self) -> dict[int, float]:
        return {ENCODE: self.encode_s, DENOISE: self.denoise_s, DECODE: self.decode_s}

    @cached_property
    def need_by_subset(self) -> tuple[tuple[int, float], ...]:
        """(stage subset, its work) for every non-empty subset with work."""
        by_bit = self.by_bit()
        needs = ((subset, sum(w for bit, w in by_bit.items() if subset & bit)) for subset in range(1, 8))
        return tuple((subset, need) for subset, need in needs if need > 0)


@dataclass(frozen=True)
class Prediction:
    """Predicted wall seconds for a workload on a plan, and why."""

    seconds: float
    num_items: int
    bottleneck: str
    """The stages whose pools bind (e.g. "decode", or "encode+denoise+decode" when every rank shares all work)."""
    fluid_s: float
    granularity_s: float
    fill_s: float

    @property
    def videos_per_hour(self) -> float:
        return 3600.0 * self.num_items / self.seconds if self.seconds > 0 and math.isfinite(self.seconds) else 0.0

    def to_dict(self) -> dict:
        return {"seconds": round(self.seconds, 3), "videos_per_hour": round(self.videos_per_hour, 1),
                "bottleneck": self.bottleneck, "fluid_s": round(self.fluid_s, 3),
                "granularity_s": round(self.granularity_s, 3), "fill_s": round(self.fill_s, 3)}


def predict_pools(work: StageWork, pools: Sequence[tuple[int, float]], num_groups: int,
                  group_speed: float = 1.0, primed: bool = False) -> Prediction:
    """``pools``: (stage mask, capacity at speed 1.0) pairs; ``num_groups`` DiT groups. ``primed``: a job already
    running (items encoded ahead wait for the DiT groups), so the first wave does not wait for its encodes."""
    if work.num_items == 0:
        return Prediction(0.0, 0, "", 0.0, 0.0, 0.0)
    merged = [0.0] * 8
    for mask, cap in pools:
        merged[mask] += cap
    fluid, binding = 0.0, 0
    for subset, need in work.need_by_subset:
        capacity = 0.0
        for mask in range(1, 8):
            if mask & subset:
                capacity += merged[mask]
        bound = need / capacity if capacity > 0 else math.inf
        if bound > fluid * (1 + 1e-12):
            fluid, binding = bound, subset
    if num_groups < 1:
        return Prediction(math.inf, work.num_items, "denoise", math.inf, math.inf, 0.0)
    per_item_wall = work.denoise_wall_s / work.num_items / max(group_speed, 1e-9)
    granularity = max(1.0, work.num_items / num_groups) * per_item_wall
    # Fill and drain: DiT groups start together (the first wave waits for its encodes) and, items of a class
    # taking the same time, finish together (the last wave's decodes follow the last denoise).
    wave = min(num_groups, work.num_items)
    encode_item, decode_item = work.encode_s / work.num_items, work.decode_s / work.num_items
    encoders = sum(merged[m] for m in range(8) if m & ENCODE)
    decoders = sum(merged[m] for m in range(8) if m & DECODE)
    fill = max(encode_item, 0.0 if primed else wave * encode_item / max(encoders, 1e-9)) + \
        max(decode_item, wave * decode_item / max(decoders, 1e-9))
    bottleneck = "+".join(stages_of_mask(binding)) if fluid >= granularity else "denoise granularity"
    return Prediction(max(fluid, granularity) + fill, work.num_items, bottleneck, fluid, granularity, fill)


HOST_TO_GPU_BYTES_PER_S = 10e9
"""Default bandwidth of copying a component from host memory to the GPU: an assumed 10 GB/s for pageable memory
(pinned memory is faster; not measured here: the engine is to measure it). ``PlannerSettings.host_to_gpu_bytes_per_s``."""


def predict_time_shared(work: StageWork, speeds: Sequence[float], stage_batch: int,
                        cycle_move_s: float) -> Prediction:
    """Predicted time of ``work`` on time-shared ranks of ``speeds``: every rank pulls up to ``stage_batch`` items
    (at most its share of what is left near the end), encodes them all, moves the DiT in, denoises them all,
    moves the VAE in, decodes and writes them all, and moves the text encoder back in: ``cycle_move_s`` per cycle.

    No stage waits for another rank, so the fluid share of all work per rank binds; plus the moves of
    ``ceil(items per rank / stage_batch)`` cycles, and a tail: ranks finish up to one item apart (half an item on
    average, on the slowest rank), and with uneven speeds a slow rank's last cycle (of ``stage_batch`` items, or
    its share near the end, counted at its speed) ends after the others by about half of what its slowness adds
    to it (speeds within 10% count as even). With fewer items than ranks, one item's time (granularity)."""
    num_items = work.num_items
    if num_items == 0:
        return Prediction(0.0, 0, "", 0.0, 0.0, 0.0)
    total = work.encode_s + work.denoise_s + work.decode_s
    item = total / num_items
    per_rank = num_items / len(speeds)
    cycles = math.ceil(per_rank / max(1, stage_batch))
    moves = cycles * cycle_move_s
    fluid = total / sum(speeds) + moves
    granularity = item * len(speeds) / sum(speeds) + cycle_move_s
    mean_speed = sum(speeds) / len(speeds)
    uneven = max(speeds) > 1.1 * min(speeds)  # fitted speeds of equal GPUs scatter by a few percent
    last_cycle = min(stage_batch, per_rank) * item * (1 / min(speeds) - 1 / mean_speed) if uneven else 0.0
    tail = 0.5 * item / min(speeds) + 0.5 * last_cycle if per_rank > 1 else 0.0
    bottleneck = "time-shared" if fluid >= granularity else "time-shared granularity"
    return Prediction(max(fluid, granularity) + tail, num_items, bottleneck, fluid, granularity, tail)
