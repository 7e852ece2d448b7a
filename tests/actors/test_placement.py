"""Expert maps: contiguous by default, any complete map accepted, broken maps named."""

from __future__ import annotations

import pytest

from actors.placement import ExpertPlacement, PlacementError


def test_contiguous_split_covers_every_expert():
    p = ExpertPlacement.contiguous(n_layers=2, n_experts=8, n_shards=3)
    assert p.layers[0] == ((0, 1, 2), (3, 4), (5, 6, 7)) or sum(len(s) for s in p.layers[0]) == 8
    assert p.send_order(1).tolist() == list(range(8))
    assert p.shard_experts(2) == [list(p.layers[0][2]), list(p.layers[1][2])]


def test_one_map_for_all_layers_or_one_per_layer():
    same = ExpertPlacement.from_lists([[7, 0, 2], [1, 3, 4, 5, 6]], n_layers=3, n_experts=8)
    assert all(layer == ((7, 0, 2), (1, 3, 4, 5, 6)) for layer in same.layers)
    assert same.send_order(0).tolist() == [7, 0, 2, 1, 3, 4, 5, 6]
    per = ExpertPlacement.from_lists([[[0, 1], [2, 3]], [[3, 0], [2, 1]]], n_layers=2, n_experts=4)
    assert per.layers[1] == ((3, 0), (2, 1))


@pytest.mark.parametrize("lists, message", [
    ([[0, 1, 2], [2, 3]], "duplicated"),
    ([[0, 1], [3]], "unowned \\[2\\]"),
    ([[0, 1, 2], [3, 9]], "out of range"),
])
def test_broken_maps_are_named(lists, message):
    with pytest.raises(PlacementError, match=message):
        ExpertPlacement.from_lists(lists, n_layers=2, n_experts=4)


def test_shard_count_bounds():
    with pytest.raises(PlacementError, match="between 1 and the 4 experts"):
        ExpertPlacement.contiguous(2, 4, 5)
