"""Token permutation for the experts: sort token copies by expert, and take them back.

`permute` turns a routing (top-k experts and weights per token) into a frozen `Dispatch`: the
copies sorted by expert (a sort + gather, never a dense [tokens, experts] one-hot), rows per
expert, and for each token the sorted rows of its k copies. `unpermute` is the way back: each
token's weighted sum of its rows, by gathering them, so there are no atomics and the summation
order is fixed. Expert-parallel code sends the sorted rows over the network in between:
`dispatch_rows` and `combine_rows` are the same two steps for it, as autograd functions whose
backwards are again a gather-sum and a gather instead of autograd's accumulating scatter (for
indexing) and batched vector products (for the weighted sum), which cost a quarter of the
expert-parallel layer's step on GPUs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model.permute_kernel import fused_permute, fused_permute_applies
from model.swiglu_kernels import gather_scaled_rows, gather_weighted_sum, triton_runs_on


@dataclass(frozen=True)
class Routing:
    weights: torch.Tensor  # [N, K] combine weights (unbiased scores)
    experts: torch.Tensor  # [N, K] chosen expert ids
    scores: torch.Tensor | None  # [N, E] unbiased scores, for the auxiliary loss (None in fused inference)


@dataclass(frozen=True)
class Dispatch:
    """How token copies were ordered for the experts; `unpermute` takes it back."""

    token_index: torch.Tensor  # [M] source token of each sorted row
    weights: torch.Tensor  # [M] combine weight of each sorted row (read detached: gradients flow through slot_weights)
    counts: torch.Tensor  # [E] rows per expert after any capacity drop
    routed_counts: torch.Tensor  # [E] copies the routing sent each expert (the load, before any drop)
    dropped: int  # (token, expert) pairs dropped by the capacity limit
    slots: torch.Tensor  # [N, K] sorted row of each token's k-th choice; a dropped one points at row M
    slot_weights: torch.Tensor  # [N, K] combine weights in token order (the routing's, gradients flow)


def expert_counts(expert_ids: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Copies per expert [n_experts]. Not `torch.bincount`: on a GPU it reads the largest id back to
    the host to size its output, a sync per MoE layer that stalls the launch queue."""
    flat = expert_ids.reshape(-1)
    return torch.zeros(n_experts, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))


