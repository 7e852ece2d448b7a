"""Expert parallelism for training moray's own MoE under DeepSpeed.

`parallelize_experts(model, ep_size)` swaps every MoE layer's `RoutedExperts` for an
`ExpertParallelExperts` that holds this rank's slice of the experts and exchanges token rows
with the other ranks of its expert-parallel group. Gate, bias balancing, shared
experts and the dropless grouped computation stay moray's (model/moe.py); only where the expert
weights live changes.

The exchange is an all-to-all written as one batch of point-to-point sends and receives (one
NCCL group), a chunk per (rank, expert), so that rows land where the grouped expert product
wants them (each local expert's rows together) and outputs land back in the sender's order,
with no reordering pass on either side. It is a pair of autograd functions: `send_rows` starts it, `receive_rows` waits for it, and the MoE layer computes its shared
experts in between (`start` / `finish` of model/moe.py's `RemoteRoutedExperts`). Backward
mirrors it: `receive_rows`' backward starts the reverse exchange of the gradient and
`send_rows`' backward waits for it. Autograd runs ready nodes latest-created first, so the
shared experts' backward (created between the two in forward) runs while the gradient
travels; any other order is only slower, never wrong, since the wait sits in the node that
produces the gradient.

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


class _Transfer:
    """Rows on their way between the two layouts of an `EPExchange`: `launch` starts moving them
    from `src` to `dst` (or, reversed, their gradients back), `wait` returns the filled buffer."""

    __slots__ = ("exchange", "src", "dst", "works", "out", "sent")

    def __init__(self, exchange: EPExchange, src: ChunkLayout, dst: ChunkLayout):
        self.exchange, self.src, self.dst = exchange, src, dst
        self.works, self.out, self.sent = [], None, None

    def launch(self, x: torch.Tensor, reverse: bool = False) -> torch.Tensor:
        """Each (peer, expert) chunk goes straight to its place in the peer's layout, one send and
        one receive per chunk in one batch (one NCCL group): the receiver needs no reordering
        pass afterwards, which an `all_to_all_single` (source-major on arrival) would. This
        rank's own chunks are device copies."""
        src, dst = (self.dst, self.src) if reverse else (self.src, self.dst)
        ex = self.exchange
        self.sent = x = x.contiguous()
        self.out = out = x.new_empty(dst.rows, *x.shape[1:])
        ops = []
        for peer, s0, ns, d0, nd in zip(ex.peers, src.starts, src.counts, dst.starts, dst.counts):
            if peer == ex.rank:
                out[d0:d0 + nd].copy_(x[s0:s0 + ns])
                continue
            if ns:
                ops.append(dist.P2POp(dist.isend, x[s0:s0 + ns], group=ex.group, group_peer=peer))
            if nd:
                ops.append(dist.P2POp(dist.irecv, out[d0:d0 + nd], group=ex.group, group_peer=peer))
        self.works = dist.batch_isend_irecv(ops) if ops else []
        return out

    def wait(self) -> torch.Tensor:
        for work in self.works:
            work.wait()
        out, self.works, self.out, self.sent = self.out, [], None, None  # nothing outlives its use
        return out


