"""A DiT group denoises one item together: the engine-facing entry point of sequence parallelism.

Every member of the group calls :meth:`SPDenoiser.denoise` for the same item at the same time. The group leader
(group rank 0) holds the item's text embeddings (from an encoder rank, or its own encode) and its seed; it
broadcasts them, then every member runs :meth:`WanStages.denoise` — the pipeline's own loop, unchanged — on the full
latents, with the transformer sequence-parallel underneath (its forward splits the tokens, attends across the
group and all-gathers its output, so every member sees the same full noise prediction and takes the same
scheduler steps). The leader returns the final latents; the others return ``None``. The result equals the
one-rank :meth:`WanStages.denoise` up to floating-point reassociation in the attention.

CFG parallel (``cfg_parallel=True``, a group of ``2k`` ranks, with guidance): the first ``k`` ranks run the
conditional branch and the last ``k`` the unconditional one, each half sequence-parallel over its ``k`` ranks
(any layout); once per step rank ``i`` and rank ``i + k`` swap their noise predictions (:class:`CfgSplit`) and
both combine them as the pipeline does, so every rank takes the same scheduler step. Half the forwards per rank,
and the attention's exchanges span ``k`` ranks instead of ``2k``.

No MPI here: the group's communication comes in as a :class:`~spmd_diff.parallel.seq_comm.SeqComm`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from spmd_diff.parallel.attention import LocalAttention, SeqParallelAttention
from spmd_diff.parallel.seq_comm import GroupSeqComm, SeqComm
from spmd_diff.parallel.hooks import SPHandle, parallelize_transformer
from spmd_diff.parallel.layout import SPLayout, cfg_half_torus, resolve_layout


def build_attention(comm: SeqComm, layout: SPLayout, local: LocalAttention = LocalAttention(),
                    pack_impl: str = "auto", merge_impl: str = "auto", head_chunks: int = 1) -> SeqParallelAttention:
    """The group's :class:`SeqParallelAttention` for ``layout`` (torus rows and columns from ``comm.split``)."""
    inner = outer = None
    if layout.name == "torus":
        inner, outer = comm.split(layout.outer, layout.inner)
    return SeqParallelAttention(layout, comm, inner, outer, local, pack_impl, merge_impl, head_chunks)


