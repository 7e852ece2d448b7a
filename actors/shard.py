"""`ExpertShard`: a Ray actor that owns some routed experts of every MoE layer.

One Ray call (`run_step`) per forward step drives all the layers' collectives; the tokens
themselves move through torch.distributed, never through Ray's object store.
"""

from __future__ import annotations

import os

import psutil
import ray
import torch

from actors.transport import GroupSpec, join_group, leave_group, shard_serve_layer
from actors.weights import WeightSource
from model.config import ModelConfig
from model.moe import RoutedExperts


class ExpertShard:
    def __init__(self, cfg: ModelConfig, source: WeightSource, experts_per_layer: list[list[int]],
                 dtype: str = "float32", device: str = "cpu"):
        self.cfg = cfg
        self.device = torch.device("cuda", 0) if device == "cuda" else torch.device("cpu")
        self.dtype = getattr(torch, dtype)
        self.expert_ids = experts_per_layer
        moe_layers = range(cfg.n_dense_layers, cfg.n_layers)
        self.experts: list[RoutedExperts] = []
        for layer, ids in zip(moe_layers, experts_per_layer):
            stack = RoutedExperts(len(ids), cfg.dim, cfg.moe.moe_inter_dim)
            stack.load_state_dict(source.expert_state(cfg, layer, ids))
            self.experts.append(stack.to(self.device, self.dtype).eval())
        self.load = [torch.zeros(len(ids), dtype=torch.long) for ids in experts_per_layer]
        self.steps = 0

    def join(self, spec: GroupSpec, rank: int) -> None:
        join_group(spec, rank)

    def leave(self) -> None:
        leave_group()

    @torch.no_grad()
    def run_step(self) -> None:
        """Serve every MoE layer of one forward step, in layer order."""
        for i, stack in enumerate(self.experts):
            counts = shard_serve_layer(stack.n_experts, self.cfg.dim, self.dtype, self.device, stack)
            self.load[i] += counts.cpu()
        self.steps += 1

    def stats(self) -> dict:
        """Tokens each owned expert has processed, and what the shard occupies."""
        param_bytes = sum(p.numel() * p.element_size() for s in self.experts for p in s.parameters())
        stats = {
            "node_id": ray.get_runtime_context().get_node_id(),
            "pid": os.getpid(),
            "expert_ids": self.expert_ids,
            "expert_load": [load.tolist() for load in self.load],
            "steps": self.steps,
            "param_bytes": param_bytes,
            "rss_bytes": psutil.Process().memory_info().rss,
            "device": str(self.device),
        }
        if self.device.type == "cuda":
            stats["cuda_allocated_bytes"] = torch.cuda.memory_allocated(self.device)
        return stats


ExpertShardActor = ray.remote(ExpertShard)
