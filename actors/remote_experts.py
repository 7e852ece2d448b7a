"""The router's stand-in for a MoE layer's routed experts: the same call as `RoutedExperts`, but
the rows travel to the shards that own their experts and the results come back.

Swapping this module into a plain `Transformer` makes the router: attention, gates, shared
experts and the head run locally, unchanged; only the expert products move.
"""

from __future__ import annotations

import torch
from torch import nn

from actors.transport import router_dispatch


class RemoteExperts(nn.Module):
    def __init__(self, shard_experts: tuple[tuple[int, ...], ...]):
        super().__init__()
        self.shard_experts = shard_experts
        self.register_buffer("send_order", torch.tensor([e for s in shard_experts for e in s], dtype=torch.long),
                             persistent=False)
        self.contiguous = bool(torch.equal(self.send_order, torch.arange(self.send_order.numel())))

    def forward(self, x_MD: torch.Tensor, counts_E: torch.Tensor, impl: str = "auto") -> torch.Tensor:
        """Rows sorted by global expert id (counts_E each) -> expert outputs in the same order."""
        send_counts = counts_E[self.send_order]
        if self.contiguous:
            index = None
            rows = x_MD
        else:
            # move each expert's block of rows to its place in shard order (a gather, no one-hot)
            starts = torch.cumsum(counts_E, 0) - counts_E
            send_starts = torch.cumsum(send_counts, 0) - send_counts
            shift = torch.repeat_interleave(starts[self.send_order] - send_starts, send_counts)
            index = torch.arange(x_MD.shape[0], device=x_MD.device) + shift
            rows = x_MD[index]
        out = router_dispatch(rows, send_counts, [len(s) for s in self.shard_experts])
        if index is None:
            return out
        return torch.empty_like(out).index_copy_(0, index, out)
