"""Wan image-to-video as the same three stages: encode (UMT5 + CLIP image encoder + VAE encode), denoise, decode.

The math is diffusers' ``WanImageToVideoPipeline.__call__`` (diffusers 0.42.1) split at the two handoffs, with the
same ops in the same order and the same dtypes. Encode: the prompt embeddings as in text-to-video; the image
embeddings (``encode_image``: the image processor, then the CLIP vision model's second-to-last hidden state);
the conditioning latents (``prepare_latents``: the image resized to the video's size by the ``VideoProcessor``,
followed by ``num_frames - 1`` zero frames, VAE-encoded (the distribution's mode), normalised by the VAE's
latents mean and std, behind the first-frame mask). Denoise: the pipeline's loop, with the condition
concatenated to the noise on the channel axis at every step and the image embeddings passed to the transformer;
the initial noise has the VAE's ``z_dim`` channels (16), not the transformer's ``in_channels`` (36). The loop is
:meth:`WanStages.denoise` with this class's inputs (it also calls ``scheduler.set_begin_index(0)``, which the I2V
pipeline does not: the same first step index, as the schedule's timesteps are distinct). Decode: as text-to-video.

Supported: Wan2.1 I2V (a CLIP image encoder) and image-to-video dirs without one (Wan2.2 A14B: two experts);
not Wan2.2 TI2V (``expand_timesteps``) nor a last frame. No MPI here.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from spmd_diff.models.speed import EXACT, StageOptions
from spmd_diff.models.shapes import I2V_PIPELINE_CLASS, VideoSpec, has_component
from spmd_diff.models.wan import WanStages


class WanI2VStages(WanStages):
    """The components one rank needs for its stages of Wan image-to-video, and the stage functions.

    As :class:`WanStages`, plus: ``encode`` also loads the image processor and CLIP image encoder (in ``dtype``,
    when the model directory has them) and a VAE of its own (``encode_vae``, ``options.vae_dtype``): the Wan VAE
    keeps per-call feature caches in the module, and a rank that decodes does so on another thread, so encode and
    decode may run at the same time and must not share one.
    """

    pipeline_class = I2V_PIPELINE_CLASS

    def __init__(self, model_dir: Any, stages: Iterable[str], *, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, options: StageOptions = EXACT, time_shared: bool = False) -> None:
        self.image_processor: Any = None
        self.image_encoder: Any = None
        self.encode_vae: Any = None
        self.encode_video_processor: Any = None
        super().__init__(model_dir, stages, device=device, dtype=dtype, options=options, time_shared=time_shared)
        if "encode" in self.stages:
            if has_component(self._index, "image_encoder"):
                self.image_processor = self._load("image_processor")
                self.image_encoder = self._keep("encode", "image_encoder", self._load("image_encoder", dtype=dtype))
            from diffusers.video_processor import VideoProcessor

            self.encode_vae = self._keep("encode", "encode_vae", self._load("vae", dtype=options.vae_dtype))
            self.encode_video_processor = VideoProcessor(vae_scale_factor=self.encode_vae.config.scale_factor_spatial)

    # ---- encode -------------------------------------------------------------------------------------------------

    def encode(self, prompt: str, negative_prompt: str | None, spec: VideoSpec,
               image: Any = None) -> dict[str, torch.Tensor]:
        """Everything denoise needs of one item, as ``WanImageToVideoPipeline.__call__`` computes it.

        ``image``: a ``PIL.Image.Image`` in RGB (the conditioning first frame, any size: resized to the video's).
        Returns :meth:`WanStages.encode`'s text embeddings plus ``"image_embeds"`` ``[1, T, E]`` (the image
        encoder's dtype; only for models with an image encoder) and ``"condition"`` ``[1, 4 + z, F, H, W]``
        float32 (first-frame mask, then normalised VAE latents of the conditioning video); on ``self.device``.
        """
        if image is None:
            raise ValueError("image-to-video needs an image for every item")
        embeds = super().encode(prompt, negative_prompt, spec)
        if self.shapes(spec).image_embeds_shape is not None:
            embeds["image_embeds"] = self.encode_image(image)
        embeds["condition"] = self.encode_condition(image, spec)
        return embeds

    @torch.no_grad()
    def encode_image(self, image: Any) -> torch.Tensor:
        """``WanImageToVideoPipeline.encode_image``: ``[1, T, E]`` CLIP hidden states (second to last layer)."""
        self._require("encode")
        pixels = self.image_processor(images=image, return_tensors="pt").to(self.device)
        return self.image_encoder(**pixels, output_hidden_states=True).hidden_states[-2].to(self.device)

    @torch.no_grad()
    def encode_condition(self, image: Any, spec: VideoSpec) -> torch.Tensor:
        """``WanImageToVideoPipeline.prepare_latents``' condition (no last frame): ``[1, 4 + z, F, H, W]`` float32."""
        self._require("encode")
        vae, device = self.encode_vae, self.device
        shapes = self.shapes(spec)
        scale_temporal = shapes.vae_scale_factor_temporal
        height, width, num_frames = spec.height, spec.width, spec.num_frames
        latent_height, latent_width = shapes.latent_height, shapes.latent_width
        pixels = self.encode_video_processor.preprocess(image, height=height, width=width).to(device, dtype=torch.float32)
        pixels = pixels.unsqueeze(2)  # [1, 3, 1, H, W]
        video_condition = torch.cat([pixels, pixels.new_zeros(1, 3, num_frames - 1, height, width)], dim=2)
        video_condition = video_condition.to(device=device, dtype=vae.dtype)
        z_dim = vae.config.z_dim
        latents_mean = torch.tensor(vae.config.latents_mean).view(1, z_dim, 1, 1, 1).to(device, torch.float32)
        latents_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, z_dim, 1, 1, 1).to(device, torch.float32)
        latent_condition = vae.encode(video_condition).latent_dist.mode()  # retrieve_latents(sample_mode="argmax")
        latent_condition = latent_condition.to(device=device, dtype=torch.float32)
        latent_condition = (latent_condition - latents_mean) * latents_std

        mask = torch.ones(1, 1, num_frames, latent_height, latent_width)
        mask[:, :, list(range(1, num_frames))] = 0
        first_frame_mask = torch.repeat_interleave(mask[:, :, 0:1], dim=2, repeats=scale_temporal)
        mask = torch.concat([first_frame_mask, mask[:, :, 1:, :]], dim=2)
        mask = mask.view(1, -1, scale_temporal, latent_height, latent_width).transpose(1, 2)
        mask = mask.to(latent_condition.device)
        return torch.concat([mask, latent_condition], dim=1)

    # ---- denoise: WanStages.denoise, with the image's inputs ------------------------------------------------------

    def _transformer_inputs(self, embeds: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The CLIP image embeddings (``encoder_hidden_states_image``, in the transformer's dtype; None when the
        model has no image encoder, as the pipeline passes them)."""
        image_embeds = None
        if self.transformer is not None and self.transformer.config.image_dim is not None:
            image_embeds = embeds["image_embeds"].to(device=self.device, dtype=dtype)
        return {"encoder_hidden_states_image": image_embeds}

    def _latents_condition(self, embeds: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The first-frame mask and conditioning latents, float32 as the pipeline leaves them."""
        return embeds["condition"].to(device=self.device, dtype=torch.float32)

    def _cache_context_kwargs(self, step_index: int, sigma: float, num_steps: int) -> dict[str, Any]:
        """``WanImageToVideoPipeline`` names only the branch."""
        return {}

    # ---- the rest -----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def warmup(self, spec: VideoSpec) -> None:
        """As :meth:`WanStages.warmup`, with a grey image through encode and zero condition tensors."""
        import dataclasses

        import PIL.Image

        shapes = self.shapes(spec)
        latents = None
        if "encode" in self.stages:
            self.use("encode")
            self.encode("warm-up", None, spec, image=PIL.Image.new("RGB", (spec.width, spec.height), (128,) * 3))
        if "denoise" in self.stages:
            self.use("denoise")
            model = self.transformer if self.transformer is not None else self.transformer_2
            embeds = {key: torch.zeros(shape, dtype=torch.float32 if key == "condition" else model.dtype,
                                       device=self.device) for key, shape in shapes.encoded_shapes().items()}
            latents = self.denoise(embeds, 0, dataclasses.replace(spec, num_inference_steps=1))
        if "decode" in self.stages:
            self.use("decode")
            if latents is None:
                latents = torch.zeros(shapes.latents_shape, device=self.device)
            self.decode_uint8(latents)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def free(self) -> None:
        self.image_processor = self.image_encoder = self.encode_vae = self.encode_video_processor = None
        super().free()


def reference_i2v_video(model_dir: Any, image: Any, prompt: str, negative_prompt: str | None, seed: int,
                        spec: VideoSpec) -> Any:
    """The video diffusers' own ``WanImageToVideoPipeline`` renders (CPU, float32) from the PIL ``image``:
    uint8 ``[frames, height, width, 3]``. The independent reference the stages are tested against."""
    from diffusers import WanImageToVideoPipeline

    from spmd_diff.models.shapes import model_index, read_shapes
    from spmd_diff.models.wan import _frames_to_uint8

    root, _ = model_index(model_dir)
    read_shapes(root, spec)
    pipeline = WanImageToVideoPipeline.from_pretrained(root)
    pipeline.set_progress_bar_config(disable=True)
    frames = pipeline(image=image, prompt=prompt, negative_prompt=negative_prompt, height=spec.height,
                      width=spec.width, num_frames=spec.num_frames, num_inference_steps=spec.num_inference_steps,
                      guidance_scale=spec.guidance_scale, generator=torch.Generator("cpu").manual_seed(seed),
                      output_type="np", max_sequence_length=spec.max_sequence_length).frames
    return _frames_to_uint8(frames[0])
