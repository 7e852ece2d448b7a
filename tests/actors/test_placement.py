"""Expert maps: contiguous by default, any complete map accepted (replicas included), broken
maps named, and the balanced placement evens out a skewed load (pure functions, no Ray)."""

from __future__ import annotations

import pytest
import torch

from actors.placement import ExpertPlacement, PlacementError, balanced_placement, imbalance


def test_contiguous_split_covers_every_expert():
    p = ExpertPlacement.contiguous(n_layers=2, n_experts=8, n_shards=3)
    assert sorted(e for s in p.layers[0] for e in s) == list(range(8))
    assert [len(s) for s in p.layers[0]] in ([3, 2, 3], [3, 3, 2], [2, 3, 3])
    assert p.shard_experts(2) == [list(p.layers[0][2]), list(p.layers[1][2])]
    assert p.replica_counts(1).tolist() == [1] * 8


def test_one_map_for_all_layers_or_one_per_layer():
    same = ExpertPlacement.from_lists([[7, 0, 2], [1, 3, 4, 5, 6]], n_layers=3, n_experts=8)
    assert all(layer == ((7, 0, 2), (1, 3, 4, 5, 6)) for layer in same.layers)
    per = ExpertPlacement.from_lists([[[0, 1], [2, 3]], [[3, 0], [2, 1]]], n_layers=2, n_experts=4)
    assert per.layers[1] == ((3, 0), (2, 1))


def test_replicas_split_their_load_evenly():
    p = ExpertPlacement.from_lists([[0, 1, 2], [2, 3]], n_layers=1, n_experts=4)
    assert p.replica_counts(0).tolist() == [1, 1, 2, 1]
    load = torch.tensor([[10, 0, 40, 30]])
    assert p.shard_load(load).tolist() == [[30.0, 50.0]]
    assert imbalance(p.shard_load(load)) == pytest.approx(50 / 40)


@pytest.mark.parametrize("lists, message", [
    ([[0, 1, 2, 2], [3]], "duplicated"),
    ([[0, 1], [3]], "unowned \\[2\\]"),
    ([[0, 1, 2], [3, 9]], "out of range"),
    ([[0, 1, 2, 3], []], "shard 1 holds no expert"),
])
def test_broken_maps_are_named(lists, message):
    with pytest.raises(PlacementError, match=message):
        ExpertPlacement.from_lists(lists, n_layers=2, n_experts=4)


def test_shard_count_bounds():
    with pytest.raises(PlacementError, match="between 1 and the 4 experts"):
        ExpertPlacement.contiguous(2, 4, 5)
    with pytest.raises(PlacementError, match="n_redundant"):
        balanced_placement(torch.ones(1, 4), 2, n_redundant=9)


def skewed_load(n_layers: int, n_experts: int, hot: list[int], seed: int) -> torch.Tensor:
    """A few hot experts get most tokens; the rest a little, at random."""
    gen = torch.Generator().manual_seed(seed)
    load = torch.randint(5, 20, (n_layers, n_experts), generator=gen)
    load[:, hot] += 400
    return load


@pytest.mark.parametrize("n_experts, n_shards, hot", [(8, 2, [0, 1]), (16, 4, [0, 1, 2, 3]), (64, 8, [3, 17, 40])])
def test_balanced_placement_with_replicas_evens_a_skewed_load(n_experts, n_shards, hot, seed):
    load = skewed_load(2, n_experts, hot, seed)
    contiguous = ExpertPlacement.contiguous(2, n_experts, n_shards)
    before = imbalance(contiguous.shard_load(load))
    placed = balanced_placement(load, n_shards, n_redundant=n_shards)
    after = imbalance(placed.shard_load(load))
    print(f"max/mean shard load: contiguous {before:.3f} -> balanced {after:.3f}")
    assert before > 1.5 and after <= 1.15
    # every shard holds the same number of copies, every expert lives somewhere, hot ones twice
    for li in range(2):
        sizes = {len(s) for s in placed.layers[li]}
        assert max(sizes) - min(sizes) <= 1
        assert all(placed.replica_counts(li)[e] >= 2 for e in hot[:n_shards])


def test_without_replicas_packing_alone_balances_when_experts_are_many(seed):
    load = skewed_load(3, 32, [5, 6, 7, 8], seed)
    placed = balanced_placement(load, 4)
    assert all(placed.replica_counts(li).max() == 1 for li in range(3))
    assert imbalance(placed.shard_load(load)) < imbalance(ExpertPlacement.contiguous(3, 32, 4).shard_load(load))


def test_groups_stay_on_one_node(seed):
    """With 4 groups of 4 experts and shards on 2 nodes, each group's experts (and copies) are on one node."""
    load = skewed_load(1, 16, [0, 9], seed)
    nodes = [0, 0, 1, 1]
    placed = balanced_placement(load, 4, n_redundant=2, shard_nodes=nodes, n_groups=4)
    for group in range(4):
        holders = {nodes[s] for s, experts in enumerate(placed.layers[0]) for e in experts if e // 4 == group}
        assert len(holders) == 1, f"group {group} spans nodes {holders}"
