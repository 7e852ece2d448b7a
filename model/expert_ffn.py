"""The routed experts' SwiGLU as one autograd function that keeps only what backward needs.

Autograd through the plain steps (gather, three grouped matmuls, silu, product, weighted
combine) keeps the gathered rows [M, D], four [M, F] tensors and the expert outputs [M, D]
alive until backward; with top-6 of 64 experts that is several times the layer's input. Here
forward keeps the layer input and the two projections g = x W_gate, u = x W_up, and backward
re-derives the rest: the gathered rows by the same gather, silu(g) * u elementwise, and the
combine weights' gradient from dz = dout W_down^T, which backward computes anyway, because
<dout, h W_down> = <dout W_down^T, h>. No output row [M, D] is ever kept.

With a `Dispatch` the function also gathers its input rows from the tokens and sums each
token's weighted outputs (the single-process MoE layer); without it, it maps rows to rows (an
expert shard or an expert-parallel rank, which receive their rows over the network).
"""

from __future__ import annotations

import torch

from model.dispatch import Dispatch, slot_sum
from model.grouped import grouped_mm, grouped_mm_weight_grad
from model.swiglu_kernels import swiglu, swiglu_backward


class _ExpertSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_gate, w_up, w_down, slot_weights, counts_E, dispatch, impl):
        x_MD = x if dispatch is None else x[dispatch.token_index]
        g = grouped_mm(x_MD, w_gate, counts_E, impl)
        u = grouped_mm(x_MD, w_up, counts_E, impl)
        del x_MD
        y = grouped_mm(swiglu(g, u), w_down, counts_E, impl)
        if dispatch is not None:
            y = slot_sum(y, dispatch.slots, slot_weights, dispatch.dropped > 0)
        ctx.save_for_backward(x, w_gate, w_up, w_down, counts_E, g, u)
        ctx.dispatch, ctx.impl = dispatch, impl
        return y

    @staticmethod
    def backward(ctx, dout):
        x, w_gate, w_up, w_down, counts_E, g, u = ctx.saved_tensors
        dispatch, impl = ctx.dispatch, ctx.impl
        dout = dout.contiguous()
        dy_MD = dout if dispatch is None else dout[dispatch.token_index]
        dz = grouped_mm(dy_MD, w_down.transpose(-2, -1), counts_E, impl)  # d(loss)/d(h) before the combine weight
        row_weights = None if dispatch is None else dispatch.weights.detach()
        dg, du, h, d_rows = swiglu_backward(dz, g, u, row_weights)
        if row_weights is not None:  # dy_MD is this function's own gather: scale it in place
            dy_MD.mul_(row_weights[:, None].to(dy_MD.dtype))
        dw_down = grouped_mm_weight_grad(h, dy_MD, counts_E, impl)
        del h, dy_MD
        x_MD = x if dispatch is None else x[dispatch.token_index]
        dw_gate = grouped_mm_weight_grad(x_MD, dg, counts_E, impl)
        dw_up = grouped_mm_weight_grad(x_MD, du, counts_E, impl)
        del x_MD
        d_slot_weights = None
        if dispatch is None:
            dx = grouped_mm(dg, w_gate.transpose(-2, -1), counts_E, impl)
            dx += grouped_mm(du, w_up.transpose(-2, -1), counts_E, impl)
        else:  # reduce each [M, D] product to tokens before making the next: one [M, D] alive at a time
            padded = dispatch.dropped > 0
            dx = slot_sum(grouped_mm(dg, w_gate.transpose(-2, -1), counts_E, impl), dispatch.slots, None, padded)
            dx += slot_sum(grouped_mm(du, w_up.transpose(-2, -1), counts_E, impl), dispatch.slots, None, padded)
            if ctx.needs_input_grad[4]:
                d_rows = torch.cat([d_rows, d_rows.new_zeros(1)]) if padded else d_rows
                d_slot_weights = d_rows[dispatch.slots].to(dispatch.slot_weights.dtype)
        return dx, dw_gate, dw_up, dw_down, d_slot_weights, None, None, None


def expert_swiglu(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                  counts_E: torch.Tensor | None, dispatch: Dispatch | None = None, impl: str = "auto") -> torch.Tensor:
    """silu(x W_gate) * (x W_up) W_down per expert block of rows (counts_E None: one expert, all rows,
    as the dense FFN and the shared experts are).

    Rows to rows ([M, D] sorted by expert -> [M, D]) without a dispatch; with one, x is the
    tokens [N, D] and the result is each token's weighted sum of its rows' outputs [N, D]
    (the gradient reaches the routing through `dispatch.slot_weights`).
    """
    slot_weights = None if dispatch is None else dispatch.slot_weights
    return _ExpertSwiGLU.apply(x, w_gate, w_up, w_down, slot_weights, counts_E, dispatch, impl)
