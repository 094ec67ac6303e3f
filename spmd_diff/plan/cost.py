"""A cost model of one item per stage, from the model's shapes alone (pure Python).

Used for deadlines (a wait longer than a few items' worth of work means a peer is stuck or dead) and as the
prior for balancing roles. FLOP counts are the standard dense-transformer ones; they match DESIGN.md's
measurement (Wan2.1-1.3B, 480p x 81 frames: 2.8e14 FLOP per forward, 612 ms on one H200).
"""

from __future__ import annotations

from dataclasses import dataclass

# Sustained rates the model assumes (FLOP/s). Conservative on purpose: a deadline must not fire on a slow node.
RATE_FLOPS = {"cuda": 3.0e14, "cpu": 1.0e10}
MIN_DEADLINE_S = 300.0
"""No wait is cut shorter than this, whatever the model predicts (start-up, file systems, noisy neighbours)."""


@dataclass(frozen=True)
class DitDims:
    num_layers: int
    dim: int
    ffn_dim: int
    text_len: int
    text_encoder_params: float = 5.7e9
    """Parameters of the text encoder's layers (UMT5-XXL: about 5.7e9)."""
    vae_base_dim: int = 96
    """The VAE's base width (Wan2.1: 96); decode cost scales with its square."""
    image_encoder_params: float = 0.0
    """Image-to-video: parameters of the CLIP image encoder's layers (ViT-H/14: about 6.3e8); 0 for text-to-video."""
    image_tokens: int = 0
    """Image-to-video: tokens the image encoder runs over (ViT-H/14 at 224 px: 257)."""
    vae_encode: bool = False
    """Image-to-video: encode also runs the VAE's encoder over the whole conditioning video (first frame, then
    zeros: all ``num_frames``), which costs about what a decode does."""


def dit_forward_flops(num_tokens: int, dims: DitDims) -> float:
    """FLOP of one transformer forward over ``num_tokens`` video tokens (self-attn, cross-attn, FFN)."""
    d, n, t = dims.dim, num_tokens, dims.text_len
    linear = 2 * n * (4 * d * d + 2 * d * d + 2 * d * dims.ffn_dim)  # qkvo self, q/o cross, ffn
    attention = 4 * n * n * d + 4 * n * t * d
    text_kv = 2 * t * 2 * d * d
    return float(dims.num_layers * (linear + attention + text_kv))


@dataclass(frozen=True)
class ItemCost:
    """Predicted seconds of one item in each stage on one rank of the given device kind."""

    encode_s: float
    denoise_s: float
    decode_s: float

    @property
    def slowest_s(self) -> float:
        return max(self.encode_s, self.denoise_s, self.decode_s)


def predict_item_cost(num_tokens: int, dims: DitDims, num_steps: int, cfg: bool, num_pixels: int,
                      device: str, sp_degree: int = 1) -> ItemCost:
    rate = RATE_FLOPS["cuda" if device.startswith("cuda") else "cpu"]
    forwards = num_steps * (2 if cfg else 1)
    denoise = forwards * dit_forward_flops(num_tokens, dims) / rate / sp_degree
    encode = 2 * dims.text_encoder_params * dims.text_len * (2 if cfg else 1) / rate
    encode += 2 * dims.image_encoder_params * dims.image_tokens / rate + vae_encode_seconds(dims, num_pixels, device)
    # Wan VAE decode, calibrated: 1.8 s for 480p x 81 (32.3 Mpx) on one H200 = ~1.7e7 FLOP-equivalents per
    # output pixel at the model's rate (convolutions run far below matmul peak); scales with base width squared.
    decode = 1.7e7 * (dims.vae_base_dim / 96) ** 2 * num_pixels / rate
    return ItemCost(encode, denoise, decode)


def vae_encode_seconds(dims: DitDims, num_pixels: int, device: str) -> float:
    """The image-to-video encoder's VAE encode of the conditioning video (0 for text-to-video), in the same
    FLOP-equivalents as the decode (bf16 calibration): the encoder mirrors the decoder's convolutions."""
    if not dims.vae_encode:
        return 0.0
    rate = RATE_FLOPS["cuda" if device.startswith("cuda") else "cpu"]
    return 1.7e7 * (dims.vae_base_dim / 96) ** 2 * num_pixels / rate


def wait_deadline_s(cost: ItemCost, setting_s: float, fan_in: int = 1) -> float:
    """The deadline of one wait: what one item's stage may take (the job's ``run.timeout_s`` if given, > 0) times
    the items a wait may legitimately queue behind: its own and the one ahead of it, plus one of each other
    producer of a consumer shared by ``fan_in`` producers (a consumer serves its producers in turn, so a full
    producer waits at most one item of each other one). Automatic (``setting_s`` 0): a few items' worth of the
    model's slowest stage on top of that queue, never under ``MIN_DEADLINE_S``."""
    fan_in = max(1, fan_in)
    if setting_s > 0:
        return (2 + fan_in) * setting_s
    return max(MIN_DEADLINE_S, (4.0 + fan_in) * cost.slowest_s)
