"""Elastic experts under load: how long scale-out, scale-in, rebalance and recovery from a killed
shard take, and what they do to the latency of the requests in flight.

Concurrent clients send greedy requests (bounded: until told to stop, at most 10,000 each)
straight to the router of a `ShardedModel`. The model's routing is skewed on purpose (a few hot
experts get a selection bias), so the contiguous placement starts unbalanced. Phases:
steady (contiguous) -> rebalance (replicas of the hot experts) -> steady -> scale out to
--scale-to shards -> scale in back -> kill a shard (failover). For each event: its duration
(`duration_s` of the event; for the kill, from the kill to the end of the failover), and
p50/p99 latency of the requests that overlapped it versus the steady phase before it. Every
answer must equal the first answer for its prompt (and, on CPU, the single-process model's).

`--failover-timeout-s` bounds the kill phase: a failover not done by then stops the run, which
still prints and writes its rows so far (meta "stopped_by" says why) and exits non-zero.

Runs on CPU (gloo) and on GPU (--use-gpu: one GPU per router and per shard, NCCL; scaling to
--scale-to shards needs scale_to + 1 GPUs, so on 2 GPUs use --shards 1 --scale-to 1, which
skips the scale events).

Run: python benchmarks/elastic.py --preset tiny
     python benchmarks/elastic.py --preset tiny model.moe.moe_inter_dim=2048 --prompt-len 64   # expert-bound
     python benchmarks/elastic.py --preset small --use-gpu --shards 1 --scale-to 1
     python benchmarks/elastic.py --preset tiny --standby-shards 1   # failover and scale-out take a standby
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import tempfile
import threading
import time
from pathlib import Path

import ray
import torch

from cluster.config import load_config
from cluster.sharded import ShardedModel
from model.checkpoint import save_checkpoint
from model.generate import SamplingParams, generate
from model.transformer import Transformer


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] if ordered else float("nan")


class Clients:
    """Client threads; each request is recorded as (start, end, prompt index, output)."""

    def __init__(self, model: ShardedModel, prompts: list[list[int]], params: SamplingParams, n: int):
        self.model, self.prompts, self.params = model, prompts, params
        self.done: list[tuple[float, float, int, list[int]]] = []
        self.errors: list[str] = []
        self.in_flight: dict[int, float] = {}  # client -> start of its unanswered request
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(n)]
        for t in self.threads:
            t.start()

    def _run(self, index: int) -> None:
        for n in range(10_000):
            if self.stop.is_set():
                return
            p = (index + n) % len(self.prompts)
            start = self.in_flight[index] = time.perf_counter()
            try:
                out = self.model.generate([self.prompts[p]], self.params)[0]
                self.done.append((start, time.perf_counter(), p, out))
            except Exception as exc:  # counted and reported, never hidden
                self.errors.append(str(exc).splitlines()[0][:200])
            finally:
                del self.in_flight[index]

    def wait_answered(self, before: float, limit_s: float = 120.0) -> None:
        """Until every request started before `before` is answered (or failed), so an event's
        latency row includes the requests it held up, however long they took."""
        deadline = time.perf_counter() + limit_s
        while any(start <= before for start in list(self.in_flight.values())) and time.perf_counter() < deadline:
            time.sleep(0.05)

    def window(self, t0: float, t1: float) -> list[float]:
        """Latencies of requests that overlapped [t0, t1]."""
        return [end - start for start, end, _, _ in self.done if start <= t1 and end >= t0]

    def tokens_per_s(self, t0: float, t1: float) -> float:
        return sum(len(out) for start, end, _, out in self.done if start >= t0 and end <= t1) / (t1 - t0)

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=600)


def skewed_checkpoint(preset: str, overrides: list[str], hot: int, bias: float, path: Path, seed: int = 0):
    cfg = load_config(preset, overrides).model
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for moe in model.moe_layers():
            moe.expert_bias[:hot] += bias  # the first experts are hot: all on shard 0 when contiguous
    return cfg, model, save_checkpoint(path, cfg, model.state_dict())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("overrides", nargs="*", help="model dotlist overrides, e.g. model.moe.moe_inter_dim=1024")
    parser.add_argument("--prompt-len", type=int, default=12, help="mean prompt length (prefill rows per request)")
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--scale-to", type=int, default=3)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--steady-s", type=float, default=15.0)
    parser.add_argument("--hot", type=int, default=2, help="hot experts (selection bias raised)")
    parser.add_argument("--bias", type=float, default=0.5)
    parser.add_argument("--use-gpu", action="store_true")
    parser.add_argument("--standby-shards", type=int, default=0,
                        help="shards kept started without experts (each takes a GPU or CPU of its own)")
    parser.add_argument("--failover-timeout-s", type=float, default=300.0,
                        help="a failover not done by then stops the run (its rows so far are still written)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="moray-elastic-"))
    cfg, reference, ckpt = skewed_checkpoint(args.preset, args.overrides, args.hot, args.bias, work / "ckpt")
    gen = torch.Generator().manual_seed(1)
    lengths = [max(1, round(args.prompt_len * f)) for f in (0.4, 0.9, 0.7, 1.3, 0.25, 0.75, 1.5, 1.2)]
    prompts = [torch.randint(3, cfg.vocab_size, (n,), generator=gen).tolist() for n in lengths]
    params = SamplingParams(max_new_tokens=args.max_tokens, temperature=0.0)
    expected = None if args.use_gpu else generate(reference, prompts, params)
    ray.init(address="local", num_cpus=max(8, args.scale_to + 3), include_dashboard=False)
    elastic = {"redundant_experts": args.hot * args.shards, "start_timeout_s": 300,
               "standby_shards": args.standby_shards}
    model = ShardedModel.create(str(ckpt), num_shards=args.shards, use_gpu=args.use_gpu, elastic=elastic)
    model.generate(prompts[:1], params)  # warm up
    deadline = time.time() + 300  # the standby shards start in the background: wait for them (bounded)
    while len(model.elastic_status()["standby"]) < args.standby_shards and time.time() < deadline:
        time.sleep(0.5)
    clients = Clients(model, prompts, params, args.clients)
    rows, marks = [], {}

    def steady(name: str) -> tuple[float, float]:
        t0 = time.perf_counter()
        time.sleep(args.steady_s)
        t1 = time.perf_counter()
        marks[name] = (t0, t1)
        lat = clients.window(t0, t1)
        imbalance = model.elastic_status()["imbalance"]
        rows.append({"phase": name, "duration_s": None, "requests": len(lat), "p50_s": statistics.median(lat),
                     "p99_s": percentile(lat, 0.99), "tokens_per_s": clients.tokens_per_s(t0, t1),
                     "imbalance": imbalance})
        print(json.dumps(rows[-1]), flush=True)  # as it comes: a run cut short still reports its phases
        return t0, t1

    def event(name: str, action, baseline: str) -> None:
        t0 = time.perf_counter()
        duration, message = action()
        t1 = time.perf_counter()
        clients.wait_answered(t1)
        lat = clients.window(t0, t1)
        base = rows[[r["phase"] for r in rows].index(baseline)]
        rows.append({"phase": name, "duration_s": duration, "requests": len(lat),
                     "p50_s": statistics.median(lat) if lat else float("nan"), "p99_s": percentile(lat, 0.99),
                     "p99_vs_steady": percentile(lat, 0.99) / base["p99_s"], "tokens_per_s": None,
                     "imbalance": model.elastic_status()["imbalance"], "message": message})
        print(json.dumps(rows[-1]), flush=True)

    def checked(result: dict) -> tuple[float, str]:
        """The event's duration and its message (a failover's says where its time went)."""
        if not result["ok"]:
            raise RuntimeError(f"{result['action']} failed: {result['message']}")
        return result["duration_s"], result["message"]

    def kill_and_recover() -> tuple[float, str]:
        """From the kill to the end of the failover (wall clock: events carry time.time())."""
        killed = time.time()
        ray.kill(model.shard_handles()[0], no_restart=True)
        while not any(e["action"] == "failover" for e in model.elastic_status()["events"]):
            if time.time() - killed > args.failover_timeout_s:
                raise RuntimeError(f"no failover within {args.failover_timeout_s:.0f} s")
            time.sleep(0.05)
        failover = [e for e in model.elastic_status()["events"] if e["action"] == "failover"][-1]
        return failover["time"] + failover["duration_s"] - killed, checked(failover)[1]

    error = None
    try:
        steady("steady, contiguous")
        event("rebalance (replicas)", lambda: checked(model.rebalance()), "steady, contiguous")
        steady("steady, rebalanced")
        if args.scale_to != args.shards:
            event(f"scale out {args.shards}->{args.scale_to}", lambda: checked(model.scale_shards(args.scale_to)),
                  "steady, rebalanced")
            steady(f"steady, {args.scale_to} shards")
            event(f"scale in {args.scale_to}->{args.shards}", lambda: checked(model.scale_shards(args.shards)),
                  f"steady, {args.scale_to} shards")
            steady(f"steady, {args.shards} shards again")
        event("kill a shard (failover)", kill_and_recover, rows[-1]["phase"])
    except Exception as exc:  # a run cut short still reports what it measured, then fails
        error = str(exc).splitlines()[0][:300]
        print(f"run stopped: {error}", flush=True)
    finally:
        if error is None:
            clients.close()
            model.shutdown()
        else:  # the router may be stuck: its shutdown times out and kills it, then the clients' calls end
            try:
                model.shutdown()
            except Exception as exc:
                print(f"shutdown: {str(exc).splitlines()[0][:200]}", flush=True)
            clients.close()

    answers: dict[int, list[int]] = {}
    mismatches = 0
    for _, _, p, out in clients.done:
        want = expected[p] if expected is not None else answers.setdefault(p, out)
        mismatches += out != want
    meta = {"date": datetime.date.today().isoformat(), "machine": f"{platform.node()} ({torch.get_num_threads()} torch "
            f"threads{', ' + torch.cuda.get_device_name() if args.use_gpu else ''})", "preset": args.preset,
            "overrides": args.overrides, "prompt_len": args.prompt_len, "shards": args.shards, "scale_to": args.scale_to,
            "standby_shards": args.standby_shards, "clients": args.clients, "max_tokens": args.max_tokens,
            "hot_experts": args.hot, "requests": len(clients.done), "errors": len(clients.errors),
            "answers_differing": mismatches, "compared_with": "single-process model" if expected else "first answer",
            "stopped_by": error}
    print(json.dumps(meta))
    print(f"{'phase':>28} {'event s':>8} {'reqs':>5} {'p50 s':>7} {'p99 s':>7} {'p99/steady':>10} {'tok/s':>7} "
          f"{'max/mean':>8}")
    for r in rows:
        dur = f"{r['duration_s']:.2f}" if r["duration_s"] is not None else "-"
        ratio = f"{r['p99_vs_steady']:.2f}" if "p99_vs_steady" in r else "-"
        tps = f"{r['tokens_per_s']:.1f}" if r["tokens_per_s"] is not None else "-"
        print(f"{r['phase']:>28} {dur:>8} {r['requests']:>5} {r['p50_s']:>7.3f} {r['p99_s']:>7.3f} {ratio:>10} "
              f"{tps:>7} {r['imbalance']:>8.3f}")
    if clients.errors:
        print("errors:", clients.errors[:3])
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    if error is not None:
        raise SystemExit(f"run stopped: {error}")


if __name__ == "__main__":
    main()
