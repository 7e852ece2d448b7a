"""The Python API for a sharded model on the current Ray cluster.

    model = ShardedModel.create("ckpt/", num_shards=4)       # or (cfg, seed=0) for random weights
    logits = model.forward([[1, 2, 3]])
    outs = model.generate([[1, 2, 3]], SamplingParams(max_new_tokens=16))
    model.scale_shards(3); model.rebalance(); model.apply_placement([[0, 1, 2], [2, 3, 4], [5, 6, 7]])
    model.shutdown()

One placement group holds the model: bundle 0 for the router, bundles 1..N for the shards,
spread across nodes (one GPU per bundle when there are GPUs). Shards added later (scale-out,
failover, drain) run outside that group. Shutdown frees every actor and the placement group.
"""

from __future__ import annotations

from collections.abc import Sequence

import ray
import torch
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group

from actors.bundles import actor_options, model_bundles, shard_options
from actors.elastic import ElasticConfig
from actors.placement import ExpertPlacement
from actors.router import RouterActor
from actors.weights import WeightSource
from model import checkpoint
from model.config import ModelConfig, check_cuda_graphs
from model.generate import SamplingParams

ROUTER_CONCURRENCY = 256  # concurrent generate calls that can wait on the running batch
STUCK_CHECK_S = 5.0  # how often a long forward or generate asks the router whether its step is stuck


class RouterStuck(RuntimeError):
    """The router's step waits on device work that will not finish (`Router.stuck_step`): an
    error instead of a call that never returns. The model is unusable until it is shut down and
    created again (a Serve replica in this state is replaced by its health check)."""


class ShardedModel:
    def __init__(self, router, pg: PlacementGroup, cfg: ModelConfig):
        self.router, self.pg, self.cfg = router, pg, cfg

    @classmethod
    def create(cls, source: ModelConfig | str, num_shards: int = 2, seed: int | None = None,
               placement: ExpertPlacement | Sequence | None = None, dtype: str = "float32",
               max_batch_size: int = 32, use_gpu: bool | None = None, timeout_s: float = 60.0,
               elastic: ElasticConfig | dict | None = None, cuda_graphs: str = "all") -> "ShardedModel":
        """source: a checkpoint directory, or a model config together with `seed`.
        elastic: failover / controller settings (default: failover on, controller off).
        cuda_graphs: where decode steps replay as CUDA graphs on GPU ("all", "router", "none")."""
        check_cuda_graphs(cuda_graphs)
        if isinstance(source, ModelConfig):
            if seed is None:
                raise ValueError("a sharded model from a config needs a seed for its weights")
            cfg, weights = source, WeightSource(seed=seed)
        else:
            cfg, weights = checkpoint.load_config(source), WeightSource(checkpoint=str(source))
        if not isinstance(placement, ExpertPlacement):
            placement = (ExpertPlacement.contiguous(cfg.n_moe_layers, cfg.moe.n_routed_experts, num_shards)
                         if placement is None else
                         ExpertPlacement.from_lists(placement, cfg.n_moe_layers, cfg.moe.n_routed_experts))
        if placement.n_shards != num_shards:
            raise ValueError(f"the expert map has {placement.n_shards} shards, num_shards is {num_shards}")
        if use_gpu is None:
            use_gpu = ray.cluster_resources().get("GPU", 0) >= num_shards + 1
        pg = placement_group(model_bundles(num_shards, use_gpu), strategy="SPREAD")
        try:
            ray.get(pg.ready(), timeout=timeout_s)
            router = RouterActor.options(max_concurrency=ROUTER_CONCURRENCY, **actor_options(pg, 0, use_gpu)).remote(
                cfg, weights, placement, shard_options(pg, num_shards, use_gpu), dtype, max_batch_size, timeout_s,
                use_gpu, elastic, cuda_graphs)
            ray.get(router.stats.remote(), timeout=max(timeout_s, 120))  # construction errors surface here
        except Exception:
            remove_placement_group(pg)
            raise
        return cls(router, pg, cfg)

    def forward(self, tokens: list[list[int]] | torch.Tensor, decode_from: int | None = None) -> torch.Tensor:
        return self._answer(self.router.forward.remote(tokens, decode_from))

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[list[int]]:
        return self._answer(self.router.generate.remote(prompts, params))

    def _answer(self, ref: ray.ObjectRef):
        """The router's answer, or RouterStuck once its step has run past `stuck_step_s`: on GPUs
        a step can wait for ever (a CUDA-graph collective whose peer died, README, failover)."""
        while not ray.wait([ref], timeout=STUCK_CHECK_S)[0]:
            problem = ray.get(self.router.stuck_step.remote(), timeout=60)
            if problem is not None:
                raise RouterStuck(f"{problem}; shut this model down and create it again")
        return ray.get(ref)

    def expert_load(self) -> torch.Tensor:
        """Tokens routed to each expert since start: [n_moe_layers, n_routed_experts]."""
        return torch.tensor(self.stats()["expert_load"])

    def stats(self) -> dict:
        return ray.get(self.router.stats.remote())

    def shard_stats(self) -> list[dict]:
        return ray.get(self.router.shard_stats.remote())

    def shard_handles(self) -> list:
        return ray.get(self.router.shard_handles.remote())

    def replace_shard(self, index: int) -> None:
        ray.get(self.router.replace_shard.remote(index))

    @property
    def placement(self) -> ExpertPlacement:
        """The current placement (it changes with rebalance, scale and apply_placement)."""
        return ExpertPlacement.from_lists(self.elastic_status()["placement"], self.cfg.n_moe_layers,
                                          self.cfg.moe.n_routed_experts)

    def elastic_status(self) -> dict:
        """Placement, window load, imbalance, shards, events (the keys of `cluster.experts.experts_status`)."""
        return ray.get(self.router.elastic_status.remote())

    def rebalance(self) -> dict:
        return ray.get(self.router.rebalance.remote())

    def apply_placement(self, lists: Sequence) -> dict:
        return ray.get(self.router.apply_placement.remote(lists))

    def scale_shards(self, n: int) -> dict:
        return ray.get(self.router.scale_shards.remote(n))

    def drain_node(self, node_id: str) -> dict:
        return ray.get(self.router.drain_node.remote(node_id))

    def shutdown(self) -> None:
        try:
            ray.get(self.router.shutdown.remote(), timeout=60)
        finally:
            ray.kill(self.router, no_restart=True)
            remove_placement_group(self.pg)

    def __enter__(self) -> "ShardedModel":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
