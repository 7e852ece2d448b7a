"""The MoE layer: gate, dropless grouped routed experts, shared experts, load balancing.

The layer is split into pure steps so the expert-parallel runtime can put a network between
them: `route` (gate scores -> top-k experts and weights), `permute` (sort token copies by
expert, returning a frozen `Dispatch`), `RoutedExperts` (grouped matmuls over sorted rows) and
`unpermute` (each token's weighted sum of its rows). Permutation is a sort + gather, never a
dense [tokens, experts] one-hot.

Experts held elsewhere (expert-parallel ranks in training, expert shards in serving) replace
`RoutedExperts` with an object of the two-step `RemoteRoutedExperts` protocol: `start` takes the
tokens and their `Dispatch` and sends the sorted rows on their way, the layer computes its shared
experts while they travel, and `finish` waits for the experts' outputs and combines them per
token. The permutation is the remote side's to do (`dispatch_rows` / `combine_rows`), so an
expert-parallel rank can keep the rows for its own experts apart from those that travel
without ever joining them. Ranks and networks stay outside this file.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from model.config import MoEConfig
from model.dispatch import Dispatch, Routing, permute
from model.expert_ffn import expert_swiglu
from model.grouped import grouped_mm
from model.layers import SwiGLU
from model.route_kernel import fused_route, fused_route_applies


def route(logits_NE: torch.Tensor, bias_E: torch.Tensor | None, cfg: MoEConfig) -> Routing:
    """Top-k expert choice. The balancing bias steers selection only, never the combine weights.

    On a GPU the choice is one kernel (model/route_kernel.py); in inference, without an
    auxiliary loss, so are the weights, and the [N, E] scores are not kept."""
    fused = fused_route_applies(logits_NE, cfg)
    if fused and not torch.is_grad_enabled() and cfg.aux_loss_alpha == 0:
        experts, weights = fused_route(logits_NE, bias_E, cfg, with_weights=True)
        return Routing(weights=weights, experts=experts, scores=None)
    scores = logits_NE.float().softmax(-1) if cfg.score_func == "softmax" else logits_NE.float().sigmoid()
    experts = fused_route(logits_NE, bias_E, cfg, with_weights=False)[0] if fused else _top_k(scores, bias_E, cfg)
    weights = scores.gather(1, experts)
    if cfg.norm_topk_prob and cfg.top_k > 1:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return Routing(weights=weights * cfg.routed_scaling_factor, experts=experts, scores=scores)


def _top_k(scores: torch.Tensor, bias_E: torch.Tensor | None, cfg: MoEConfig) -> torch.Tensor:
    """The selection rule in PyTorch ops: biased scores, best groups, then the top k within them."""
    select = scores if bias_E is None else scores + bias_E.float()
    if cfg.n_group > 1:
        N = select.shape[0]
        grouped = select.view(N, cfg.n_group, -1)
        group_scores = grouped.amax(-1) if cfg.group_score == "max" else grouped.topk(2, dim=-1).values.sum(-1)
        keep_groups = group_scores.topk(cfg.topk_group, dim=-1).indices
        group_mask = torch.ones(N, cfg.n_group, dtype=torch.bool, device=select.device)
        group_mask.scatter_(1, keep_groups, False)
        select = grouped.masked_fill(group_mask[:, :, None], float("-inf")).view(N, -1)
    return select.topk(cfg.top_k, dim=-1).indices


def expert_capacity(n_tokens: int, cfg: MoEConfig) -> int | None:
    if cfg.capacity_factor <= 0:
        return None
    return math.ceil(cfg.capacity_factor * n_tokens * cfg.top_k / cfg.n_routed_experts)


# a routed-expert stack's tensors, by state-dict name: what shards load and checkpoints slice
EXPERT_WEIGHTS = ("w_gate_up", "w_down")


class RoutedExperts(nn.Module):
    """A stack of SwiGLU experts as [n_experts, ...] tensors: the unit a shard owns and a checkpoint
    slices. Each expert's gate and up weights lie side by side, [W_gate | W_up] [D, 2F], so both
    projections are one grouped product (model/expert_ffn.py)."""

    def __init__(self, n_experts: int, dim: int, inter_dim: int):
        super().__init__()
        self.w_gate_up = nn.Parameter(torch.empty(n_experts, dim, 2 * inter_dim))
        self.w_down = nn.Parameter(torch.empty(n_experts, inter_dim, dim))

    @property
    def n_experts(self) -> int:
        return self.w_down.shape[0]

    def forward(self, x_MD: torch.Tensor, counts_E: torch.Tensor, impl: str = "auto") -> torch.Tensor:
        """Rows of x sorted by expert, counts_E rows per expert of this stack."""
        return expert_swiglu(x_MD, self.w_gate_up, self.w_down, counts_E, impl=impl)

    def combine(self, x_ND: torch.Tensor, dispatch: Dispatch, impl: str = "auto", chunks: int = 1) -> torch.Tensor:
        """Gather, experts and weighted combine in one step: each token's output [N, D] (in `chunks`
        blocks of rows, trading a little time for peak memory: see model/expert_ffn.py)."""
        return expert_swiglu(x_ND, self.w_gate_up, self.w_down, dispatch.counts, dispatch, impl, chunks)

    def reference(self, x_MD: torch.Tensor, counts_E: torch.Tensor, impl: str = "loop") -> torch.Tensor:
        """The plain autograd composition: the definition the fused step is checked against."""
        g, u = grouped_mm(x_MD, self.w_gate_up, counts_E, impl).chunk(2, dim=-1)
        return grouped_mm(F.silu(g) * u, self.w_down, counts_E, impl)


class RemoteRoutedExperts(Protocol):
    """Routed experts that live elsewhere: the rows are handed over in `start`, their outputs
    come back from `finish`.

    Whatever the layer computes between the two (its shared experts) overlaps the exchange: the
    rows travel while it computes. An implementation with autograd makes its backward overlap
    the same way.
    """

    def start(self, x_ND: torch.Tensor, dispatch: Dispatch) -> Any:
        """Tokens [N, D] and how their copies go to the experts; returns what `finish` needs."""

    def finish(self, in_flight: Any) -> torch.Tensor:
        """Each token's weighted sum of its experts' outputs [N, D] (as `RoutedExperts.combine`)."""


def sequence_balance_loss(routing: Routing, batch: int, cfg: MoEConfig) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise auxiliary loss: alpha * sum_i f_i * P_i per sequence, averaged."""
    E, K = cfg.n_routed_experts, cfg.top_k
    scores = routing.scores.view(batch, -1, E)
    T = scores.shape[1]
    probs = scores / (scores.sum(-1, keepdim=True) + 1e-20)
    hits = torch.zeros(batch, E, device=scores.device).scatter_add_(
        1, routing.experts.view(batch, T * K), torch.ones(batch, T * K, device=scores.device))
    f = hits * E / (K * T)
    return cfg.aux_loss_alpha * (f * probs.mean(1)).sum(-1).mean()


