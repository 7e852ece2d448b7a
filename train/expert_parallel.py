"""Expert parallelism for training moray's own MoE under DeepSpeed.

`parallelize_experts(model, ep_size)` swaps every MoE layer's `RoutedExperts` for an
`ExpertParallelExperts` that holds this rank's slice of the experts and exchanges token rows
with the other ranks of its expert-parallel group by all-to-all. Gate, bias balancing, shared
experts and the dropless grouped computation stay moray's (model/moe.py); only where the expert
weights live changes.

The exchange is a pair of autograd functions around one asynchronous `all_to_all_single`:
`send_rows` starts it, `receive_rows` waits for it, and the MoE layer computes its shared
experts in between (`start` / `finish` of model/moe.py's `RemoteRoutedExperts`). Backward
mirrors it: `receive_rows`' backward starts the reverse exchange of the gradient and
`send_rows`' backward waits for it. Autograd runs ready nodes latest-created first, so the
shared experts' backward (created between the two in forward) runs while the gradient
travels; any other order is only slower, never wrong, since the wait sits in the node that
produces the gradient.

`start` exchanges the per-expert counts, reads the split sizes on the host and sends the rows
at once; on GPUs the rows are gathered and sent from a side stream, so the shared experts the
layer queues next run beside the exchange (`ep_dispatch_start` says why the read is not
deferred).

Rows for this rank's own experts never travel. The experts compute the rows other ranks sent
first, so their outputs are on their way back while the experts compute this rank's own rows
(and in backward, the own rows' gradients are computed while the others' travel). Nor are the
two kinds ever joined: `dispatch_rows` gathers the tokens' rows straight into the rows that
travel and the own rows, and `combine_rows` sums each token's outputs from where they lie (a
join was one [M, D] copy in forward and one in backward). With two ranks the received rows
come from one source and arrive already sorted by expert: no reordering pass on either side.

Each kind of this rank's expert weights is one parameter, the [n_local, ...] stack the grouped
products read: DeepSpeed then reduces, clips, steps and checkpoints a few large tensors per
layer instead of one per expert. Its per-parameter bookkeeping is host time every step (at
`small`'s shape 930 parameters became 186), and its checkpoint writes one expert file per rank
and layer instead of one per expert.

The module is a `deepspeed.moe.layer.MoE` in DeepSpeed's eyes, holding one DeepSpeed "expert"
per rank (`deepspeed_moe.experts.deepspeed_experts.0.*`: the rank's stacks, tagged
`allreduce=False` with the group name): the engine then reduces their gradients over the
expert-data-parallel group only and writes them as expert checkpoint files, file `r` holding
rank `r`'s stacks. Those files are read back only at the same expert-parallel size; any other
resumes from moray's own checkpoint (train/worker.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from deepspeed.moe.layer import MoE as DeepSpeedMoE
from torch import nn

from model.dispatch import Dispatch, combine_rows, dispatch_rows
from model.expert_ffn import expert_swiglu
from model.moe import EXPERT_WEIGHTS, MoE, RoutedExperts
from model.transformer import Transformer


class _Work:
    """The all-to-all on its way between a `_SendRows` and its `_ReceiveRows`: in forward the
    rows going out, in backward their gradients coming back."""

    __slots__ = ("handle", "out")

    def launch(self, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
        self.out = x.new_empty(sum(out_splits), *x.shape[1:])
        self.handle = dist.all_to_all_single(self.out, x.contiguous(), out_splits, in_splits, group=group,
                                             async_op=True)
        return self.out

    def wait(self) -> torch.Tensor:
        self.handle.wait()
        out, self.handle, self.out = self.out, None, None  # nothing outlives its use
        if out.is_cuda:  # launched from another stream maybe: the allocator must know who reads it now
            out.record_stream(torch.cuda.current_stream(out.device))
        return out


class _SendRows(torch.autograd.Function):
    """Starts all_to_all_single (uneven splits) and returns the buffer it is filling; only
    `_ReceiveRows` may read it. Backward waits for the gradient exchange `_ReceiveRows`' backward
    started: autograd runs whatever does not depend on the exchange in between."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group, work: _Work):
        ctx.work = work
        return work.launch(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, _passed_through: torch.Tensor):
        return ctx.work.wait(), None, None, None, None


class _ReceiveRows(torch.autograd.Function):
    """Waits for `_SendRows`' exchange; backward starts the reverse exchange of the gradient and
    returns at once (the incoming gradient passes through to `_SendRows`, which ignores it)."""

    @staticmethod
    def forward(ctx, buffer: torch.Tensor, out_splits: list[int], in_splits: list[int], group, work: _Work):
        ctx.splits, ctx.group, ctx.work = (out_splits, in_splits), group, work
        return work.wait()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out_splits, in_splits = ctx.splits
        ctx.work.launch(grad, in_splits, out_splits, ctx.group)
        return grad, None, None, None, None


@dataclass(frozen=True)
class RowsInFlight:
    """An all-to-all started by `send_rows`; `receive_rows` gives its result."""

    buffer: torch.Tensor  # filled by the exchange; read it only through receive_rows
    out_splits: list[int]
    in_splits: list[int]
    group: object
    work: _Work


