"""`ExpertShard`: a Ray actor that holds some routed experts of every MoE layer.

One Ray call (`run_step`) per forward step drives all the layers' collectives; the tokens
themselves move through torch.distributed, never through Ray's object store.

Re-placement is two-phase so serving goes on while weights load: `prepare` (its own
concurrency group, so it runs beside steps) builds the new expert stacks, reusing the experts
the shard already holds and reading the others from the weight source; `commit` (between
steps, in the default group like `run_step`) swaps them in and frees the old ones. `node_id`
and `stats` answer from a third group, so status queries never wait behind a step; `vigil`
(a fourth) runs for as long as the shard is in a group, so the router learns of its death at once
(`actors/vigil.py`).
"""

from __future__ import annotations

import os
import threading

import psutil
import ray
import torch

from actors.shard_graphs import StepGraphs
from actors.transport import (GroupSpec, abort_group_soon, graph_buckets, join_group, leave_group,
                              shard_serve_layer)
from actors.weights import WeightSource
from model.config import ModelConfig
from model.grouped import native_kernel_serves
from model.moe import EXPERT_WEIGHTS, RoutedExperts


class ExpertShard:
    def __init__(self, cfg: ModelConfig, source: WeightSource, experts_per_layer: list[list[int]],
                 dtype: str = "float32", device: str = "cpu", step_graphs: bool = True):
        self.cfg, self.source = cfg, source
        self.device = torch.device("cuda", 0) if device == "cuda" else torch.device("cpu")
        self.dtype = getattr(torch, dtype)
        self.expert_ids: list[list[int]] = []
        self.experts: list[RoutedExperts] = []
        self.rows: list[torch.Tensor] = []  # rows each held expert computed, per layer
        self._pending: tuple[list[list[int]], list[RoutedExperts]] | None = None
        self._group: tuple[int, threading.Event] | None = None  # generation of the group joined, set on leaving
        # a graph step's launch and the group's abort one at a time; the generation aborted
        self._launch_lock, self._aborted = threading.Lock(), None
        # on GPU, fixed-size steps (decode) replayed as CUDA graphs, one per row count (the row
        # counts of the router's replayed steps only: other small steps vary in size), where the
        # expert products read no counts on the host: a capture would fail and the router's
        # replayed collectives wait for this shard's forever
        capturable = self.device.type == "cuda" and native_kernel_serves(self.dtype, self.device, cfg.dim,
                                                                         cfg.moe.moe_inter_dim)
        self.graphs = StepGraphs() if step_graphs and capturable else None
        self.graph_rows = {b * cfg.moe.top_k for b in graph_buckets(cfg.moe.top_k)}
        self.prepare(experts_per_layer)
        self.commit()
        self.steps = 0

    def _stack(self, layer_index: int, ids: list[int]) -> RoutedExperts:
        """One layer's stack for ids: experts already held are copied locally, the rest read."""
        layer = self.cfg.n_dense_layers + layer_index
        held = self.expert_ids[layer_index] if layer_index < len(self.expert_ids) else []
        new = [e for e in ids if e not in held]
        read = self.source.expert_state(self.cfg, layer, new) if new else {}
        stack = RoutedExperts(len(ids), self.cfg.dim, self.cfg.moe.moe_inter_dim).to(self.device, self.dtype)
        with torch.no_grad():
            for name in EXPERT_WEIGHTS:
                target = getattr(stack, name)
                for row, e in enumerate(ids):
                    if e in held:
                        target[row].copy_(getattr(self.experts[layer_index], name)[held.index(e)])
                    else:
                        target[row].copy_(read[name][new.index(e)])
        return stack.eval()

    @ray.method(concurrency_group="load")
    def prepare(self, experts_per_layer: list[list[int]]) -> int:
        """Build (not yet use) the stacks of a new placement; returns how many experts were read."""
        stacks = [self._stack(i, list(ids)) for i, ids in enumerate(experts_per_layer)]
        self._pending = ([list(ids) for ids in experts_per_layer], stacks)
        held = [set(ids) for ids in self.expert_ids] or [set() for _ in experts_per_layer]
        return sum(len(set(ids) - h) for ids, h in zip(experts_per_layer, held))

    def commit(self) -> None:
        """Switch to the prepared stacks; the old ones are freed. Load counters restart."""
        if self._pending is None:
            raise RuntimeError("commit without a prepared placement")
        self._drop_graphs()  # they captured the old stacks and row counters
        self.expert_ids, self.experts = self._pending
        self._pending = None
        self.rows = [torch.zeros(len(ids), dtype=torch.long, device=self.device) for ids in self.expert_ids]
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def join(self, spec: GroupSpec, rank: int) -> None:
        self.leave()
        join_group(spec, rank)
        self._group = (spec.generation, threading.Event())

    def leave(self) -> None:
        if self._group is not None:
            self._group[1].set()  # ends the vigil call: the shard left, it did not die
            self._group = None
        self._drop_graphs()  # before the old communicator goes: they hold its work
        leave_group()

    @ray.method(concurrency_group="vigil")
    def vigil(self, generation: int) -> None:
        """Returns when this shard leaves the group of `generation`; fails when its process dies,
        which is what the router waits for (`actors/vigil.py`)."""
        group = self._group
        if group is not None and group[0] == generation:
            group[1].wait()

    @ray.method(concurrency_group="info")
    def abort_collectives(self, generation: int) -> None:
        """A peer of group `generation` died: end this shard's collectives waiting for it, so a
        step call blocked behind them returns and the shard can join the next group."""
        with self._launch_lock:
            group = self._group
            if group is not None and group[0] == generation:
                self._aborted = generation
                abort_group_soon()

    def _drop_graphs(self) -> None:
        if self.graphs is not None:
            self.graphs.clear()

    @ray.method(concurrency_group="info")
    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    @torch.no_grad()
    def run_step(self, rows_per_shard: int | None = None) -> None:
        """Serve every MoE layer of one forward step, in layer order (with the router's fixed row
        count for small steps: see `router_dispatch`). The rows computed are added up on the
        device, so nothing here waits for the device. Fixed-size steps on GPU replay a CUDA graph."""
        def serve() -> None:
            for i, stack in enumerate(self.experts):
                self.rows[i] += shard_serve_layer(stack.n_experts, self.cfg.dim, self.dtype, self.device, stack,
                                                  rows_per_shard)

        if self.graphs is not None and rows_per_shard in self.graph_rows:
            # queues work only, never waits on the device: so under the lock the abort takes,
            # and never after an abort (its collectives could wait for a dead peer for ever)
            with self._launch_lock:
                if self._group is not None and self._aborted == self._group[0]:
                    raise RuntimeError(f"group {self._aborted}'s collectives were aborted: a peer died")
                self.graphs.run(rows_per_shard, serve)
        else:
            serve()
        self.steps += 1

    @ray.method(concurrency_group="info")
    def stats(self) -> dict:
        """Rows each held expert has computed since the last placement (its work), and what the
        shard occupies. Rows, not routed tokens: a decode step replayed as a graph pads its batch
        up to a bucket and the padding rows are computed here too, so the routed-token load that
        placement and scaling read is the router's (`Router.stats`, exact)."""
        param_bytes = sum(p.numel() * p.element_size() for s in self.experts for p in s.parameters())
        stats = {
            "node_id": ray.get_runtime_context().get_node_id(),
            "pid": os.getpid(),
            "expert_ids": self.expert_ids,
            "expert_rows": [rows.tolist() for rows in self.rows],
            "steps": self.steps,
            "param_bytes": param_bytes,
            "rss_bytes": psutil.Process().memory_info().rss,
            "device": str(self.device),
            "step_graphs": len(self.graphs.graphs) if self.graphs is not None else None,  # row counts captured
        }
        if self.device.type == "cuda":
            stats["cuda_allocated_bytes"] = torch.cuda.memory_allocated(self.device)
        return stats


ExpertShardActor = ray.remote(concurrency_groups={"load": 1, "info": 1, "vigil": 2})(ExpertShard)