class _SendRows(torch.autograd.Function):
    """Starts the transfer and returns the buffer it is filling; only `_ReceiveRows` may read it.
    Backward waits for the gradient transfer `_ReceiveRows`' backward started: autograd runs
    whatever does not depend on the exchange in between."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, transfer: _Transfer):
        ctx.transfer = transfer
        return transfer.launch(x)

    @staticmethod
    def backward(ctx, _passed_through: torch.Tensor):
        return ctx.transfer.wait(), None


class _ReceiveRows(torch.autograd.Function):
    """Waits for `_SendRows`' transfer; backward starts the reverse transfer of the gradient and
    returns at once (the incoming gradient passes through to `_SendRows`, which ignores it)."""

    @staticmethod
    def forward(ctx, buffer: torch.Tensor, transfer: _Transfer):
        ctx.transfer = transfer
        return transfer.wait()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ctx.transfer.launch(grad, reverse=True)
        return grad, None


@dataclass(frozen=True)
class RowsInFlight:
    """A transfer started by `send_rows`; `receive_rows` gives its result."""

    buffer: torch.Tensor  # filled by the transfer; read it only through receive_rows
    transfer: _Transfer


def send_rows(x: torch.Tensor, exchange: EPExchange, src: ChunkLayout, dst: ChunkLayout) -> RowsInFlight:
    """Start moving rows laid out as `src` on this rank into `dst` on their ranks."""
    transfer = _Transfer(exchange, src, dst)
    return RowsInFlight(_SendRows.apply(x, transfer), transfer)


def receive_rows(sent: RowsInFlight) -> torch.Tensor:
    return _ReceiveRows.apply(sent.buffer, sent.transfer)


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
    """Stands in for `RoutedExperts` (as model/moe.py's `RemoteRoutedExperts`): the experts spread
    over the ep group, rows sent in `start` and the outputs back in `finish`."""

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

    def start(self, x_MD: torch.Tensor, counts_E: torch.Tensor) -> EPDispatch | tuple[torch.Tensor, torch.Tensor]:
        """Send rows sorted by global expert to the ranks owning them (one rank: nothing to send)."""
        if self.ep_size == 1:
            return x_MD, counts_E
        return ep_dispatch_start(x_MD, counts_E, self.ep_size, self.deepspeed_moe.ep_group)

    def finish(self, sent: EPDispatch | tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """This rank's experts on the rows it received; their outputs go back where they came from."""
        w_gate, w_up, w_down = self.local_stacks()
        if self.ep_size == 1:
            x_MD, counts_E = sent
            return expert_swiglu(x_MD, w_gate, w_up, w_down, counts_E)
        rows = ep_dispatch_finish(sent)
        y = expert_swiglu(rows, w_gate, w_up, w_down, sent.exchange.local_counts)
        return ep_combine(y, sent.exchange)


@dataclass(frozen=True)
class ChunkLayout:
    """Where the chunks of an exchange lie on this rank: chunk (peer p, local expert j), listed
    in (p, j) order, is `counts[i]` rows from row `starts[i]`."""

    starts: list[int]
    counts: list[int]
    rows: int

    @staticmethod
    def of(counts_PE: list[list[int]], expert_major: bool) -> ChunkLayout:
        """Chunks stored (p, j)-major, or (j, p)-major: each local expert's rows together."""
        P, El = len(counts_PE), len(counts_PE[0])
        order = [(p, j) for j in range(El) for p in range(P)] if expert_major else \
            [(p, j) for p in range(P) for j in range(El)]
        start, at = {}, 0
        for p, j in order:
            start[p, j], at = at, at + counts_PE[p][j]
        return ChunkLayout([start[p, j] for p in range(P) for j in range(El)],
                           [c for row in counts_PE for c in row], at)


@dataclass(frozen=True)
class EPExchange:
    """One dispatch's two layouts, for `ep_combine` to send the outputs back along: no state kept
    between the two. `sorted` is this rank's rows by global expert (chunk (p, j): its rows for
    rank p's expert j), `expert_major` the rows its own experts compute, by local expert and then
    source (chunk (p, j): rank p's rows for expert j)."""

    sorted: ChunkLayout
    expert_major: ChunkLayout
    peers: list[int]  # the peer of each chunk, in (p, j) order
    rank: int
    group: object
    local_counts: torch.Tensor  # rows per local expert, all sources together


@dataclass(frozen=True)
class EPDispatch:
    """Rows on their way to their experts' ranks (`ep_dispatch_start`)."""

    rows: RowsInFlight
    exchange: EPExchange


def ep_dispatch_start(x_MD: torch.Tensor, counts_E: torch.Tensor, ep_size: int, group) -> EPDispatch:
    """Start sending rows sorted by global expert to the ranks owning them (rank p owns a
    contiguous block of ids). The counts go first and must reach the host (both layouts are
    cut from them): that exchange completes here; the rows' transfer is left running."""
    P, El = ep_size, counts_E.numel() // ep_size
    recv_counts = torch.empty_like(counts_E)
    dist.all_to_all_single(recv_counts, counts_E.contiguous(), group=group)
    counts_PE = recv_counts.view(P, El)  # rows from source p for local expert j
    mine, theirs = torch.stack([counts_E.view(P, El), counts_PE]).tolist()  # one host sync
    exchange = EPExchange(ChunkLayout.of(mine, expert_major=False), ChunkLayout.of(theirs, expert_major=True),
                          [p for p in range(P) for _ in range(El)], dist.get_rank(group), group, counts_PE.sum(0))
    return EPDispatch(send_rows(x_MD, exchange, exchange.sorted, exchange.expert_major), exchange)


def ep_dispatch_finish(sent: EPDispatch) -> torch.Tensor:
    """The rows this rank's experts must compute, sorted by local expert."""
    return receive_rows(sent.rows)


def ep_combine(y_sorted: torch.Tensor, exchange: EPExchange) -> torch.Tensor:
    """Send the experts' outputs back to the ranks their rows came from, in their original order."""
    return receive_rows(send_rows(y_sorted, exchange, exchange.expert_major, exchange.sorted))


def parallelize_experts(model: nn.Module, ep_size: int, ep_rank: int, group=None) -> None:
    """Give every MoE (main stack and MTP) this rank's slice of its experts. The ep group is
    DeepSpeed's to set when its engine wraps the model; without DeepSpeed, pass it here."""
    for moe in (m for m in model.modules() if isinstance(m, MoE)):
        moe.experts = ExpertParallelExperts(moe.experts, ep_size, ep_rank)
        if group is not None:
            moe.experts.deepspeed_moe._set_ep_group(group)


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
