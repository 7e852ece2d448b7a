"""The routed experts' SwiGLU as one autograd function that keeps only what backward needs.

The gate and up weights of an expert lie side by side in one [D, 2F] matrix W_gate_up, so the
two projections are one grouped product [g | u] = x W_gate_up, and backward's input gradient
is one product over K = 2F ([dg | du] W_gate_up^T) instead of two and an add: fewer, larger
matmuls (benchmarks/RESULTS.md has the probe and the layer before and after).

Autograd through the plain steps (gather, two grouped matmuls, silu, product, weighted
combine) keeps the gathered rows [M, D], three [M, F]-sized tensors and the expert outputs
[M, D] alive until backward; with top-6 of 64 experts that is several times the layer's input.
Here forward keeps the layer input and the projections [g | u], and backward re-derives the
rest: the gathered rows by the same gather, silu(g) * u elementwise, and the
combine weights' gradient from dz = dout W_down^T, which backward computes anyway, because
<dout, h W_down> = <dout W_down^T, h>. No output row [M, D] is ever kept, and backward writes
its [M, F] gradients over the saved projections (so it runs once per forward: retain_graph
gets a clear error instead of wrong values).

With a `Dispatch` the function also gathers its input rows from the tokens and sums each
token's weighted outputs (the single-process MoE layer); without it, it maps rows to rows (an
expert shard or an expert-parallel rank, which receive their rows over the network).

Transient [M, D] tensors (the gathered rows, the expert outputs before the combine, their
gradients) still peak at several times the layer's input with top-8 routing. `chunks` > 1
walks the sorted rows in about that many blocks of whole experts instead (a hot expert with
more rows than a block's share is cut into pieces) and combines each block into an fp32 sum
as soon as it is computed, so only about [M / chunks, D] exists at a time. The price: one host
read of the expert counts per layer (to cut the blocks), a read-modify-write of the [N, D] sum
per block, and one matmul per expert for the weight gradients, which must land in place: `torch._grouped_mm`
has no `out=` and no accumulate, and a grouped result would be one more block-sized tensor.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from model.dispatch import BlockSum, Dispatch, slot_sum, slot_values
from model.grouped import group_offsets, grouped_mm, grouped_mm_weight_grad
from model.swiglu_kernels import swiglu, swiglu_backward


@dataclass(frozen=True)
class RowBlock:
    """Sorted rows [rows.start, rows.stop) of the experts in `experts`, `counts` rows each. A hot
    expert's rows may be cut into several one-expert blocks; all but the first are `continued`
    (their weight gradient adds to the one before). `host_counts` repeats `counts` on the host
    where the blocks were cut from them (empty for the one block of the sync-free path);
    `offsets` are the grouped products' group ends, made once for the block's products."""

    rows: slice
    experts: slice
    counts: torch.Tensor | None
    continued: bool = False
    host_counts: tuple[int, ...] = ()
    offsets: torch.Tensor | None = None


def row_blocks(counts_E: torch.Tensor | None, chunks: int) -> list[RowBlock]:
    """Consecutive experts grouped into blocks of at most M / chunks rows, an expert with more
    rows than that cut into pieces of its own; one block, with no host sync, when chunks is 1.
    No block is empty: idle experts left out of every block get zero weight gradients."""
    if chunks <= 1 or counts_E is None:
        return [RowBlock(slice(None), slice(None), counts_E, offsets=group_offsets(counts_E))]
    counts = counts_E.tolist()  # the chunked step's one host sync per layer
    target = max(1, -(-sum(counts) // chunks))
    blocks, e0, r0, r1 = [], 0, 0, 0
    for e, c in enumerate(counts):
        if r1 > r0 and (c > target or r1 - r0 + c > target):  # expert e would overfill the open block
            blocks.append(RowBlock(slice(r0, r1), slice(e0, e), counts_E[e0:e], host_counts=tuple(counts[e0:e])))
            e0, r0 = e, r1
        if c > target:  # a hot expert: cut into pieces of its own
            pieces = -(-c // target)
            cuts = [r1 + p * c // pieces for p in range(pieces + 1)]
            blocks += [RowBlock(slice(a, b), slice(e, e + 1), counts_E.new_full((1,), b - a), p > 0, (b - a,))
                       for p, (a, b) in enumerate(zip(cuts, cuts[1:]))]
            e0, r0 = e + 1, r1 + c
        r1 += c
    if r1 > r0:
        blocks.append(RowBlock(slice(r0, r1), slice(e0, len(counts)), counts_E[e0:], host_counts=tuple(counts[e0:])))
    return [replace(b, offsets=group_offsets(b.counts)) for b in blocks]


def _block_rows(x: torch.Tensor, dispatch: Dispatch | None, block: RowBlock) -> torch.Tensor:
    return x[block.rows] if dispatch is None else x[dispatch.token_index[block.rows]]


def _weight_grad_buffer(w: torch.Tensor, blocks: list[RowBlock]) -> torch.Tensor:
    """The [E, ...] weight gradient the blocks fill; zeroed only if some idle expert is in none."""
    covered = sum(b.experts.stop - b.experts.start for b in blocks if not b.continued)
    return torch.empty_like(w) if covered == w.shape[0] else torch.zeros_like(w)


def _weight_grad(total: torch.Tensor | None, block: RowBlock, a_rows: torch.Tensor, b_rows: torch.Tensor,
                 impl: str) -> torch.Tensor:
    """A block's experts' weight gradients a^T b written into the [E, K, N] total; the only block's
    is the total itself (one grouped kernel). In blocks, one matmul per expert straight into its
    slice (`torch._grouped_mm` has no `out=`: a grouped gradient would be a second copy of the
    block's gradients, then copied into place); a cut expert's pieces add up in place."""
    if total is None:
        return grouped_mm_weight_grad(a_rows, b_rows, block.counts, impl, block.offsets)
    # views per expert made by one call each: at V2-Lite's shape a few host microseconds per
    # slicing op would add up to more than the GPU time of these matmuls
    pieces = zip(total[block.experts].unbind(0), a_rows.t().split(block.host_counts, 1),
                 b_rows.split(block.host_counts))
    for grad, a_t, b in pieces:
        if block.continued:
            grad.addmm_(a_t, b)
        else:
            torch.mm(a_t, b, out=grad)
    return total


def _input_grad(block: RowBlock, dgu: torch.Tensor, w_gate_up: torch.Tensor, impl: str) -> torch.Tensor:
    """[dg | du] W_gate_up^T per expert [rows, D]: both projections' input gradients in one product."""
    return grouped_mm(dgu, w_gate_up[block.experts].transpose(-2, -1), block.counts, impl, block.offsets)


class _ExpertSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_gate_up, w_down, slot_weights, dispatch, blocks, impl):
        single = len(blocks) == 1
        out = None if single else BlockSum(*x.shape, x.dtype, x.device)
        projections = []
        for b in blocks:
            x_b = _block_rows(x, dispatch, b)
            gu = grouped_mm(x_b, w_gate_up[b.experts], b.counts, impl, b.offsets)
            del x_b
            y = grouped_mm(swiglu(gu), w_down[b.experts], b.counts, impl, b.offsets)
            if dispatch is None:
                out = y
            elif single:
                out = slot_sum(y, dispatch.slots, slot_weights, dispatch.dropped > 0)
            else:
                out.add(y, b.rows.start, dispatch.slots, slot_weights)
            projections.append(gu)
        ctx.save_for_backward(x, w_gate_up, w_down, *projections)
        ctx.dispatch, ctx.blocks, ctx.impl, ctx.consumed = dispatch, blocks, impl, False
        return out if single else out.result()

    @staticmethod
    def backward(ctx, dout):
        if ctx.consumed:
            raise RuntimeError("the expert step runs backward once per forward: its backward overwrites the saved "
                               "projections (model/expert_ffn.py), so retain_graph cannot reuse them")
        ctx.consumed = True
        x, w_gate_up, w_down, *projections = ctx.saved_tensors
        dispatch, blocks, impl = ctx.dispatch, ctx.blocks, ctx.impl
        single = len(blocks) == 1
        dout = dout.contiguous()
        dx = None if single or dispatch is None else BlockSum(*x.shape, x.dtype, x.device)
        dw_gate_up = dw_down = None
        if not single:
            dw_gate_up, dw_down = (_weight_grad_buffer(w, blocks) for w in (w_gate_up, w_down))
        d_rows = []
        for b, gu in zip(blocks, projections):
            dy_b = _block_rows(dout, dispatch, b)
            dz = grouped_mm(dy_b, w_down[b.experts].transpose(-2, -1), b.counts, impl, b.offsets)  # d(loss)/d(h) before the combine weight
            row_weights = None if dispatch is None else dispatch.weights[b.rows].detach()
            dgu, wh, d_rows_b = swiglu_backward(dz, gu, row_weights)  # wh: h scaled by the row's weight
            if row_weights is not None:
                d_rows.append(d_rows_b)
            dw_down = _weight_grad(dw_down, b, wh, dy_b, impl)
            del wh, dy_b
            x_b = _block_rows(x, dispatch, b)
            dw_gate_up = _weight_grad(dw_gate_up, b, x_b, dgu, impl)
            del x_b
            dx_rows = _input_grad(b, dgu, w_gate_up, impl)
            if dispatch is None:
                dx = dx_rows
            elif single:
                dx = slot_sum(dx_rows, dispatch.slots, None, dispatch.dropped > 0)
            else:
                dx.add(dx_rows, b.rows.start, dispatch.slots, None)
        d_slot_weights = None
        if dispatch is not None and ctx.needs_input_grad[3]:
            d_slot_weights = slot_values(torch.cat(d_rows), dispatch)
        dx = dx if single or dispatch is None else dx.result()
        return dx, dw_gate_up, dw_down, d_slot_weights, None, None, None


def expert_swiglu(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, counts_E: torch.Tensor | None,
                  dispatch: Dispatch | None = None, impl: str = "auto", chunks: int = 1) -> torch.Tensor:
    """silu(x W_gate) * (x W_up) W_down per expert block of rows, W_gate_up = [W_gate | W_up]
    [E, D, 2F] (counts_E None: one expert, all rows, as the dense FFN and the shared experts are).

    Rows to rows ([M, D] sorted by expert -> [M, D]) without a dispatch; with one, x is the
    tokens [N, D] and the result is each token's weighted sum of its rows' outputs [N, D]
    (the gradient reaches the routing through `dispatch.slot_weights`), computed in `chunks`
    blocks of rows (see the module docstring).
    """
    slot_weights = None if dispatch is None else dispatch.slot_weights
    blocks = row_blocks(counts_E, chunks if dispatch is not None else 1)
    return _ExpertSwiGLU.apply(x, w_gate_up, w_down, slot_weights, dispatch, blocks, impl)
