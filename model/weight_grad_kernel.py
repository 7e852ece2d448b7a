"""Grouped weight gradient that adds into an existing gradient: out[e] += a[rows_e]^T b[rows_e].

Why: the expert-parallel layer runs each rank's experts twice a step (the rows other ranks
sent, then the rank's own), so every expert weight gets two gradients. `torch._grouped_mm` has
no accumulate and no `out=`, so the second gradient was a fresh [E, K, N] tensor and autograd
added the two: at V2-Lite's shape, 16k tokens per GPU, 0.55-0.66 ms of pure memory traffic a
step (benchmarks/RESULTS.md). Here the sum happens in the GEMM's epilogue: each output tile is
read once, added to the fp32 accumulator and written once.

GPU with Triton only; the caller keeps `torch._grouped_mm` plus an add elsewhere.
"""

from __future__ import annotations

import torch

from model.swiglu_kernels import HAVE_TRITON

if HAVE_TRITON:
    import triton
    import triton.language as tl


def accumulate_weight_grad(out_EKN: torch.Tensor, a_MK: torch.Tensor, b_MN: torch.Tensor,
                           group_ends: torch.Tensor) -> torch.Tensor:
    """out[e] += a[rows_e]^T @ b[rows_e] in place, rows_e = [group_ends[e-1], group_ends[e]); bf16
    operands, fp32 accumulation, one kernel. Returns out."""
    E, K, N = out_EKN.shape
    if not (a_MK.is_contiguous() and b_MN.is_contiguous() and out_EKN.is_contiguous()):
        raise ValueError("accumulate_weight_grad needs contiguous operands")
    if E == 0 or K == 0 or N == 0:
        return out_EKN
    grid = lambda meta: (triton.cdiv(K, meta["BLOCK_K"]) * triton.cdiv(N, meta["BLOCK_N"]), E)
    _weight_grad_kernel[grid](a_MK, b_MN, out_EKN, group_ends, K, N)
    return out_EKN


if HAVE_TRITON:
    _CONFIGS = [triton.Config({"BLOCK_K": bk, "BLOCK_N": bn, "BLOCK_M": bm}, num_warps=w, num_stages=s)
                for bk, bn, bm, w, s in ((128, 128, 64, 8, 4), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3),
                                         (128, 128, 64, 4, 4), (128, 128, 32, 4, 5))]

    @triton.autotune(configs=_CONFIGS, key=["K", "N"], reset_to_zero=[], restore_value=["out_ptr"])
    @triton.jit
    def _weight_grad_kernel(a_ptr, b_ptr, out_ptr, ends_ptr, K, N,
                            BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
        tile, e = tl.program_id(0), tl.program_id(1)
        tiles_n = tl.cdiv(N, BLOCK_N)
        k0, n0 = (tile // tiles_n) * BLOCK_K, (tile % tiles_n) * BLOCK_N
        start = tl.load(ends_ptr + e - 1, mask=e > 0, other=0).to(tl.int64)
        stop = tl.load(ends_ptr + e).to(tl.int64)
        offs_k = k0 + tl.arange(0, BLOCK_K)
        offs_n = n0 + tl.arange(0, BLOCK_N)
        in_k, in_n = offs_k < K, offs_n < N
        acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
        for m0 in range(start, stop, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            in_rows = rows < stop
            a_t = tl.load(a_ptr + rows[None, :] * K + offs_k[:, None], mask=in_rows[None, :] & in_k[:, None], other=0.0)
            b = tl.load(b_ptr + rows[:, None] * N + offs_n[None, :], mask=in_rows[:, None] & in_n[None, :], other=0.0)
            acc = tl.dot(a_t, b, acc)
        where = out_ptr + e.to(tl.int64) * K * N + offs_k[:, None] * N + offs_n[None, :]
        keep = in_k[:, None] & in_n[None, :]
        acc += tl.load(where, mask=keep, other=0.0).to(tl.float32)
        tl.store(where, acc.to(out_ptr.dtype.element_ty), mask=keep)
