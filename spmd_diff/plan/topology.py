"""What the job got: nodes, ranks on each node, GPUs. One frozen, printable value built by pure functions."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from spmd_diff.errors import UserError


@dataclass(frozen=True)
class Topology:
    """The allocation as the program sees it.

    ``node_of_rank[r]`` is the node index (0..num_nodes-1) of rank r; ranks of one node need not be
    contiguous. ``gpus_per_node`` is 0 on CPU-only allocations.
    """

    node_of_rank: tuple[int, ...]
    gpus_per_node: int = 0
    hostnames: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        assert self.node_of_rank, "a topology has at least one rank"
        nodes = sorted(set(self.node_of_rank))
        assert nodes == list(range(len(nodes))), f"node ids must be 0..N-1, got {nodes}"
        assert not self.hostnames or len(self.hostnames) == len(nodes)

    @property
    def num_ranks(self) -> int:
        return len(self.node_of_rank)

    @property
    def num_nodes(self) -> int:
        return max(self.node_of_rank) + 1

    @cached_property
    def node_ranks(self) -> tuple[tuple[int, ...], ...]:
        """Per node, its ranks in increasing order (computed once: plans of 4,096 ranks ask often)."""
        per_node: list[list[int]] = [[] for _ in range(self.num_nodes)]
        for rank, node in enumerate(self.node_of_rank):
            per_node[node].append(rank)
        return tuple(tuple(ranks) for ranks in per_node)

    def ranks_on_node(self, node: int) -> tuple[int, ...]:
        return self.node_ranks[node]

    def local_rank(self, rank: int) -> int:
        return self.ranks_on_node(self.node_of_rank[rank]).index(rank)

    def hostname(self, node: int) -> str:
        return self.hostnames[node] if self.hostnames else f"node{node}"

    @staticmethod
    def uniform(num_nodes: int, ranks_per_node: int, gpus_per_node: int = 0) -> "Topology":
        """``num_nodes`` nodes of ``ranks_per_node`` consecutive ranks each (what srun's block distribution gives)."""
        if num_nodes < 1 or ranks_per_node < 1:
            raise UserError(f"a topology needs >= 1 node and >= 1 rank per node, got {num_nodes} x {ranks_per_node}")
        return Topology(tuple(r // ranks_per_node for r in range(num_nodes * ranks_per_node)), gpus_per_node)

    @staticmethod
    def from_hostnames(hostname_of_rank: list[str], gpus_per_node: int = 0) -> "Topology":
        """Nodes numbered in order of first appearance."""
        order: dict[str, int] = {}
        for host in hostname_of_rank:
            order.setdefault(host, len(order))
        return Topology(tuple(order[h] for h in hostname_of_rank), gpus_per_node, tuple(order))

    def regrouped(self, ranks_per_node: int) -> "Topology":
        """A virtual topology of consecutive blocks of ``ranks_per_node`` ranks (testing multi-node layouts on one node)."""
        if ranks_per_node < 1 or self.num_ranks % ranks_per_node:
            raise UserError(
                f"world.ranks_per_node={ranks_per_node} must divide the {self.num_ranks} ranks of the job")
        topo = Topology.uniform(self.num_ranks // ranks_per_node, ranks_per_node, self.gpus_per_node)
        return Topology(topo.node_of_rank, self.gpus_per_node,
                        tuple(f"virtual{n}" for n in range(topo.num_nodes)))

    def describe(self) -> str:
        per_node = [len(self.ranks_on_node(n)) for n in range(self.num_nodes)]
        gpus = f", {self.gpus_per_node} GPUs per node" if self.gpus_per_node else ", no GPUs"
        if len(set(per_node)) == 1:
            return f"{self.num_ranks} ranks on {self.num_nodes} node(s) x {per_node[0]} ranks{gpus}"
        return f"{self.num_ranks} ranks on {self.num_nodes} nodes (ranks per node {per_node}){gpus}"
