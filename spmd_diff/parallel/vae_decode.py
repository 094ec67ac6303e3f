"""One video's VAE decode split over the ranks of a group: horizontal bands of rows, halos exchanged per layer.

Every rank of the group runs diffusers' own ``AutoencoderKLWan.decode`` (the causal frame-by-frame loop with its
feature cache, unchanged) on its band of latent rows, ``split_sizes(H_latent, S)`` in group-rank order; at every
resolution a rank holds the same band scaled by the upsampling so far. Every layer of the decoder is local in
space except two kinds, which this module replaces while a decode runs (:func:`split_decoder`):

- the spatial convolutions (``WanCausalConv3d`` 3x3x3 and the upsamplers' ``Conv2d`` 3x3): their receptive field
  is read from each layer (``padding`` rows above and below, 1 for every Wan2.1/2.2 decoder layer); before the
  convolution the rank receives that many rows from the band above and the band below (zeros at the frame's top
  and bottom edge, as the layer's own zero padding) and sends its edge rows to them. Cached frames of the causal
  time axis are concatenated first, so the cache holds band rows only and the halo covers cached frames too;
- the mid-block ``WanAttentionBlock`` (one head over all positions of a frame): the rank projects its band, all
  ranks all-gather keys and values, and each attends with its own queries to every position of the frame.

Everything else (RMS norms over channels, activations, nearest-exact 2x upsampling, 1x1 convolutions, Wan2.2's
``DupUp3D`` and unpatchify, the final clamp and uint8 conversion) maps each position to positions of the same band.
So every output pixel is computed from the same inputs as in the one-rank decode, with no redundant rows: the
bands' videos, concatenated, equal the one-rank video up to floating-point reassociation inside the convolution
kernels (in practice within one uint8 level; the tests check it). Unknown module types in the decoder are refused
rather than guessed at.

Communication goes through a :class:`~spmd_diff.parallel.seq_comm.SeqComm` (the project's collectives, or torch
NCCL): per spatial convolution and latent frame one neighbour exchange of ``padding`` rows each way, per frame one
all-gather of the attention's keys and values at the latent resolution, and at the end one gather of the uint8
bands to the group leader.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

from spmd_diff.parallel.seq_comm import SeqComm, offsets, split_sizes

_LOCAL_MODULES = frozenset({
    # containers and blocks whose own code only routes tensors between their children
    "WanDecoder3d", "WanMidBlock", "WanUpBlock", "WanResidualUpBlock", "WanResidualBlock", "WanResample",
    "ModuleList", "Sequential",
    # position-wise or band-preserving layers
    "WanRMS_norm", "WanUpsample", "DupUp3D", "SiLU", "Dropout", "Identity",
})
_CONVS = frozenset({"WanCausalConv3d", "Conv2d", "Conv3d"})


class _Band:
    """This rank's band of rows: latent row counts of every rank and the rank's place among them."""

    def __init__(self, comm: SeqComm, latent_rows: list[int]) -> None:
        self.comm = comm
        self.latent_rows = latent_rows

    def scale(self, local_rows: int) -> int:
        """Rows per latent row at the resolution of a tensor holding ``local_rows`` of this rank's rows."""
        mine = self.latent_rows[self.comm.rank]
        if local_rows % mine:
            raise RuntimeError(f"split decode: a layer holds {local_rows} rows, not a multiple of the rank's "
                               f"{mine} latent rows")
        return local_rows // mine

    def with_halo(self, x: torch.Tensor, width: int) -> torch.Tensor:
        """``x`` (rows on dim -2) with ``width`` rows of the band above and below added (zeros at the edges)."""
        comm, me = self.comm, self.comm.rank
        if width == 0:
            return x
        if x.shape[-2] < width:
            raise RuntimeError(f"split decode: a band of {x.shape[-2]} rows cannot provide a halo of {width}")
        shape = (*x.shape[:-2], width, x.shape[-1])
        send: list[torch.Tensor | None] = [None] * comm.size
        recv: list[tuple[int, ...] | None] = [None] * comm.size
        if me > 0:
            send[me - 1] = x[..., :width, :].contiguous()
            recv[me - 1] = shape
        if me < comm.size - 1:
            send[me + 1] = x[..., -width:, :].contiguous()
            recv[me + 1] = shape
        if comm.size > 1:
            if all(t is None for t in send):
                send[me] = x.new_empty(0)
            got = comm.all_to_all(send, recv)
        else:
            got = [None]
        above = got[me - 1] if me > 0 else x.new_zeros(shape)
        below = got[me + 1] if me < comm.size - 1 else x.new_zeros(shape)
        return torch.cat([above.to(x.device), x, below.to(x.device)], dim=-2)


