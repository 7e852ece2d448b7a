"""Which shard owns which routed experts, per MoE layer: the map the router dispatches by.

Pure data with validation, no Ray: any map is accepted as long as every expert of every layer
has exactly one owner. The order of a shard's list is the order of its local expert stack.
"""

from __future__ import annotations

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
            owned = sorted(e for experts in shards for e in experts)
            if owned != list(range(self.n_experts)):
                missing = sorted(set(range(self.n_experts)) - set(owned))
                extra = sorted({e for e in owned if owned.count(e) > 1 or not 0 <= e < self.n_experts})
                raise PlacementError(f"MoE layer {li}: every expert 0..{self.n_experts - 1} needs exactly one shard; "
                                     f"unowned {missing[:8]}, duplicated or out of range {extra[:8]}")

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
        """What one shard owns, per layer."""
        return [list(layer[shard]) for layer in self.layers]

    def send_order(self, layer: int) -> torch.Tensor:
        """Global expert ids in the order the router sends rows: shard 0's experts, then shard 1's..."""
        return torch.tensor([e for experts in self.layers[layer] for e in experts], dtype=torch.long)

    def to_lists(self) -> list[list[list[int]]]:
        return [[list(s) for s in layer] for layer in self.layers]
