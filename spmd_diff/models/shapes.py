"""What a Wan model directory says about one item, read from its JSON configs only (no weights, no torch
modules): the item's settings (:class:`VideoSpec`), every tensor shape of its three stages (:class:`WanShapes`,
:func:`read_shapes`: sizes buffers and rings), and the readers of ``model_index.json`` and the components'
configs that the stage loader (:mod:`spmd_diff.models.wan`) shares.
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
import pathlib
from dataclasses import dataclass
from typing import Any

import torch

from spmd_diff.errors import UserError

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


def read_json(path: pathlib.Path, what: str) -> dict[str, Any]:
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


def model_index(model_dir: str | pathlib.Path) -> tuple[pathlib.Path, dict[str, Any]]:
    """The model directory as an absolute path and its ``model_index.json``; UserError if it is not a WanPipeline."""
    root = pathlib.Path(model_dir).expanduser().absolute()
    if not root.is_dir():
        raise UserError(f"model directory {root} does not exist (or is not a directory)")
    index = read_json(root / "model_index.json", f"model directory {root} is not a diffusers pipeline directory")
    if index.get("_class_name") not in (PIPELINE_CLASS, I2V_PIPELINE_CLASS):
        raise UserError(f"model directory {root} holds a {index.get('_class_name')!r} pipeline; only "
                        f"{PIPELINE_CLASS} (Wan text-to-video) and {I2V_PIPELINE_CLASS} (image-to-video) are supported")
    return root, index


def has_component(index: dict[str, Any], name: str) -> bool:
    entry = index.get(name)
    return isinstance(entry, list) and len(entry) == 2 and all(isinstance(part, str) for part in entry)


def component_class(root: pathlib.Path, index: dict[str, Any], name: str) -> type:
    """The class ``model_index.json`` names for component ``name`` (as the pipeline resolves it)."""
    if not has_component(index, name):
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


def component_config(root: pathlib.Path, index: dict[str, Any], name: str, file_name: str) -> dict[str, Any]:
    """A component's JSON config with its class's ``__init__`` defaults filled in, as ``from_pretrained`` does."""
    cls = component_class(root, index, name)
    raw = read_json(root / name / file_name, f"model directory {root}: component {name!r}")
    init = getattr(cls, "__init__", None)
    defaults: dict[str, Any] = {}
    if init is not None:
        for parameter in inspect.signature(init).parameters.values():
            if parameter.default is not inspect.Parameter.empty:
                defaults[parameter.name] = parameter.default
    return {**defaults, **raw}


def transformer_names(index: dict[str, Any]) -> list[str]:
    return [name for name in ("transformer", "transformer_2") if has_component(index, name)]


def read_shapes(model_dir: str | pathlib.Path, spec: VideoSpec) -> WanShapes:
    """Shapes of one item rendered with ``spec`` by the Wan pipeline in ``model_dir``; reads only JSON configs.

    Raises :class:`UserError` if ``model_dir`` is missing or not a Wan (``WanPipeline``) diffusers directory, or if
    ``spec``'s size does not fit the model: the pipeline would silently round what this rejects.
    """
    root, index = model_index(model_dir)
    names = transformer_names(index)
    if not names:
        raise UserError(f"model directory {root}: model_index.json names no transformer")
    transformer = component_config(root, index, names[0], "config.json")
    vae = component_config(root, index, "vae", "config.json")
    scale_spatial = int(vae["scale_factor_spatial"])
    scale_temporal = int(vae["scale_factor_temporal"])
    patch_size = tuple(int(p) for p in transformer["patch_size"])
    assert len(patch_size) == 3, patch_size
    text_dim = int(transformer["text_dim"])
    if has_component(index, "text_encoder"):
        d_model = read_json(root / "text_encoder" / "config.json", f"model directory {root}: text_encoder")
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
            clip = read_json(root / "image_encoder" / "config.json", f"model directory {root}: image_encoder")
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
