"""Should the router drive its shards' steps through a Ray compiled graph? (CPU, no GPU needed)

Why: every forward step of a sharded model makes one Ray actor call per shard (`run_step`,
actors/router.py), and a decode step of the sharded `small` model takes 0.8-1.3 ms longer than
the one-process step (benchmarks/RESULTS.md). Ray's compiled graphs promise under 50 us per
call instead of about 1 ms. This probe measures, for actors shaped like `ExpertShard` (the same
concurrency groups, a `vigil` call kept open in its own group, as the router keeps one):

- the round trip of one step's calls to every shard: `.remote()` + `ray.get`, and a compiled
  graph's `execute` + `ray.get` (with `None` as the argument too, as exact-count steps pass);
- the CPU time each shard process and the caller use while the compiled graph waits idle (a
  served model waits between requests);
- what a killed shard does to the next execution, and how long `teardown` takes then.

Run: python3 benchmarks/compiled_graph_probe.py [--shards 2] [--idle-s 5]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import psutil
import ray
from ray.dag import InputNode, MultiOutputNode


@ray.remote(concurrency_groups={"load": 1, "info": 1, "vigil": 2})
class StepActor:
    """A stand-in for ExpertShard: what matters here is the call path, not the step's work."""

    def __init__(self):
        self.steps = 0

    def run_step(self, rows_per_shard: int | None) -> None:
        self.steps += 1

    @ray.method(concurrency_group="info")
    def pid(self) -> int:
        return os.getpid()

    @ray.method(concurrency_group="vigil")
    def vigil(self, seconds: float) -> None:
        time.sleep(seconds)


def _per_call_us(fn, n: int = 300) -> float:
    for _ in range(20):
        fn()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1e6


def _cpu_s(processes: list[psutil.Process]) -> list[float]:
    return [sum(p.cpu_times()[:2]) for p in processes]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--idle-s", type=float, default=5.0)
    args = parser.parse_args()
    ray.init(num_cpus=args.shards + 2, include_dashboard=False)
    shards = [StepActor.remote() for _ in range(args.shards)]
    pids = ray.get([s.pid.remote() for s in shards])
    vigils = [s.vigil.remote(120) for s in shards]  # noqa: F841 (kept open, as the router keeps them)
    row: dict = {"shards": args.shards, "cpus": os.cpu_count(), "ray": ray.__version__}
    row["remote_get_us"] = _per_call_us(lambda: ray.get([s.run_step.remote(8) for s in shards]))
    with InputNode() as rows:
        graph = MultiOutputNode([s.run_step.bind(rows) for s in shards]).experimental_compile()
    row["compiled_us"] = _per_call_us(lambda: ray.get(graph.execute(8)))
    row["compiled_none_argument"] = ray.get(graph.execute(None)) == [None] * args.shards
    processes = [psutil.Process(p) for p in pids] + [psutil.Process()]
    before = _cpu_s(processes)
    time.sleep(args.idle_s)
    used = [after - b for after, b in zip(_cpu_s(processes), before)]
    row["idle_cpu_fraction_per_shard"] = [round(u / args.idle_s, 3) for u in used[:-1]]
    row["idle_cpu_fraction_caller"] = round(used[-1] / args.idle_s, 3)
    ray.kill(shards[-1], no_restart=True)
    start = time.perf_counter()
    try:
        ray.get(graph.execute(8), timeout=30)
        row["after_kill"] = "answered"
    except Exception as exc:  # what the caller sees is the finding
        row["after_kill"] = type(exc).__name__
    row["after_kill_s"] = round(time.perf_counter() - start, 3)
    start = time.perf_counter()
    graph.teardown()
    row["teardown_s"] = round(time.perf_counter() - start, 3)
    print(json.dumps(row))
    ray.shutdown()


if __name__ == "__main__":
    main()
