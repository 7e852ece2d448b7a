"""Would the expert-parallel exchange gain from copy engines instead of NCCL's kernels? (2 GPUs, no Ray)

Why: in the expert-parallel layer (`benchmarks/ep_layer.py`) a grouped GEMM running beside a
NCCL all-to-all takes up to twice as long, so an overlapped exchange hides only about half its
time (benchmarks/RESULTS.md). A peer copy into symmetric memory (`torch.distributed.
_symmetric_memory`) moves the rows on the copy engines, with no kernel of its own but a short
barrier, the way vLLM's copy-engine transport and NCCL's zero-CTA path do. This probe measures,
for the bytes one rank sends the other at 16k tokens (V2-Lite: 49,152 rows of 2,048 bf16):

- each exchange alone: NCCL `all_to_all_single`, and a peer copy plus barrier;
- a dense bf16 GEMM loop alone, and beside each exchange (the exchange on a side stream): how
  long each took, the window both took together, and what the overlap saved against running
  them one after the other;
- whether symmetric memory works where each process sees only its own GPU, as Ray gives an
  actor with `num_gpus=1` (`--visible one`), or needs both visible (`--visible all`).

Run: python3 benchmarks/copy_engine_probe.py [--visible all|one]
"""

from __future__ import annotations

import argparse
import json
import os

import torch.multiprocessing as mp

ROWS, DIM = 49152, 2048
GEMMS, EXCHANGES = 20, 6  # the GEMM loop and the exchanges beside it take about as long each


def _worker(rank: int, visible: str, port: int, out) -> None:
    if visible == "one":
        os.environ["CUDA_VISIBLE_DEVICES"] = str(rank)  # before CUDA starts in this process
    import torch
    import torch.distributed as dist
    import torch.distributed._symmetric_memory as symm_mem

    device = torch.device("cuda", 0 if visible == "one" else rank)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            device_id=device)
    result: dict = {"rank": rank, "visible": visible}
    try:
        rows = torch.randn(ROWS, DIM, device=device, dtype=torch.bfloat16)
        received = torch.empty_like(rows)
        a, b = (torch.randn(8192, 8192, device=device, dtype=torch.bfloat16) for _ in range(2))
        splits = [0, ROWS] if rank == 0 else [ROWS, 0]  # all rows to the other rank, all of its to me
        try:
            buffer = symm_mem.empty(ROWS, DIM, dtype=torch.bfloat16, device=device)
            handle = symm_mem.rendezvous(buffer, dist.group.WORLD.group_name)
        except RuntimeError as exc:
            result["symmetric_memory"] = f"failed: {exc}"
            return
        peer = handle.get_buffer(1 - rank, (ROWS, DIM), torch.bfloat16)

        def nccl() -> None:
            dist.all_to_all_single(received, rows, splits, splits)

        def copy_engine() -> None:
            peer.copy_(rows)
            handle.barrier(channel=0)  # the peer's rows are in my buffer once it returns on the device

        def gemm() -> None:
            a @ b

        def timed(fn, n: int) -> float:
            fn()
            torch.cuda.synchronize()
            dist.barrier()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(n):
                fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end)

        def beside(exchange) -> dict:
            torch.cuda.synchronize()
            dist.barrier()
            side = torch.cuda.Stream()
            events = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
            events[0].record()
            side.wait_event(events[0])
            with torch.cuda.stream(side):
                for _ in range(EXCHANGES):
                    exchange()
                events[1].record(side)
            for _ in range(GEMMS):
                gemm()
            events[2].record()
            torch.cuda.current_stream().wait_stream(side)
            events[3].record()
            torch.cuda.synchronize()
            return {"exchanges_ms": events[0].elapsed_time(events[1]), "gemms_ms": events[0].elapsed_time(events[2]),
                    "window_ms": events[0].elapsed_time(events[3])}

        copy_engine()
        torch.cuda.synchronize()
        nccl()
        result["copy_equals_nccl"] = bool(torch.equal(buffer, received))  # both hold the peer's rows
        alone = {"gemms_ms": timed(gemm, GEMMS), "nccl_ms": timed(nccl, EXCHANGES),
                 "copy_engine_ms": timed(copy_engine, EXCHANGES)}
        result["alone"] = alone
        for name, exchange in (("nccl", nccl), ("copy_engine", copy_engine)):
            row = beside(exchange)
            row["saved_ms"] = alone["gemms_ms"] + alone[f"{name}_ms"] - row["window_ms"]
            result[f"beside_{name}"] = row
        result["symmetric_memory"] = "ok"
    finally:
        out[rank] = result
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--visible", choices=["all", "one"], default="all",
                        help="GPUs each process sees: both, or only its own (as a Ray actor)")
    parser.add_argument("--port", type=int, default=29533)
    args = parser.parse_args()
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(args.visible, args.port, results), nprocs=2, join=True)
    for rank in sorted(results):
        print(json.dumps(results[rank]))


if __name__ == "__main__":
    main()
