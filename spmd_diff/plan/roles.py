"""The role plan: which ranks encode, which denoise (in which DiT groups), which decode. Pure Python.

Placement rule: a DiT group should sit inside one node (sequence parallelism over NVLink). Ranks that cannot
complete a group on their node are the first picked for encoder/decoder roles; only when the plan needs more
encoder/decoder ranks than that does it take whole groups' worth of ranks from the last nodes. Ranks left that
still do not fill a group on their node form groups across nodes (the torus layout's A x B grid).

A plan of ``roles.policy = "auto"`` (``spmd_diff.plan.planner``) also says which stages each rank holds
(``rank_stages``): a DiT rank may also encode and decode, a non-DiT rank may encode and decode. Plans of
``"static"`` derive the same from their counts, so every caller asks :meth:`RolePlan.stages_of`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any, Sequence

from spmd_diff.errors import UserError
from spmd_diff.parallel.layout import resolve_group_layout
from spmd_diff.plan.topology import Topology


def spread_edges(producers: Sequence[int], consumers: Sequence[int]) -> list[tuple[int, int]]:
    """Which producer feeds which consumer, as sorted ``(producer, consumer)`` rank pairs.

    Every producer feeds at least one consumer and every consumer hears from at least one producer; a producer
    feeds two consumers where there are two (the second half the consumers away), so one slow consumer never holds
    a producer alone. A consumer hears from at most ``2 * ceil(P / C)`` producers (2 when ``C >= P``): its rings,
    and so the symmetric heap every rank allocates, grow with the ratio of producers to consumers, never with
    their number (each producer -> every consumer would need ``P`` rings per consumer: gigabytes at scale).
    """
    num_p, num_c = len(producers), len(consumers)
    if not num_p or not num_c:
        return []
    pairs = {(j % num_p, j % num_c) for j in range(max(num_p, num_c))}
    if num_c > 1:
        pairs |= {(j, (j + num_c // 2) % num_c) for j in range(num_p)}
    return sorted((producers[p], consumers[c]) for p, c in pairs)


@dataclass(frozen=True)
class RolePlan:
    """What each rank does. ``encoders``/``decoders`` empty means DiT ranks do that stage themselves."""

    num_ranks: int
    encoders: tuple[int, ...]
    dit_groups: tuple[tuple[int, ...], ...]
    decoders: tuple[int, ...]
    sp_layout: str
    """A summary of the groups' layouts (:func:`summarize_layouts`): "none" (groups of one rank), "ulysses",
    "ring", "torus", or "mixed" when groups resolve differently. Each group runs its own layout:
    ``spmd_diff.plan.parallel_layout.resolve_parallel_layout``."""
    torus_shape: tuple[int, int] = (1, 1)
    """(A inter-node, B intra-node) ranks of the torus groups when every group is that torus; (1, S) otherwise."""
    rank_stages: tuple[tuple[str, ...], ...] = field(default=(), repr=False)
    """Per rank, the stages it holds ("encode", "denoise", "decode"), set by the auto planner. Empty: derived
    from the counts (static plans: DiT group leaders encode/decode when there are no encoders/decoders)."""
    policy: str = "static"
    """"static" (fixed counts, :func:`plan_roles`) or "auto" (chosen by ``spmd_diff.plan.planner``)."""
    predicted_videos_per_hour: float = 0.0
    """What the planner predicted for the workload it planned for (0: not predicted)."""
    cfg_parallel: bool = False
    """Each DiT group runs the two CFG branches on its two halves (``dit.cfg_parallel``; :func:`with_group_options`)."""
    time_shared: bool = False
    """Every rank holds every stage but keeps one stage's components on its GPU at a time (the others in host
    memory), running the items it pulls stage by stage, ``stage_batch`` at a time (``roles.time_share``). Groups
    of one rank; no channels between ranks."""
    stage_batch: int = 0
    """Items per cycle of a time-shared rank (``roles.stage_batch``, or fewer as the auto planner chose); 0 when
    not :attr:`time_shared`."""
    group_decode: bool = False
    """Each DiT group decodes its own items together, every member a band of rows (``dit.group_decode``); its
    members then hold the decode stage too."""

    @property
    def dit_ranks(self) -> tuple[int, ...]:
        return tuple(r for group in self.dit_groups for r in group)

    @property
    def sp_degree(self) -> int:
        return len(self.dit_groups[0])

    @property
    def encode_on_dit(self) -> bool:
        """DiT ranks encode (their own items, or any pulled item)."""
        if self.rank_stages:
            return "encode" in self.rank_stages[self.dit_groups[0][0]]
        return not self.encoders

    @property
    def decode_on_dit(self) -> bool:
        """DiT ranks decode (their own items, or any pulled item)."""
        if self.rank_stages:
            return "decode" in self.rank_stages[self.dit_groups[0][0]]
        return not self.decoders

    @cached_property
    def _stage_table(self) -> tuple[tuple[str, ...], ...]:
        if self.rank_stages:
            return self.rank_stages
        table: list[tuple[str, ...]] = [()] * self.num_ranks
        for rank in self.encoders:
            table[rank] = ("encode",)
        for rank in self.decoders:
            table[rank] = table[rank] + ("decode",)
        for group in self.dit_groups:
            leader_extra = (("encode",) if self.encode_on_dit else ()) + (("decode",) if self.decode_on_dit else ())
            table[group[0]] = tuple(s for s in STAGE_ORDER if s == "denoise" or s in leader_extra)
            for rank in group[1:]:
                table[rank] = ("denoise", "decode") if self.group_decode else ("denoise",)
        return tuple(table)

    @cached_property
    def _group_index(self) -> dict[int, int]:
        return {rank: index for index, group in enumerate(self.dit_groups) for rank in group}

    @property
    def ranks_independent(self) -> bool:
        """Every rank renders whole items alone (time-shared, or every stage on a group of one): no channels and
        no collectives between ranks, so a rank can go on to the next batch while others finish theirs."""
        return self.sp_degree == 1 and all(stages == STAGE_ORDER for stages in self._stage_table)

    def stages_of(self, rank: int) -> tuple[str, ...]:
        """The stages ``rank`` holds (the components it loads), in pipeline order."""
        return self._stage_table[rank]

    def ranks_with(self, stage: str) -> tuple[int, ...]:
        return tuple(r for r, stages in enumerate(self._stage_table) if stage in stages)

    def same_roles(self, other: "RolePlan") -> bool:
        """Same ranks doing the same stages in the same groups (predictions aside)."""
        return (self.num_ranks == other.num_ranks and self.dit_groups == other.dit_groups
                and self._stage_table == other._stage_table and self.time_shared == other.time_shared
                and self.stage_batch == other.stage_batch)

    def role_of(self, rank: int) -> str:
        """"all", "time-shared", "encoder", "decoder", "dit", or for co-located auto roles e.g. "dit+decoder",
        "encoder+decoder"."""
        if self.time_shared:
            return "time-shared"
        if self.rank_stages:
            return role_name(self.rank_stages[rank])
        if self.num_ranks == 1:
            return "all"
        if rank in self.encoders:
            return "encoder"
        if rank in self.decoders:
            return "decoder"
        return "dit"

    def role_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for rank in range(self.num_ranks):
            name = self.role_of(rank)
            counts[name] = counts.get(name, 0) + 1
        return counts

    def channel_edges(self, embeds_spec: Any, latents_spec: Any) -> list[tuple[int, int, Any, str]]:
        """The plan's channels as ``(producer, consumer, spec, name)``: encoders -> DiT group leaders (text
        embeddings, ``embeds_spec``), leaders -> decoders (latents, ``latents_spec``), connected by
        :func:`spread_edges`. Co-located stages hand over in process and need none."""
        leaders = [group[0] for group in self.dit_groups]
        edges = [(e, d, embeds_spec, f"enc{e}->dit{d}") for e, d in spread_edges(self.encoders, leaders)]
        edges += [(d, x, latents_spec, f"dit{d}->dec{x}") for d, x in spread_edges(leaders, self.decoders)]
        return edges

    def fan_in(self) -> int:
        """The most producers one consumer serves (at least 1): a producer's wait for a free slot may last
        that many of the consumer's items."""
        consumers = Counter(consumer for _, consumer, _, _ in self.channel_edges(None, None))
        return max(consumers.values(), default=1)

    def group_of(self, rank: int) -> int:
        """Index of the DiT group holding ``rank``."""
        if rank not in self._group_index:
            raise KeyError(f"rank {rank} is not a DiT rank")
        return self._group_index[rank]

    def to_dict(self) -> dict:
        out = {
            "encoders": list(self.encoders),
            "dit_groups": [list(g) for g in self.dit_groups],
            "decoders": list(self.decoders),
            "sp_layout": self.sp_layout,
            "torus_shape": list(self.torus_shape),
            "policy": self.policy,
        }
        if self.rank_stages:
            by_role: dict[str, list[int]] = {}
            for rank in range(self.num_ranks):
                by_role.setdefault(self.role_of(rank), []).append(rank)
            out["roles"] = {name: rank_ranges(ranks) for name, ranks in sorted(by_role.items())}
        if self.predicted_videos_per_hour:
            out["predicted_videos_per_hour"] = round(self.predicted_videos_per_hour, 1)
        if self.cfg_parallel:
            out["cfg_parallel"] = True
        if self.group_decode:
            out["group_decode"] = True
        if self.time_shared:
            out["time_shared"] = True
            out["stage_batch"] = self.stage_batch
        return out

    def _group_extras(self) -> str:
        extras = []
        if self.cfg_parallel:
            extras.append(f"CFG parallel: halves of {self.sp_degree // 2}")
        if self.group_decode:
            extras.append("groups decode together")
        return "".join(f", {e}" for e in extras)

    def describe(self, topology: Topology | None = None) -> str:
        def where(ranks) -> str:
            if topology is None or not ranks:
                return ""
            nodes = sorted({topology.hostname(topology.node_of_rank[r]) for r in ranks})
            return f" on {', '.join(nodes)}"

        def short(ranks) -> str:
            ranks = list(ranks)
            if len(ranks) > 12:
                return f"{ranks[:6]}...{ranks[-3:]}"
            return str(ranks)

        if self.rank_stages:
            return self._describe_auto(where, short)
        if self.time_shared:
            return (f"role plan for {self.num_ranks} rank(s) (policy {self.policy}): every rank time-shared "
                    f"{short(range(self.num_ranks))}: all stages, one stage's components on its GPU at a time, "
                    f"{self.stage_batch} item(s) per cycle")
        lines = [f"role plan for {self.num_ranks} rank(s):"]
        lines.append(f"  encoders : {len(self.encoders):5d} {short(self.encoders)}{where(self.encoders)}"
                     + ("  (DiT ranks encode their own items)" if self.encode_on_dit else ""))
        layout = self.sp_layout if self.sp_layout != "torus" else f"torus {self.torus_shape[0]}x{self.torus_shape[1]}"
        lines.append(f"  DiT      : {len(self.dit_ranks):5d} ranks in {len(self.dit_groups)} group(s) of "
                     f"{self.sp_degree} ({layout}){self._group_extras()}")
        for index, group in enumerate(self.dit_groups[:8]):
            lines.append(f"    group {index}: {list(group)}{where(group)}")
        if len(self.dit_groups) > 8:
            lines.append(f"    ... {len(self.dit_groups) - 8} more groups")
        lines.append(f"  decoders : {len(self.decoders):5d} {short(self.decoders)}{where(self.decoders)}"
                     + ("  (DiT ranks decode their own items)" if self.decode_on_dit else ""))
        if self.predicted_videos_per_hour:
            lines.append(f"  predicted: {self.predicted_videos_per_hour:,.0f} videos/h")
        return "\n".join(lines)

    def _describe_auto(self, where, short) -> str:
        layout = self.sp_layout if self.sp_layout != "torus" else f"torus {self.torus_shape[0]}x{self.torus_shape[1]}"
        lines = [f"role plan for {self.num_ranks} rank(s) (policy {self.policy}): {len(self.dit_groups)} DiT "
                 f"group(s) of {self.sp_degree} ({layout}){self._group_extras()}"]
        by_role: dict[str, list[int]] = {}
        for rank in range(self.num_ranks):
            by_role.setdefault(self.role_of(rank), []).append(rank)
        for name in sorted(by_role, key=lambda n: (-len(by_role[n]), n)):
            ranks = by_role[name]
            stages = "+".join(self.stages_of(ranks[0])) or "nothing"
            lines.append(f"  {name:16s}: {len(ranks):5d} rank(s) holding {stages:22s} {rank_ranges(ranks)}"
                         f"{where(ranks) if len(ranks) <= 8 else ''}")
        if self.time_shared:
            lines.append(f"    one stage's components on the GPU at a time (the others in host memory), "
                         f"{self.stage_batch} item(s) per cycle (roles.stage_batch)")
        for index, group in enumerate(self.dit_groups[:4] if self.sp_degree > 1 else ()):
            lines.append(f"    group {index}: {list(group)}{where(group)}")
        if self.predicted_videos_per_hour:
            lines.append(f"  predicted: {self.predicted_videos_per_hour:,.0f} videos/h")
        return "\n".join(lines)