def _conv3d_forward(conv: Any, band: _Band):
    """``WanCausalConv3d.forward`` with the row padding replaced by the neighbours' rows (same math)."""
    def forward(x: torch.Tensor, cache_x: torch.Tensor | None = None) -> torch.Tensor:
        padding = list(conv._padding)  # (w, w, h, h, t, 0)
        if cache_x is not None and padding[4] > 0:
            x = torch.cat([cache_x.to(x.device), x], dim=2)
            padding[4] -= cache_x.shape[2]
        x = band.with_halo(x, padding[2])
        padding[2] = padding[3] = 0
        return torch.nn.Conv3d.forward(conv, F.pad(x, padding))
    return forward


def _conv2d_forward(conv: torch.nn.Conv2d, band: _Band):
    """``Conv2d.forward`` (zero padding) with the row padding replaced by the neighbours' rows."""
    def forward(x: torch.Tensor) -> torch.Tensor:
        x = band.with_halo(x, conv.padding[0])
        return F.conv2d(x, conv.weight, conv.bias, conv.stride, (0, conv.padding[1]), conv.dilation, conv.groups)
    return forward


def _attention_forward(block: Any, band: _Band):
    """``WanAttentionBlock.forward`` for a band: queries of the band, keys and values of the whole frame."""
    def forward(x: torch.Tensor) -> torch.Tensor:
        identity = x
        batch, channels, frames, height, width = x.shape
        x = x.permute(0, 2, 1, 3, 4).reshape(batch * frames, channels, height, width)
        x = block.norm(x)
        qkv = block.to_qkv(x)
        qkv = qkv.reshape(batch * frames, 1, channels * 3, -1).permute(0, 1, 3, 2).contiguous()
        q = qkv[..., :channels]
        kv = qkv[..., channels:].contiguous()  # [B*T, 1, n, 2C]
        scale = band.scale(height)
        shapes = [(batch * frames, 1, rows * scale * width, 2 * channels) for rows in band.latent_rows]
        everyone = band.comm.all_gather(kv, shapes) if band.comm.size > 1 else [kv]
        kv_all = torch.cat([t.to(kv.device) for t in everyone], dim=2)
        k, v = kv_all[..., :channels], kv_all[..., channels:]
        x = F.scaled_dot_product_attention(q, k, v)
        x = x.squeeze(1).permute(0, 2, 1).reshape(batch * frames, channels, height, width)
        x = block.proj(x)
        x = x.view(batch, frames, channels, height, width).permute(0, 2, 1, 3, 4)
        return x + identity
    return forward


