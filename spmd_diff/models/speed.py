"""Speed options of the Wan stages: what the exact tier removes (waste) and what the fast tier changes (kernels).

Exact (bit-identical to the plain path, which equals ``WanPipeline``):

- :func:`frames_to_uint8`: ``VideoProcessor.postprocess_video(video, "np")`` followed by ``round(255 * x)`` as
  uint8, computed where the video is (the GPU) with the same float32 operations in the same order (IEEE multiply
  and add, round half to even), so no float32 video crosses to the host and numpy does no pass over it;
- :class:`EmbedCache`: text embeddings of a repeated text (the job's negative prompt) computed once.

Fast (opt-in, deviation measured): :class:`StageOptions` ``vae_dtype`` (bfloat16 VAE), ``compile_blocks``
(``torch.compile`` of every transformer block, as SP groups already do) and ``attention_backend`` (a diffusers
attention backend). No MPI here.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageOptions:
    """How ``WanStages`` builds and runs its components (the runtime maps the job's ``[speed]`` onto this)."""

    vae_dtype: torch.dtype = torch.float32
    """VAE weights and decode arithmetic; float32 is what Wan recommends and WanPipeline users run (exact)."""
    compile_blocks: bool = False
    """``nn.Module.compile`` every transformer block (fast tier; changes bf16 rounding)."""
    attention_backend: str | None = None
    """A diffusers ``AttentionBackendName`` value for the transformer(s), or None to keep the model's default."""
    negative_cache_size: int = 8
    """Distinct negative-prompt texts whose embeddings are kept (0: encode every time). Exact: same tensors."""

    def describe(self) -> str:
        dtype = str(self.vae_dtype).removeprefix("torch.")
        return (f"vae {dtype}, compiled blocks {'on' if self.compile_blocks else 'off'}, attention "
                f"{self.attention_backend or 'default'}, negative-prompt cache {self.negative_cache_size}")


EXACT = StageOptions()


def frames_to_uint8(video_BCFHW: torch.Tensor) -> torch.Tensor:
    """The VAE's output as uint8 frames ``[F, H, W, 3]`` on its own device (batch 1).

    Bit-identical to ``_frames_to_uint8(VideoProcessor.postprocess_video(video, "np")[0])``: denormalise in the
    video's dtype (``(x * 0.5 + 0.5).clamp(0, 1)``, as diffusers does on the device), then ``.float()`` (diffusers'
    ``pt_to_numpy``), then ``round(255 * x)`` in float32 (numpy's float32 multiply and round half to even) and the
    cast of those whole numbers to uint8. Each step is a separate eager kernel: nothing is fused into an FMA.
    """
    if video_BCFHW.ndim != 5 or video_BCFHW.shape[0] != 1:
        raise ValueError(f"expected a video [1, C, F, H, W], got {tuple(video_BCFHW.shape)}")
    frames = video_BCFHW[0].permute(1, 2, 3, 0)  # [F, H, W, C]: elementwise results are the same in any layout
    frames = (frames * 0.5 + 0.5).clamp(0, 1)
    frames = frames.float()
    frames = torch.round(frames * 255.0)
    return frames.to(torch.uint8).contiguous()


class EmbedCache:
    """Text embeddings by (text, max_sequence_length), least recently used dropped beyond ``size`` entries.

    Holds the tensors ``embed`` returned (on the encoder's device); callers must not modify them in place.
    """

    def __init__(self, size: int) -> None:
        self.size = int(size)
        self._entries: OrderedDict[tuple[str, int], torch.Tensor] = OrderedDict()
        self.num_hits = 0
        self.num_misses = 0

    def get(self, text: str, max_sequence_length: int, embed: Callable[[str, int], torch.Tensor]) -> torch.Tensor:
        if self.size <= 0:
            return embed(text, max_sequence_length)
        key = (text, max_sequence_length)
        tensor = self._entries.get(key)
        if tensor is not None:
            self._entries.move_to_end(key)
            self.num_hits += 1
            return tensor
        self.num_misses += 1
        tensor = embed(text, max_sequence_length)
        self._entries[key] = tensor
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)
        return tensor

    def clear(self) -> None:
        self._entries.clear()


def apply_transformer_options(model: Any, options: StageOptions, device: torch.device) -> list[str]:
    """Apply ``options``' transformer settings to a ``WanTransformer3DModel``; returns what was applied.

    The attention backend is set on CUDA devices only (the non-default native backends are CUDA kernels);
    blocks are compiled on any device (:func:`compile_blocks`).
    """
    applied = []
    if options.attention_backend and options.attention_backend != "native":
        if device.type == "cuda":
            model.set_attention_backend(options.attention_backend)
            applied.append(f"attention {options.attention_backend}")
        else:
            logger.info("attention backend %s skipped on %s", options.attention_backend, device)
    if options.compile_blocks:
        compile_blocks(model)
        applied.append(f"{len(model.blocks)} blocks compiled")
    return applied


MAX_COMPILED_VARIANTS = 32
"""Most graphs one rank may compile per transformer block code in a job (distinct local token counts x attention
paths; :func:`spmd_diff.parallel.hooks.compiled_variants`): each costs a compilation (seconds to a minute with
Inductor) and its code's memory. A job needing more is refused up front rather than recompiling all along."""


def compile_blocks(model: Any, backend: str | Callable = "inductor") -> bool:
    """``nn.Module.compile`` every transformer block of ``model`` once for the model's lifetime; returns whether it
    compiled them now (False: they already were, with this backend).

    ``dynamic=False``: one graph per distinct input shape (the local token count) and attention processor, shared
    by all blocks (Dynamo caches per code object and guards on the block's type and structure, not its identity);
    the first forward of each pays the compilation. Sequence-parallel groups attached later
    (:func:`spmd_diff.parallel.hooks.parallelize_transformer`) reuse these compiled blocks. Measured against
    ``dynamic=True`` in perf/results/compile-shapes-*.md. ``backend``: the ``torch.compile`` backend ("inductor";
    "aot_eager" runs the same operations as eager, for tests).

    Raises:
        ValueError: if the blocks were compiled with another backend.
    """
    current = getattr(model, "_spmd_compiled_backend", None)
    if current is not None:
        if current is not backend and current != backend:
            raise ValueError(f"the transformer blocks are compiled with backend {current!r} already, not {backend!r}")
        return False
    for block in model.blocks:
        block.compile(dynamic=False, backend=backend)
    model._spmd_compiled_backend = backend
    return True


def allow_compiled_variants(count: int) -> None:
    """Let Dynamo keep ``count`` compiled graphs per code object (``torch._dynamo.config.recompile_limit``, only
    ever raised) and make it raise, instead of silently running a block uncompiled, if a job ever needs more
    (``fail_on_recompile_limit_hit``). ``count`` is what the job's schedule can produce
    (:func:`spmd_diff.parallel.hooks.compiled_variants`).

    Raises:
        ValueError: if ``count`` exceeds :data:`MAX_COMPILED_VARIANTS`.
    """
    if count > MAX_COMPILED_VARIANTS:
        raise ValueError(f"{count} compiled block variants (local token counts x attention paths) exceed the "
                         f"{MAX_COMPILED_VARIANTS} allowed")
    import torch._dynamo.config as dynamo_config

    dynamo_config.recompile_limit = max(int(dynamo_config.recompile_limit), int(count))
    dynamo_config.fail_on_recompile_limit_hit = True
