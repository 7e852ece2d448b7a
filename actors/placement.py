"""Which shards hold which routed experts, per MoE layer: the map the router dispatches by.

Pure data and pure functions, no Ray. Every expert of every layer lives on at least one shard;
a hot expert may live on several (replicas), and the router splits its tokens among them. A
shard holds an expert at most once; the order of a shard's list is the order of its local
expert stack. `balanced_placement` computes a placement from per-expert load (EPLB-style).
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

import torch


class PlacementError(ValueError):
    """An expert map that cannot be used; the message names the layer and the expert."""


@dataclass(frozen=True)
class ExpertPlacement:
    n_experts: int
    layers: tuple[tuple[tuple[int, ...], ...], ...]  # [moe layer][shard] -> expert ids in local order

    def __post_init__(self) -> None:
        if not self.layers:
            return
        n_shards = len(self.layers[0])
        for li, shards in enumerate(self.layers):
            if len(shards) != n_shards:
                raise PlacementError(f"MoE layer {li} maps to {len(shards)} shards, layer 0 to {n_shards}")
            for si, experts in enumerate(shards):
                if not experts:
                    raise PlacementError(f"MoE layer {li}: shard {si} holds no expert")
                if len(set(experts)) != len(experts):
                    twice = sorted({e for e in experts if experts.count(e) > 1})
                    raise PlacementError(f"MoE layer {li}: shard {si} holds experts {twice[:8]} twice (duplicated)")
            held = {e for experts in shards for e in experts}
            if held != set(range(self.n_experts)):
                missing = sorted(set(range(self.n_experts)) - held)
                extra = sorted(e for e in held if not 0 <= e < self.n_experts)
                raise PlacementError(f"MoE layer {li}: every expert 0..{self.n_experts - 1} needs a shard; "
                                     f"unowned {missing[:8]}, out of range {extra[:8]}")

    @staticmethod
    def contiguous(n_layers: int, n_experts: int, n_shards: int) -> "ExpertPlacement":
        """Shard s owns a contiguous block of experts in every layer (the default)."""
        if not 1 <= n_shards <= n_experts:
            raise PlacementError(f"number of shards must be between 1 and the {n_experts} experts, got {n_shards}")
        bounds = [round(s * n_experts / n_shards) for s in range(n_shards + 1)]
        shards = tuple(tuple(range(bounds[s], bounds[s + 1])) for s in range(n_shards))
        return ExpertPlacement(n_experts, tuple(shards for _ in range(n_layers)))

    @staticmethod
    def from_lists(lists: Sequence[Sequence[Sequence[int]]] | Sequence[Sequence[int]], n_layers: int,
                   n_experts: int) -> "ExpertPlacement":
        """Either one shard->experts map for every layer, or one per layer."""
        if lists and lists[0] and isinstance(lists[0][0], int):
            per_layer = [lists] * n_layers
        else:
            per_layer = list(lists)
        if len(per_layer) != n_layers:
            raise PlacementError(f"expected a map for each of {n_layers} MoE layers, got {len(per_layer)}")
        return ExpertPlacement(n_experts, tuple(tuple(tuple(int(e) for e in s) for s in layer) for layer in per_layer))

    @property
    def n_shards(self) -> int:
        return len(self.layers[0]) if self.layers else 0

    def shard_experts(self, shard: int) -> list[list[int]]:
        """What one shard holds, per layer."""
        return [list(layer[shard]) for layer in self.layers]

    def replica_counts(self, layer: int) -> torch.Tensor:
        """[n_experts]: on how many shards each expert of this layer lives."""
        held = torch.tensor([e for experts in self.layers[layer] for e in experts], dtype=torch.long)
        return torch.bincount(held, minlength=self.n_experts)

    def shard_load(self, load_LE: torch.Tensor) -> torch.Tensor:
        """[n_layers, n_shards] tokens each shard would compute for this per-expert load, with a
        replicated expert's tokens split evenly among its copies (as the router splits them)."""
        out = torch.zeros(len(self.layers), self.n_shards, dtype=torch.float64)
        for li, shards in enumerate(self.layers):
            per_copy = load_LE[li].double() / self.replica_counts(li).double()
            for si, experts in enumerate(shards):
                out[li, si] = per_copy[list(experts)].sum()
        return out

    def to_lists(self) -> list[list[list[int]]]:
        return [[list(s) for s in layer] for layer in self.layers]


def imbalance(shard_load_LS: torch.Tensor) -> float:
    """max/mean shard load as a step feels it: every layer waits for its busiest shard, so the sum
    over layers of the per-layer maximum over the sum of per-layer means. 1.0 is perfect balance."""
    mean = shard_load_LS.double().mean(1).sum()
    if mean <= 0:
        return 1.0
    return float(shard_load_LS.double().amax(1).sum() / mean)


