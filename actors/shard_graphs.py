"""A shard's side of fixed-size steps, replayed as CUDA graphs.

Once the router replays its decode steps as graphs (`model/decode_graphs.py`), the shard serving
them eagerly is what each step waits for: per MoE layer three exchanges and the grouped
products, launched from Python. A fixed-size step (`rows_per_shard`, see `router_dispatch`) has
no input but what arrives over the collectives and reads nothing on the host, so the shard
records its whole step once per row count and replays it.

Unlike the router, the shard needs no one's cooperation to capture: a capture executes nothing
and involves no peer, so the step call that first needs a graph captures it and replays it at
once to serve its step. A row count is captured only after it was served eagerly (on a side
stream, as PyTorch asks) `warmup` times, so kernel selection, library handles and the
communicator's connections are set up outside the graph.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import torch


class StepGraphs:
    def __init__(self, warmup: int = 2):
        self.warmup = warmup
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.served: Counter[int] = Counter()  # eager runs per row count, before its capture
        self.pool = torch.cuda.graph_pool_handle()

    def run(self, rows: int, step: Callable[[], None]) -> None:
        """Serve one step of `rows` rows per shard: eagerly while warming up, then by replay."""
        graph = self.graphs.get(rows)
        if graph is None and self.served[rows] < self.warmup:
            self.served[rows] += 1
            current = torch.cuda.current_stream()
            side = torch.cuda.Stream()
            side.wait_stream(current)
            with torch.cuda.stream(side):
                step()
            current.wait_stream(side)
            return
        if graph is None:
            graph = torch.cuda.CUDAGraph()
            try:
                # thread-local: the shard's status thread keeps reading its load meanwhile
                with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                    step()
            except BaseException:
                graph.reset()  # a failed capture may hold the communicator's work too
                raise
            self.graphs[rows] = graph
        graph.replay()

    def clear(self) -> None:
        """Forget every graph: the stacks, the load buffers or the communicator they captured
        changed. Their memory pool goes with the last of them, so later captures need a new one.
        Destroyed here, not when the last reference goes: see `DecodeGraphs.clear`."""
        for graph in self.graphs.values():
            graph.reset()
        self.graphs.clear()
        self.served.clear()
        self.pool = torch.cuda.graph_pool_handle()
