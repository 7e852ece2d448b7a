"""Expert parallelism for training moray's own MoE under DeepSpeed.

`parallelize_experts(model, ep_size)` swaps every MoE layer's `RoutedExperts` for an
`ExpertParallelExperts` that holds this rank's slice of the experts and exchanges token rows
with the other ranks of its expert-parallel group by all-to-all (an autograd function whose
backward is the reverse all-to-all). Gate, bias balancing, shared experts and the dropless
grouped computation stay moray's (model/moe.py); only where the expert weights live changes.

The module is a `deepspeed.moe.layer.MoE` in DeepSpeed's eyes, with its parameters in
DeepSpeed's per-expert layout (`deepspeed_moe.experts.deepspeed_experts.<i>.*`, tagged
`allreduce=False` with the group name): the engine then reduces their gradients over the
expert-data-parallel group only and writes them as expert checkpoint files.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from deepspeed.moe.layer import MoE as DeepSpeedMoE
from torch import nn

from model.expert_ffn import expert_swiglu
from model.moe import MoE, RoutedExperts
from model.transformer import Transformer


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with uneven splits; the gradient travels the reverse way."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty(sum(out_splits), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out_splits, in_splits = ctx.splits
        back = grad.new_empty(sum(in_splits), *grad.shape[1:])
        dist.all_to_all_single(back, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return back, None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    return _AllToAll.apply(x, out_splits, in_splits, group)


class _Expert(nn.Module):
    """One SwiGLU expert's weights, in the per-expert layout DeepSpeed checkpoints."""

    def __init__(self, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, group_name: str):
        super().__init__()
        self.w_gate, self.w_up, self.w_down = (nn.Parameter(w.detach().clone()) for w in (w_gate, w_up, w_down))
        for p in self.parameters():
            p.allreduce = False
            p.group_name = group_name


class _ExpertHolder(nn.Module):
    """What DeepSpeed's engine looks for inside an MoE: `.experts.deepspeed_experts` and an ep group."""

    def __init__(self, experts: list[_Expert]):
        super().__init__()
        self.experts = nn.Module()
        self.experts.deepspeed_experts = nn.ModuleList(experts)
        self.ep_group = None

    def _set_ep_group(self, group) -> None:
        self.ep_group = group


