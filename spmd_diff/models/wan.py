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
import importlib
import inspect
import json
import logging
import math
import pathlib
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from spmd_diff.errors import UserError
from spmd_diff.models.speed import EXACT, EmbedCache, StageOptions, apply_transformer_options, frames_to_uint8

logger = logging.getLogger(__name__)

STAGES = frozenset({"encode", "denoise", "decode"})
PIPELINE_CLASS = "WanPipeline"
I2V_PIPELINE_CLASS = "WanImageToVideoPipeline"
_LOADABLE_LIBRARIES = ("diffusers", "transformers")


@dataclass(frozen=True)
class VideoSpec:
    """What to render: pure values, the same for every item of a job."""

    height: int
    """Pixels; a multiple of 16 and of the VAE's spatial factor times the patch size (16 for Wan2.1)."""
    width: int
    """Pixels; same rule as ``height``."""
    num_frames: int
    """Frames; ``4k + 1`` for Wan2.1's temporal factor 4 (81 is Wan2.1's default)."""
    num_inference_steps: int
    """Denoising steps (scheduler steps; each is 1 or, with CFG, 2 transformer forwards)."""
    guidance_scale: float
    """Classifier-free guidance scale; CFG (and a negative prompt) is used when it is > 1."""
    max_sequence_length: int = 512
    """Text tokens: prompts are truncated or zero-padded to this length (the pipeline's default, 512)."""
    guidance_scale_2: float | None = None
    """Wan2.2 two-expert dirs only: guidance of the low-noise expert (``None``: ``guidance_scale``, as diffusers)."""

    def __post_init__(self) -> None:
        for name in ("height", "width", "num_frames", "num_inference_steps", "max_sequence_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"{name} must be a positive integer, got {value!r}")
        for name in ("guidance_scale", "guidance_scale_2"):
            value = getattr(self, name)
            if value is None and name == "guidance_scale_2":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise UserError(f"{name} must be a finite number, got {value!r}")

    @property
    def do_classifier_free_guidance(self) -> bool:
        """True when ``guidance_scale > 1``: then encode also returns negative embeddings (as the pipeline)."""
        return self.guidance_scale > 1.0


@dataclass(frozen=True)
class WanShapes:
    """Tensor shapes of one item, from the model directory's JSON configs only (no weights): sizes buffers."""

    text_seq_len: int
    """L: tokens per text embedding (``VideoSpec.max_sequence_length``)."""
    text_dim: int
    """D: text embedding width (UMT5 ``d_model``; the transformer's ``text_dim``). 4096 for Wan2.1."""
    latent_channels: int
    """C: latent channels (the transformer's ``in_channels``). 16 for Wan2.1."""
    latent_frames: int
    """F: ``(num_frames - 1) // vae_scale_factor_temporal + 1``."""
    latent_height: int
    """H: ``height // vae_scale_factor_spatial``."""
    latent_width: int
    """W: ``width // vae_scale_factor_spatial``."""
    vae_scale_factor_spatial: int
    vae_scale_factor_temporal: int
    patch_size: tuple[int, int, int]
    """Transformer patch (frames, height, width); (1, 2, 2) for Wan2.1."""
    num_attention_heads: int
    attention_head_dim: int
    num_embeds: int = 1
    """Text embedding tensors per item: 2 (prompt, negative prompt) with CFG, else 1."""
    condition_channels: int = 0
    """Image-to-video: channels of the conditioning tensor (mask ``vae_scale_factor_temporal`` + VAE ``z_dim``: 20
    for Wan2.1 I2V, whose transformer takes ``C + 20 = 36`` ``in_channels``); 0 for text-to-video."""
    image_embeds_shape: tuple[int, int, int] | None = None
    """Image-to-video with a CLIP image encoder (Wan2.1): ``[1, tokens, width]`` of the image embeddings
    (``[1, 257, 1280]`` for Wan2.1's ViT-H/14); None otherwise."""

    @property
    def condition_shape(self) -> tuple[int, int, int, int, int]:
        """Image-to-video: ``[1, condition_channels, F, H, W]`` (float32): the first-frame mask, then the VAE
        latents of the conditioning video, as ``WanImageToVideoPipeline.prepare_latents`` returns them."""
        return (1, self.condition_channels, self.latent_frames, self.latent_height, self.latent_width)

    def encoded_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shape of every tensor the encode stage hands to denoise, by name (the message between them)."""
        shapes: dict[str, tuple[int, ...]] = {"prompt_embeds": self.embeds_shape}
        if self.num_embeds == 2:
            shapes["negative_prompt_embeds"] = self.embeds_shape
        if self.image_embeds_shape is not None:
            shapes["image_embeds"] = self.image_embeds_shape
        if self.condition_channels:
            shapes["condition"] = self.condition_shape
        return shapes

    def encoded_nbytes(self, embeds_dtype: torch.dtype, align: int = 1) -> int:
        """Bytes of one item's encode results (each tensor rounded up to ``align``): embeddings in
        ``embeds_dtype`` (the encoders' dtype), the condition in float32."""
        total = 0
        for name, shape in self.encoded_shapes().items():
            itemsize = 4 if name == "condition" else embeds_dtype.itemsize
            total += -(-math.prod(shape) * itemsize // align) * align
        return total

    @property
    def embeds_shape(self) -> tuple[int, int, int]:
        """Shape of each tensor :meth:`WanStages.encode` returns: ``[1, L, D]``."""
        return (1, self.text_seq_len, self.text_dim)

    @property
    def latents_shape(self) -> tuple[int, int, int, int, int]:
        """Shape of :meth:`WanStages.denoise`'s result: ``[1, C, F, H, W]`` (float32)."""
        return (1, self.latent_channels, self.latent_frames, self.latent_height, self.latent_width)

    @property
    def video_shape(self) -> tuple[int, int, int, int]:
        """Shape of :meth:`WanStages.decode`'s result: ``[frames, height, width, 3]`` (uint8)."""
        num_frames = (self.latent_frames - 1) * self.vae_scale_factor_temporal + 1
        return (num_frames, self.latent_height * self.vae_scale_factor_spatial,
                self.latent_width * self.vae_scale_factor_spatial, 3)

    @property
    def num_video_tokens(self) -> int:
        """Transformer sequence length: latent positions after patching (32,760 for Wan2.1 480p x 81 frames)."""
        p_t, p_h, p_w = self.patch_size
        return (self.latent_frames // p_t) * (self.latent_height // p_h) * (self.latent_width // p_w)

    def embeds_nbytes(self, dtype: torch.dtype) -> int:
        """Bytes of all :attr:`num_embeds` text embeddings of one item in ``dtype``."""
        return self.num_embeds * math.prod(self.embeds_shape) * dtype.itemsize

    def latents_nbytes(self) -> int:
        """Bytes of one item's final latents (float32)."""
        return math.prod(self.latents_shape) * 4

    def video_nbytes(self) -> int:
        """Bytes of one decoded video (uint8)."""
        return math.prod(self.video_shape)


# --------------------------------------------------------------------------------------------------------------
# Reading a model directory


def _read_json(path: pathlib.Path, what: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise UserError(f"{what}: {path} not found") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"{what}: cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"{what}: {path} does not hold a JSON object")
    return data


def _model_index(model_dir: str | pathlib.Path) -> tuple[pathlib.Path, dict[str, Any]]:
    """The model directory as an absolute path and its ``model_index.json``; UserError if it is not a WanPipeline."""
    root = pathlib.Path(model_dir).expanduser().absolute()
    if not root.is_dir():
        raise UserError(f"model directory {root} does not exist (or is not a directory)")
    index = _read_json(root / "model_index.json", f"model directory {root} is not a diffusers pipeline directory")
    if index.get("_class_name") not in (PIPELINE_CLASS, I2V_PIPELINE_CLASS):
        raise UserError(f"model directory {root} holds a {index.get('_class_name')!r} pipeline; only "
                        f"{PIPELINE_CLASS} (Wan text-to-video) and {I2V_PIPELINE_CLASS} (image-to-video) are supported")
    return root, index


def _has_component(index: dict[str, Any], name: str) -> bool:
    entry = index.get(name)
    return isinstance(entry, list) and len(entry) == 2 and all(isinstance(part, str) for part in entry)


def _component_class(root: pathlib.Path, index: dict[str, Any], name: str) -> type:
    """The class ``model_index.json`` names for component ``name`` (as the pipeline resolves it)."""
    if not _has_component(index, name):
        raise UserError(f"model directory {root}: model_index.json names no {name!r} component")
    library, class_name = index[name]
    if library not in _LOADABLE_LIBRARIES:
        raise UserError(f"model directory {root}: component {name!r} comes from {library!r}; "
                        f"only {', '.join(_LOADABLE_LIBRARIES)} components are supported")
    cls = getattr(importlib.import_module(library), class_name, None)
    if cls is None:
        raise UserError(f"model directory {root}: component {name!r} class {library}.{class_name} does not exist "
                        f"in the installed {library}")
    return cls


def _component_config(root: pathlib.Path, index: dict[str, Any], name: str, file_name: str) -> dict[str, Any]:
    """A component's JSON config with its class's ``__init__`` defaults filled in, as ``from_pretrained`` does."""
    cls = _component_class(root, index, name)
    raw = _read_json(root / name / file_name, f"model directory {root}: component {name!r}")
    init = getattr(cls, "__init__", None)
    defaults: dict[str, Any] = {}
    if init is not None:
        for parameter in inspect.signature(init).parameters.values():
            if parameter.default is not inspect.Parameter.empty:
                defaults[parameter.name] = parameter.default
    return {**defaults, **raw}


def _transformer_names(index: dict[str, Any]) -> list[str]:
    return [name for name in ("transformer", "transformer_2") if _has_component(index, name)]


def read_shapes(model_dir: str | pathlib.Path, spec: VideoSpec) -> WanShapes:
    """Shapes of one item rendered with ``spec`` by the Wan pipeline in ``model_dir``; reads only JSON configs.

    Raises :class:`UserError` if ``model_dir`` is missing or not a Wan (``WanPipeline``) diffusers directory, or if
    ``spec``'s size does not fit the model: the pipeline would silently round what this rejects.
    """
    root, index = _model_index(model_dir)
    names = _transformer_names(index)
    if not names:
        raise UserError(f"model directory {root}: model_index.json names no transformer")
    transformer = _component_config(root, index, names[0], "config.json")
    vae = _component_config(root, index, "vae", "config.json")
    scale_spatial = int(vae["scale_factor_spatial"])
    scale_temporal = int(vae["scale_factor_temporal"])
    patch_size = tuple(int(p) for p in transformer["patch_size"])
    assert len(patch_size) == 3, patch_size
    text_dim = int(transformer["text_dim"])
    if _has_component(index, "text_encoder"):
        d_model = _read_json(root / "text_encoder" / "config.json", f"model directory {root}: text_encoder")
        if int(d_model.get("d_model", text_dim)) != text_dim:
            raise UserError(f"model directory {root}: text_encoder d_model {d_model.get('d_model')} != "
                            f"transformer text_dim {text_dim}")

    for name, size, patch in (("height", spec.height, patch_size[1]), ("width", spec.width, patch_size[2])):
        multiple = math.lcm(16, scale_spatial * patch)  # 16: WanPipeline.check_inputs; the rest: patchification
        if size % multiple:
            raise UserError(f"{name} {size} is not a multiple of {multiple} (VAE spatial factor {scale_spatial} x "
                            f"patch {patch}, and 16); try {max(multiple, round(size / multiple) * multiple)}")
    if spec.num_frames % scale_temporal != 1 % scale_temporal:
        lower = (spec.num_frames - 1) // scale_temporal * scale_temporal + 1
        raise UserError(f"num_frames {spec.num_frames} must be {scale_temporal}k+1 (VAE temporal factor "
                        f"{scale_temporal}); try {lower} or {lower + scale_temporal}")
    latent_frames = (spec.num_frames - 1) // scale_temporal + 1
    if latent_frames % patch_size[0]:
        raise UserError(f"num_frames {spec.num_frames} gives {latent_frames} latent frames, not a multiple of the "
                        f"transformer's temporal patch {patch_size[0]}")
    if spec.guidance_scale_2 is not None and index.get("boundary_ratio") is None:
        raise UserError(f"guidance_scale_2 is only supported by two-expert (Wan2.2) model directories; "
                        f"{root} has no boundary_ratio")
    latent_channels, condition_channels, image_embeds_shape = int(transformer["in_channels"]), 0, None
    if index.get("_class_name") == I2V_PIPELINE_CLASS:
        latent_channels = int(vae["z_dim"])  # the pipeline draws z_dim noise channels; in_channels adds the condition
        condition_channels = scale_temporal + latent_channels
        if index.get("expand_timesteps", False):
            raise UserError(f"model directory {root}: image-to-video with expand_timesteps (Wan2.2 TI2V) is not "
                            "supported")
        if int(transformer["in_channels"]) != latent_channels + condition_channels:
            raise UserError(f"model directory {root}: transformer in_channels {transformer['in_channels']} != "
                            f"{latent_channels} noise + {condition_channels} condition channels")
        if transformer.get("image_dim") is not None:
            clip = _read_json(root / "image_encoder" / "config.json", f"model directory {root}: image_encoder")
            clip = clip.get("vision_config", clip)
            num_tokens = (int(clip.get("image_size", 224)) // int(clip.get("patch_size", 32))) ** 2 + 1
            if int(clip.get("hidden_size", 768)) != int(transformer["image_dim"]):
                raise UserError(f"model directory {root}: image_encoder hidden_size {clip.get('hidden_size')} != "
                                f"transformer image_dim {transformer['image_dim']}")
            image_embeds_shape = (1, num_tokens, int(transformer["image_dim"]))
    return WanShapes(
        text_seq_len=spec.max_sequence_length,
        text_dim=text_dim,
        latent_channels=latent_channels,
        latent_frames=latent_frames,
        latent_height=spec.height // scale_spatial,
        latent_width=spec.width // scale_spatial,
        vae_scale_factor_spatial=scale_spatial,
        vae_scale_factor_temporal=scale_temporal,
        patch_size=patch_size,  # type: ignore[arg-type]
        num_attention_heads=int(transformer["num_attention_heads"]),
        attention_head_dim=int(transformer["attention_head_dim"]),
        num_embeds=2 if spec.do_classifier_free_guidance else 1,
        condition_channels=condition_channels,
        image_embeds_shape=image_embeds_shape,
    )


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
    """

    pipeline_class = PIPELINE_CLASS
    """The diffusers pipeline whose math these stages are (``model_index.json``'s ``_class_name``)."""

    def __init__(self, model_dir: str | pathlib.Path, stages: Iterable[str], *, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, options: StageOptions = EXACT) -> None:
        self.stages = frozenset(stages)
        unknown = self.stages - STAGES
        if unknown or not self.stages:
            raise ValueError(f"stages must be a non-empty subset of {sorted(STAGES)}, got {sorted(self.stages)}")
        self.model_dir, self._index = _model_index(model_dir)
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

        if "encode" in self.stages:
            self.tokenizer = self._load("tokenizer")
            self.text_encoder = self._load("text_encoder", dtype=dtype)
        if "denoise" in self.stages:
            names = _transformer_names(self._index)
            if not names:
                raise UserError(f"model directory {self.model_dir}: model_index.json names no transformer")
            for name in names:
                setattr(self, name, self._load(name, dtype=dtype))
                applied = apply_transformer_options(getattr(self, name), options, self.device)
                if applied:
                    logger.info("%s: %s", name, ", ".join(applied))
            self._scheduler = self._load("scheduler")
        if "decode" in self.stages:
            from diffusers.video_processor import VideoProcessor

            self.vae = self._load("vae", dtype=options.vae_dtype)
            self.video_processor = VideoProcessor(vae_scale_factor=self.vae.config.scale_factor_spatial)

    def _load(self, name: str, dtype: torch.dtype | None = None) -> Any:
        """``from_pretrained`` of component ``name`` with the class and keywords ``WanPipeline.from_pretrained``
        uses; ``nn.Module`` components are moved to ``self.device`` in eval mode."""
        cls = _component_class(self.model_dir, self._index, name)
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

    def _require(self, stage: str) -> None:
        if stage not in self.stages:
            raise RuntimeError(f"WanStages was built for stages {sorted(self.stages)}, not {stage!r}")

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
            self._embed("warm-up", spec.max_sequence_length)
        if "denoise" in self.stages:
            model = self.transformer if self.transformer is not None else self.transformer_2
            zeros = torch.zeros(shapes.embeds_shape, dtype=model.dtype, device=self.device)
            embeds = {"prompt_embeds": zeros, "negative_prompt_embeds": zeros}
            latents = self.denoise(embeds, 0, dataclasses.replace(spec, num_inference_steps=1))
        if "decode" in self.stages:
            if latents is None:
                latents = torch.zeros(shapes.latents_shape, device=self.device)
            self.decode_uint8(latents)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def free(self) -> None:
        """Drop every loaded component and return cached accelerator memory."""
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

    root, _ = _model_index(model_dir)
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