def _narrow_sort_key(expert_ids: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Expert ids in the narrowest integer type that holds them: a GPU radix sort makes one pass
    per key byte, so 64 routed experts sort in one pass instead of eight."""
    if n_experts <= 256:
        return expert_ids.to(torch.uint8)
    return expert_ids.to(torch.int16) if n_experts <= 32768 else expert_ids


def permute(routing: Routing, n_experts: int, capacity: int | None = None) -> Dispatch:
    """Sort (token, expert) pairs by expert, keeping token order within each expert (on a GPU
    without a capacity, one counting sort: model/permute_kernel.py).

    With a capacity, each expert keeps its first `capacity` tokens in token order and the rest
    are dropped (they pass through the residual only), as in GShard/Switch.
    """
    N, K = routing.experts.shape
    if capacity is None and fused_permute_applies(routing.experts, n_experts):
        token_index, weights, counts, slots = fused_permute(routing.experts, routing.weights, n_experts)
        return Dispatch(token_index=token_index, weights=weights, counts=counts, routed_counts=counts, dropped=0,
                        slots=slots, slot_weights=routing.weights)
    flat_experts = routing.experts.reshape(-1)
    order = torch.argsort(_narrow_sort_key(flat_experts, n_experts), stable=True)
    counts = routed = expert_counts(flat_experts, n_experts)
    positions = torch.arange(order.numel(), device=order.device)
    row_of_pair = torch.empty_like(order).index_copy_(0, order, positions)
    token_index = order // K
    weights = routing.weights.reshape(-1)[order]
    dropped = 0
    if capacity is not None:
        starts = torch.cumsum(counts, 0) - counts
        keep = positions - starts[flat_experts[order]] < capacity
        n_kept = int(keep.sum())
        dropped = order.numel() - n_kept
        row_of_pair = torch.where(keep, torch.cumsum(keep, 0) - 1, n_kept)[row_of_pair]
        token_index, weights = token_index[keep], weights[keep]
        counts = counts.clamp(max=capacity)
    return Dispatch(token_index=token_index, weights=weights, counts=counts, routed_counts=routed, dropped=dropped,
                    slots=row_of_pair.view(N, K), slot_weights=routing.weights)


def unpermute(y_MD: torch.Tensor, dispatch: Dispatch) -> torch.Tensor:
    """Weighted sum of each token's expert outputs [N, D]: a gather of its K rows and a K-long
    dot product per token, so no atomics and a fixed summation order (deterministic)."""
    return slot_sum(y_MD, dispatch.slots, dispatch.slot_weights, dispatch.dropped > 0)


def slot_sum(rows_MD: torch.Tensor, slots_NK: torch.Tensor, weights_NK: torch.Tensor | None,
             padded: bool, inset: tuple[torch.Tensor, int] | None = None) -> torch.Tensor:
    """sum_k weights[n, k] * rows[slots[n, k]] (plain sum without weights); with `padded`, slot M is
    a zero row (a copy the capacity limit dropped). With `inset` (rows, start) the sorted rows
    [start, start + len) are that tensor's and rows_MD holds the others (`gather_weighted_sum`)."""
    differentiable = torch.is_grad_enabled() and (rows_MD.requires_grad or
                                                   (weights_NK is not None and weights_NK.requires_grad))
    if not differentiable and triton_runs_on(rows_MD):
        return gather_weighted_sum(rows_MD, slots_NK, weights_NK, inset=inset)
    if inset is not None:
        rows_MD = _join_inset(rows_MD, *inset)
    if padded:
        rows_MD = torch.cat([rows_MD, rows_MD.new_zeros(1, rows_MD.shape[1])])
    gathered = rows_MD[slots_NK]  # [N, K, D]
    if weights_NK is None:
        return gathered.sum(1)
    return torch.bmm(weights_NK.to(rows_MD.dtype).unsqueeze(1), gathered).squeeze(1)


def _join_inset(rest: torch.Tensor, inset_rows: torch.Tensor, start: int) -> torch.Tensor:
    """The sorted rows in one tensor: `inset_rows` put back between rest's first `start` rows and the others."""
    return torch.cat([rest[:start], inset_rows, rest[start:]])


class BlockSum:
    """Each token's weighted sum of its rows [N, D], added block of sorted rows by block in fp32
    (the chunked expert step combines each block as soon as it is computed, so the [M, D] rows of
    every block never exist at once) and handed back in the rows' dtype.

    Rounding the fp32 sum into a separate result at the end would hold both at once, which was
    the chunked step's memory peak. Instead a 2-byte result's own storage holds fp32 for its
    first half of the tokens, which add up there; the rest add up in an fp32 tensor of their
    own. `result()` narrows the first half in place, front to back in doubling steps (each step
    writes only bytes whose fp32 values an earlier step already read), then copies the rest in
    after it: the peak is the fp32 sum's bytes alone."""

    def __init__(self, n: int, d: int, dtype: torch.dtype, device: torch.device):
        self.out = torch.empty(n, d, dtype=dtype, device=device)
        if self.out.element_size() == 2 and d % 2 == 0:
            n_front = n // 2
            front = self.out.view(torch.float32).view(-1)[:n_front * d].view(n_front, d)
            self.parts = [(0, front.zero_()), (n_front, torch.zeros(n - n_front, d, device=device))]
        else:
            self.parts = [(0, self.out.zero_() if dtype == torch.float32 else torch.zeros(n, d, device=device))]

    def add(self, rows_mD: torch.Tensor, row0: int, slots_NK: torch.Tensor, weights_NK: torch.Tensor | None) -> None:
        """Adds the tokens' rows among sorted rows [row0, row0 + m)."""
        for t0, part in self.parts:
            t1 = t0 + part.shape[0]
            _slot_sum_into(part, rows_mD, row0, slots_NK[t0:t1], None if weights_NK is None else weights_NK[t0:t1])

    def result(self) -> torch.Tensor:
        if len(self.parts) == 1:
            return self.parts[0][1].to(self.out.dtype)  # no copy when the sum is the result
        (_, front), (n_front, back) = self.parts
        done = min(n_front, max(64, n_front // 16))  # a few doubling steps after a small first one
        self.out[:done].copy_(front[:done].to(self.out.dtype))  # these rows overlap their own fp32 source
        while done < n_front:
            stop = min(2 * done, n_front)  # writes bytes [2d done, 2d stop), reads from 4d done: disjoint
            self.out[done:stop].copy_(front[done:stop])
            done = stop
        self.out[n_front:].copy_(back)
        self.parts = []
        return self.out


def _slot_sum_into(out_ND: torch.Tensor, rows_mD: torch.Tensor, row0: int, slots_NK: torch.Tensor,
                   weights_NK: torch.Tensor | None) -> None:
    """out += `slot_sum` restricted to the block of sorted rows [row0, row0 + m), no autograd."""
    if rows_mD.shape[0] == 0:
        return
    if triton_runs_on(rows_mD):
        gather_weighted_sum(rows_mD, slots_NK, weights_NK, out_ND, row0)
        return
    local = slots_NK - row0
    hit = (local >= 0) & (local < rows_mD.shape[0])
    scale = hit.to(out_ND.dtype) if weights_NK is None else hit * weights_NK.to(out_ND.dtype)
    gathered = rows_mD[local.clamp(0, rows_mD.shape[0] - 1)].to(out_ND.dtype)  # [N, K, D]
    out_ND += torch.bmm(scale.unsqueeze(1), gathered).squeeze(1)


def slot_values(per_row_M: torch.Tensor, dispatch: Dispatch) -> torch.Tensor:
    """A value per sorted row back in token order [N, K] (a dropped copy's is 0): the combine
    weights' gradient, which is one dot product per row."""
    if dispatch.dropped > 0:  # slot M is a dropped copy
        per_row_M = torch.cat([per_row_M, per_row_M.new_zeros(1)])
    return per_row_M[dispatch.slots].to(dispatch.slot_weights.dtype)


class _DispatchRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_ND: torch.Tensor, dispatch: Dispatch, inset: slice | None):
        ctx.dispatch, ctx.inset = dispatch, inset
        index = dispatch.token_index
        if inset is None:
            return x_ND[index]
        rest = index[inset.stop:] if inset.start == 0 else index[:inset.start] if inset.stop == index.numel() else \
            torch.cat([index[:inset.start], index[inset.stop:]])
        return x_ND[rest], x_ND[index[inset]]

    @staticmethod
    def backward(ctx, d_rows_MD: torch.Tensor, d_inset: torch.Tensor | None = None):
        dispatch, inset = ctx.dispatch, ctx.inset
        pieces = None if inset is None else (d_inset.contiguous(), inset.start)
        return slot_sum(d_rows_MD.contiguous(), dispatch.slots, None, dispatch.dropped > 0, pieces), None, None


class _CombineRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_MD: torch.Tensor, y_inset: torch.Tensor | None, slot_weights_NK: torch.Tensor,
                dispatch: Dispatch, inset_start: int) -> torch.Tensor:
        ctx.save_for_backward(y_MD, y_inset)
        ctx.dispatch, ctx.inset_start = dispatch, inset_start
        pieces = None if y_inset is None else (y_inset, inset_start)
        return slot_sum(y_MD, dispatch.slots, slot_weights_NK, dispatch.dropped > 0, pieces)

    @staticmethod
    def backward(ctx, dout_ND: torch.Tensor):
        y_MD, y_inset = ctx.saved_tensors
        dispatch, start = ctx.dispatch, ctx.inset_start
        inset = None if y_inset is None else slice(start, start + y_inset.shape[0])
        dot_with = None if not ctx.needs_input_grad[2] else y_MD if inset is None else (y_MD, y_inset)
        d_rows, dots = gather_scaled_rows(dout_ND, dispatch.token_index, dispatch.weights.detach(), dot_with, inset)
        d_rest, d_inset = (d_rows, None) if inset is None else d_rows
        return d_rest, d_inset, None if dots is None else slot_values(dots, dispatch), None, None


def dispatch_rows(x_ND: torch.Tensor, dispatch: Dispatch, inset: slice | None = None
                  ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The sorted rows x[token_index] [M, D] (for experts elsewhere); the backward sums each
    token's copies' gradients by a gather (no atomics, fixed order). With `inset`, those sorted
    rows come as their own tensor after the others (rows, inset rows): a rank's rows for its own
    experts stay apart from those that travel, and neither side is ever copied to join them."""
    return _DispatchRows.apply(x_ND, dispatch, inset)


def combine_rows(y_MD: torch.Tensor, dispatch: Dispatch, inset: tuple[torch.Tensor, int] | None = None
                 ) -> torch.Tensor:
    """`unpermute` for rows that came back from experts elsewhere; the backward gathers each
    row's output gradient, scaled by its weight, and its dot product with the row (the weight's
    gradient) in one pass. With `inset` (rows, start), the sorted rows [start, start + len) are
    that tensor's and y_MD holds the others (as `dispatch_rows` split them)."""
    y_inset, start = (None, 0) if inset is None else inset
    return _CombineRows.apply(y_MD, y_inset, dispatch.slot_weights, dispatch, start)
