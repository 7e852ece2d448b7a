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
  with beta = 1, at the price of 96 small GEMMs instead of 3 grouped ones).

It checks that the two accumulating variants agree. Run: python3 benchmarks/weight_grad_accumulate_probe.py
"""

from __future__ import annotations

import argparse
import json

import torch

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

    start = [t.clone() for t in first]
    grouped_then_add()
    added = [t.clone() for t in first]
    for t, s in zip(first, start):
        t.copy_(s)
    addmm_per_expert()
    differs = max(float((a.float() - b.float()).abs().max() / b.float().abs().max()) for a, b in zip(first, added))
    return {"rows": rows, "grouped_ms": _timed(grouped), "grouped_then_add_ms": _timed(grouped_then_add),
            "addmm_per_expert_ms": _timed(addmm_per_expert), "max_rel_difference": differs,
            "device": torch.cuda.get_device_name()}


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
