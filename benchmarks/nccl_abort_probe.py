"""Does aborting a NCCL communicator end an all-to-all whose peer died? (2 GPUs, no Ray)

Why: a shard that dies while the router replays decode steps as CUDA graphs leaves the router
waiting without end (docs/design-notes-7-ep-overlap.md, "Failover while decode steps replay"),
and the router's abort of its communicator did not return in one GPU run. This separates the
factors: the collective eager or replayed from a graph, and the waiting thread blocked in a host
read (the abort then comes from a second thread) or polling an event (it aborts itself).

Each scenario: ranks 0 and 1 form a NCCL group and do one good all-to-all (and capture and
replay one graph); rank 1 exits; rank 0 starts one more all-to-all and, after 2 s, aborts.
One JSON line per scenario: when the abort returned, when the wait ended, or that rank 0 hung.

Run: python3 benchmarks/nccl_abort_probe.py
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import threading
import time

import torch
import torch.distributed as dist

SCENARIOS = [(mode, wait) for mode in ("eager", "graph") for wait in ("blocking", "polling")]
ABORT_AFTER_S = 2.0


def _form_group(rank: int, port: int) -> None:
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=300), device_id=torch.device("cuda", rank))


def _captured_all_to_all(y: torch.Tensor, x: torch.Tensor) -> torch.cuda.CUDAGraph:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the graph, as PyTorch asks
        dist.all_to_all_single(y, x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        dist.all_to_all_single(y, x)
    graph.replay()
    return graph


def _abort(result: dict, t0: float) -> None:
    result["abort_called_s"] = round(time.time() - t0, 2)
    try:
        dist.distributed_c10d._get_default_group().abort()
        result["abort_returned_s"] = round(time.time() - t0, 2)
    except Exception as exc:  # reported, not raised: the probe's answer
        result["abort_error"] = repr(exc)[:200]


def _wait_blocking(y: torch.Tensor, result: dict, t0: float) -> None:
    threading.Timer(ABORT_AFTER_S, _abort, (result, t0)).start()
    try:
        y.sum().cpu()
    except Exception as exc:
        result["wait_error"] = repr(exc)[:200]
    result["wait_ended_s"] = round(time.time() - t0, 2)


def _wait_polling(result: dict, t0: float) -> None:
    done = torch.cuda.Event()
    done.record()
    while not done.query() and time.time() - t0 < ABORT_AFTER_S:
        time.sleep(0.001)
    result["done_before_abort"] = done.query()
    _abort(result, t0)
    while time.time() - t0 < ABORT_AFTER_S + 20:
        try:
            if done.query():
                break
        except Exception as exc:
            result["wait_error"] = repr(exc)[:200]
            break
        time.sleep(0.01)
    result["wait_ended_s"] = round(time.time() - t0, 2)


def run_rank(rank: int, mode: str, wait: str, port: int) -> None:
    _form_group(rank, port)
    x = torch.ones(2, 1024, device="cuda")
    y = torch.empty_like(x)
    dist.all_to_all_single(y, x)
    graph = _captured_all_to_all(y, x) if mode == "graph" else None
    dist.barrier(device_ids=[rank])
    torch.cuda.synchronize()
    if rank == 1:
        os._exit(0)  # dies without leaving the group, like a killed shard
    time.sleep(1.0)
    t0, result = time.time(), {"mode": mode, "wait": wait}
    if graph is None:
        dist.all_to_all_single(y, x)
    else:
        graph.replay()
    if wait == "blocking":
        _wait_blocking(y, result, t0)
    else:
        _wait_polling(result, t0)
    print(json.dumps(result), flush=True)
    os._exit(0)  # the group may be in any state: no teardown to hang in


def main() -> None:
    for i, (mode, wait) in enumerate(SCENARIOS):
        ranks = [subprocess.Popen([sys.executable, __file__, str(r), mode, wait, str(29600 + i)]) for r in (0, 1)]
        try:
            ranks[0].wait(timeout=45)
        except subprocess.TimeoutExpired:
            print(json.dumps({"mode": mode, "wait": wait, "hung": "rank 0 still waiting after 45 s"}), flush=True)
        for proc in ranks:
            proc.kill()


if __name__ == "__main__":
    if len(sys.argv) == 5:
        run_rank(int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        main()
