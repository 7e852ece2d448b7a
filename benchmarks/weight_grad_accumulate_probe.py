"""Adding a second expert call's weight gradients to the first's: what does the add cost? (1 GPU)

Why: the expert-parallel layer computes each rank's experts in two calls (the rows other ranks
sent, then the rank's own rows, `train/expert_parallel.py`), so every expert weight gets two
gradients that autograd adds up: 0.55 ms at 16k tokens per GPU, work the one-GPU layer does not
do (benchmarks/RESULTS.md). This probe times, at V2-Lite's shape (32 local experts, hidden 2048,
expert width 1408), for the second call's rows:

- the three weight-gradient grouped GEMMs alone (`torch._grouped_mm`, what the layer runs now,
  without the add);
- the same GEMMs and the add into the first call's gradients (what the layer pays now);
- one `addmm_` per expert and kind into the first call's gradients (the add folded into cuBLAS
  with beta = 1, at the price of 96 small GEMMs instead of 3 grouped ones);
- a Triton grouped GEMM (below) that adds into the first call's gradients in its epilogue (3
  kernels, no add). In the layer it saved nothing measurable (benchmarks/RESULTS.md), so it
  lives here, not in model/ (branch `ep-weight-grad-accumulate` has it wired into the layer).

And, for the gate and up projections as one [E, D, 2F] weight (one product each way instead of
two, no add of the two input-gradient products): forward x W, input gradient dH W^T and weight
gradient x^T dH, split (what the layer runs now, with the add) against fused.

It checks that the accumulating variants agree. Run: python3 benchmarks/weight_grad_accumulate_probe.py
"""

from __future__ import annotations

import argparse
import json

import torch
import triton
import triton.language as tl

EXPERTS, DIM, WIDTH = 32, 2048, 1408


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


def _timed(fn, iters: int = 20) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def measure(rows: int) -> dict:
    counts = torch.bincount(torch.randint(0, EXPERTS, (rows,)), minlength=EXPERTS)
    host, offsets = counts.tolist(), torch.cumsum(counts, 0, dtype=torch.int32).cuda()

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16)

    x, d_gate, h, d_out = randn(rows, DIM), randn(rows, WIDTH), randn(rows, WIDTH), randn(rows, DIM)
    products = [(x, d_gate), (x, d_gate), (h, d_out)]  # w_gate, w_up (same shapes), w_down
    first = [randn(EXPERTS, DIM, WIDTH), randn(EXPERTS, DIM, WIDTH), randn(EXPERTS, WIDTH, DIM)]

    def grouped() -> list[torch.Tensor]:
        return [torch._grouped_mm(a.t(), b, offs=offsets) for a, b in products]

    def grouped_then_add() -> None:
        for total, grad in zip(first, grouped()):
            total.add_(grad)

    def addmm_per_expert() -> None:
        for total, (a, b) in zip(first, products):
            for grad, a_t, b_e in zip(total.unbind(0), a.t().split(host, 1), b.split(host)):
                grad.addmm_(a_t, b_e)

    def triton_accumulate() -> None:
        for total, (a, b) in zip(first, products):
            accumulate_weight_grad(total, a, b, offsets)

    start = [t.clone() for t in first]
    grouped_then_add()
    added = [t.clone() for t in first]
    differs = {}
    for name, variant in (("addmm_per_expert", addmm_per_expert), ("triton", triton_accumulate)):
        for t, s in zip(first, start):
            t.copy_(s)
        variant()
        differs[name] = max(float((a.float() - b.float()).abs().max() / b.float().abs().max())
                            for a, b in zip(first, added))
    return {"rows": rows, "grouped_ms": _timed(grouped), "grouped_then_add_ms": _timed(grouped_then_add),
            "addmm_per_expert_ms": _timed(addmm_per_expert), "triton_accumulate_ms": _timed(triton_accumulate),
            "max_rel_difference": differs, **measure_fused_gate_up(x, offsets, randn),
            "device": torch.cuda.get_device_name()}


def measure_fused_gate_up(x: torch.Tensor, offsets: torch.Tensor, randn) -> dict:
    """The gate and up products split (two [E, D, F] weights) against fused (one [E, D, 2F])."""
    rows = x.shape[0]
    w_gate, w_up, w_fused = randn(EXPERTS, DIM, WIDTH), randn(EXPERTS, DIM, WIDTH), randn(EXPERTS, DIM, 2 * WIDTH)
    dh = randn(rows, 2 * WIDTH)
    dg, du = dh[:, :WIDTH].contiguous(), dh[:, WIDTH:].contiguous()
    grouped = torch._grouped_mm
    times = {
        "forward_split_ms": lambda: (grouped(x, w_gate, offs=offsets), grouped(x, w_up, offs=offsets)),
        "forward_fused_ms": lambda: grouped(x, w_fused, offs=offsets),
        "input_grad_split_ms": lambda: grouped(dg, w_gate.transpose(-2, -1), offs=offsets).add_(
            grouped(du, w_up.transpose(-2, -1), offs=offsets)),
        "input_grad_fused_ms": lambda: grouped(dh, w_fused.transpose(-2, -1), offs=offsets),
        "weight_grad_split_ms": lambda: (grouped(x.t(), dg, offs=offsets), grouped(x.t(), du, offs=offsets)),
        "weight_grad_fused_ms": lambda: grouped(x.t(), dh, offs=offsets),
    }
    return {name: _timed(fn) for name, fn in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[24576, 49152],
                        help="the second call's rows (49,152: a rank's own rows at 16k tokens, top-6, 2 ranks)")
    args = parser.parse_args()
    torch.manual_seed(0)
    for rows in args.rows:
        print(json.dumps(measure(rows)))


if __name__ == "__main__":
    main()
