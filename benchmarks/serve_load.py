"""Bounded load test of the served model on loopback, and Serve's added latency.

N concurrent clients send a fixed number of streaming completions each to the OpenAI
endpoint (127.0.0.1 only); we report requests/s, generated tokens/s, p50/p99 latency, p50/p99
time to first token and errors. The same prompts then go straight to a `ShardedModel` (the
router actor, no Serve, no HTTP) with the same concurrency: the latency difference is what
Serve and HTTP add.

Run: python benchmarks/serve_load.py --clients 8 --requests 6 --max-tokens 32
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
import requests
import torch
from ray import serve

from actors.transport import free_port
from cluster.config import load_config
from cluster.sharded import ShardedModel
from model.checkpoint import save_checkpoint
from model.generate import SamplingParams
from model.transformer import Transformer
from serve.app import build_app
from train.data import prepare_corpus

PROMPTS = ["def main(", "import os\n", "class Config:", "# utilities for", "for key, value in", "return {"]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def run_clients(n_clients: int, n_requests: int, one_request) -> tuple[list[tuple[float, float, int]], float, int]:
    """Every client sends n_requests in a row; returns (latency, ttft, tokens) per request."""
    results: list[tuple[float, float, int]] = []
    errors = [0]
    lock = threading.Lock()

    def client(c: int) -> None:
        for r in range(n_requests):
            try:
                row = one_request(PROMPTS[(c + r) % len(PROMPTS)])
                with lock:
                    results.append(row)
            except Exception:  # counted, reported
                with lock:
                    errors[0] += 1

    threads = [threading.Thread(target=client, args=(c,)) for c in range(n_clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, time.perf_counter() - start, errors[0]


def http_request(url: str, max_tokens: int):
    def send(prompt: str) -> tuple[float, float, int]:
        start = time.perf_counter()
        first, tokens = None, 0
        with requests.post(url, stream=True, timeout=300, json={"model": "tiny", "prompt": prompt, "stream": True,
                                                                "max_tokens": max_tokens, "temperature": 0}) as r:
            r.raise_for_status()
            for line in r.iter_lines(decode_unicode=True):
                if line.startswith("data: ") and line != "data: [DONE]":
                    if json.loads(line[6:])["choices"][0]["finish_reason"] is None:  # one chunk per new token
                        first = first or time.perf_counter()
                        tokens += 1
        return time.perf_counter() - start, (first or time.perf_counter()) - start, tokens

    return send


def summarize(name: str, results, elapsed: float, errors: int) -> dict:
    lat = [r[0] for r in results]
    ttft = [r[1] for r in results]
    return {"path": name, "requests": len(results), "errors": errors, "requests_per_s": len(results) / elapsed,
            "tokens_per_s": sum(r[2] for r in results) / elapsed, "p50_s": statistics.median(lat),
            "p99_s": percentile(lat, 0.99), "ttft_p50_s": statistics.median(ttft), "ttft_p99_s": percentile(ttft, 0.99)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=6, help="per client")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--num-shards", type=int, default=2)
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="moray-load-"))
    manifest = prepare_corpus(None, work / "corpus", vocab_size=2048, progress=False)
    cfg = load_config("tiny").model
    torch.manual_seed(0)
    ckpt = save_checkpoint(work / "ckpt", cfg, Transformer(cfg).state_dict(), tokenizer_file=manifest.tokenizer_path)
    ray.init(address="local", num_cpus=8, include_dashboard=False)
    port = free_port("127.0.0.1")
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"checkpoint": str(ckpt), "num_shards": args.num_shards}), name="moray", route_prefix="/")
    send = http_request(f"http://127.0.0.1:{port}/v1/completions", args.max_tokens)
    send("warm up")
    rows = [summarize("serve (HTTP, streaming)", *run_clients(args.clients, args.requests, send))]
    serve.shutdown()

    tokenizer = manifest.load_tokenizer()
    with ShardedModel.create(str(ckpt), num_shards=args.num_shards) as model:
        params = SamplingParams(max_new_tokens=args.max_tokens, stop_tokens=(tokenizer.eos_id,))

        def direct(prompt: str) -> tuple[float, float, int]:
            start = time.perf_counter()
            out = model.generate([tokenizer.encode(prompt)], params)[0]
            latency = time.perf_counter() - start
            return latency, latency, len(out)  # no streaming here: first token = whole answer

        direct("warm up")
        rows.append(summarize("router actor directly", *run_clients(args.clients, args.requests, direct)))
    meta = {"date": datetime.date.today().isoformat(), "machine": f"{platform.node()} ({torch.get_num_threads()} "
            f"torch threads, {platform.processor() or platform.machine()})", "clients": args.clients,
            "requests_per_client": args.requests, "max_tokens": args.max_tokens, "num_shards": args.num_shards}
    print(json.dumps(meta))
    print(f"{'path':>26} {'req':>4} {'err':>4} {'req/s':>7} {'tok/s':>7} {'p50 s':>7} {'p99 s':>7} {'ttft p50':>9} "
          f"{'ttft p99':>9}")
    for r in rows:
        print(f"{r['path']:>26} {r['requests']:>4} {r['errors']:>4} {r['requests_per_s']:>7.2f} {r['tokens_per_s']:>7.1f} "
              f"{r['p50_s']:>7.3f} {r['p99_s']:>7.3f} {r['ttft_p50_s']:>9.3f} {r['ttft_p99_s']:>9.3f}")
    added = rows[0]["p50_s"] - rows[1]["p50_s"]
    print(f"Serve + HTTP add {added * 1e3:.0f} ms to the median request")
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
