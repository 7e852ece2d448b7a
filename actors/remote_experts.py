"""The router's stand-in for a MoE layer's routed experts: the same call as `RoutedExperts`, but
the rows travel to the shards that hold their experts and the results come back.

Swapping this module into a plain `Transformer` makes the router: attention, gates, shared
experts and the head run locally, unchanged; only the expert products move. It is a
`RemoteRoutedExperts` (model/moe.py): the MoE layer computes its shared experts between
`start` and `finish`, while the shards compute. An expert held by
several shards (a replica) has its rows split into equal consecutive parts, one per copy, so
every row is computed exactly once by an identical copy of the weights.
"""

from __future__ import annotations

import torch
from torch import nn

from actors.transport import AtTheShards, router_collect, router_dispatch, shard_of_each_copy
from model.dispatch import Dispatch, combine_rows, dispatch_rows


class RemoteExperts(nn.Module):
    def __init__(self, shard_experts: tuple[tuple[int, ...], ...], n_experts: int):
        super().__init__()
        self.shard_experts = shard_experts
        copies = [e for s in shard_experts for e in s]  # one entry per expert copy, in send order
        self.register_buffer("send_order", torch.tensor(copies, dtype=torch.long), persistent=False)
        replicas = torch.bincount(self.send_order, minlength=n_experts)
        # which copy of its expert each entry is (0 for the first shard that holds it, ...)
        seen: dict[int, int] = {}
        copy_index = []
        for e in copies:
            copy_index.append(seen.get(e, 0))
            seen[e] = copy_index[-1] + 1
        self.register_buffer("replicas", replicas[self.send_order], persistent=False)
        self.register_buffer("copy_index", torch.tensor(copy_index, dtype=torch.long), persistent=False)
        self.contiguous = bool(torch.equal(self.send_order, torch.arange(n_experts)))
        self.experts_per_shard = [len(s) for s in shard_experts]
        self.register_buffer("shard_of_copy", shard_of_each_copy(self.experts_per_shard, torch.device("cpu")),
                             persistent=False)
        # set by the router per step: a fixed row count per shard for small (decode) steps, so that
        # the exchange reads no counts on the host (actors/transport.py); None sends exact counts
        self.rows_per_shard: int | None = None

    def _copy_counts(self, counts_E: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows per expert copy in send order, and where each copy's rows start in the input."""
        total = counts_E[self.send_order]
        base, extra = total // self.replicas, total % self.replicas
        send_counts = base + (self.copy_index < extra).long()
        offset = self.copy_index * base + torch.minimum(self.copy_index, extra)
        starts = torch.cumsum(counts_E, 0) - counts_E
        return send_counts, starts[self.send_order] + offset

    def start(self, x_ND: torch.Tensor, dispatch: Dispatch) -> tuple[AtTheShards, torch.Tensor | None, Dispatch]:
        """The tokens' rows, sorted by global expert id, go to the shards; returns at once."""
        x_MD, counts_E = dispatch_rows(x_ND, dispatch), dispatch.counts
        if self.contiguous:
            return router_dispatch(x_MD, counts_E, self.experts_per_shard, self.rows_per_shard,
                                   self.shard_of_copy), None, dispatch
        send_counts, src_starts = self._copy_counts(counts_E)
        # move each copy's block of rows to its place in send order (a gather, no one-hot)
        send_starts = torch.cumsum(send_counts, 0) - send_counts
        shift = torch.repeat_interleave(src_starts - send_starts, send_counts, output_size=x_MD.shape[0])
        index = torch.arange(x_MD.shape[0], device=x_MD.device) + shift
        return router_dispatch(x_MD[index], send_counts, self.experts_per_shard, self.rows_per_shard,
                               self.shard_of_copy), index, dispatch

    def finish(self, sent: tuple[AtTheShards, torch.Tensor | None, Dispatch]) -> torch.Tensor:
        """Each token's weighted sum of the outputs the shards sent back."""
        at_shards, index, dispatch = sent
        out = router_collect(at_shards)
        return combine_rows(out if index is None else torch.empty_like(out).index_copy_(0, index, out), dispatch)
