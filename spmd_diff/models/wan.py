"""Wan text-to-video as three stage functions: encode (UMT5), denoise (DiT), decode (VAE).

The math is diffusers' ``WanPipeline.__call__`` (diffusers 0.42.1) split at the two handoffs, with the same ops in
the same order and the same dtypes: prompt cleaning, tokenisation and zero re-padding to ``max_sequence_length``;
initial latents drawn from a CPU ``torch.Generator`` seeded with the item seed (``prepare_latents``/``randn_tensor``);
the model directory's own scheduler, fresh per item; separate cond and uncond transformer forwards; the Wan2.2
two-expert switch (``transformer_2``, ``boundary_ratio``) and per-token timesteps (``expand_timesteps``); the
latents_mean/std un-normalisation, VAE decode and ``VideoProcessor`` post-processing. So a video is the same
whether these stages run in one process or on three ranks, and :func:`reference_video` is an independent check.

No MPI here: the runtime moves the tensors these functions return.
"""

from __future__ import annotations

import gc
import logging
import pathlib
import time
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch

from spmd_diff.errors import UserError
from spmd_diff.models.shapes import (PIPELINE_CLASS, STAGES, VideoSpec, WanShapes, component_class, model_index,
                                     read_shapes, transformer_names)
from spmd_diff.models.residency import HostCopy
from spmd_diff.models.speed import EXACT, EmbedCache, StageOptions, apply_transformer_options, frames_to_uint8

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------------------
# The stages


def _frames_to_uint8(frames: np.ndarray) -> np.ndarray:
    """``round(255 * frames)`` as uint8; ``frames`` float in [0, 1], as ``output_type="np"`` returns them."""
    return np.round(255.0 * frames).astype(np.uint8)


