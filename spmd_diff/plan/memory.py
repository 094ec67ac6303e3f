"""How much GPU memory a rank needs for the stages it holds, so no rank is planned with stages it cannot hold.

A rank holding a set of stages needs: a fixed overhead (CUDA context, library workspaces), the channel heap,
every held component's weights, and the largest activation peak among its stages. Stages on one rank run one at a
time and PyTorch's caching allocator reuses the blocks one stage freed for the next, so peaks do not add; a
fragmentation factor covers what the allocator cannot reuse. A time-shared rank (``roles.time_share``) holds every
stage but one stage's component on its GPU at a time: it fits when each stage alone fits
(:meth:`MemoryModel.fits_time_shared`), and keeps every component and its buffered items in host memory
(:meth:`MemoryModel.time_shared_host_bytes`). Activation peaks come from shapes (calibrated on
DESIGN.md's measurements) unless measured ones were recorded (:meth:`MemoryModel.with_measured_peak`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterable

from spmd_diff.plan.model_sizes import ModelSizes
from spmd_diff.plan.workload import WorkClass

STAGES = ("encode", "denoise", "decode")
"""Stages that hold a GPU component (writing a video needs none)."""
GIB = 2**30
VAE_PEAK_BYTES_PER_PIXEL_BF16 = 156.0
"""VAE decode peak in bf16: 4.7 GiB at 480x832x81 (32.3 Mpx), 10.4 GiB at 720x1280x81 (DESIGN.md); float32 x2."""
H200_USABLE_BYTES = int(139.8 * GIB)
"""What one H200 offers a process (the lent machines)."""


@dataclass(frozen=True)
class MemoryModel:
    """Bytes per rank for a set of stages. Build with :meth:`for_model`."""

    weight_bytes: tuple[tuple[str, int], ...]
    """(stage, bytes of the component it loads), for encode, denoise, decode."""
    dit_bytes_per_token: float
    """DiT activation peak per video token held by one rank (bf16 hidden states, FFN intermediate, q/k/v)."""
    vae_bytes_per_pixel: float
    """VAE decode peak per output pixel."""
    encode_activation_bytes: int = GIB // 4
    encode_vae: bool = False
    """Image-to-video: encode also runs the VAE encoder over the whole video (peak taken as a decode's)."""
    overhead_bytes: int = GIB
    """CUDA context, cuBLAS/cuDNN workspaces, the torch allocator's own slack."""
    heap_bytes: int = 0
    """Symmetric heap (channels, collectives, progress board) every rank allocates, when it lives on the GPU."""
    fragmentation: float = 1.1
    """Activation peaks are multiplied by this (blocks the caching allocator cannot reuse across stages)."""
    measured: tuple[tuple[str, str, int, int], ...] = ()
    """(stage, class key, SP degree, measured activation peak bytes): overrides the shape-based peak."""
    embeds_bytes: int = 0
    """One prompt's text embeddings, one guidance branch (what an encoded item holds; twice with guidance)."""

    @staticmethod
    def for_model(sizes: ModelSizes, heap_bytes: int = 0) -> "MemoryModel":
        dims = sizes.dims
        per_token = (16 * dims.dim + 4 * dims.ffn_dim) * sizes.dit_dtype_bytes / 2
        per_pixel = VAE_PEAK_BYTES_PER_PIXEL_BF16 * sizes.vae_dtype_bytes / 2 * dims.vae_base_dim / 96
        return MemoryModel(tuple(sizes.weight_bytes.items()), per_token, per_pixel, heap_bytes=heap_bytes,
                           encode_vae=sizes.dims.vae_encode, embeds_bytes=sizes.embeds_bytes)

    def component_bytes(self, stage: str) -> int:
        return dict(self.weight_bytes).get(stage, 0)

    def activation_bytes(self, stage: str, work_class: WorkClass, sp_degree: int = 1) -> int:
        """Activation peak of one item of ``work_class`` in ``stage`` on one rank of a group of ``sp_degree``."""
        for m_stage, key, degree, peak in self.measured:
            if m_stage == stage and key == work_class.key and degree == sp_degree:
                return peak
        if stage == "denoise":
            exchange = 1.25 if sp_degree > 1 else 1.0  # all-to-all send/receive buffers of q, k, v
            return int(work_class.num_tokens / sp_degree * self.dit_bytes_per_token * exchange * self.fragmentation)
        if stage == "decode":
            return int(work_class.num_pixels * self.vae_bytes_per_pixel * self.fragmentation)
        if stage == "encode":
            text = int(self.encode_activation_bytes * (2 if work_class.cfg else 1))
            if self.encode_vae:
                return max(text, int(work_class.num_pixels * self.vae_bytes_per_pixel * self.fragmentation))
            return text
        return 0

    def rank_bytes(self, stages: Iterable[str], classes: Iterable[WorkClass], sp_degree: int = 1) -> int:
        """Bytes a rank needs to hold ``stages`` and run any item of ``classes`` through each of them."""
        stages = [s for s in stages if s in STAGES]
        classes = list(classes)
        weights = sum(self.component_bytes(s) for s in stages)
        peak = max((self.activation_bytes(s, c, sp_degree if s == "denoise" else 1)
                    for s in stages for c in classes), default=0)
        return self.overhead_bytes + self.heap_bytes + weights + peak

    def fits(self, stages: Iterable[str], classes: Iterable[WorkClass], capacity_bytes: int,
             sp_degree: int = 1) -> bool:
        return self.rank_bytes(stages, classes, sp_degree) <= capacity_bytes

    def time_shared_bytes(self, classes: Iterable[WorkClass], sp_degree: int = 1) -> int:
        """GPU bytes of a time-shared rank: the most any one stage needs alone (overhead, heap, that stage's
        component and its activation peak), since only one stage's component is on the GPU at a time."""
        classes = list(classes)
        return max(self.rank_bytes((stage,), classes, sp_degree) for stage in STAGES)

    def fits_time_shared(self, classes: Iterable[WorkClass], capacity_bytes: int, sp_degree: int = 1) -> bool:
        """A time-shared rank fits when each stage alone fits."""
        return self.time_shared_bytes(classes, sp_degree) <= capacity_bytes

    def time_shared_host_bytes(self, classes: Iterable[WorkClass], stage_batch: int) -> int:
        """Host memory a time-shared rank needs: every component (kept there while another stage has the GPU)
        and the ``stage_batch`` items of a cycle, each holding its text embeddings and its latents (the largest
        class's)."""
        per_item = max((self.embeds_bytes * (2 if c.cfg else 1) + c.latent_bytes for c in classes), default=0)
        return sum(self.component_bytes(s) for s in STAGES) + stage_batch * per_item

    def with_measured_peak(self, stage: str, work_class: WorkClass, sp_degree: int, peak_bytes: int) -> "MemoryModel":
        """A model that uses a measured activation peak (e.g. ``torch.cuda.max_memory_allocated`` during the
        stage minus what was allocated before it) for this stage, class and degree."""
        kept = tuple(m for m in self.measured if (m[0], m[1], m[2]) != (stage, work_class.key, sp_degree))
        return dataclasses.replace(self, measured=kept + ((stage, work_class.key, sp_degree, int(peak_bytes)),))

    def with_heap(self, heap_bytes: int) -> "MemoryModel":
        return dataclasses.replace(self, heap_bytes=int(heap_bytes))

    def describe(self, classes: Iterable[WorkClass], capacity_bytes: int, sp_degree: int = 1) -> str:
        classes = list(classes)
        lines = [f"memory per rank (GPU capacity {capacity_bytes / GIB:.1f} GiB):"]
        for stages in (("encode",), ("denoise",), ("decode",), ("denoise", "decode"), ("encode", "decode"),
                       ("encode", "denoise", "decode")):
            need = self.rank_bytes(stages, classes, sp_degree)
            verdict = "fits" if need <= capacity_bytes else "does not fit"
            lines.append(f"  {'+'.join(stages):22s} {need / GIB:6.1f} GiB  {verdict}")
        need = self.time_shared_bytes(classes, sp_degree)
        verdict = "fits" if need <= capacity_bytes else "does not fit"
        lines.append(f"  {'time-shared':22s} {need / GIB:6.1f} GiB  {verdict} (one stage's component on the GPU "
                     "at a time)")
        return "\n".join(lines)


def capacity_bytes(gpu_memory_gib: float, device_bytes: int | None = None) -> int:
    """What the planner may use on one GPU: the device's memory, capped by ``world.gpu_memory_gib`` (> 0).

    ``device_bytes``: the GPU's usable memory as the runtime measured it (None: an H200, the lent machines).
    """
    own = H200_USABLE_BYTES if device_bytes is None else int(device_bytes)
    return min(own, int(gpu_memory_gib * GIB)) if gpu_memory_gib > 0 else own

