"""Ray's own Prometheus metrics, read straight from every node's metrics endpoint.

Each Ray node serves its metrics (the node's CPU / memory / GPU use, Serve's request counters
and latency histograms, moray's own `ray.util.metrics`) at `NodeManagerAddress:MetricsExportPort`.
The dashboard scrapes them when a page asks (at most every `min_interval_s`) and keeps a
minute of counter totals, so request and token rates and latency percentiles are measured
over that window rather than since the cluster started.
"""

from __future__ import annotations

import math
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field

import requests
from prometheus_client.parser import text_string_to_metric_families

# per (application, deployment): Serve's counters, its latency histogram, moray's token counter
REQUESTS = "ray_serve_deployment_request_counter_total"
ERRORS = "ray_serve_deployment_error_counter_total"
LATENCY = "ray_serve_deployment_processing_latency_ms_bucket"
TOKENS = "ray_moray_generated_tokens_total"
# per node
NODE_GAUGES = {"ray_node_cpu_utilization": "cpu_percent", "ray_node_mem_used": "mem_used",
               "ray_node_mem_total": "mem_total", "ray_node_gpus_utilization": "gpu_percent",
               "ray_node_gram_used": "gpu_mem_used_mb", "ray_node_gram_available": "gpu_mem_free_mb"}


@dataclass
class Totals:
    """Counter totals of one deployment at one moment."""

    requests: float = 0.0
    errors: float = 0.0
    tokens: float = 0.0
    latency_buckets: dict[float, float] = field(default_factory=lambda: defaultdict(float))


def parse(text: str) -> tuple[dict[str, float], dict[tuple[str, str], Totals]]:
    """One node's page: its gauges (GPU ones summed over devices) and its Serve totals."""
    node: dict[str, float] = {}
    serve: dict[tuple[str, str], Totals] = defaultdict(Totals)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name, labels, value = sample.name, sample.labels, sample.value
            if name in NODE_GAUGES:
                key = NODE_GAUGES[name]
                node[key] = node.get(key, 0.0) + value if key.startswith("gpu") else value
            elif name in (REQUESTS, ERRORS, TOKENS, LATENCY) and labels.get("deployment"):
                totals = serve[(labels.get("application", ""), labels["deployment"])]
                if name == LATENCY:
                    totals.latency_buckets[float(labels["le"])] += value
                else:
                    attr = {REQUESTS: "requests", ERRORS: "errors", TOKENS: "tokens"}[name]
                    setattr(totals, attr, getattr(totals, attr) + value)
    return node, dict(serve)


def quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Prometheus' histogram_quantile: linear inside the bucket holding the q-th observation."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    rank = q * buckets[bounds[-1]]
    lower, below = 0.0, 0.0
    for upper in bounds:
        count = buckets[upper]
        if count >= rank:
            if math.isinf(upper):
                return lower
            return lower + (upper - lower) * (rank - below) / max(count - below, 1e-12)
        lower, below = upper, count
    return lower


def _delta(new: Totals, old: Totals | None) -> Totals:
    if old is None:
        return new
    buckets = defaultdict(float, {le: max(0.0, v - old.latency_buckets.get(le, 0.0))
                                  for le, v in new.latency_buckets.items()})
    return Totals(max(0.0, new.requests - old.requests), max(0.0, new.errors - old.errors),
                  max(0.0, new.tokens - old.tokens), buckets)


class ClusterMetrics:
    """Scrapes the nodes given by `ray.nodes()` and keeps a window of Serve totals."""

    def __init__(self, window_s: float = 60.0, min_interval_s: float = 2.0, timeout_s: float = 3.0):
        self.window_s, self.min_interval_s, self.timeout_s = window_s, min_interval_s, timeout_s
        self.nodes: dict[str, dict[str, float]] = {}
        self.history: deque[tuple[float, dict[tuple[str, str], Totals]]] = deque()
        self._last = 0.0
        self._lock = threading.Lock()

    def refresh(self, ray_nodes: list[dict]) -> None:
        with self._lock:
            now = time.time()
            if now - self._last < self.min_interval_s:
                return
            self._last = now
            serve: dict[tuple[str, str], Totals] = defaultdict(Totals)
            for n in ray_nodes:
                if not n.get("Alive") or not n.get("MetricsExportPort"):
                    continue
                try:
                    text = requests.get(f"http://{n['NodeManagerAddress']}:{n['MetricsExportPort']}/metrics",
                                        timeout=self.timeout_s).text
                except requests.RequestException:
                    continue  # a node that cannot answer shows no use; the overview marks it otherwise
                node, per_deployment = parse(text)
                self.nodes[n["NodeID"]] = node
                for key, t in per_deployment.items():
                    total = serve[key]
                    total.requests += t.requests
                    total.errors += t.errors
                    total.tokens += t.tokens
                    for le, v in t.latency_buckets.items():
                        total.latency_buckets[le] += v
            self.history.append((now, dict(serve)))
            while len(self.history) > 2 and now - self.history[0][0] > self.window_s:
                self.history.popleft()

    def deployment(self, application: str, deployment: str) -> dict:
        """Rates over the window (None until two scrapes exist) and latency percentiles of it."""
        with self._lock:
            if not self.history:
                return {}
            t_new, newest = self.history[-1]
            t_old, oldest = self.history[0]
        key = (application, deployment)
        if key not in newest:
            return {}
        span = t_new - t_old
        d = _delta(newest[key], oldest.get(key) if span > 0 else None)
        rate = (lambda v: v / span) if span > 0 else (lambda v: None)
        buckets = d.latency_buckets if sum(d.latency_buckets.values()) else newest[key].latency_buckets
        return {"requests_total": newest[key].requests, "errors_total": newest[key].errors,
                "tokens_total": newest[key].tokens, "requests_per_s": rate(d.requests),
                "errors_per_s": rate(d.errors), "tokens_per_s": rate(d.tokens),
                "p50_ms": quantile(0.5, buckets), "p99_ms": quantile(0.99, buckets), "window_s": span}
