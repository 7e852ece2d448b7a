"""Resources of one sharded model copy and where its actors go: bundle 0 holds the router,
bundles 1..N the shards. The Python API creates such a placement group itself; a Serve
replica gets one from Serve (`placement_group_bundles`) and finds it as its current group.

Shards added later (scale-out, failover, drain) go outside that group: its bundles are fixed
when it is created. They ask for the same resources with a node-label strategy that must avoid
given nodes (dead or drained) and prefers the nodes holding fewest of this model's actors.
"""

from __future__ import annotations

from collections.abc import Sequence

from ray.util.placement_group import PlacementGroup
from ray.util.scheduling_strategies import In, NodeLabelSchedulingStrategy, NotIn, PlacementGroupSchedulingStrategy

NODE_ID_LABEL = "ray.io/node-id"


def model_bundles(num_shards: int, use_gpu: bool) -> list[dict[str, float]]:
    bundle = {"CPU": 1.0, "GPU": 1.0} if use_gpu else {"CPU": 1.0}
    return [dict(bundle) for _ in range(num_shards + 1)]


def actor_options(pg: PlacementGroup, bundle_index: int, use_gpu: bool) -> dict:
    return {
        "scheduling_strategy": PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=bundle_index),
        "num_cpus": 1,
        "num_gpus": 1 if use_gpu else 0,
    }


def shard_options(pg: PlacementGroup, num_shards: int, use_gpu: bool) -> list[dict]:
    return [actor_options(pg, i + 1, use_gpu) for i in range(num_shards)]


def elastic_shard_options(use_gpu: bool, avoid: Sequence[str] = (), prefer: Sequence[str] = ()) -> dict:
    """A shard outside the placement group: never on `avoid` nodes, preferably on `prefer` ones."""
    options: dict = {"num_cpus": 1, "num_gpus": 1 if use_gpu else 0}
    if avoid or prefer:
        options["scheduling_strategy"] = NodeLabelSchedulingStrategy(
            hard={NODE_ID_LABEL: NotIn(*avoid)} if avoid else {},
            soft={NODE_ID_LABEL: In(*prefer)} if prefer else None)
    else:
        options["scheduling_strategy"] = "SPREAD"
    return options