class WanStages:
    """The components one rank needs for its stages of Wan text-to-video, and the stage functions.

    Loads only what ``stages`` use: ``encode`` -> tokenizer and text encoder (in ``dtype``); ``denoise`` ->
    transformer (and ``transformer_2`` for Wan2.2 two-expert dirs, in ``dtype``) and the scheduler config;
    ``decode`` -> VAE (``options.vae_dtype``: float32 unless the fast tier asks for bfloat16, as Wan recommends).
    Components not loaded are ``None``. Tensors come back on ``device`` (a rank that runs the next stage itself
    keeps them there; channels move them); inputs may be on any device. ``options``: :class:`StageOptions`
    (default: the exact tier). Call :meth:`free` to release the components.

    ``time_shared``: every component is kept in host memory (:class:`HostCopy`, taken right after it is built, so
    loading never holds two components on the device) and only one stage's components are on ``device`` at a
    time: :meth:`use` moves them there before their stage runs (a stage function called for another stage
    raises). Same weights, so the same videos.
    """

    pipeline_class = PIPELINE_CLASS
    """The diffusers pipeline whose math these stages are (``model_index.json``'s ``_class_name``)."""

    def __init__(self, model_dir: str | pathlib.Path, stages: Iterable[str], *, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, options: StageOptions = EXACT, time_shared: bool = False) -> None:
        self.stages = frozenset(stages)
        unknown = self.stages - STAGES
        if unknown or not self.stages:
            raise ValueError(f"stages must be a non-empty subset of {sorted(STAGES)}, got {sorted(self.stages)}")
        self.model_dir, self._index = model_index(model_dir)
        if self._index.get("_class_name") != self.pipeline_class:
            raise UserError(f"model directory {self.model_dir} holds a {self._index.get('_class_name')} pipeline; "
                            f"{type(self).__name__} runs {self.pipeline_class} (use models.random_wan.make_stages)")
        self.device = torch.device(device)
        self.dtype = dtype
        self.options = options
        self.negative_cache = EmbedCache(options.negative_cache_size)
        self.tokenizer: Any = None
        self.text_encoder: Any = None
        self.transformer: Any = None
        self.transformer_2: Any = None
        self.vae: Any = None
        self.video_processor: Any = None
        self._scheduler: Any = None
        self._shapes: dict[VideoSpec, WanShapes] = {}
        self.time_shared = time_shared
        self._host_copies: dict[str, dict[str, HostCopy]] = {}
        """Time-shared: stage -> {component attribute: its host copy}."""
        self.resident_stage: str | None = None
        """Time-shared: the stage whose components are on the device (None: none yet)."""

        if "encode" in self.stages:
            self.tokenizer = self._load("tokenizer")
            self.text_encoder = self._keep("encode", "text_encoder", self._load("text_encoder", dtype=dtype))
        if "denoise" in self.stages:
            names = transformer_names(self._index)
            if not names:
                raise UserError(f"model directory {self.model_dir}: model_index.json names no transformer")
            for name in names:
                setattr(self, name, self._load(name, dtype=dtype))
                applied = apply_transformer_options(getattr(self, name), options, self.device)
                if applied:
                    logger.info("%s: %s", name, ", ".join(applied))
                self._keep("denoise", name, getattr(self, name))
            self._scheduler = self._load("scheduler")
        if "decode" in self.stages:
            from diffusers.video_processor import VideoProcessor

            self.vae = self._keep("decode", "vae", self._load("vae", dtype=options.vae_dtype))
            self.video_processor = VideoProcessor(vae_scale_factor=self.vae.config.scale_factor_spatial)

    def _load(self, name: str, dtype: torch.dtype | None = None) -> Any:
        """``from_pretrained`` of component ``name`` with the class and keywords ``WanPipeline.from_pretrained``
        uses; ``nn.Module`` components are moved to ``self.device`` in eval mode."""
        cls = component_class(self.model_dir, self._index, name)
        path = self.model_dir / name
        if not path.is_dir():
            raise UserError(f"model directory {self.model_dir}: component directory {path} is missing")
        kwargs: dict[str, Any] = {}
        if dtype is not None:
            is_transformers = cls.__module__.startswith("transformers")
            kwargs["dtype" if is_transformers else "torch_dtype"] = dtype
        try:
            component = cls.from_pretrained(path, **kwargs)
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot load {name} from {path}: {exc}") from exc
        if isinstance(component, torch.nn.Module):
            component = component.to(self.device).eval()
        return component

    def _keep(self, stage: str, attribute: str, component: Any) -> Any:
        """``component`` (attribute ``attribute``, used by ``stage``) as loaded; time-shared, a module is taken
        to host memory at once (its device copy released before the next component is built)."""
        if self.time_shared and isinstance(component, torch.nn.Module):
            self._host_copies.setdefault(stage, {})[attribute] = HostCopy(component, self.device)
            self._release_device_memory()
        return component

    def use(self, stage: str) -> dict[str, Any] | None:
        """Time-shared: put ``stage``'s components on the device, after dropping the device copies of the stage
        that was there (``torch.cuda.empty_cache()`` in between, so its memory is free for this one). Returns
        what moved, ``{"stage", "components", "bytes", "seconds", "dropped"}``, or None when nothing had to
        (not time-shared, or ``stage`` already resident)."""
        self._require_built(stage)
        if not self.time_shared or self.resident_stage == stage:
            return None
        t0 = time.perf_counter()
        dropped = self.resident_stage
        for copy in self._host_copies.get(dropped, {}).values():
            copy.drop()
        self.resident_stage = None
        self._release_device_memory()
        moving = self._host_copies.get(stage, {})
        for copy in moving.values():
            copy.to_device()
        self.resident_stage = stage
        return {"stage": stage, "components": sorted(moving), "bytes": sum(c.nbytes for c in moving.values()),
                "seconds": time.perf_counter() - t0, "dropped": dropped}

    def on_device(self, stage: str) -> bool:
        """Whether ``stage``'s components are on the device (always, unless time-shared)."""
        return stage in self.stages and (not self.time_shared or self.resident_stage == stage)

    def _release_device_memory(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _require_built(self, stage: str) -> None:
        if stage not in self.stages:
            raise RuntimeError(f"WanStages was built for stages {sorted(self.stages)}, not {stage!r}")

    def _require(self, stage: str) -> None:
        self._require_built(stage)
        if self.time_shared and self.resident_stage != stage:
            raise RuntimeError(f"time-shared components: {stage!r} runs while {self.resident_stage!r} is on the "
                               f"device; call use({stage!r}) first")

    def shapes(self, spec: VideoSpec) -> WanShapes:
        """:func:`read_shapes` for this model directory (cached per spec)."""
        if spec not in self._shapes:
            self._shapes[spec] = read_shapes(self.model_dir, spec)
        return self._shapes[spec]

    # ---- encode -------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def _embed(self, prompt: str, max_sequence_length: int) -> torch.Tensor:
        """``WanPipeline._get_t5_prompt_embeds`` for one prompt: ``[1, L, D]`` in the text encoder's dtype."""
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean

        text = prompt_clean(prompt)
        num_tokens = len(self.tokenizer(text, add_special_tokens=True).input_ids)
        if num_tokens > max_sequence_length:
            shown = text if len(text) <= 80 else text[:77] + "..."
            warnings.warn(f"prompt {shown!r} has {num_tokens} tokens; truncated to max_sequence_length "
                          f"{max_sequence_length} (as diffusers does)", stacklevel=3)
        text_inputs = self.tokenizer([text], padding="max_length", max_length=max_sequence_length, truncation=True,
                                     add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        text_input_ids, mask = text_inputs.input_ids, text_inputs.attention_mask
        seq_lens = mask.gt(0).sum(dim=1).long()
        prompt_embeds = self.text_encoder(text_input_ids.to(self.device), mask.to(self.device)).last_hidden_state
        prompt_embeds = prompt_embeds.to(dtype=self.text_encoder.dtype, device=self.device)
        prompt_embeds = [u[:v] for u, v in zip(prompt_embeds, seq_lens)]
        prompt_embeds = torch.stack(
            [torch.cat([u, u.new_zeros(max_sequence_length - u.size(0), u.size(1))]) for u in prompt_embeds], dim=0
        )
        return prompt_embeds

    def encode(self, prompt: str, negative_prompt: str | None, spec: VideoSpec) -> dict[str, torch.Tensor]:
        """Text embeddings of one item, as ``WanPipeline.encode_prompt``.

        Returns ``{"prompt_embeds": [1, L, D]}`` plus ``"negative_prompt_embeds": [1, L, D]`` when
        ``spec.guidance_scale > 1`` (a ``None`` negative prompt is ``""``, as in the pipeline); L is
        ``spec.max_sequence_length``, D the text encoder width; dtype the text encoder's; on ``self.device``.
        Padding positions are zeros. Over-long prompts are truncated with a warning. Negative-prompt embeddings
        come from :attr:`negative_cache` (the same tensor for the same text: do not modify it in place).
        """
        self._require("encode")
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
        embeds = {"prompt_embeds": self._embed(prompt, spec.max_sequence_length)}
        if spec.do_classifier_free_guidance:
            embeds["negative_prompt_embeds"] = self.negative_cache.get(negative_prompt or "", spec.max_sequence_length,
                                                                       self._embed)
        return embeds

    # ---- denoise ------------------------------------------------------------------------------------------------

    def new_scheduler(self) -> Any:
        """A fresh scheduler from the model directory's config (schedulers keep per-video state)."""
        self._require("denoise")
        return type(self._scheduler).from_config(self._scheduler.config)

    def initial_latents(self, seed: int, spec: VideoSpec) -> torch.Tensor:
        """``[1, C, F, H, W]`` float32 noise on the CPU from ``torch.Generator("cpu").manual_seed(seed)``, exactly as
        ``WanPipeline.prepare_latents`` draws it (``randn_tensor`` with a CPU generator)."""
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an integer, got {seed!r}")
        generator = torch.Generator("cpu").manual_seed(seed)
        shape = self.shapes(spec).latents_shape
        return torch.randn(shape, generator=generator, device="cpu", dtype=torch.float32)

    @torch.no_grad()
    def denoise(self, embeds: dict[str, torch.Tensor], seed: int, spec: VideoSpec, *,
                callback: Callable[[int, int], None] | None = None, cfg_split: Any = None) -> torch.Tensor:
        """The denoising loop of the pipeline's ``__call__`` (:attr:`pipeline_class`) for one item.

        ``embeds``: :meth:`encode`'s dict (any device and float dtype; embeddings cast to the transformer's dtype
        as the pipeline does). ``seed`` drives the CPU generator of the initial latents. ``callback(step_index,
        num_steps)`` runs after each step. ``cfg_split`` (CFG parallel, with guidance): this rank runs only the
        branch ``cfg_split.branch`` (``"cond"`` or ``"uncond"``) and ``cfg_split.combine(noise) -> (noise_cond,
        noise_uncond)`` exchanges it with the other branch's ranks
        (:class:`spmd_diff.parallel.group_denoise.CfgSplit`). Returns the final latents ``[1, C, F, H, W]``
        float32 on ``self.device``.

        One loop for every task: a subclass adds what its transformer takes beside the text embeddings
        (:meth:`_transformer_inputs`) and what is concatenated to the latents on the channel axis
        (:meth:`_latents_condition`).
        """
        self._require("denoise")
        for key, shape in self.shapes(spec).encoded_shapes().items():
            if key not in embeds:
                raise ValueError(f"denoise needs embeds[{key!r}] (guidance_scale {spec.guidance_scale})")
            if tuple(embeds[key].shape) != shape:
                raise ValueError(f"embeds[{key!r}] has shape {tuple(embeds[key].shape)}, expected {shape}")
        device = self.device
        do_cfg = spec.do_classifier_free_guidance
        boundary_ratio = self._index.get("boundary_ratio")
        guidance_scale = spec.guidance_scale
        guidance_scale_2 = spec.guidance_scale_2
        if boundary_ratio is not None and guidance_scale_2 is None:
            guidance_scale_2 = guidance_scale

        transformer_dtype = self.transformer.dtype if self.transformer is not None else self.transformer_2.dtype
        prompt_embeds = embeds["prompt_embeds"].to(device=device, dtype=transformer_dtype)
        negative_prompt_embeds = None
        if do_cfg:
            negative_prompt_embeds = embeds["negative_prompt_embeds"].to(device=device, dtype=transformer_dtype)
        extra_inputs = self._transformer_inputs(embeds, transformer_dtype)
        condition = self._latents_condition(embeds)

        scheduler = self.new_scheduler()
        scheduler.set_timesteps(spec.num_inference_steps, device=device)
        timesteps = scheduler.timesteps

        latents = self.initial_latents(seed, spec).to(device)
        mask = torch.ones(latents.shape, dtype=torch.float32, device=device)
        num_timesteps = len(timesteps)
        scheduler.set_begin_index(0)
        boundary_timestep = None
        if boundary_ratio is not None:
            boundary_timestep = boundary_ratio * scheduler.config.num_train_timesteps

        def forward(model: Any, branch: str, context_kwargs: dict[str, Any]) -> torch.Tensor:
            with model.cache_context(branch, **context_kwargs):
                return model(hidden_states=latent_model_input, timestep=timestep,
                             encoder_hidden_states=prompt_embeds if branch == "cond" else negative_prompt_embeds,
                             attention_kwargs=None, return_dict=False, **extra_inputs)[0]

        for i, t in enumerate(timesteps):
            if boundary_timestep is None or t >= boundary_timestep:
                current_model, current_guidance_scale = self.transformer, guidance_scale  # Wan2.1 / high noise
            else:
                current_model, current_guidance_scale = self.transformer_2, guidance_scale_2  # Wan2.2 low noise
            if condition is None:
                latent_model_input = latents.to(transformer_dtype)
            else:
                latent_model_input = torch.cat([latents, condition], dim=1).to(transformer_dtype)
            if self._index.get("expand_timesteps", False):
                temp_ts = (mask[0][0][:, ::2, ::2] * t).flatten()
                timestep = temp_ts.unsqueeze(0).expand(latents.shape[0], -1)  # [1, num_tokens] (Wan2.2 TI2V)
            else:
                timestep = t.expand(latents.shape[0])
            context_kwargs = self._cache_context_kwargs(i, float(scheduler.sigmas[i]), num_timesteps)
            if do_cfg and cfg_split is not None:  # CFG parallel: one branch here, the other on the paired ranks
                noise_pred, noise_uncond = cfg_split.combine(forward(current_model, cfg_split.branch,
                                                                     context_kwargs))
                noise_pred = noise_uncond + current_guidance_scale * (noise_pred - noise_uncond)
            else:
                noise_pred = forward(current_model, "cond", context_kwargs)
                if do_cfg:
                    noise_uncond = forward(current_model, "uncond", context_kwargs)
                    noise_pred = noise_uncond + current_guidance_scale * (noise_pred - noise_uncond)
            latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
            if callback is not None:
                callback(i, num_timesteps)

        assert latents.dtype == torch.float32, latents.dtype
        return latents

    def _transformer_inputs(self, embeds: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Keyword inputs of every transformer call besides the text embeddings: none for text-to-video."""
        return {}

    def _latents_condition(self, embeds: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """A tensor concatenated to the latents on the channel axis at every step: none for text-to-video."""
        return None

    def _cache_context_kwargs(self, step_index: int, sigma: float, num_steps: int) -> dict[str, Any]:
        """What the pipeline passes to ``cache_context`` besides the branch name (``WanPipeline``: the step)."""
        return {"step_index": step_index, "sigma": sigma, "num_inference_steps": num_steps}

    # ---- decode -------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def decode(self, latents_BCFHW: torch.Tensor) -> np.ndarray:
        """VAE decode of :meth:`denoise`'s ``[1, C, F, H, W]`` latents (any device/dtype): the video as uint8
        ``[frames, height, width, 3]`` = ``round(255 * frames)`` of the pipeline's ``output_type="np"`` frames,
        through diffusers' ``VideoProcessor`` and numpy (the reference path; :meth:`decode_uint8` is the same
        video without the float32 host round trip)."""
        video = self._vae_decode(latents_BCFHW)
        frames = self.video_processor.postprocess_video(video, output_type="np")
        return _frames_to_uint8(frames[0])

    @torch.no_grad()
    def decode_uint8(self, latents_BCFHW: torch.Tensor) -> torch.Tensor:
        """:meth:`decode`'s video, bit-identical, as a uint8 tensor ``[frames, height, width, 3]`` on
        ``self.device``: the conversion runs where the VAE ran (:func:`frames_to_uint8`)."""
        return frames_to_uint8(self._vae_decode(latents_BCFHW))

    def _vae_decode(self, latents_BCFHW: torch.Tensor) -> torch.Tensor:
        """The pipeline's un-normalisation and ``vae.decode``: ``[1, 3, frames, height, width]`` in the VAE's dtype,
        values in about [-1, 1]."""
        self._require("decode")
        vae = self.vae
        if latents_BCFHW.ndim != 5 or latents_BCFHW.shape[0] != 1 or latents_BCFHW.shape[1] != vae.config.z_dim:
            raise ValueError(f"decode expects latents [1, {vae.config.z_dim}, F, H, W], "
                             f"got {tuple(latents_BCFHW.shape)}")
        latents = latents_BCFHW.to(self.device, dtype=vae.dtype)
        z_dim = vae.config.z_dim
        latents_mean = torch.tensor(vae.config.latents_mean).view(1, z_dim, 1, 1, 1).to(latents.device, latents.dtype)
        latents_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, z_dim, 1, 1, 1).to(
            latents.device, latents.dtype)
        latents = latents / latents_std + latents_mean
        return vae.decode(latents, return_dict=False)[0]

    @torch.no_grad()
    def warmup(self, spec: VideoSpec) -> None:
        """Run each loaded stage once on throwaway inputs (one denoising step), so that compilation, kernel
        selection and library handles are paid before the first item. Leaves no state behind: items rendered
        afterwards are unchanged."""
        import dataclasses

        shapes = self.shapes(spec)
        latents = None
        if "encode" in self.stages:
            self.use("encode")
            self._embed("warm-up", spec.max_sequence_length)
        if "denoise" in self.stages:
            self.use("denoise")
            model = self.transformer if self.transformer is not None else self.transformer_2
            zeros = torch.zeros(shapes.embeds_shape, dtype=model.dtype, device=self.device)
            embeds = {"prompt_embeds": zeros, "negative_prompt_embeds": zeros}
            latents = self.denoise(embeds, 0, dataclasses.replace(spec, num_inference_steps=1))
        if "decode" in self.stages:
            self.use("decode")
            if latents is None:
                latents = torch.zeros(shapes.latents_shape, device=self.device)
            self.decode_uint8(latents)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def free(self) -> None:
        """Drop every loaded component and return cached accelerator memory."""
        self._host_copies = {}
        self.resident_stage = None
        self.tokenizer = self.text_encoder = self.transformer = self.transformer_2 = self.vae = None
        self.video_processor = self._scheduler = None
        self.negative_cache.clear()
        self.stages = frozenset()
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def reference_video(model_dir: str | pathlib.Path, prompt: str, negative_prompt: str | None, seed: int,
                    spec: VideoSpec, pipeline: Any = None) -> np.ndarray:
    """The video diffusers' own ``WanPipeline`` renders (CPU, float32): uint8 ``[frames, height, width, 3]``.

    The independent reference the stage functions are tested against; slow for real models. ``pipeline``: a
    ``WanPipeline.from_pretrained(model_dir)`` to reuse for several references (None: loaded here).
    """
    from diffusers import WanPipeline

    root, _ = model_index(model_dir)
    read_shapes(root, spec)  # the pipeline would round bad sizes with a warning; reject them the same way
    if pipeline is None:
        pipeline = WanPipeline.from_pretrained(root)
    pipeline.set_progress_bar_config(disable=True)
    kwargs: dict[str, Any] = {}
    if spec.guidance_scale_2 is not None:
        kwargs["guidance_scale_2"] = spec.guidance_scale_2
    frames = pipeline(prompt=prompt, negative_prompt=negative_prompt, height=spec.height, width=spec.width,
                      num_frames=spec.num_frames, num_inference_steps=spec.num_inference_steps,
                      guidance_scale=spec.guidance_scale, generator=torch.Generator("cpu").manual_seed(seed),
                      output_type="np", max_sequence_length=spec.max_sequence_length, **kwargs).frames
    return _frames_to_uint8(frames[0])
