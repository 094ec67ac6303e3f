"""Sequence parallelism attached to diffusers' ``WanTransformer3DModel`` from outside, by hooks and a processor.

The plan (the same split/gather points as the model's own ``_cp_plan``, applied by our hooks over our comms):

- model forward pre-hook: read the token count ``N`` from ``hidden_states`` ``[B, C, F, H, W]`` (``N = F/p_t *
  H/p_h * W/p_w``) and fix the shards, ``split_sizes(N, S)`` in group-rank order; per-token timesteps
  ``[B, N]`` (Wan2.2 TI2V) are split along the tokens;
- ``rope`` forward hook: keep this rank's rows of the rotary tables ``[1, N, 1, D]`` (fresh ``[1, s, 1, D]``);
- ``patch_embedding`` forward hook: keep this rank's tokens of its output ``[B, C, F', H', W']`` (the ``N``
  tokens of ``F' H' W'`` in the order the model flattens them) as ``[B, C, 1, 1, s]``, so the model's own
  ``flatten(2).transpose(1, 2)`` makes the local ``hidden_states`` ``[B, s, C]`` the blocks see;
- every ``attn1`` (self-attention over the video tokens): a processor that projects and normalises q, k, v of the
  local tokens as ``WanAttnProcessor`` does and runs the group's :class:`SeqParallelAttention`;
- ``attn2`` (cross-attention) is untouched: its queries are local tokens and its keys/values come from the text
  embedding, which every rank holds whole;
- ``proj_out`` forward hook: all-gather the ``[B, s, C_out]`` outputs (the narrowest point: ``C_out = 64`` for
  Wan2.1, not the inner width), so unpatchify and everything after it run on the full sequence on every rank.

With ``compile_blocks=True`` each transformer block is compiled (:func:`~spmd_diff.models.speed.compile_blocks`:
once per model for the whole job, whatever groups attach to it later; Inductor fuses the block's many fp32 norm,
modulation, rotary-free elementwise and residual passes); the group attention itself stays outside the compiled
graphs (``torch.compiler.disable``): its collectives run exactly as uncompiled. Nothing a group changes is inside
what the compiled blocks trace: every hook is on a module outside the blocks, and every ``attn1`` gets the same
persistent processor, whose :class:`_GroupSlot` (this group's attention and token shards) is only read inside the
disabled group attention. So a new group (another degree, other ranks) reuses the compiled graphs: a block is
compiled once per distinct local token count and attention path (:func:`compiled_variants`), never per group.

No model code changes; :meth:`SPHandle.remove` restores the model (its compiled blocks stay compiled).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch

from spmd_diff.models.speed import compile_blocks as compile_blocks_once
from spmd_diff.parallel.attention import SeqParallelAttention
from spmd_diff.parallel.seq_comm import offsets, split_sizes


@dataclass
class _Shards:
    """Per-forward state shared by the hooks and processors of one model."""

    seq_sizes: list[int] = field(default_factory=list)
    start: int = 0
    size: int = 0
    num_tokens: int = 0

    def set(self, num_tokens: int, num_ranks: int, rank: int) -> None:
        self.num_tokens = num_tokens
        self.seq_sizes = split_sizes(num_tokens, num_ranks)
        self.start = offsets(self.seq_sizes)[rank]
        self.size = self.seq_sizes[rank]

    def take(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's tokens of ``tensor`` along ``dim`` (which must hold all ``num_tokens``)."""
        if tensor.shape[dim] != self.num_tokens:
            raise RuntimeError(f"sequence parallelism expected {self.num_tokens} tokens along dim {dim}, got "
                               f"{tuple(tensor.shape)}")
        return tensor.narrow(dim, self.start, self.size)


class _GroupSlot:
    """The group a transformer's SP processors attend over: one per model for its lifetime, its contents switched
    by :func:`parallelize_transformer` / :meth:`SPHandle.remove` outside any compiled graph."""

    def __init__(self) -> None:
        self.attention: SeqParallelAttention | None = None
        self.shards = _Shards()
        self.processor = SPSelfAttnProcessor(self)


class SPSelfAttnProcessor:
    """Self-attention of a ``WanAttention`` (``attn1``) over a DiT group: ``WanAttnProcessor``'s projections and
    q/k RMS norms on the local tokens, then the slot's :class:`SeqParallelAttention` (which applies the rotary
    embedding). One per model, shared by its blocks, never replaced (compiled blocks guard on it)."""

    def __init__(self, slot: _GroupSlot) -> None:
        self.slot = slot

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None,
                 rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None or attn.add_k_proj is not None:
            raise RuntimeError("SPSelfAttnProcessor handles unmasked self-attention (attn1) only")
        if getattr(attn, "fused_projections", False):
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        query = query.unflatten(2, (attn.heads, -1))  # [B, s, H, D]
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        out = _group_attention(self.slot, query, key, value, rotary_emb)  # [B, s, H, D]
        out = out.flatten(2, 3).type_as(query)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


@torch.compiler.disable
def _group_attention(slot: _GroupSlot, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     rotary_emb: Any) -> torch.Tensor:
    """The group's attention, never traced by Dynamo (a graph break inside a compiled block): the group and its
    split sizes are read here, so compiled graphs neither guard on them nor keep stale ones."""
    if slot.attention is None:
        raise RuntimeError("sequence-parallel attention called with no group attached")
    return slot.attention(query, key, value, slot.shards.seq_sizes, rotary_emb)


def _slot_of(transformer: torch.nn.Module) -> _GroupSlot:
    slot = getattr(transformer, "_spmd_sp_slot", None)
    if slot is None:
        slot = transformer._spmd_sp_slot = _GroupSlot()
    return slot