def _replicate(load_E: torch.Tensor, n_copies: int, max_copies: int) -> list[int]:
    """Copies per expert: one each, then each spare copy to the expert with the most load per
    copy that is not yet on every shard (a shard holds an expert at most once)."""
    copies = [1] * load_E.numel()
    heap = [(-float(load), e) for e, load in enumerate(load_E.tolist())]
    heapq.heapify(heap)
    for _ in range(n_copies - load_E.numel()):
        _, e = heapq.heappop(heap)
        copies[e] += 1
        if copies[e] < max_copies:
            heapq.heappush(heap, (-float(load_E[e]) / copies[e], e))
    return copies


def _pack(load_E: torch.Tensor, copies: list[int], n_shards: int) -> list[list[int]]:
    """Greedy longest-processing-time packing of expert copies onto shards of equal size: the
    heaviest copy goes to the least loaded shard with room that does not hold that expert yet."""
    n_items = sum(copies)
    room = [n_items // n_shards + (s < n_items % n_shards) for s in range(n_shards)]
    items = sorted(((float(load_E[e]) / copies[e], e) for e in range(len(copies)) for _ in range(copies[e])),
                   key=lambda item: (-item[0], item[1]))
    shards: list[list[int]] = [[] for _ in range(n_shards)]
    totals = [0.0] * n_shards
    for load, e in items:
        candidates = [s for s in range(n_shards) if len(shards[s]) < room[s] and e not in shards[s]]
        s = min(candidates, key=lambda s: (totals[s], len(shards[s]), s))
        shards[s].append(e)
        totals[s] += load
    return [sorted(s) for s in shards]


def balanced_placement(load_LE: torch.Tensor, n_shards: int, n_redundant: int = 0,
                       shard_nodes: Sequence[int] | None = None, n_groups: int = 1) -> ExpertPlacement:
    """A placement that evens out shard load for the given per-expert load [n_layers, n_experts].

    n_redundant extra expert copies per layer go to the hottest experts (by load per copy), then
    all copies are packed onto shards holding equal numbers of copies. With shard_nodes (the node
    index of each shard) and n_groups > 1, each expert group is kept on one node: groups are packed
    onto nodes by load, then each node's experts onto its shards (replicas stay within the node).
    """
    n_layers, n_experts = load_LE.shape
    if not 1 <= n_shards <= n_experts + n_redundant:
        raise PlacementError(f"{n_shards} shards cannot each hold an expert of {n_experts} + {n_redundant} copies")
    if n_redundant < 0 or n_redundant > n_experts * (n_shards - 1):
        raise PlacementError(f"n_redundant must be between 0 and {n_experts * (n_shards - 1)}, got {n_redundant}")
    load_LE = load_LE.double().clamp(min=0) + 1e-9  # idle experts still get a place
    if shard_nodes is None or n_groups <= 1:
        layers = [_pack(load_E, _replicate(load_E, n_experts + n_redundant, n_shards), n_shards)
                  for load_E in load_LE]
        return ExpertPlacement(n_experts, tuple(tuple(tuple(s) for s in layer) for layer in layers))
    return _grouped_placement(load_LE, n_shards, n_redundant, list(shard_nodes), n_groups)


def _grouped_placement(load_LE: torch.Tensor, n_shards: int, n_redundant: int, shard_nodes: list[int],
                       n_groups: int) -> ExpertPlacement:
    n_layers, n_experts = load_LE.shape
    if len(shard_nodes) != n_shards:
        raise PlacementError(f"shard_nodes names {len(shard_nodes)} shards, expected {n_shards}")
    if n_experts % n_groups:
        raise PlacementError(f"{n_groups} groups do not divide the {n_experts} experts")
    nodes = sorted(set(shard_nodes))
    node_shards = {n: [s for s in range(n_shards) if shard_nodes[s] == n] for n in nodes}
    group_size = n_experts // n_groups
    layers = []
    for load_E in load_LE:
        group_load = load_E.view(n_groups, group_size).sum(1)
        node_groups = _pack(group_load, [1] * n_groups, len(nodes)) if n_groups >= len(nodes) else None
        if node_groups is None:
            raise PlacementError(f"{n_groups} expert groups cannot cover {len(nodes)} nodes")
        shards: list[list[int]] = [[] for _ in range(n_shards)]
        for node, groups in zip(nodes, node_groups):
            experts = [g * group_size + i for g in groups for i in range(group_size)]
            local = load_E[experts]
            spare = round(n_redundant * len(node_shards[node]) / n_shards)
            n_local = len(node_shards[node])
            packed = _pack(local, _replicate(local, len(experts) + min(spare, len(experts) * (n_local - 1)), n_local),
                           n_local)
            for s, local_ids in zip(node_shards[node], packed):
                shards[s] = sorted(experts[i] for i in local_ids)
        layers.append(tuple(tuple(s) for s in shards))
    return ExpertPlacement(n_experts, tuple(layers))