STAGE_ORDER = ("encode", "denoise", "decode")
_ROLE_NAMES = {("encode", "denoise", "decode"): "all", ("denoise",): "dit", ("encode",): "encoder",
               ("decode",): "decoder", ("encode", "decode"): "encoder+decoder", ("denoise", "decode"): "dit+decoder",
               ("encode", "denoise"): "dit+encoder", (): "idle"}


def role_name(stages: tuple[str, ...]) -> str:
    """The role of a rank holding ``stages`` (in :data:`STAGE_ORDER`)."""
    return _ROLE_NAMES[tuple(s for s in STAGE_ORDER if s in stages)]


def rank_ranges(ranks) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``"0-2,5,7-8"``."""
    parts: list[str] = []
    ranks = sorted(ranks)
    start = prev = None
    for rank in ranks + [None]:
        if start is not None and (rank is None or rank != prev + 1):
            parts.append(str(start) if start == prev else f"{start}-{prev}")
            start = None
        if rank is not None and start is None:
            start = rank
        prev = rank
    return ",".join(parts)


def with_group_options(plan: RolePlan, cfg_parallel: bool | str = False, group_decode: bool | str = False,
                       strict: bool = False) -> RolePlan:
    """``plan`` with :attr:`RolePlan.cfg_parallel` and :attr:`RolePlan.group_decode` resolved from the job's
    ``dit.cfg_parallel`` / ``dit.group_decode`` (true, false or "auto"; pass ``cfg_parallel=False`` for items
    without guidance). "auto" and true both turn an option on wherever it applies (CFG parallel: groups of an
    even size; group decode: groups of more than one rank that decode their own items, all members holding the
    decode stage in auto plans); with ``strict`` (static plans) true where it cannot apply is a UserError."""
    even = plan.sp_degree % 2 == 0
    cfg = cfg_parallel in (True, "auto") and even
    members_decode = plan.decode_on_dit and (not plan.rank_stages or all(
        "decode" in plan.rank_stages[r] for group in plan.dit_groups for r in group))
    decode = group_decode in (True, "auto") and plan.sp_degree > 1 and members_decode
    if strict and cfg_parallel is True and not cfg:
        raise UserError(f"dit.cfg_parallel=true needs DiT groups of an even size, got {plan.sp_degree}")
    if strict and group_decode is True and not decode:
        raise UserError("dit.group_decode=true needs DiT groups of more than one rank that decode their own items "
                        "(dit.sp_degree > 1, roles.decoders=0)")
    if (cfg, decode) == (plan.cfg_parallel, plan.group_decode):
        return plan
    return replace(plan, cfg_parallel=cfg, group_decode=decode)


def _check_one_rank_per_gpu(topology: Topology) -> None:
    if topology.gpus_per_node:
        for node in range(topology.num_nodes):
            on_node = len(topology.ranks_on_node(node))
            if on_node > topology.gpus_per_node:
                raise UserError(
                    f"node {topology.hostname(node)} has {on_node} ranks but {topology.gpus_per_node} GPUs: "
                    "launch one rank per GPU (e.g. srun --ntasks-per-node=GPUS)")


def plan_time_shared(topology: Topology, stage_batch: int) -> RolePlan:
    """Every rank a group of one holding every stage, one stage's components on its GPU at a time, taking
    ``stage_batch`` items per cycle (``roles.time_share = true`` with ``roles.policy = "static"``)."""
    _check_one_rank_per_gpu(topology)
    n = topology.num_ranks
    return RolePlan(n, (), tuple((rank,) for rank in range(n)), (), "none", (1, 1), time_shared=True,
                    stage_batch=stage_batch)


def plan_roles(topology: Topology, num_encoders: int, num_decoders: int, sp_degree: int = 1,
               sp_layout: str = "auto") -> RolePlan:
    """Map ranks to roles. One rank does every stage itself; otherwise the counts must fit the world."""
    n = topology.num_ranks
    _check_one_rank_per_gpu(topology)
    if n == 1:
        if sp_degree != 1:
            raise UserError(f"dit.sp_degree={sp_degree} needs at least {sp_degree} ranks; the job has 1")
        return RolePlan(1, (), ((0,),), (), "none", (1, 1))
    num_dit = n - num_encoders - num_decoders
    if num_dit < sp_degree or num_dit % sp_degree:
        raise UserError(
            f"roles do not fit the allocation: {n} ranks = {num_encoders} encoder(s) + {num_decoders} decoder(s) "
            f"+ {num_dit} DiT rank(s), and DiT ranks must be a positive multiple of dit.sp_degree={sp_degree}. "
            f"Change roles.encoders/roles.decoders (--set roles.encoders=...) or the number of ranks "
            f"(e.g. {num_encoders + num_decoders + sp_degree} or {num_encoders + num_decoders + 2 * sp_degree}).")

    chosen, groups = place_ranks(topology, num_encoders + num_decoders, sp_degree)
    encoders = tuple(sorted(chosen[:num_encoders]))
    decoders = tuple(sorted(chosen[num_encoders:]))
    assert all(len(g) == sp_degree for g in groups) and len(groups) * sp_degree == num_dit

    layout, shape = summarize_layouts(topology, groups, sp_layout)
    return RolePlan(n, encoders, tuple(groups), decoders, layout, shape)


def place_ranks(topology: Topology, num_non_dit: int, sp_degree: int,
                node_order: list[int] | None = None) -> tuple[list[int], list[tuple[int, ...]]]:
    """Pick ``num_non_dit`` ranks for non-DiT roles and group the rest in blocks of ``sp_degree``.

    Ranks that cannot complete an intra-node group are taken first (front of each node); then whole intra-node
    blocks from the nodes in ``node_order`` (default: last node backwards), front of the node first. Returns the
    chosen ranks in the order they were picked and the DiT groups (intra-node first, then across nodes).
    """
    per_node = topology.node_ranks
    chosen: list[int] = []
    for ranks in per_node:
        for rank in ranks[: len(ranks) % sp_degree]:
            if len(chosen) < num_non_dit:
                chosen.append(rank)
    chosen_set = set(chosen)
    order = node_order if node_order is not None else list(range(len(per_node) - 1, -1, -1))
    position = 0
    while len(chosen) < num_non_dit:
        node = order[position % len(order)]
        position += 1
        candidates = [r for r in per_node[node] if r not in chosen_set]
        take = candidates[: num_non_dit - len(chosen)]
        chosen.extend(take)
        chosen_set.update(take)
    groups: list[tuple[int, ...]] = []
    leftovers: list[int] = []
    for ranks in per_node:
        free = [r for r in ranks if r not in chosen_set]
        whole = len(free) - len(free) % sp_degree
        groups.extend(tuple(free[i: i + sp_degree]) for i in range(0, whole, sp_degree))
        leftovers.extend(free[whole:])
    groups.extend(tuple(leftovers[i: i + sp_degree]) for i in range(0, len(leftovers), sp_degree))
    return chosen, groups


def summarize_layouts(topology: Topology, groups: Sequence[tuple[int, ...]],
                      requested: str) -> tuple[str, tuple[int, int]]:
    """The plan-level summary of its groups' sequence-parallel layouts, for printing and the plan's record:
    ``(name, (A, B))`` when every group resolves alike (from where its own ranks landed, the head count aside:
    ``parallel.layout.resolve_group_layout``), else ``("mixed", (1, S))``. What a group runs is its own layout
    (``spmd_diff.plan.parallel_layout``), never this summary. Raises :class:`UserError` as the per-group
    resolution does (``"torus"`` asked of a group that is no grid)."""
    sp = len(groups[0])
    if sp == 1:
        return "none", (1, 1)
    layouts = {resolve_group_layout(requested, topology.node_of_rank, g, None) for g in groups}
    if len(layouts) > 1:
        return "mixed", (1, sp)
    layout = layouts.pop()
    return layout.name, (layout.torus_shape if layout.name == "torus" else (1, sp))
