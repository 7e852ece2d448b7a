"""The model deployment: each replica is one complete sharded copy of the model.

The replica process is the router; its expert shards go into the replica's own placement
group (bundles 1..N of `placement_group_bundles`), so Serve's autoscaling adds and removes
whole sharded copies. Requests join the router's running batch; tokens come back one by one.
Shards added later by the elasticity controller (scale-out, failover, drain) start outside that
group: its bundles are fixed when Serve creates the replica (see `actors/bundles.py`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from ray import serve
from ray.serve import metrics
from ray.util import get_current_placement_group

from actors.bundles import shard_options
from actors.placement import ExpertPlacement
from actors.router import Router
from actors.weights import WeightSource
from model import checkpoint
from model.generate import SamplingParams

# what `cluster/experts.py` may ask a replica's router to do
ADMIN_ACTIONS = ("elastic_status", "rebalance", "apply_placement", "scale_shards", "drain_node")


class ModelServer:
    def __init__(self, checkpoint_dir: str, num_shards: int = 2, max_batch_size: int = 32, use_gpu: bool = False,
                 dtype: str = "float32", elastic: dict | None = None, cuda_graphs: str = "all"):
        cfg = checkpoint.load_config(checkpoint_dir)
        pg = get_current_placement_group()
        options = shard_options(pg, num_shards, use_gpu) if pg is not None else None
        self.router = Router(cfg, WeightSource(checkpoint=checkpoint_dir),
                             ExpertPlacement.contiguous(cfg.n_moe_layers, cfg.moe.n_routed_experts, num_shards),
                             options, dtype, max_batch_size, use_gpu=use_gpu, elastic=elastic,
                             cuda_graphs=cuda_graphs)
        self.cfg = cfg
        # Serve tags it with application/deployment/replica; the admin dashboard shows its rate
        self.generated_tokens = metrics.Counter("moray_generated_tokens", description="tokens generated")

    async def stream(self, prompt: list[int], params: SamplingParams) -> AsyncIterator[int]:
        """New tokens as the batch makes them; a client that goes away frees its slot."""
        seq, tokens = self.router.submit(prompt, params)
        try:
            while (item := await asyncio.to_thread(tokens.get)) is not None:
                if isinstance(item, Exception):
                    raise item
                self.generated_tokens.inc()
                yield item
        finally:
            if not seq.done:
                self.router.cancel(seq)

    async def generate(self, prompt: list[int], params: SamplingParams) -> list[int]:
        return [token async for token in self.stream(prompt, params)]

    def check_health(self) -> None:
        """Serve's replica health check: a replica whose router is stuck in a step (see
        `Router.stuck_step`) fails it, and Serve replaces the replica, shards and all."""
        problem = self.router.stuck_step()
        if problem is not None:
            raise RuntimeError(problem)

    def stats(self) -> dict:
        return self.router.stats()

    async def admin(self, action: str, args: list, skip: list[str]) -> dict | None:
        """One elastic action on this replica's router, off the event loop (it may take seconds
        while requests keep streaming). None when this replica is in `skip` (already asked)."""
        replica = serve.get_replica_context().replica_id.unique_id
        if replica in skip:
            return None
        if action not in ADMIN_ACTIONS:
            raise ValueError(f"unknown action {action!r}; one of {', '.join(ADMIN_ACTIONS)}")
        result = await asyncio.to_thread(getattr(self.router, action), *args)
        return {"replica": replica, "result": result}

    def __del__(self) -> None:
        router = getattr(self, "router", None)
        if router is not None:
            router.shutdown()
