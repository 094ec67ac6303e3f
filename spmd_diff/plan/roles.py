"""The role plan: which ranks encode, which denoise (in which DiT groups), which decode. Pure Python.

Placement rule: a DiT group should sit inside one node (sequence parallelism over NVLink). Ranks that cannot
complete a group on their node are the first picked for encoder/decoder roles; only when the plan needs more
encoder/decoder ranks than that does it take whole groups' worth of ranks from the last nodes. Ranks left that
still do not fill a group on their node form groups across nodes (the torus layout's A x B grid).
"""

from __future__ import annotations

from dataclasses import dataclass

from spmd_diff.errors import UserError
from spmd_diff.plan.topology import Topology


@dataclass(frozen=True)
class RolePlan:
    """What each rank does. ``encoders``/``decoders`` empty means DiT ranks do that stage themselves."""

    num_ranks: int
    encoders: tuple[int, ...]
    dit_groups: tuple[tuple[int, ...], ...]
    decoders: tuple[int, ...]
    sp_layout: str
    """"none" (groups of one rank), "ulysses", "ring" or "torus"."""
    torus_shape: tuple[int, int] = (1, 1)
    """(A inter-node, B intra-node) ranks of a torus group; (1, S) otherwise."""

    @property
    def dit_ranks(self) -> tuple[int, ...]:
        return tuple(r for group in self.dit_groups for r in group)

    @property
    def sp_degree(self) -> int:
        return len(self.dit_groups[0])

    @property
    def encode_on_dit(self) -> bool:
        return not self.encoders

    @property
    def decode_on_dit(self) -> bool:
        return not self.decoders

    def role_of(self, rank: int) -> str:
        if self.num_ranks == 1:
            return "all"
        if rank in self.encoders:
            return "encoder"
        if rank in self.decoders:
            return "decoder"
        return "dit"

    def group_of(self, rank: int) -> int:
        """Index of the DiT group holding ``rank``."""
        for index, group in enumerate(self.dit_groups):
            if rank in group:
                return index
        raise KeyError(f"rank {rank} is not a DiT rank")

    def to_dict(self) -> dict:
        return {
            "encoders": list(self.encoders),
            "dit_groups": [list(g) for g in self.dit_groups],
            "decoders": list(self.decoders),
            "sp_layout": self.sp_layout,
            "torus_shape": list(self.torus_shape),
        }

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

        lines = [f"role plan for {self.num_ranks} rank(s):"]
        lines.append(f"  encoders : {len(self.encoders):5d} {short(self.encoders)}{where(self.encoders)}"
                     + ("  (DiT ranks encode their own items)" if self.encode_on_dit else ""))
        layout = self.sp_layout if self.sp_layout != "torus" else f"torus {self.torus_shape[0]}x{self.torus_shape[1]}"
        lines.append(f"  DiT      : {len(self.dit_ranks):5d} ranks in {len(self.dit_groups)} group(s) of "
                     f"{self.sp_degree} ({layout})")
        for index, group in enumerate(self.dit_groups[:8]):
            lines.append(f"    group {index}: {list(group)}{where(group)}")
        if len(self.dit_groups) > 8:
            lines.append(f"    ... {len(self.dit_groups) - 8} more groups")
        lines.append(f"  decoders : {len(self.decoders):5d} {short(self.decoders)}{where(self.decoders)}"
                     + ("  (DiT ranks decode their own items)" if self.decode_on_dit else ""))
        return "\n".join(lines)


def plan_roles(topology: Topology, num_encoders: int, num_decoders: int, sp_degree: int = 1,
               sp_layout: str = "auto") -> RolePlan:
    """Map ranks to roles. One rank does every stage itself; otherwise the counts must fit the world."""
    n = topology.num_ranks
    if topology.gpus_per_node:
        for node in range(topology.num_nodes):
            on_node = len(topology.ranks_on_node(node))
            if on_node > topology.gpus_per_node:
                raise UserError(
                    f"node {topology.hostname(node)} has {on_node} ranks but {topology.gpus_per_node} GPUs: "
                    "launch one rank per GPU (e.g. srun --ntasks-per-node=GPUS)")
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

    per_node = [list(topology.ranks_on_node(node)) for node in range(topology.num_nodes)]
    # Ranks that cannot complete an intra-node group are taken first (front of each node: local rank 0 up).
    non_dit_needed = num_encoders + num_decoders
    spare = [ranks[: len(ranks) % sp_degree] for ranks in per_node]
    chosen: list[int] = []
    for node_spare in spare:
        for rank in node_spare:
            if len(chosen) < non_dit_needed:
                chosen.append(rank)
    # Then whole intra-node blocks, from the last node backwards, front of the node first.
    node = len(per_node) - 1
    while len(chosen) < non_dit_needed:
        candidates = [r for r in per_node[node] if r not in chosen]
        take = min(len(candidates), non_dit_needed - len(chosen))
        chosen.extend(candidates[:take])
        node = (node - 1) % len(per_node)
    chosen_set = set(chosen)
    encoders = tuple(sorted(chosen[:num_encoders]))
    decoders = tuple(sorted(chosen[num_encoders:]))

    groups: list[tuple[int, ...]] = []
    leftovers: list[int] = []
    for ranks in per_node:
        free = [r for r in ranks if r not in chosen_set]
        whole = len(free) - len(free) % sp_degree
        groups.extend(tuple(free[i: i + sp_degree]) for i in range(0, whole, sp_degree))
        leftovers.extend(free[whole:])
    groups.extend(tuple(leftovers[i: i + sp_degree]) for i in range(0, len(leftovers), sp_degree))
    assert all(len(g) == sp_degree for g in groups) and len(groups) * sp_degree == num_dit

    layout, shape = _resolve_layout(topology, groups, sp_layout)
    return RolePlan(n, encoders, tuple(groups), decoders, layout, shape)


def _resolve_layout(topology: Topology, groups: list[tuple[int, ...]], requested: str) -> tuple[str, tuple[int, int]]:
    """Sequence-parallel layout from where the groups actually landed."""
    sp = len(groups[0])
    if sp == 1:
        return "none", (1, 1)
    spans_nodes = any(len({topology.node_of_rank[r] for r in g}) > 1 for g in groups)
    shapes = {_grid_shape(topology, g) for g in groups}
    uniform_grid = len(shapes) == 1 and None not in shapes
    if requested == "auto":
        if not spans_nodes:
            return "ulysses", (1, sp)
        return ("torus", shapes.pop()) if uniform_grid else ("ring", (1, sp))
    if requested == "torus":
        if not uniform_grid:
            raise UserError("dit.sp_layout='torus' needs every DiT group to be an A x B grid (A nodes with B ranks "
                            "each); this allocation gives uneven groups. Use 'ring' or 'ulysses', or change the "
                            "ranks per node.")
        return "torus", shapes.pop()
    return requested, (1, sp)


def _grid_shape(topology: Topology, group: tuple[int, ...]) -> tuple[int, int] | None:
    counts: dict[int, int] = {}
    for rank in group:
        node = topology.node_of_rank[rank]
        counts[node] = counts.get(node, 0) + 1
    if len(set(counts.values())) != 1:
        return None
    return len(counts), next(iter(counts.values()))