class ExpertParallelExperts(DeepSpeedMoE):
    """Stands in for `RoutedExperts`: same call, the experts spread over the ep group."""

    def __init__(self, full: RoutedExperts, ep_size: int, ep_rank: int):
        nn.Module.__init__(self)  # DeepSpeed's MoE.__init__ builds its own gate and experts: not wanted
        n_experts = full.n_experts
        if n_experts % ep_size:
            raise ValueError(f"{n_experts} experts do not split over ep_size {ep_size}")
        self.ep_size, self.ep_rank = ep_size, ep_rank
        self.num_experts, self.num_local_experts = n_experts, n_experts // ep_size
        self.expert_group_name = f"ep_size_{ep_size}"
        self.use_residual, self.enable_expert_tensor_parallelism = False, False
        first = ep_rank * self.num_local_experts
        local = range(first, first + self.num_local_experts)
        self.deepspeed_moe = _ExpertHolder([_Expert(full.w_gate[e], full.w_up[e], full.w_down[e],
                                                    self.expert_group_name) for e in local])

    def local_stacks(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's experts as [n_local, ...] stacks (autograd flows back to each expert)."""
        experts = self.deepspeed_moe.experts.deepspeed_experts
        return tuple(torch.stack([getattr(e, name) for e in experts]) for name in ("w_gate", "w_up", "w_down"))

    def forward(self, x_MD: torch.Tensor, counts_E: torch.Tensor, impl: str = "auto") -> torch.Tensor:
        w_gate, w_up, w_down = self.local_stacks()
        if self.ep_size == 1:
            return expert_swiglu(x_MD, w_gate, w_up, w_down, counts_E, impl=impl)
        group = self.deepspeed_moe.ep_group
        rows, exchange = ep_dispatch(x_MD, counts_E, self.ep_size, group)
        y = expert_swiglu(rows, w_gate, w_up, w_down, exchange.local_counts, impl=impl)
        return ep_combine(y, exchange, group)


@dataclass(frozen=True)
class EPExchange:
    """What `ep_dispatch` did, for `ep_combine` to undo: no state kept between the two."""

    in_splits: list[int]  # rows this rank sent to each rank
    out_splits: list[int]  # rows this rank received from each rank
    index: torch.Tensor  # received (source, expert) order -> expert-major order
    local_counts: torch.Tensor  # rows per local expert, all sources together


def ep_dispatch(x_MD: torch.Tensor, counts_E: torch.Tensor, ep_size: int, group) -> tuple[torch.Tensor, EPExchange]:
    """Send rows sorted by global expert to the ranks owning them (rank p owns a contiguous block
    of ids); returns the rows this rank's experts must compute, sorted by local expert."""
    P, El = ep_size, counts_E.numel() // ep_size
    recv_counts = torch.empty_like(counts_E)
    dist.all_to_all_single(recv_counts, counts_E.contiguous(), group=group)
    counts_PE = recv_counts.view(P, El)  # rows from source p for local expert j
    in_splits = counts_E.view(P, El).sum(1).tolist()
    out_splits = counts_PE.sum(1).tolist()
    rows = all_to_all(x_MD, out_splits, in_splits, group)
    # received rows are ordered (source, local expert); the grouped product wants (expert, source)
    index = _source_major_to_expert_major(counts_PE)
    return rows[index], EPExchange(in_splits, out_splits, index, counts_PE.sum(0))


def ep_combine(y_sorted: torch.Tensor, exchange: EPExchange, group) -> torch.Tensor:
    """Send the experts' outputs back to the ranks their rows came from, in their original order."""
    y = torch.empty_like(y_sorted).index_copy(0, exchange.index, y_sorted)
    return all_to_all(y, exchange.in_splits, exchange.out_splits, group)


def _source_major_to_expert_major(counts_PE: torch.Tensor) -> torch.Tensor:
    """Index that reorders rows grouped (source p, expert j) into (expert j, source p)."""
    P, El = counts_PE.shape
    starts_PE = (torch.cumsum(counts_PE.reshape(-1), 0) - counts_PE.reshape(-1)).view(P, El)
    counts_EP, starts_EP = counts_PE.t().reshape(-1), starts_PE.t().reshape(-1)
    dest_starts = torch.cumsum(counts_EP, 0) - counts_EP
    shift = torch.repeat_interleave(starts_EP - dest_starts, counts_EP)
    return torch.arange(int(counts_EP.sum()), device=counts_PE.device) + shift


def parallelize_experts(model: Transformer, ep_size: int, ep_rank: int) -> None:
    """Give every MoE (main stack and MTP) this rank's slice of its experts."""
    for moe in (m for m in model.modules() if isinstance(m, MoE)):
        moe.experts = ExpertParallelExperts(moe.experts, ep_size, ep_rank)


def gather_expert_stacks(model: Transformer) -> dict[str, torch.Tensor]:
    """All experts of every MoE as moray's stacked state-dict entries ([n_experts, ...]),
    gathered over the ep groups: what the model checkpoint format stores."""
    out = {}
    for name, module in model.named_modules():
        if not isinstance(module, ExpertParallelExperts):
            continue
        for weight, local in zip(("w_gate", "w_up", "w_down"), module.local_stacks()):
            local = local.detach().contiguous()
            if module.ep_size > 1:
                parts = [torch.empty_like(local) for _ in range(module.ep_size)]
                dist.all_gather(parts, local, group=module.deepspeed_moe.ep_group)
                local = torch.cat(parts)
            out[f"{name}.{weight}"] = local.cpu()
    return out
