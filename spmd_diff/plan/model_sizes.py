"""How big the model's components are: parameter counts and dtypes, from the components' JSON configs. Pure Python.

Parameter counts are the dense-layer formulas (norms and biases ignored, under 0.5%); they match the published
sizes: Wan2.1-T2V-1.3B's transformer 1.42e9, -14B's 1.40e10 (their DiT), UMT5-XXL's encoder 5.68e9, Wan's VAE
1.27e8.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from spmd_diff.plan.cost import DitDims

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
VAE_PARAMS_AT_BASE_96 = 1.27e8
"""Wan2.1's AutoencoderKLWan (base_dim 96); scales with base_dim squared."""


@dataclass(frozen=True)
class ModelSizes:
    """Sizes the planner needs: FLOP dimensions (for the cost prior) and bytes of each component's weights."""

    dims: DitDims
    dit_params: float
    text_encoder_params: float
    """All of the text encoder's parameters (layers and token embedding)."""
    vae_params: float
    dit_dtype_bytes: int = 2
    text_dtype_bytes: int = 2
    vae_dtype_bytes: int = 4
    """The VAE runs in float32, as diffusers' WanPipeline loads it."""
    name: str = ""
    image_encoder_params: float = 0.0
    """Image-to-video: all of the CLIP image encoder's parameters (0 for text-to-video)."""
    text_dim: int = 4096
    """Width of the text embeddings the encoder hands the DiT (the transformer's ``text_dim``)."""

    @property
    def embeds_bytes(self) -> int:
        """One prompt's text embeddings for one guidance branch (``text_len`` x ``text_dim`` x dtype)."""
        return self.dims.text_len * self.text_dim * self.text_dtype_bytes

    @property
    def weight_bytes(self) -> dict[str, int]:
        """Bytes of the components each stage loads: encode -> text encoder (image-to-video: and the image encoder
        and a VAE of its own), denoise -> DiT, decode -> VAE."""
        image_to_video = self.image_encoder_params * self.text_dtype_bytes + \
            (self.vae_params * self.vae_dtype_bytes if self.dims.vae_encode else 0)
        return {"encode": int(self.text_encoder_params * self.text_dtype_bytes + image_to_video),
                "denoise": int(self.dit_params * self.dit_dtype_bytes),
                "decode": int(self.vae_params * self.vae_dtype_bytes)}

    def describe(self) -> str:
        gib = {stage: b / 2**30 for stage, b in self.weight_bytes.items()}
        return (f"{self.name or 'model'}: DiT {self.dit_params / 1e9:.2f}e9 params ({gib['denoise']:.1f} GiB), "
                f"text encoder {self.text_encoder_params / 1e9:.2f}e9 ({gib['encode']:.1f} GiB), "
                f"VAE {self.vae_params / 1e6:.0f}e6 ({gib['decode']:.2f} GiB)")

    @staticmethod
    def from_configs(transformer: Mapping[str, Any], text_encoder: Mapping[str, Any], vae: Mapping[str, Any],
                     dtype: str = "bfloat16", text_len: int = 512, name: str = "",
                     image_encoder: Mapping[str, Any] | None = None) -> "ModelSizes":
        """From the diffusers ``config.json`` of each component (missing keys take Wan2.1's defaults).
        ``image_encoder``: None for text-to-video; for image-to-video the CLIP vision config ({} for a model
        without an image encoder: then only the VAE encode is added to the encode stage)."""
        heads = int(transformer.get("num_attention_heads", 12))
        dim = heads * int(transformer.get("attention_head_dim", 128))
        ffn = int(transformer.get("ffn_dim", 8960))
        layers = int(transformer.get("num_layers", 30))
        text_dim = int(transformer.get("text_dim", 4096))
        freq_dim = int(transformer.get("freq_dim", 256))
        patch = transformer.get("patch_size", (1, 2, 2))
        channels = int(transformer.get("in_channels", 16)) * patch[0] * patch[1] * patch[2]
        # Per block: self- and cross-attention q, k, v, o; the FFN. Then text, time and patch embeddings, head.
        dit_params = (layers * (8 * dim * dim + 2 * dim * ffn) + text_dim * dim + dim * dim
                      + freq_dim * dim + dim * dim + 6 * dim * dim + 2 * channels * dim)
        if transformer.get("added_kv_proj_dim"):  # image-to-video: image keys/values in every cross-attention
            dit_params += layers * 2 * int(transformer["added_kv_proj_dim"]) * dim
        if transformer.get("image_dim"):
            dit_params += int(transformer["image_dim"]) * dim + dim * dim
        clip_layer_params = clip_params = 0.0
        clip_tokens = 0
        if image_encoder:
            width = int(image_encoder.get("hidden_size", 1280))
            clip_layer_params = float(int(image_encoder.get("num_hidden_layers", 32))
                                      * (4 * width * width + 2 * width * int(image_encoder.get("intermediate_size",
                                                                                            4 * width))))
            clip_tokens = (int(image_encoder.get("image_size", 224)) // int(image_encoder.get("patch_size", 14))) ** 2 + 1
            clip_params = clip_layer_params + clip_tokens * width + 3 * int(image_encoder.get("patch_size", 14)) ** 2 * width
        d_model = int(text_encoder.get("d_model", 4096))
        inner = int(text_encoder.get("num_heads", 64)) * int(text_encoder.get("d_kv", 64))
        d_ff = int(text_encoder.get("d_ff", 10240))
        gated = 3 if text_encoder.get("is_gated_act", True) else 2
        text_layers = int(text_encoder.get("num_layers", 24))
        text_layer_params = text_layers * (4 * d_model * inner + gated * d_model * d_ff)
        text_params = text_layer_params + int(text_encoder.get("vocab_size", 256384)) * d_model
        base_dim = int(vae.get("base_dim", 96))
        dims = DitDims(layers, dim, ffn, text_len, float(text_layer_params), base_dim, clip_layer_params, clip_tokens,
                       image_encoder is not None)
        dtype_bytes = DTYPE_BYTES.get(dtype, 2)
        return ModelSizes(dims, float(dit_params), float(text_params), VAE_PARAMS_AT_BASE_96 * (base_dim / 96) ** 2,
                          dtype_bytes, dtype_bytes, 4, name, clip_params, text_dim)


_WAN_DIT = dict(attention_head_dim=128, text_dim=4096, freq_dim=256, patch_size=(1, 2, 2), in_channels=16)
WAN21_T2V_1_3B = ModelSizes.from_configs(dict(_WAN_DIT, num_attention_heads=12, ffn_dim=8960, num_layers=30), {}, {},
                                         name="Wan2.1-T2V-1.3B")
WAN21_T2V_14B = ModelSizes.from_configs(dict(_WAN_DIT, num_attention_heads=40, ffn_dim=13824, num_layers=40), {}, {},
                                        name="Wan2.1-T2V-14B")
WAN21_I2V_14B = ModelSizes.from_configs(dict(_WAN_DIT, num_attention_heads=40, ffn_dim=13824, num_layers=40,
                                             in_channels=36, image_dim=1280, added_kv_proj_dim=5120), {}, {},
                                        name="Wan2.1-I2V-14B",
                                        image_encoder=dict(hidden_size=1280, num_hidden_layers=32,
                                                           intermediate_size=5120, image_size=224, patch_size=14))