def send_rows(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> RowsInFlight:
    """Start exchanging rows with uneven splits (in_splits[p] rows to rank p, out_splits[p] from it)."""
    work = _Work()
    return RowsInFlight(_SendRows.apply(x, out_splits, in_splits, group, work), out_splits, in_splits, group, work)


def receive_rows(sent: RowsInFlight) -> torch.Tensor:
    return _ReceiveRows.apply(sent.buffer, sent.out_splits, sent.in_splits, sent.group, sent.work)


class _RankExperts(nn.Module):
    """This rank's experts as one DeepSpeed expert: each kind of weight one [n_local, ...]
    parameter, tagged as DeepSpeed's expert parameters of group `group_name`."""

    def __init__(self, stacks: list[torch.Tensor], group_name: str):
        super().__init__()
        for name, stack in zip(EXPERT_WEIGHTS, stacks):
            setattr(self, name, nn.Parameter(stack))
        for p in self.parameters():
            p.allreduce = False
            p.group_name = group_name


class _ExpertHolder(nn.Module):
    """What DeepSpeed's engine looks for inside an MoE: `.experts.deepspeed_experts` and an ep group."""

    def __init__(self, experts: list[_RankExperts]):
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
        n_local = n_experts // ep_size
        # DeepSpeed's count: one expert per rank, the rank's stacks (its checkpoint files follow it)
        self.num_experts, self.num_local_experts = ep_size, 1
        self.expert_group_name = f"ep_size_{ep_size}"
        self.use_residual, self.enable_expert_tensor_parallelism = False, False
        local = slice(ep_rank * n_local, (ep_rank + 1) * n_local)
        stacks = [getattr(full, name)[local].detach().clone() for name in EXPERT_WEIGHTS]
        self.deepspeed_moe = _ExpertHolder([_RankExperts(stacks, self.expert_group_name)])

    def local_stacks(self) -> tuple[torch.Tensor, ...]:
        """This rank's experts as [n_local, ...] stacks, `EXPERT_WEIGHTS` (the parameters themselves)."""
        experts = self.deepspeed_moe.experts.deepspeed_experts[0]
        return tuple(getattr(experts, name) for name in EXPERT_WEIGHTS)

    def start(self, x_ND: torch.Tensor, dispatch: Dispatch) -> EPDispatch | tuple[torch.Tensor, Dispatch]:
        """Send the rows to the ranks holding their experts (one rank: nothing to send)."""
        if self.ep_size == 1:
            return x_ND, dispatch
        return ep_dispatch_start(x_ND, dispatch, self.ep_size, self.deepspeed_moe.ep_group)

    def finish(self, sent: EPDispatch | tuple[torch.Tensor, Dispatch]) -> torch.Tensor:
        """This rank's experts on the rows it received; their outputs go back where they came from,
        and this rank's tokens get theirs combined. The other ranks' rows go first, so their
        outputs travel back while the experts compute this rank's own rows, which never left it."""
        if self.ep_size == 1:
            x_ND, dispatch = sent
            return expert_swiglu(x_ND, *self.local_stacks(), dispatch.counts, dispatch)
        exchange, weights = sent.exchange, self.local_stacks()
        y_theirs = expert_swiglu(ep_dispatch_finish(sent), *weights, exchange.their_counts)
        returning = ep_combine_start(y_theirs, exchange, self.deepspeed_moe.ep_group)
        y_own = expert_swiglu(sent.own_rows, *weights, exchange.own_counts)
        return ep_combine_finish(returning, y_own, exchange)


@dataclass(frozen=True)
class EPExchange:
    """What `ep_dispatch_start` did, for the combine to undo: no state kept between the two.
    Only rows for other ranks travel (the splits to and from this rank itself are 0)."""

    in_splits: list[int]  # rows this rank sent to each rank
    out_splits: list[int]  # rows this rank received from each rank
    own: slice  # this rank's rows for its own experts, within its rows sorted by global expert
    reorder: tuple[torch.Tensor, torch.Tensor] | None  # received (source, expert) -> (expert, source)
    # order and back; None when one other rank sends (ep_size 2): its rows arrive expert-major
    their_counts: torch.Tensor  # received rows per local expert
    own_counts: torch.Tensor  # this rank's own rows per local expert
    dispatch: Dispatch  # this rank's tokens' permutation, which the combine undoes


@dataclass(frozen=True)
class EPDispatch:
    """Rows on their way to their experts' ranks (`ep_dispatch_start`), and those that stay."""

    rows: RowsInFlight
    own_rows: torch.Tensor
    exchange: EPExchange


def ep_dispatch_start(x_ND: torch.Tensor, dispatch: Dispatch, ep_size: int, group) -> EPDispatch:
    """Exchange the per-expert counts, read them on the host (the split sizes), and start sending
    the tokens' rows sorted by global expert to the ranks owning them (rank p owns a contiguous
    block of ids); this rank's rows for its own experts stay, gathered apart. Returns at once:
    the caller computes (the shared experts) while the rows travel.

    On a GPU the rows are gathered and sent from a side stream, launched before the caller queues
    anything else: the gathers get the SMs first and the exchange then runs beside the shared
    experts. Reading the split sizes stalls the device for the host's launch of these few ops;
    deferring the read until after the shared experts were queued (so nothing stalls) measured
    slower, as the gathers then waited for the shared experts' full-width GEMMs and the exchange
    ran after them (benchmarks/RESULTS.md)."""
    counts_E, rank = dispatch.counts, dist.get_rank(group)
    P, El = ep_size, counts_E.numel() // ep_size
    recv_counts = torch.empty_like(counts_E)
    dist.all_to_all_single(recv_counts, counts_E.contiguous(), group=group)
    recv_PE = recv_counts.view(P, El)
    sent_PE, counts_PE = torch.stack([counts_E.view(P, El), recv_PE]).tolist()  # the one host sync
    own = slice(sum(map(sum, sent_PE[:rank])), sum(map(sum, sent_PE[:rank + 1])))
    in_splits = [0 if p == rank else sum(sent_PE[p]) for p in range(P)]
    out_splits = [0 if p == rank else sum(counts_PE[p]) for p in range(P)]
    reorder = None
    if P > 2:
        their_PE = recv_PE.clone()
        their_PE[rank] = 0
        index = _source_major_to_expert_major(their_PE, sum(out_splits))
        reorder = index, torch.empty_like(index).scatter_(0, index, torch.arange(index.numel(), device=index.device))
    exchange = EPExchange(in_splits, out_splits, own, reorder, recv_PE.sum(0) - recv_PE[rank], recv_PE[rank], dispatch)
    if not x_ND.is_cuda:
        theirs, own_rows = dispatch_rows(x_ND, dispatch, own)
        return EPDispatch(send_rows(theirs, out_splits, in_splits, group), own_rows, exchange)
    side = _side_stream(x_ND.device)
    side.wait_stream(torch.cuda.current_stream(x_ND.device))
    with torch.cuda.stream(side):
        theirs, own_rows = dispatch_rows(x_ND, dispatch, own)
        rows = send_rows(theirs, out_splits, in_splits, group)
    return EPDispatch(rows, own_rows, exchange)


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    """One stream per device for the dispatch's gathers and exchange, so that the shared experts
    queued after them on the compute stream run beside them instead of after them."""
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[device]


_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


class _ReorderRows(torch.autograd.Function):
    """rows[order] for a permutation `order`, whose backward is the gather by its inverse.
    Autograd's own backward of indexing is an accumulating scatter into zeros, built for
    repeated indices, which a permutation has none of."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return rows[order]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return grad[inverse], None, None


def ep_dispatch_finish(sent: EPDispatch) -> torch.Tensor:
    """The rows the other ranks sent this rank's experts, sorted by local expert."""
    rows, reorder = receive_rows(sent.rows), sent.exchange.reorder
    # received rows are ordered (source, local expert); the grouped product wants (expert, source)
    return rows if reorder is None else _ReorderRows.apply(rows, *reorder)


def ep_combine_start(y_theirs: torch.Tensor, exchange: EPExchange, group) -> RowsInFlight:
    """Start sending the experts' outputs for other ranks' rows back where they came from."""
    if exchange.reorder is not None:
        index, inverse = exchange.reorder
        y_theirs = _ReorderRows.apply(y_theirs, inverse, index)
    return send_rows(y_theirs, exchange.in_splits, exchange.out_splits, group)


def ep_combine_finish(returning: RowsInFlight, y_own: torch.Tensor, exchange: EPExchange) -> torch.Tensor:
    """This rank's tokens' weighted sums [N, D] of the outputs that came back and of its own
    rows' outputs, each read where it lies (no [M, D] join)."""
    return combine_rows(receive_rows(returning), exchange.dispatch, (y_own, exchange.own.start))


def _source_major_to_expert_major(counts_PE: torch.Tensor, total: int) -> torch.Tensor:
    """Index that reorders rows grouped (source p, expert j) into (expert j, source p). total (the
    row count, known on the host) keeps it free of device syncs while the rows are in flight."""
    P, El = counts_PE.shape
    starts_PE = (torch.cumsum(counts_PE.reshape(-1), 0) - counts_PE.reshape(-1)).view(P, El)
    counts_EP, starts_EP = counts_PE.t().reshape(-1), starts_PE.t().reshape(-1)
    dest_starts = torch.cumsum(counts_EP, 0) - counts_EP
    shift = torch.repeat_interleave(starts_EP - dest_starts, counts_EP, output_size=total)
    return torch.arange(total, device=counts_PE.device) + shift


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
        for weight, local in zip(EXPERT_WEIGHTS, module.local_stacks()):
            local = local.detach().contiguous()
            if module.ep_size > 1:
                parts = [torch.empty_like(local) for _ in range(module.ep_size)]
                dist.all_gather(parts, local, group=module.deepspeed_moe.ep_group)
                local = torch.cat(parts)
            out[f"{name}.{weight}"] = local.to("cpu", copy=True)  # never the live (aliased) weights
    return out
