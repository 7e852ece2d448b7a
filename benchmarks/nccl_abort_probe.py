"""Can a process abort a NCCL communicator whose peer died, and go on in a new group? (2 GPUs, no Ray)

Why: a shard that dies while the router replays decode steps as CUDA graphs leaves the router
waiting without end (docs/design-notes-7-ep-overlap.md, "Failover while decode steps replay").
The first run of this probe (H200s, NCCL 2.27) showed that an abort issued from a second thread
does end a blocked host read behind a replayed all-to-all whose peer died, but an abort issued
while the graph still exists did not return within 45 s, where the same abort of an eager
all-to-all returned in 0.5 s. The hypothesis: NCCL keeps a communicator's resources alive for
every CUDA graph that captured its work (freed when the graph is destroyed), and the abort waits
for them. This run separates it, with moray's own `leave_group` and `join_group`:

- `eager`: the all-to-all launched eagerly (control);
- `graph-kept`: replayed from a graph that stays alive through the abort;
- `graph-dropped-after`: the graph is destroyed once the blocked read returns, while the abort
  (issued from a second thread, as a watchdog would) is still in progress;
- `graph-dropped-first`: the waiting thread polls, destroys the graph, then aborts itself.

Each scenario: ranks 0 and 1 form a group (one good all-to-all, and a capture and replay); rank 1
exits; rank 0 launches one more all-to-all and, after 2 s, leaves the group (abort). If the abort
returns, rank 0 joins a new group with a replacement rank 1 and checks one all-to-all in it.
One JSON line per scenario: when the read ended, when the abort returned, whether the new group
worked, or that rank 0 hung.

Run: python3 benchmarks/nccl_abort_probe.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import torch
import torch.distributed as dist

from actors.transport import GroupSpec, join_group, leave_group

SCENARIOS = ("eager", "graph-kept", "graph-dropped-after", "graph-dropped-first")
ABORT_AFTER_S, ABORT_WAIT_S, HANG_S = 2.0, 15.0, 60.0


def _spec(port: int) -> GroupSpec:
    return GroupSpec("127.0.0.1", port, 2, "nccl", 60.0, generation=port)


def _join(rank: int, port: int) -> None:
    store = dist.TCPStore("127.0.0.1", port, 2, is_master=True, wait_for_workers=False) if rank == 0 else None
    join_group(_spec(port), rank, store)
    if store is not None:
        _join.store = store  # the store must outlive the group


def _all_to_all_ok(rank: int) -> bool:
    x = torch.full((2, 1024), float(rank + 1), device="cuda")
    y = torch.empty_like(x)
    dist.all_to_all_single(y, x)
    return y[0].eq(1).all().item() and y[1].eq(2).all().item()


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


def _leave(result: dict, t0: float) -> None:
    result["abort_called_s"] = round(time.time() - t0, 2)
    try:
        leave_group()
        result["abort_returned_s"] = round(time.time() - t0, 2)
    except Exception as exc:  # reported, not raised: the probe's answer
        result["abort_error"] = repr(exc)[:200]


def run_survivor(scenario: str, port: int, new_port: int) -> None:
    torch.cuda.set_device(0)
    _join(0, port)
    x, y = torch.ones(2, 1024, device="cuda"), torch.empty(2, 1024, device="cuda")
    dist.all_to_all_single(y, x)
    graph = None if scenario == "eager" else _captured_all_to_all(y, x)
    dist.barrier(device_ids=[0])
    torch.cuda.synchronize()
    time.sleep(1.5)  # rank 1 is gone by now
    t0, result = time.time(), {"scenario": scenario, "nccl": ".".join(map(str, torch.cuda.nccl.version()))}
    graph.replay() if graph is not None else dist.all_to_all_single(y, x)
    if scenario == "graph-dropped-first":
        done = torch.cuda.Event()
        done.record()
        time.sleep(ABORT_AFTER_S)
        result["done_before_abort"] = done.query()
        graph.reset()
        graph = None
        _leave(result, t0)
    else:
        aborter = threading.Timer(ABORT_AFTER_S, _leave, (result, t0))
        aborter.start()
        try:
            y.sum().cpu()
        except Exception as exc:
            result["read_error"] = repr(exc)[:200]
        result["read_ended_s"] = round(time.time() - t0, 2)
        if scenario == "graph-dropped-after":
            graph.reset()
            graph = None
        aborter.join(timeout=ABORT_WAIT_S)
    if "abort_returned_s" in result:
        t1 = time.time()
        _join(0, new_port)
        result["new_group_ok"] = _all_to_all_ok(0)
        result["new_group_s"] = round(time.time() - t1, 2)
    print(json.dumps(result), flush=True)
    os._exit(0)  # the old group may be in any state: no teardown to hang in


def run_peer(rank_role: str, port: int) -> None:
    torch.cuda.set_device(1)
    _join(1, port)
    if rank_role == "replacement":
        _all_to_all_ok(1)
        return
    x, y = torch.ones(2, 1024, device="cuda"), torch.empty(2, 1024, device="cuda")
    dist.all_to_all_single(y, x)
    if os.environ["SCENARIO"] != "eager":
        _captured_all_to_all(y, x)
    dist.barrier(device_ids=[1])
    torch.cuda.synchronize()
    os._exit(0)  # dies without leaving the group, like a killed shard


def main() -> None:
    for i, scenario in enumerate(SCENARIOS):
        port, new_port = 29600 + 2 * i, 29601 + 2 * i
        env = dict(os.environ, SCENARIO=scenario)
        procs = [subprocess.Popen([sys.executable, __file__, "survivor", scenario, str(port), str(new_port)], env=env),
                 subprocess.Popen([sys.executable, __file__, "peer", "dying", str(port)], env=env),
                 subprocess.Popen([sys.executable, __file__, "peer", "replacement", str(new_port)], env=env)]
        try:
            procs[0].wait(timeout=HANG_S)
        except subprocess.TimeoutExpired:
            print(json.dumps({"scenario": scenario, "hung": f"rank 0 still waiting after {HANG_S:.0f} s"}), flush=True)
        for proc in procs:
            proc.kill()


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "survivor":
        run_survivor(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    elif len(sys.argv) > 1 and sys.argv[1] == "peer":
        run_peer(sys.argv[2], int(sys.argv[3]))
    else:
        main()
