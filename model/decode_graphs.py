"""Decode steps replayed as CUDA graphs: one launch per step instead of ~1,700.

A decode step of a small model is host-bound: Python and kernel launches cost ~10x the GPU
work (benchmarks/RESULTS.md). A CUDA graph records every kernel of one step once and replays
them with a single launch. That needs static shapes and no device->host reads inside the step,
so a graph exists per batch-size bucket (rows padded up to it) and per cache-length bucket
(attention reads the cache up to the bucket's length under the causal mask: a power of two at
least the batch's longest sequence, so short contexts do not pay for the whole cache), and the
layout says on the host that every token is real. Padding rows write into a scratch cache slot
nobody owns, and count in no expert's load. Steps that are not pure decode
(prefills, mixed steps, batches over the largest bucket) run eagerly, unchanged.

A model whose steps involve other processes (the sharded router: its shards serve every MoE
layer over collectives) passes `peers`, a context run around each eager warm-up step of a
capture, in which those processes serve their side of the step; during the capture itself
nothing runs (captured collectives do not execute), so they must not either.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch

from model.attention import KVCache, StepLayout
from model.transformer import Transformer


class DecodeGraphs:
    """A `StepFn` for `ContinuousBatcher`: graphs for decode steps, the model itself otherwise.

    Owns the KV caches (`slot_caches`, n_slots usable slots, plus one scratch slot behind them)."""

    def __init__(self, model: Transformer, n_slots: int, buckets: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128),
                 kv_buckets: tuple[int, ...] = tuple(2**i for i in range(7, 18)),
                 peers: Callable[[int], AbstractContextManager] | None = None):
        self.model, self.peers = model, peers
        self.max_len = model.cfg.max_seq_len
        self.caches = model.new_cache(n_slots + 1)
        self.slot_caches: list[KVCache] = [{k: v[:n_slots] for k, v in c.items()} for c in self.caches]
        self.n_slots = self.scratch = n_slots
        self.buckets = sorted({min(b, n_slots) for b in buckets})
        self.kv_buckets = sorted({min(b, self.max_len) for b in kv_buckets} | {self.max_len})
        # (batch bucket, cache-length bucket) -> graph and its static inputs/outputs
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, dict[str, torch.Tensor]]] = {}
        self.pool = torch.cuda.graph_pool_handle()

    def graph_key(self, tokens: torch.Tensor, layout: StepLayout) -> tuple[int, int] | None:
        """(batch bucket, cache-length bucket) of the graph that runs this step; None: it runs eagerly."""
        B, T = tokens.shape
        if T != 1 or not layout.all_real or B > self.buckets[-1]:
            return None
        bucket = next(b for b in self.buckets if b >= B)
        return bucket, next(k for k in self.kv_buckets if k >= (layout.kv_len or self.max_len))

    def prepare(self, key: tuple[int, int]) -> tuple[torch.cuda.CUDAGraph, dict[str, torch.Tensor]]:
        """The graph for key, captured now if it is not yet (a caller with peers does this before
        its peers start the step itself)."""
        return self.graphs.get(key) or self._capture(*key)

    def clear(self) -> None:
        """Forget every graph: what they captured (a process group, the model's buffers) changed.
        Their memory pool goes with the last of them, so later captures need a new one. Each is
        destroyed here, not when the last reference goes (a traceback may hold one): an NCCL
        communicator cannot be aborted while a graph holds its work (`actors/transport.py`)."""
        for graph, _ in self.graphs.values():
            graph.reset()
        self.graphs.clear()
        self.pool = torch.cuda.graph_pool_handle()

    def __call__(self, tokens: torch.Tensor, layout: StepLayout, caches: list[KVCache],
                 logits_at: torch.Tensor) -> torch.Tensor:
        key = self.graph_key(tokens, layout)
        if key is None:
            return self.model(tokens, layout, self.caches, logits_at)
        graph, io = self.prepare(key)
        B = tokens.shape[0]
        io["tokens"][:B].copy_(tokens)
        io["positions"][:B].copy_(layout.positions)
        io["slots"][:B].copy_(layout.slots)
        io["slots"][B:].fill_(self.scratch)  # padding rows write only the scratch slot
        io["real_rows"].fill_(B)
        graph.replay()
        return io["logits"][:B]

    @torch.no_grad()
    def _capture(self, bucket: int, kv_len: int) -> tuple[torch.cuda.CUDAGraph, dict[str, torch.Tensor]]:
        device = self.model.embed.weight.device
        io = {"tokens": torch.zeros(bucket, 1, dtype=torch.long, device=device),
              "positions": torch.zeros(bucket, 1, dtype=torch.long, device=device),
              "slots": torch.full((bucket,), self.scratch, dtype=torch.long, device=device),
              "real_rows": torch.zeros((), dtype=torch.long, device=device)}

        def step() -> torch.Tensor:
            layout = StepLayout(positions=io["positions"], lengths=torch.ones_like(io["slots"]), slots=io["slots"],
                                all_real=True, kv_len=kv_len)
            return self.model(io["tokens"], layout, self.caches, torch.zeros_like(io["slots"]))

        moes = self.model.moe_layers()
        for moe in moes:
            moe.real_rows = io["real_rows"]
        try:
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):  # warm-up: kernel compilation and library handles stay out of the graph
                for _ in range(2):
                    with self.peers(bucket) if self.peers else contextlib.nullcontext():
                        step()
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            try:
                # thread-local: a caller's other threads (a router's status queries) keep using the device
                with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                    io["logits"] = step()
            except BaseException:
                graph.reset()  # a failed capture may hold a communicator's work too (`clear`)
                raise
        finally:
            for moe in moes:  # eager steps count every row
                moe.real_rows = None
        self.graphs[(bucket, kv_len)] = (graph, io)
        return graph, io
