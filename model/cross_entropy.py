"""The next-token loss in two single-pass GPU kernels instead of an fp32 copy of the logits.

`F.cross_entropy(logits.float(), targets)` over a [tokens, vocab] bf16 matrix (8k tokens x a
32k vocabulary: 512 MB) writes the logits again in fp32, their log-softmax in fp32 (kept for
backward), and in backward a zero-filled fp32 gradient, the log-softmax gradient and its bf16
copy: about 8 GB of memory traffic per head, twice a step with multi-token prediction (~11 ms of
`small`'s 72 ms of GPU work on an H100, benchmarks/RESULTS.md). Here the forward reads the bf16
logits once, keeping only each row's log-sum-exp, and the backward reads them once more and
writes the bf16 gradient softmax - onehot directly: ~1.5 GB. Both compute in fp32 inside, as the
fp32 path does, so loss and gradient agree with it to fp32 rounding (the gradient is rounded to
bf16 once, as the `.float()` backward did).

Every target counts (no ignore index: moray's data has no padding targets). Elsewhere (CPU, no
Triton) it is `F.cross_entropy` on fp32 logits; the interpreter runs the kernels on CPU tensors
in the CPU test suite.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model.swiglu_kernels import triton, triton_runs_on

if triton is not None:
    import triton.language as tl

BLOCK = 4096  # vocabulary entries a program reads at a time


def cross_entropy(logits_NV: torch.Tensor, targets_N: torch.Tensor) -> torch.Tensor:
    """Mean over rows of -log softmax(logits)[target], in fp32 whatever the logits' dtype."""
    if triton_runs_on(logits_NV) and logits_NV.dim() == 2 and logits_NV.shape[0] > 0:
        return _FusedCrossEntropy.apply(logits_NV, targets_N)
    return F.cross_entropy(logits_NV.float(), targets_N)


class _FusedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits, targets = logits.contiguous(), targets.contiguous()
        N, V = logits.shape
        losses = torch.empty(N, dtype=torch.float32, device=logits.device)
        lse = torch.empty_like(losses)
        _cross_entropy_fwd_kernel[(N,)](logits, targets, losses, lse, V, BLOCK=BLOCK)
        ctx.save_for_backward(logits, targets, lse)
        return losses.mean()

    @staticmethod
    def backward(ctx, d_loss: torch.Tensor):
        logits, targets, lse = ctx.saved_tensors
        N, V = logits.shape
        grad = torch.empty_like(logits)
        # d_loss stays on the device (a read of it would be a host sync): the kernel loads it
        _cross_entropy_bwd_kernel[(N, triton.cdiv(V, BLOCK))](
            logits, targets, lse, d_loss.float().reshape(1), grad, V, 1.0 / N, BLOCK=BLOCK)
        return grad, None


if triton is not None:
    @triton.jit
    def _cross_entropy_fwd_kernel(x_ptr, t_ptr, loss_ptr, lse_ptr, V, BLOCK: tl.constexpr):
        """One row: log-sum-exp by the online rule (running max, sum rescaled as it grows) and
        the loss lse - x[target]."""
        row = tl.program_id(0)
        base = x_ptr + row.to(tl.int64) * V
        m = float("-inf")
        s = 0.0
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
            m = m_new
        lse = m + tl.log(s)
        target = tl.load(t_ptr + row)
        x_t = tl.load(base + target).to(tl.float32)
        tl.store(loss_ptr + row, lse - x_t)
        tl.store(lse_ptr + row, lse)

    @triton.jit
    def _cross_entropy_bwd_kernel(x_ptr, t_ptr, lse_ptr, d_ptr, g_ptr, V, inv_n, BLOCK: tl.constexpr):
        """One block of one row: (softmax - onehot(target)) * d_loss / N, in the logits' dtype."""
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < V
        offset = row.to(tl.int64) * V
        x = tl.load(x_ptr + offset + cols, mask=mask, other=0.0).to(tl.float32)
        p = tl.exp(x - tl.load(lse_ptr + row))
        p = tl.where(cols == tl.load(t_ptr + row), p - 1.0, p)
        g = p * (tl.load(d_ptr) * inv_n)
        tl.store(g_ptr + offset + cols, g.to(g_ptr.dtype.element_ty), mask=mask)