def _replacements(vae: Any, band: _Band) -> list[tuple[torch.nn.Module, Any]]:
    """(module, forward) for every decoder layer that must see other bands; ValueError for unknown layers."""
    out = []
    for root in (vae.post_quant_conv, vae.decoder):
        for name, module in root.named_modules():
            kind = type(module).__name__
            if kind == "WanAttentionBlock":
                out.append((module, _attention_forward(module, band)))
            elif kind in _CONVS:
                if getattr(module, "padding_mode", "zeros") != "zeros":
                    raise ValueError(f"split decode: {name} pads with {module.padding_mode!r}, not zeros")
                if kind == "WanCausalConv3d":
                    rows, kernel, stride = module._padding[2], module.kernel_size[1], module.stride[1]
                    forward = _conv3d_forward(module, band)
                elif kind == "Conv2d":
                    rows, kernel, stride = module.padding[0], module.kernel_size[0], module.stride[0]
                    forward = _conv2d_forward(module, band)
                else:
                    rows, kernel, stride = module.padding[1], module.kernel_size[1], module.stride[1]
                    forward = None
                if stride != 1 or kernel != 2 * rows + 1:
                    raise ValueError(f"split decode: {name} ({kind}, kernel {module.kernel_size}, stride "
                                     f"{module.stride}) is not a 'same' convolution over rows")
                if rows:
                    if forward is None:
                        raise ValueError(f"split decode: {name} is a plain Conv3d with row padding")
                    out.append((module, forward))
            elif kind == "WanUpsample":
                if module.mode not in ("nearest", "nearest-exact"):
                    raise ValueError(f"split decode: {name} upsamples with {module.mode!r}, not nearest")
            elif kind not in _LOCAL_MODULES:
                raise ValueError(f"split decode: the VAE decoder holds a {kind} ({name}); only Wan decoders "
                                 "(whose layers are known to be local in space) can be split")
    return out


@contextlib.contextmanager
def split_decoder(vae: Any, comm: SeqComm, latent_rows: list[int]) -> Iterator[None]:
    """While inside, ``vae.decode`` of this rank's band of latent rows (``latent_rows[comm.rank]`` rows, bands in
    rank order) computes that band of the video, exchanging halos with the other ranks (collective: every rank
    of ``comm`` decodes its band at the same time). The VAE is restored on exit."""
    band = _Band(comm, list(latent_rows))
    swapped = _replacements(vae, band)
    try:
        for module, forward in swapped:
            module.forward = forward
        yield
    finally:
        for module, _ in swapped:
            module.__dict__.pop("forward", None)


def band_rows(latent_height: int, num_ranks: int) -> list[int]:
    """Latent rows per rank: ``split_sizes``; every rank needs at least one row (its halo is one row)."""
    if latent_height < num_ranks:
        raise ValueError(f"cannot split {latent_height} latent rows over {num_ranks} ranks (one row each at least)")
    return split_sizes(latent_height, num_ranks)


@torch.no_grad()
def decode_split(stages: Any, comm: SeqComm, latents_BCFHW: torch.Tensor, leader: int = 0) -> torch.Tensor | None:
    """One video decoded by every rank of ``comm`` together (collective).

    Args:
        stages: this rank's ``WanStages`` with the decode stage (every rank the same VAE).
        comm: the ranks that decode together.
        latents_BCFHW: the full latents ``[1, C, F, H, W]``, the same on every rank (a DiT group's members all
            hold them after denoising); each rank decodes its band of rows.
        leader: the rank that receives the video.

    Returns:
        On ``leader``: :meth:`WanStages.decode_uint8`'s video ``[frames, height, width, 3]`` uint8 on the
        leader's device; on the others ``None``.
    """
    rows = band_rows(int(latents_BCFHW.shape[3]), comm.size)
    start = offsets(rows)[comm.rank]
    mine = latents_BCFHW[:, :, :, start:start + rows[comm.rank]]
    with split_decoder(stages.vae, comm, rows):
        video = stages.decode_uint8(mine)  # [F, h, W, 3] uint8: this band
    if comm.size == 1:
        return video
    frames, height, width, channels = video.shape
    scale = height // rows[comm.rank]
    send: list[torch.Tensor | None] = [None] * comm.size
    send[leader] = video
    shapes = [(frames, n * scale, width, channels) for n in rows] if comm.rank == leader else [None] * comm.size
    bands = comm.all_to_all(send, shapes)
    if comm.rank != leader:
        return None
    return torch.cat([band.to(video.device) for band in bands], dim=1)
