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

Each kind of this rank's expert weights lies back to back in one tensor (every expert's
parameters are views into it), so the grouped products get the [n_local, ...] stacks without
a copy (`_stacked`).

The module is a `deepspeed.moe.layer.MoE` in DeepSpeed's eyes, with its parameters in
DeepSpeed's per-expert layout (`deepspeed_moe.experts.deepspeed_experts.<i>.*`, tagged
`allreduce=False` with the group name): the engine then reduces their gradients over the
expert-data-parallel group only and writes them as expert checkpoint files.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
from deepspeed.moe.layer import MoE as DeepSpeedMoE
from torch import nn

from model.dispatch import Dispatch, Routing, combine_rows, dispatch_rows, permute
from model.expert_ffn import expert_swiglu
from model.moe import MoE, RoutedExperts
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


class _Expert(nn.Module):
    """One SwiGLU expert's weights, in the per-expert layout DeepSpeed checkpoints. The parameters
    are the given tensors themselves (views into the rank's stacks, see `_stacked`)."""

    def __init__(self, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, group_name: str):
        super().__init__()
        self.w_gate, self.w_up, self.w_down = (nn.Parameter(w) for w in (w_gate, w_up, w_down))
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
        local = slice(ep_rank * self.num_local_experts, (ep_rank + 1) * self.num_local_experts)
        # each kind's weights back to back in one tensor, every expert's parameters views into it
        stacks = [w[local].detach().clone() for w in (full.w_gate, full.w_up, full.w_down)]
        self.deepspeed_moe = _ExpertHolder([_Expert(*(w[i] for w in stacks), self.expert_group_name)
                                            for i in range(self.num_local_experts)])

    def local_stacks(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's experts as [n_local, ...] stacks (autograd flows back to each expert)."""
        experts = self.deepspeed_moe.experts.deepspeed_experts
        return tuple(_stacked([getattr(e, name) for e in experts]) for name in ("w_gate", "w_up", "w_down"))

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
        rows, their = ep_dispatch_finish(sent)
        returning = ep_combine_start(expert_swiglu(rows, *weights, their.counts, their), exchange,
                                     self.deepspeed_moe.ep_group)
        own = ep_own_dispatch(exchange)
        y_own = expert_swiglu(sent.tokens, *weights, own.counts, own)
        return ep_combine_finish(returning, y_own, exchange)


class _StackedWeights(torch.autograd.Function):
    """Weights lying back to back in one storage as one [n, ...] tensor, without a copy; backward
    hands each its slice of the stacked gradient (the same views `torch.stack`'s backward gives)."""

    @staticmethod
    def forward(ctx, *weights: torch.Tensor) -> torch.Tensor:
        first = weights[0]
        return first.detach().as_strided((len(weights), *first.shape), (first.numel(), *first.stride()))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.unbind(0)


def _stacked(weights: list[torch.Tensor]) -> torch.Tensor:
    """`torch.stack(weights)` (autograd to each), without its copy where the weights lie back to
    back in one storage, as `ExpertParallelExperts` lays them out: at V2-Lite's shape the copy
    was 0.37 ms of a 19 ms expert-parallel step. Anything that moves them apart (`.to()`; an
    optimizer flattening its parameters in another order than `parameters_kind_major`) only
    brings the copy back."""
    first = weights[0]
    step, base = first.numel() * first.element_size(), first.data_ptr()
    fits = first.untyped_storage().nbytes() >= (first.storage_offset() + len(weights) * first.numel()) * \
        first.element_size()
    if fits and all(w.data_ptr() == base + i * step and w.shape == first.shape and w.dtype == first.dtype
                    and w.is_contiguous() for i, w in enumerate(weights)):
        return _StackedWeights.apply(*weights)
    return torch.stack(weights)


@dataclass(frozen=True)
class EPExchange:
    """What `ep_dispatch_start` did, for the combine to undo: no state kept between the two.
    A token travels once to each other rank holding any of its experts (the splits to and from
    this rank itself are 0)."""

    in_splits: list[int]  # token rows this rank sent to each rank
    out_splits: list[int]  # token rows this rank received from each rank
    their_copies: int  # copies of the received rows for this rank's experts (rows the experts compute)
    own_rows: slice  # this rank's copies for its own experts, within the layer's sorted rows
    own_experts: slice  # this rank's experts, within the layer's
    dispatch: Dispatch  # the layer's: this rank's tokens' copies, sorted by global expert
    sent: Dispatch  # this rank's tokens -> the rows sent: one per (rank, token), counts per rank


@dataclass(frozen=True)
class EPDispatch:
    """Token rows and their routes on their way to their experts' ranks (`ep_dispatch_start`)."""

    tokens: torch.Tensor  # this rank's tokens, which its own experts read in place
    rows: RowsInFlight
    routes: RowsInFlight  # per row sent: its k combine weights, then its k local expert ids (or n_local)
    exchange: EPExchange


def ep_dispatch_start(x_ND: torch.Tensor, dispatch: Dispatch, ep_size: int, group) -> EPDispatch:
    """Exchange the counts, read them on the host (the split sizes), and start sending each token
    once to every other rank holding some of its experts (rank p owns a contiguous block of
    expert ids), with its routes there: the combine weights and local ids of those experts. With
    top-6 of 64 experts over two ranks a token has about three copies on the other rank, so this
    moves about a third of the bytes of sending every copy; the receiver permutes the rows for
    its experts itself and sends back one row per token, already combined. Returns at once: the
    caller computes (the shared experts) while the rows travel.

    Everything that does not need the split sizes is queued before the host reads them: after
    the read the device idles until the host has launched the rows' gather and exchange, so only
    those few ops come after it. On a GPU they run on a side stream, so the exchange runs beside
    the shared experts the caller queues next. (Deferring the read until after the shared experts
    were queued measured slower: the gathers then waited for the shared experts' full-width
    GEMMs and the exchange ran after them; benchmarks/RESULTS.md.)"""
    counts_E, rank = dispatch.counts, dist.get_rank(group)
    P, El, (N, K) = ep_size, counts_E.numel() // ep_size, dispatch.slots.shape
    experts_NK = torch.bucketize(dispatch.slots, torch.cumsum(counts_E, 0), right=True)  # a dropped copy: E
    ranks = torch.arange(P, device=experts_NK.device)
    here_PNK = torch.div(experts_NK, El, rounding_mode="floor")[None] == ranks[:, None, None]
    to_rank_PN = here_PNK.any(-1)
    to_rank_PN[rank] = False
    table = torch.cat([counts_E.view(P, El), to_rank_PN.sum(1, keepdim=True)], 1)  # [P, El + 1]: copies, tokens
    received = torch.empty_like(table)
    dist.all_to_all_single(received, table, group=group)
    # the rows to send, rank-major, tokens in order within a rank: each (rank, token)'s place in
    # the send order (P N where nothing goes), and the order's (rank, token) pairs
    flat = to_rank_PN.reshape(-1)
    slots_PN = torch.where(flat, torch.cumsum(flat, 0) - 1, P * N).view(P, N)
    order = torch.empty(P * N + 1, dtype=torch.long, device=flat.device)
    order.scatter_(0, slots_PN.reshape(-1), torch.arange(P * N, device=flat.device))
    local_ids = torch.where(here_PNK, experts_NK[None] - ranks[:, None, None] * El, El)
    weights = torch.where(here_PNK, dispatch.slot_weights[None], 0.0)
    routes = torch.cat([weights.float(), local_ids.float()], -1).view(P * N, 2 * K)
    ones_NP, ones = (torch.ones(n, dtype=dispatch.slot_weights.dtype, device=flat.device) for n in ((N, P), P * N))

    sent_table, received_table = torch.stack([table, received]).tolist()  # the one host sync
    in_splits, out_splits = [t[El] for t in sent_table], [t[El] for t in received_table]
    own_start = sum(map(sum, (t[:El] for t in sent_table[:rank])))
    own_rows = slice(own_start, own_start + sum(sent_table[rank][:El]))
    their_copies = sum(sum(t[:El]) for p, t in enumerate(received_table) if p != rank)
    S = sum(in_splits)
    stream = _side_stream(x_ND.device) if x_ND.is_cuda else None
    if stream is not None:
        stream.wait_stream(torch.cuda.current_stream(x_ND.device))
    with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
        order = order[:S]
        sent = Dispatch(token_index=order % N, weights=ones[:S], counts=to_rank_PN.sum(1),
                        routed_counts=to_rank_PN.sum(1), dropped=N * P - S,
                        slots=slots_PN.clamp(max=S).t().contiguous(), slot_weights=ones_NP)
        routes = send_rows(routes[order], out_splits, in_splits, group)  # first: the receiver permutes by them
        rows = send_rows(dispatch_rows(x_ND, sent), out_splits, in_splits, group)
    exchange = EPExchange(in_splits, out_splits, their_copies, own_rows, slice(rank * El, (rank + 1) * El),
                          dispatch, sent)
    return EPDispatch(x_ND, rows, routes, exchange)


def ep_own_dispatch(exchange: EPExchange) -> Dispatch:
    """The layer's dispatch cut to this rank's experts: their sorted rows are a contiguous range,
    and every other copy is a dropped one (slot M). Made after the rows were sent, off the path
    from the host's read of the split sizes to the exchange."""
    dispatch, rows, experts = exchange.dispatch, exchange.own_rows, exchange.own_experts
    M = rows.stop - rows.start
    slots = dispatch.slots - rows.start
    slots = torch.where((slots >= 0) & (slots < M), slots, M)
    # copies, not views: a slice starting mid-tensor is not 16-byte aligned, and the Triton kernels
    # that read them would be compiled anew for every alignment the split happens to give
    return Dispatch(token_index=dispatch.token_index[rows].clone(), weights=dispatch.weights[rows].clone(),
                    counts=dispatch.counts[experts], routed_counts=dispatch.routed_counts[experts],
                    dropped=dispatch.slots.numel() - M, slots=slots, slot_weights=dispatch.slot_weights)


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    """One stream per device for the dispatch's gathers and exchange, so that the shared experts
    queued after them on the compute stream run beside them instead of after them."""
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[device]


_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def ep_dispatch_finish(sent: EPDispatch) -> tuple[torch.Tensor, Dispatch]:
    """The token rows the other ranks sent [R, D], and how their copies go to this rank's experts
    (a `Dispatch` over the local experts, whose combine gives one row per received token)."""
    routes = receive_rows(sent.routes)
    K = routes.shape[1] // 2
    weights, local_ids = routes[:, :K], routes[:, K:].detach().long()
    experts = sent.exchange.own_experts
    El = experts.stop - experts.start
    # the copies for other ranks' experts sort last, as a pseudo-expert El, and are cut off as dropped
    full = permute(Routing(weights, local_ids, None), El + 1)
    M = sent.exchange.their_copies
    their = Dispatch(token_index=full.token_index[:M], weights=full.weights[:M], counts=full.counts[:El],
                     routed_counts=full.routed_counts[:El], dropped=local_ids.numel() - M,
                     slots=full.slots.clamp(max=M), slot_weights=weights)
    return receive_rows(sent.rows), their


def ep_combine_start(y_RD: torch.Tensor, exchange: EPExchange, group) -> RowsInFlight:
    """Start sending the received tokens' combined outputs back where they came from."""
    return send_rows(y_RD, exchange.in_splits, exchange.out_splits, group)


def ep_combine_finish(returning: RowsInFlight, y_own_ND: torch.Tensor, exchange: EPExchange) -> torch.Tensor:
    """This rank's tokens' outputs [N, D]: its own experts' combined outputs plus the rows that
    came back (each already a weighted sum over that rank's experts)."""
    return y_own_ND + combine_rows(receive_rows(returning), exchange.sent)


def parallelize_experts(model: nn.Module, ep_size: int, ep_rank: int, group=None) -> None:
    """Give every MoE (main stack and MTP) this rank's slice of its experts. The ep group is
    DeepSpeed's to set when its engine wraps the model; without DeepSpeed, pass it here."""
    for moe in (m for m in model.modules() if isinstance(m, MoE)):
        moe.experts = ExpertParallelExperts(moe.experts, ep_size, ep_rank)
        if group is not None:
            moe.experts.deepspeed_moe._set_ep_group(group)


def parameters_kind_major(model: nn.Module) -> list[nn.Parameter]:
    """`model.parameters()`, but each expert-parallel layer's expert weights kind by kind (every
    expert's w_gate, then every w_up, then every w_down) instead of expert by expert. Optimizers
    that flatten their parameters into one buffer in group order (DeepSpeed's ZeRO and bf16
    optimizers) then keep each kind back to back, so `local_stacks` stays a view under them."""
    blocks: dict[int, list[nn.Parameter]] = {}
    for module in model.modules():
        if isinstance(module, ExpertParallelExperts):
            experts = module.deepspeed_moe.experts.deepspeed_experts
            block = [getattr(e, kind) for kind in ("w_gate", "w_up", "w_down") for e in experts]
            blocks.update((id(p), block) for p in block)
    ordered, listed = [], set()
    for p in model.parameters():
        if id(p) not in listed:
            block = blocks.get(id(p), [p])
            ordered += block
            listed.update(id(q) for q in block)
    return ordered


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
            out[f"{name}.{weight}"] = local.to("cpu", copy=True)  # never the live (aliased) weights
    return out