class CfgSplit:
    """One rank's side of CFG parallel: its branch and the exchange with its partner in the other half.

    Args:
        pair: the two ranks ``i`` (cond half, pair rank 0) and ``i + k`` (uncond half, pair rank 1).
    """

    def __init__(self, pair: SeqComm) -> None:
        if pair.size != 2:
            raise ValueError(f"a CFG pair has 2 ranks, got {pair.size}")
        self.pair = pair
        self.branch = "cond" if pair.rank == 0 else "uncond"

    def combine(self, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(noise_cond, noise_uncond)`` from this rank's branch prediction and the partner's (collective)."""
        me, other = self.pair.rank, 1 - self.pair.rank
        send: list[torch.Tensor | None] = [None, None]
        send[other] = noise.contiguous()
        shapes: list[tuple[int, ...] | None] = [None, None]
        shapes[other] = tuple(noise.shape)
        theirs = self.pair.all_to_all(send, shapes)[other].to(noise.device)
        return (noise, theirs) if me == 0 else (theirs, noise)


class SPDenoiser:
    """Sequence-parallel denoising for one DiT group; built once per group (hooks installed), used per item.

    Args:
        stages: this rank's ``WanStages`` with the ``denoise`` stage loaded (every member loads the same model).
        comm: the group, rank 0 the leader; rank order is the token-shard order (node-major for a torus).
        layout: the resolved layout (:func:`resolve_layout`); ``layout.degree == comm.size``.
        local: the kernel for local attention blocks.
        compile_blocks: compile the transformer blocks (``parallelize_transformer``; once per model: later groups
            on the same model reuse them).
        backend: the ``torch.compile`` backend with ``compile_blocks`` ("inductor"; tests: "aot_eager").
        cfg_parallel: split the two CFG branches over the group's halves (module docstring); ``layout`` is then
            the layout of one half (``layout.degree == comm.size // 2``). Items without guidance run both halves
            on the conditional branch alone, each half sequence-parallel.
    """

    def __init__(self, stages: Any, comm: SeqComm, layout: SPLayout, local: LocalAttention = LocalAttention(),
                 compile_blocks: bool = False, cfg_parallel: bool = False, backend: str | Callable = "inductor") -> None:
        self.cfg: CfgSplit | None = None
        sp_comm = comm
        if cfg_parallel:
            if comm.size % 2:
                raise ValueError(f"CFG parallel needs an even group, got {comm.size} ranks")
            half, pair = comm.split(2, comm.size // 2)
            self.cfg = CfgSplit(pair)
            sp_comm = half
        if layout.degree != sp_comm.size:
            raise ValueError(f"{layout.describe()} needs {layout.degree} ranks, the group has {sp_comm.size}"
                             + (" per CFG half" if cfg_parallel else ""))
        self.stages = stages
        self.comm = comm
        self.sp_comm = sp_comm
        self.layout = layout
        self.attention = build_attention(sp_comm, layout, local) if layout.name != "none" else None
        self._handles: list[SPHandle] = []
        if self.attention is not None:
            for model in (stages.transformer, getattr(stages, "transformer_2", None)):
                if model is not None:
                    self._handles.append(parallelize_transformer(model, self.attention, compile_blocks, backend))

    @classmethod
    def from_group(cls, stages: Any, group: Any, subgroup: Callable[[list[int]], Any] | None,
                   sp_layout: str | SPLayout, torus_shape: tuple[int, int] | None = None,
                   device: torch.device | str | None = None, local: LocalAttention = LocalAttention(),
                   compile_blocks: bool = False, cfg_parallel: bool = False,
                   backend: str | Callable = "inductor") -> "SPDenoiser":
        """From the project's collectives: ``group`` a ``Group`` of the DiT group's ranks (leader first),
        ``subgroup`` its ``GroupCollectives.group`` (for torus rows/columns and CFG halves), ``sp_layout``/
        ``torus_shape`` as the role plan resolved them (``RolePlan.sp_layout``, ``RolePlan.torus_shape``: of the
        whole group; with ``cfg_parallel`` each half gets :func:`cfg_half_torus` of it). ``device``: the
        collectives' transport device; leave it ``None`` to take it from the group (a GPU job on the MPI transport
        moves host tensors, an NVSHMEM one device tensors). ``sp_layout`` may also be the group's layout as
        already resolved (an :class:`SPLayout` from ``spmd_diff.plan.parallel_layout``, for the CFG half with
        ``cfg_parallel``): it is taken as it is, and ``torus_shape`` is not used."""
        if isinstance(sp_layout, SPLayout):
            return cls(stages, GroupSeqComm(group, subgroup, device), sp_layout, local, compile_blocks, cfg_parallel,
                       backend)
        model = stages.transformer if stages.transformer is not None else stages.transformer_2
        degree = len(group.ranks)
        if cfg_parallel:
            degree //= 2
            torus_shape = cfg_half_torus(torus_shape, 2 * degree)
            if sp_layout == "torus" and (torus_shape is None or 1 in torus_shape):
                sp_layout = "auto"  # a half that is no grid (or one row/column of it): the layout its shape allows
        layout = resolve_layout(sp_layout, degree, int(model.config.num_attention_heads), torus_shape)
        return cls(stages, GroupSeqComm(group, subgroup, device), layout, local, compile_blocks, cfg_parallel, backend)

    @property
    def is_leader(self) -> bool:
        return self.comm.rank == 0

    def denoise(self, embeds: dict[str, torch.Tensor] | None, seed: int | None, spec: Any, *,
                callback: Callable[[int, int], None] | None = None,
                every_rank: bool = False) -> torch.Tensor | None:
        """Denoise one item on every member of the group (collective).

        Args:
            embeds: leader: :meth:`WanStages.encode`'s dict (``WanShapes.encoded_shapes``); others: ``None``.
            seed: leader: the item's seed; others: ignored (broadcast from the leader).
            spec: the job's ``VideoSpec`` (the same on every member).
            callback: ``callback(step_index, num_steps)`` after each step, on every member.
            every_rank: return the latents on every member (they all hold the same ones), e.g. to decode together.

        Returns:
            Leader (every member with ``every_rank``): the final latents ``[1, C, F, H, W]`` float32 on the CPU,
            equal to the one-rank ``stages.denoise(embeds, seed, spec)`` up to reassociation; others: ``None``.

        Raises:
            ValueError: on every member, if the leader's embeddings or seed are unusable.
        """
        stages = self.stages
        encoded_shapes = stages.shapes(spec).encoded_shapes()  # text (and image-to-video's image, condition)
        model = stages.transformer if stages.transformer is not None else stages.transformer_2
        dtype = model.dtype
        problem = ""
        if self.is_leader:
            problem = _check_leader_inputs(embeds, seed, encoded_shapes)
        header = torch.tensor([int(seed) if self.is_leader and not problem else 0, 1 if problem else 0],
                              dtype=torch.int64)
        header = self.comm.broadcast(header, 0)
        if int(header[1]):
            raise ValueError(f"DiT group leader's inputs are unusable: {problem or 'see the leader rank'}")
        seed = int(header[0])
        shared: dict[str, torch.Tensor] = {}
        for key, shape in encoded_shapes.items():
            # denoise casts to the transformer's dtype anyway (the float32 condition too, after concatenation)
            if self.is_leader:
                tensor = embeds[key].detach().to("cpu", dtype).contiguous()
            else:
                tensor = torch.empty(shape, dtype=dtype)
            shared[key] = self.comm.broadcast(tensor, 0)
        cfg = self.cfg if spec.do_classifier_free_guidance else None
        latents = stages.denoise(shared, seed, spec, callback=callback, cfg_split=cfg)
        return latents if self.is_leader or every_rank else None

    def remove(self) -> None:
        """Take the hooks out of the transformer(s) (they run unparallelized again). Not collective."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _check_leader_inputs(embeds: Any, seed: Any, shapes: dict[str, tuple[int, ...]]) -> str:
    if isinstance(seed, bool) or not isinstance(seed, int):
        return f"seed must be an integer, got {seed!r}"
    if not isinstance(embeds, dict):
        return f"embeds must be a dict of tensors, got {type(embeds).__name__}"
    for key, shape in shapes.items():
        tensor = embeds.get(key)
        if not isinstance(tensor, torch.Tensor):
            return f"embeds[{key!r}] is missing"
        if tuple(tensor.shape) != tuple(shape):
            return f"embeds[{key!r}] has shape {tuple(tensor.shape)}, expected {tuple(shape)}"
    return ""