class MoE(nn.Module):
    """Routed experts (top-k of n, dropless by default) plus always-on shared experts."""

    def __init__(self, dim: int, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.gate = nn.Linear(dim, cfg.n_routed_experts, bias=False)
        # selection bias of auxiliary-loss-free balancing: state, not a trained parameter
        self.register_buffer("expert_bias", torch.zeros(cfg.n_routed_experts))
        self.experts: RoutedExperts | RemoteRoutedExperts = RoutedExperts(cfg.n_routed_experts, dim, cfg.moe_inter_dim)
        self.shared = SwiGLU(dim, cfg.n_shared_experts * cfg.moe_inter_dim) if cfg.n_shared_experts else None
        # tokens per expert in the last forward, and accumulated since the last bias update
        self.register_buffer("last_load", torch.zeros(cfg.n_routed_experts, dtype=torch.long), persistent=False)
        # set by a replayed CUDA graph (model/decode_graphs.py): its first rows are real, the rest
        # padding, and only the real ones count in last_load (a device scalar, written per replay)
        self.real_rows: torch.Tensor | None = None
        self.register_buffer("pending_load", torch.zeros(cfg.n_routed_experts, dtype=torch.long), persistent=False)

    def gate_route(self, x_ND: torch.Tensor) -> tuple[Routing, Dispatch]:
        """Route and permute the tokens, and record the per-expert load of this forward (the
        permutation's own counts: one count per layer, not two)."""
        bias = self.expert_bias if self.cfg.bias_balancing else None
        routing = route(self.gate(x_ND), bias, self.cfg)
        dispatch = permute(routing, self.cfg.n_routed_experts, expert_capacity(x_ND.shape[0], self.cfg))
        if self.real_rows is None:
            self.last_load.copy_(dispatch.routed_counts)
        else:  # padded rows are routed too (static shapes) but are nobody's load
            real = (torch.arange(x_ND.shape[0], device=x_ND.device) < self.real_rows).long()
            self.last_load.zero_().scatter_add_(0, routing.experts.reshape(-1),
                                                real.repeat_interleave(routing.experts.shape[1]))
        if self.training:
            self.pending_load += dispatch.routed_counts
        return routing, dispatch

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x [B, T, D]; valid [B, T] marks real tokens (padding skips the experts). Returns (out, aux_loss)."""
        B, T, D = x.shape
        x_ND = x.reshape(-1, D) if valid is None else x[valid]
        routing, dispatch = self.gate_route(x_ND)
        if isinstance(self.experts, RoutedExperts):
            # shared experts first: autograd runs the later-recorded node's backward first, so the
            # routed step (backward's memory peak) runs before the shared branch's [N, D] gradient exists
            shared_ND = self.shared(x_ND) if self.shared is not None else None
            # blocks save backward's memory and cost a host sync, which inference (decode steps,
            # CUDA-graph capture) must not pay: only where gradients are being recorded
            chunks = self.cfg.expert_chunks if torch.is_grad_enabled() else 1
            out_ND = self.experts.combine(x_ND, dispatch, chunks=chunks)
        else:  # experts elsewhere: the shared experts compute here while the rows travel
            in_flight = self.experts.start(x_ND, dispatch)
            shared_ND = self.shared(x_ND) if self.shared is not None else None
            out_ND = self.experts.finish(in_flight)
        if shared_ND is not None:
            out_ND = out_ND + shared_ND
        aux = None
        if self.training and self.cfg.aux_loss_alpha > 0 and valid is None:
            aux = sequence_balance_loss(routing, B, self.cfg)
        if valid is None:
            return out_ND.view(B, T, D), aux
        return x.new_zeros(B, T, D).index_put((valid.nonzero(as_tuple=True)), out_ND), aux

    @torch.no_grad()
    def update_bias(self, load_E: torch.Tensor | None = None) -> None:
        """bias += gamma * sign(mean_load - load): starve overloaded experts, feed idle ones.

        Called after each optimizer step with the load since the last update (all-reduced
        across ranks by distributed training so every rank applies the same change).
        """
        load = (self.pending_load if load_E is None else load_E).float()
        if self.cfg.bias_balancing:  # no load, no change: sign(0 - 0) (and no host sync to ask)
            self.expert_bias += self.cfg.bias_update_rate * torch.sign(load.mean() - load)
        self.pending_load.zero_()