class SPHandle:
    """What :func:`parallelize_transformer` installed; :meth:`remove` takes it all out again."""

    def __init__(self, transformer: torch.nn.Module, attention: SeqParallelAttention, slot: _GroupSlot) -> None:
        self.transformer = transformer
        self.attention = attention
        self.slot = slot
        self.shards = slot.shards
        self._hooks: list = []
        self._processors: list[tuple[Any, Any]] = []

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        for module, processor in self._processors:
            module.processor = processor
        self._hooks, self._processors = [], []
        if getattr(self.transformer, "_spmd_sp_handle", None) is self:
            del self.transformer._spmd_sp_handle
            self.slot.attention = None


def parallelize_transformer(transformer: torch.nn.Module, attention: SeqParallelAttention,
                            compile_blocks: bool = False, backend: str | Callable = "inductor") -> SPHandle:
    """Make ``transformer`` (a diffusers ``WanTransformer3DModel``) run sequence-parallel over ``attention``'s
    group. Every rank of the group must then call it with the same full inputs; each gets the full output.

    Args:
        transformer: the model; its modules are not changed, only hooked (and ``attn1`` processors swapped).
        attention: the group's self-attention (layout, comms, kernels).
        compile_blocks: compile every block (:func:`~spmd_diff.models.speed.compile_blocks`, once per model: a
            model whose blocks are compiled already keeps them; the first forward of each local token count
            compiles, and the blocks share one compiled graph per count).
        backend: the ``torch.compile`` backend with ``compile_blocks`` ("inductor"; tests: "aot_eager").

    Returns:
        The handle; ``handle.remove()`` restores the model.

    Raises:
        ValueError: if the model is already parallelized or is not shaped like a ``WanTransformer3DModel``.
    """
    for name in ("rope", "blocks", "proj_out", "patch_embedding"):
        if not hasattr(transformer, name):
            raise ValueError(f"{type(transformer).__name__} has no {name!r}: not a WanTransformer3DModel")
    if getattr(transformer, "_spmd_sp_handle", None) is not None:
        raise ValueError("this transformer is already sequence-parallel; remove() the old handle first")
    if len(transformer.blocks) == 0:
        raise ValueError("a transformer without blocks has nothing to parallelize")
    slot = _slot_of(transformer)
    handle = SPHandle(transformer, attention, slot)
    slot.attention = attention
    shards = slot.shards
    rank, size = attention.rank, attention.size
    patch = tuple(int(p) for p in transformer.config.patch_size)

    def before_forward(module, args, kwargs):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        _, _, frames, height, width = hidden.shape
        shards.set((frames // patch[0]) * (height // patch[1]) * (width // patch[2]), size, rank)
        timestep = kwargs["timestep"] if "timestep" in kwargs else (args[1] if len(args) > 1 else None)
        if timestep is not None and timestep.ndim == 2:  # per-token timesteps: split like the tokens
            local = shards.take(timestep, 1)
            if "timestep" in kwargs:
                kwargs = {**kwargs, "timestep": local}
            else:
                args = (args[0], local, *args[2:])
        return args, kwargs

    def after_rope(module, args, output):
        # copies with fresh strides: the view's stride over the batch dimension (of size 1, so .contiguous() keeps
        # it) is the full token count N, and compiled blocks guard on strides (a graph per (N, s), not per s)
        cos, sin = output
        fresh = torch.contiguous_format
        return shards.take(cos, 1).clone(memory_format=fresh), shards.take(sin, 1).clone(memory_format=fresh)

    def after_patch_embedding(module, args, output):
        batch, channels = output.shape[:2]  # [B, C, F', H', W']: the model flattens F' H' W' into the tokens
        return shards.take(output.flatten(2), 2).reshape(batch, channels, 1, 1, shards.size)

    def after_proj_out(module, args, output):
        batch, local, channels = output.shape
        shapes = [(batch, n, channels) for n in shards.seq_sizes]
        parts = attention.comm.all_gather(output.contiguous(), shapes)
        return torch.cat(parts, dim=1)

    handle._hooks.append(transformer.register_forward_pre_hook(before_forward, with_kwargs=True))
    handle._hooks.append(transformer.rope.register_forward_hook(after_rope))
    handle._hooks.append(transformer.patch_embedding.register_forward_hook(after_patch_embedding))
    handle._hooks.append(transformer.proj_out.register_forward_hook(after_proj_out))
    for block in transformer.blocks:
        handle._processors.append((block.attn1, block.attn1.processor))
        block.attn1.processor = slot.processor
    if compile_blocks:
        compile_blocks_once(transformer, backend)
    transformer._spmd_sp_handle = handle
    return handle


def compiled_variants(pairs: Iterable[tuple[int, int]]) -> int:
    """How many graphs each compiled block takes for ``pairs`` of (video tokens ``N``, SP degree ``S``) one rank
    runs: one per distinct (local token count, attention path): the counts ``split_sizes(N, S)`` (a rank may
    hold either of a split's two sizes), the plain model's attention at ``S = 1`` and the group's otherwise."""
    return len({(size, degree > 1) for tokens, degree in pairs for size in set(split_sizes(tokens, degree))})


def num_video_tokens(transformer: torch.nn.Module, latents_shape: tuple[int, ...]) -> int:
    """Tokens of ``latents_shape`` ``[B, C, F, H, W]`` after the transformer's patching."""
    patch = transformer.config.patch_size
    return math.prod(int(n) // int(p) for n, p in zip(latents_shape[2:], patch))
