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
- `model/weight_grad_kernel.py`'s Triton grouped GEMM that adds into the first call's gradients
  in its epilogue (3 kernels, no add).

And, for the gate and up projections as one [E, D, 2F] weight (one product each way instead of
two, no add of the two input-gradient products): forward x W, input gradient dH W^T and weight
gradient x^T dH, split (what the layer runs now, with the add) against fused.

It checks that the accumulating variants agree. Run: python3 benchmarks/weight_grad_accumulate_probe.py
"""

from __future__ import annotations

import argparse
import json

import torch

from model.weight_grad_kernel import accumulate_weight_grad

EXPERTS, DIM, WIDTH = 32, 2048, 1408


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
