"""Seconds per item per stage, fitted online from measured timings, seeded from the analytic model. Pure Python.

The fitted model is log-additive: the time rank r takes per item of key k = (stage, class, SP degree) is
``base[k] / speed[r]``. Each (rank, key) keeps a running mean of log seconds over its last ``window_items`` items;
``refit`` folds a batch in and solves for bases and speeds by alternating least squares, warm-started from the
previous fit (speeds normalised to a geometric mean of 1 over the ranks measured). Ranks that did two stages, or
changed stage after a re-plan, link the stages' populations, so a slow node is told apart from a slow stage.

Prediction for (stage, class, degree): ``base`` if that key was measured; else the analytic prior times the
stage's scale (the items-weighted geometric mean of base / prior over the measured keys of the stage), so what was
learnt at 480p carries to 720p and from degree 1 to degree 2. Every rank runs ``refit`` on the same allgathered
timings and gets the same model (sorted keys, fixed iteration count).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Sequence

from spmd_diff.plan.cost import predict_item_cost, vae_encode_seconds
from spmd_diff.plan.model_sizes import ModelSizes
from spmd_diff.plan.timings import TIMED_STAGES, RankTimings
from spmd_diff.plan.workload import WorkClass

Key = tuple[str, str, int]
"""(stage, class key, SP degree)."""


def sp_efficiency(sp_degree: int) -> float:
    """Parallel efficiency of a DiT group: 0.94 per doubling (perf/results/sp-2026-11-22: 0.93/0.88 at 2/4 GPUs
    for 480p, 0.96/0.92 for 720p)."""
    return 0.94 ** math.log2(sp_degree) if sp_degree > 1 else 1.0


@dataclass(frozen=True)
class AnalyticPrior:
    """Stage seconds from shapes alone: :func:`predict_item_cost` plus the parts it does not model.

    Calibrations from DESIGN.md (one H200). ``predict_item_cost`` assumes 3e14 FLOP/s, conservative on purpose
    (its deadlines must not fire on a slow node); a plan wants the expected time, so on GPUs: denoise x 0.65 (a
    2.8e14-FLOP forward took 612 ms), encode x 2.66 (UMT5-XXL took 42 ms per 512-token prompt, memory-bound).
    Decode = VAE (``predict_item_cost`` is the bf16 VAE; the pipeline's float32 VAE is 2.77 / 1.83 = 1.51x) + CPU
    postprocess (0.73 s for 32.3 Mpx); image-to-video's VAE encode is priced as the VAE part of a decode; write = raw uint8 bytes at 0.29 GB/s (97 MB in 0.34 s).
    """

    sizes: ModelSizes
    device: str = "cuda"
    vae_float32: bool = True
    gpu_calibration: tuple[tuple[str, float], ...] = (("encode", 2.66), ("denoise", 0.65))
    postprocess_s_per_pixel: float = 0.73 / (81 * 480 * 832)
    write_bytes_per_s: float = 97e6 / 0.34

    def seconds(self, stage: str, work_class: WorkClass, sp_degree: int = 1) -> float:
        cost = predict_item_cost(work_class.num_tokens, self.sizes.dims, work_class.num_steps, work_class.cfg,
                                 work_class.num_pixels, self.device, 1)
        factor = dict(self.gpu_calibration).get(stage, 1.0) if self.device.startswith("cuda") else 1.0
        if stage == "encode":  # text (and image) encoders, calibrated; image-to-video's VAE encode like a decode
            vae = vae_encode_seconds(self.sizes.dims, work_class.num_pixels, self.device)
            return (cost.encode_s - vae) * factor + vae * (2.77 / 1.83 if self.vae_float32 else 1.0)
        if stage == "denoise":
            return cost.denoise_s * factor / (sp_degree * sp_efficiency(sp_degree))
        if stage == "decode":
            return cost.decode_s * (2.77 / 1.83 if self.vae_float32 else 1.0) + \
                work_class.num_pixels * self.postprocess_s_per_pixel
        if stage == "write":
            return work_class.num_pixels * 3 / self.write_bytes_per_s
        raise ValueError(f"unknown stage {stage!r}")


@dataclass(frozen=True)
class TablePrior:
    """A prior from a table of seconds per (stage, class key, degree); degrees not listed scale by
    :func:`sp_efficiency` from degree 1 (simulators and tests use it for the true costs)."""

    table: tuple[tuple[Key, float], ...]
    _lookup: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_lookup", dict(self.table))

    def seconds(self, stage: str, work_class: WorkClass, sp_degree: int = 1) -> float:
        lookup = self._lookup
        if (stage, work_class.key, sp_degree) in lookup:
            return lookup[(stage, work_class.key, sp_degree)]
        base = lookup[(stage, work_class.key, 1)]
        return base / (sp_degree * sp_efficiency(sp_degree)) if stage == "denoise" else base


@dataclass(frozen=True)
class Estimate:
    stage: str
    class_key: str
    sp_degree: int
    seconds: float
    weight: float
    """Items the estimate stands for (each rank's capped at the model's ``window_items``)."""


class History:
    """Per (rank, key): the running mean of log seconds per item and the items it stands for, as flat rows.

    Treated as immutable: :meth:`folded` returns a new history (lists copied, rows appended in first-seen order,
    the same on every rank because the allgathered timings are in rank order everywhere).
    """

    def __init__(self) -> None:
        self.ranks: list[int] = []
        self.keys: list[Key] = []
        self.rank_at: dict[int, int] = {}
        self.key_at: dict[Key, int] = {}
        self.row_at: dict[tuple[int, int], int] = {}
        self.row_rank: list[int] = []
        self.row_key: list[int] = []
        self.mean: list[float] = []
        self.weight: list[float] = []

    def __len__(self) -> int:
        return len(self.mean)

    def folded(self, timings: Sequence[RankTimings], window: float) -> "History":
        new = History()
        new.ranks, new.keys = list(self.ranks), list(self.keys)
        new.rank_at, new.key_at, new.row_at = dict(self.rank_at), dict(self.key_at), dict(self.row_at)
        new.row_rank, new.row_key = list(self.row_rank), list(self.row_key)
        new.mean, new.weight = list(self.mean), list(self.weight)
        mean, weight, row_at, key_at, log = new.mean, new.weight, new.row_at, new.key_at, math.log
        for rank in timings:
            i = new.rank_at.get(rank.rank)
            for s in rank.samples:
                if s.num_items <= 0 or s.busy_s <= 0:
                    continue
                if i is None:
                    i = new.rank_at[rank.rank] = len(new.ranks)
                    new.ranks.append(rank.rank)
                key = (s.stage, s.class_key, s.sp_degree)
                k = key_at.get(key)
                if k is None:
                    k = key_at[key] = len(new.keys)
                    new.keys.append(key)
                observed = log(s.busy_s / s.num_items)
                row = row_at.get((i, k))
                if row is None:
                    row_at[(i, k)] = len(mean)
                    new.row_rank.append(i)
                    new.row_key.append(k)
                    mean.append(observed)
                    weight.append(min(float(s.num_items), window))
                else:
                    w = weight[row]
                    mean[row] = (mean[row] * w + observed * s.num_items) / (w + s.num_items)
                    weight[row] = min(w + s.num_items, window)
        return new


@dataclass(frozen=True)
class CostModel:
    """Predicted seconds per item per stage at a rank of speed 1.0, and each rank's speed."""

    prior: AnalyticPrior | TablePrior | ScaledPrior
    estimates: tuple[Estimate, ...] = ()
    rank_speeds: tuple[tuple[int, float], ...] = ()
    """(rank, speed): 2.0 takes half the time of 1.0 (the geometric mean of the ranks measured). Others: 1.0."""
    history: History = field(default_factory=History, repr=False, compare=False)
    """Per rank and key, the running mean of log seconds per item (what the fit is solved from)."""
    window_items: float = 32.0
    iterations: int = 6
    _by_key: dict = field(init=False, repr=False, compare=False)
    _speeds: dict = field(init=False, repr=False, compare=False)
    _scales: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_key", {(e.stage, e.class_key, e.sp_degree): e for e in self.estimates})
        object.__setattr__(self, "_speeds", dict(self.rank_speeds))
        object.__setattr__(self, "_scales", {})

    def seconds(self, stage: str, work_class: WorkClass, sp_degree: int = 1) -> float:
        """Seconds per item of ``work_class`` in ``stage`` (for denoise: the group's wall time at ``sp_degree``)."""
        estimate = self._by_key.get((stage, work_class.key, sp_degree))
        if estimate is not None:
            return estimate.seconds
        return self.prior.seconds(stage, work_class, sp_degree) * self.stage_scale(stage)

    def stage_scale(self, stage: str) -> float:
        """Measured / prior for this stage (1.0 until something of the stage was measured)."""
        if stage not in self._scales:
            num, den = 0.0, 0.0
            for e in self.estimates:
                if e.stage == stage and e.seconds > 0:
                    prior = self.prior.seconds(stage, WorkClass.from_key(e.class_key), e.sp_degree)
                    if prior > 0:
                        num += e.weight * math.log(e.seconds / prior)
                        den += e.weight
            self._scales[stage] = math.exp(num / den) if den > 0 else 1.0
        return self._scales[stage]

    def scaled(self, stage: str, factor: float) -> "CostModel":
        """This model's prior with ``stage`` ``factor`` times as slow, nothing measured: what-if plans (the engine
        sizes its channel heap for the plans such shifts would choose)."""
        return CostModel(ScaledPrior(self, stage, factor))

    def speed(self, rank: int) -> float:
        return self._speeds.get(rank, 1.0)

    def speeds(self, num_ranks: int) -> tuple[float, ...]:
        if not self._speeds:
            return (1.0,) * num_ranks
        return tuple(self._speeds.get(r, 1.0) for r in range(num_ranks))

    def refit(self, timings: Sequence[RankTimings]) -> "CostModel":
        """A new model with one batch's timings (every rank's) folded in.

        Deterministic on every rank: the same rows in the same order (:class:`History`) and the same stopping test.
        """
        if not any(s.num_items > 0 and s.busy_s > 0 for rank in timings for s in rank.samples):
            return self
        history = self.history.folded(timings, self.window_items)
        ranks, keys = history.ranks, history.keys
        row_rank, row_key, row_mean, row_weight = history.row_rank, history.row_key, history.mean, history.weight
        key_weight = [0.0] * len(keys)
        rank_weight = [1.0] * len(ranks)  # one item's worth of pull towards speed 1.0 keeps lone ranks sane
        for i, k, w in zip(row_rank, row_key, row_weight):
            key_weight[k] += w
            rank_weight[i] += w
        log_speed = [math.log(self._speeds.get(r, 1.0)) for r in ranks]
        rows = list(zip(row_rank, row_key, row_mean, row_weight))

        def bases(log_speed: list[float]) -> list[float]:
            sums = [0.0] * len(keys)
            for i, k, m, w in rows:
                sums[k] += w * (m + log_speed[i])
            return [total / weight for total, weight in zip(sums, key_weight)]

        for _ in range(self.iterations):  # warm-started from the last fit: one or two rounds usually settle it
            base = bases(log_speed)
            sums = [0.0] * len(ranks)
            for i, k, m, w in rows:
                sums[i] += w * (base[k] - m)
            new = [total / weight for total, weight in zip(sums, rank_weight)]
            shift = sum(new) / len(new)
            new = [v - shift for v in new]
            moved = max(abs(a - b) for a, b in zip(new, log_speed))
            log_speed = new
            if moved < 1e-4:
                break
        base = bases(log_speed)
        estimates = tuple(Estimate(k[0], k[1], k[2], math.exp(base[j]), key_weight[j])
                          for j, k in sorted(enumerate(keys), key=lambda jk: jk[1]))
        speeds = tuple(sorted((r, math.exp(log_speed[i])) for i, r in enumerate(ranks)))
        return dataclasses.replace(self, estimates=estimates, rank_speeds=speeds, history=history)

    def item_seconds(self, work_class: WorkClass, sp_degree: int = 1) -> dict[str, float]:
        return {stage: self.seconds(stage, work_class, sp_degree) for stage in TIMED_STAGES}

    def summary(self, classes: Sequence[WorkClass], sp_degree: int = 1) -> dict:
        """For events: per class the predicted stage seconds; the stage scales; ranks off the typical speed."""
        typical = sorted(v for _, v in self.rank_speeds)[len(self.rank_speeds) // 2] if self.rank_speeds else 1.0
        slow = {r: round(v / typical, 3) for r, v in self.rank_speeds if abs(v / typical - 1.0) > 0.1}
        return {"classes": {c.key: {s: round(v, 4) for s, v in self.item_seconds(c, sp_degree).items()}
                            for c in classes},
                "stage_scale": {s: round(self.stage_scale(s), 4) for s in TIMED_STAGES},
                "ranks_off_speed": dict(list(slow.items())[:64]), "num_ranks_off_speed": len(slow)}


@dataclass(frozen=True)
class ScaledPrior:
    """A cost model's predictions with one stage ``factor`` times as slow (see :meth:`CostModel.scaled`)."""

    base: "CostModel"
    stage: str
    factor: float

    def seconds(self, stage: str, work_class: WorkClass, sp_degree: int = 1) -> float:
        seconds = self.base.seconds(stage, work_class, sp_degree)
        return seconds * self.factor if stage == self.stage else seconds
