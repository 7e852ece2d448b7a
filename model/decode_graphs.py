"""Decode steps replayed as CUDA graphs: one launch per step instead of ~1,700.

A decode step of a small model is host-bound: Python and kernel launches cost ~10x the GPU
work (benchmarks/RESULTS.md). A CUDA graph records every kernel of one step once and replays
them with a single launch. That needs static shapes and no device->host reads inside the step,
so a graph exists per batch-size bucket (rows padded up to it) and per cache-length bucket
(attention reads the cache up to the bucket's length under the causal mask: a power of two at
least the batch's longest sequence, so short contexts do not pay for the whole cache), and the
layout says on the host that every token is real. Padding rows write into a scratch cache slot
nobody owns. Steps that are not pure decode
(prefills, mixed steps, batches over the largest bucket) run eagerly, unchanged.
"""

from __future__ import annotations

import torch

from model.attention import KVCache, StepLayout
from model.transformer import Transformer


class DecodeGraphs:
    """A `StepFn` for `ContinuousBatcher`: graphs for decode steps, the model itself otherwise.

    Owns the KV caches (`slot_caches`, n_slots usable slots, plus one scratch slot behind them)."""

    def __init__(self, model: Transformer, n_slots: int, buckets: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128),
                 kv_buckets: tuple[int, ...] = tuple(2**i for i in range(7, 18))):
        self.model = model
        self.max_len = model.cfg.max_seq_len
        self.caches = model.new_cache(n_slots + 1)
        self.slot_caches: list[KVCache] = [{k: v[:n_slots] for k, v in c.items()} for c in self.caches]
        self.n_slots = self.scratch = n_slots
        self.buckets = sorted({min(b, n_slots) for b in buckets})
        self.kv_buckets = sorted({min(b, self.max_len) for b in kv_buckets} | {self.max_len})
        # (batch bucket, cache-length bucket) -> graph and its static inputs/outputs
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, dict[str, torch.Tensor]]] = {}
        self.pool = torch.cuda.graph_pool_handle()

    def __call__(self, tokens: torch.Tensor, layout: StepLayout, caches: list[KVCache],
                 logits_at: torch.Tensor) -> torch.Tensor:
        B, T = tokens.shape
        if T != 1 or not layout.all_real or B > self.buckets[-1]:
            return self.model(tokens, layout, self.caches, logits_at)
        bucket = next(b for b in self.buckets if b >= B)
        kv_len = next(k for k in self.kv_buckets if k >= (layout.kv_len or self.max_len))
        graph, io = self.graphs.get((bucket, kv_len)) or self._capture(bucket, kv_len)
        io["tokens"][:B].copy_(tokens)
        io["positions"][:B].copy_(layout.positions)
        io["slots"][:B].copy_(layout.slots)
        io["slots"][B:].fill_(self.scratch)  # padding rows write only the scratch slot
        graph.replay()
        return io["logits"][:B]

    @torch.no_grad()
    def _capture(self, bucket: int, kv_len: int) -> tuple[torch.cuda.CUDAGraph, dict[str, torch.Tensor]]:
        device = self.model.embed.weight.device
        io = {"tokens": torch.zeros(bucket, 1, dtype=torch.long, device=device),
              "positions": torch.zeros(bucket, 1, dtype=torch.long, device=device),
              "slots": torch.full((bucket,), self.scratch, dtype=torch.long, device=device)}

        def step() -> torch.Tensor:
            layout = StepLayout(positions=io["positions"], lengths=torch.ones_like(io["slots"]), slots=io["slots"],
                                all_real=True, kv_len=kv_len)
            return self.model(io["tokens"], layout, self.caches, torch.zeros_like(io["slots"]))

        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up: kernel compilation and library handles stay out of the graph
            for _ in range(2):
                step()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            io["logits"] = step()
        self.graphs[(bucket, kv_len)] = (graph, io)
        return graph, io
