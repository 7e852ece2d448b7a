"""Resources of one sharded model copy and where its actors go: bundle 0 holds the router,
bundles 1..N the shards. The Python API creates such a placement group itself; a Serve
replica gets one from Serve (`placement_group_bundles`) and finds it as its current group."""

from __future__ import annotations

from ray.util.placement_group import PlacementGroup
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy


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
