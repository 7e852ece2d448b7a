"""Elasticity policy of one sharded model copy: its settings, its load window, its metrics, and
the controller thread that rebalances experts and scales shards by load.

The controller lives next to the router (in the Serve replica or the router actor) because the
router is what sees every step's per-expert counts and what swaps the dispatch map; the CLI and
`cluster/experts.py` only ask it to act. Every action becomes an event (before/after placement
and load, duration, ok) kept in a bounded list, logged, and exported through `ray.util.metrics`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass

import torch
from ray.util import metrics

log = logging.getLogger(__name__)


@dataclass
class ElasticConfig:
    # replace a dead shard and re-run the step in progress (clients see latency, not an error)
    failover: bool = True
    failover_retries: int = 2
    # how long a new shard may take to be scheduled and load its experts before it is an error
    start_timeout_s: float = 60.0
    # while no replacement could be started, requests fail at once; a new try every retry_after_s
    retry_after_s: float = 10.0
    # shards kept started without experts (process up, device initialized), each holding a GPU
    # (or CPU) of its own: a failover or scale-out loads experts into one instead of waiting for a
    # new process, which is nearly all of a failover's time (benchmarks/RESULTS.md); refilled in
    # the background
    standby_shards: int = 0
    # a step attempt running longer than this marks the Serve replica unhealthy, so Serve replaces
    # it (0: three collective timeouts); see Router.stuck_step
    stuck_step_s: float = 0.0
    # controller: rebalance experts when max/mean shard load over the window passes threshold
    rebalance: bool = False
    threshold: float = 1.3
    # extra expert copies per layer a rebalance may place on the hottest experts
    redundant_experts: int = 0
    window_steps: int = 256
    min_window_tokens: int = 512
    interval_s: float = 10.0
    # controller: add a shard above scale_up_tokens_s routed tokens/s per shard, remove one below
    # scale_down_tokens_s (0 disables), between min_shards and max_shards
    autoscale: bool = False
    min_shards: int = 1
    max_shards: int = 8
    scale_up_tokens_s: float = 0.0
    scale_down_tokens_s: float = 0.0


def check_elastic_config(cfg: ElasticConfig, where: str = "cluster.elastic") -> None:
    """Impossible values fail at load, naming the key."""
    from model.config import ConfigError

    rules = [("threshold", cfg.threshold >= 1.0, "must be >= 1.0 (max/mean load)"),
             ("window_steps", cfg.window_steps > 0, "must be > 0"),
             ("interval_s", cfg.interval_s > 0, "must be > 0"),
             ("redundant_experts", cfg.redundant_experts >= 0, "must be >= 0"),
             ("failover_retries", cfg.failover_retries >= 0, "must be >= 0"),
             ("standby_shards", cfg.standby_shards >= 0, "must be >= 0"),
             ("start_timeout_s", cfg.start_timeout_s > 0, "must be > 0"),
             ("retry_after_s", cfg.retry_after_s > 0, "must be > 0"),
             ("stuck_step_s", cfg.stuck_step_s >= 0, "must be >= 0 (0: three collective timeouts)"),
             ("min_shards", 1 <= cfg.min_shards <= cfg.max_shards, "must be between 1 and max_shards")]
    for key, ok, message in rules:
        if not ok:
            raise ConfigError(f"{where}.{key}: {message}, got {getattr(cfg, key)}")


def elastic_config_from(data: dict | ElasticConfig | None) -> ElasticConfig:
    """From a plain dict (Serve args, JSON) with the same checks as the cluster config."""
    if isinstance(data, ElasticConfig):
        cfg = data
    else:
        from omegaconf import OmegaConf

        from model.config import merge_checked

        cfg = OmegaConf.to_object(merge_checked(OmegaConf.structured(ElasticConfig), data or {}, "elastic"))
    check_elastic_config(cfg)
    return cfg


class LoadWindow:
    """Per-expert token counts of the last `steps` forward steps, and when they happened."""

    def __init__(self, steps: int):
        self.steps: deque[tuple[float, torch.Tensor]] = deque(maxlen=steps)

    def add(self, load_LE: torch.Tensor) -> None:
        self.steps.append((time.time(), load_LE.clone()))

    def load(self, shape: tuple[int, int]) -> torch.Tensor:
        if not self.steps:
            return torch.zeros(shape, dtype=torch.long)
        return torch.stack([load for _, load in self.steps]).sum(0)

    def tokens_per_s(self) -> float:
        """Routed token copies per second from the window's first step until now, so the rate
        falls while the model is idle (0 until two steps are in the window)."""
        if len(self.steps) < 2:
            return 0.0
        span = time.time() - self.steps[0][0]
        return float(sum(int(load.sum()) for _, load in list(self.steps)[1:])) / max(span, 1e-6)

    def clear(self) -> None:
        self.steps.clear()


class ElasticMetrics:
    """Prometheus series through ray.util.metrics (exported by every node's metrics agent)."""

    def __init__(self):
        self.expert_load = metrics.Gauge("moray_expert_load_tokens", "Routed tokens per expert over the load window",
                                         tag_keys=("layer", "expert"))
        self.shard_load = metrics.Gauge("moray_shard_load_tokens", "Routed tokens per shard over the load window",
                                        tag_keys=("shard",))
        self.imbalance = metrics.Gauge("moray_shard_load_imbalance", "max/mean shard load over the load window")
        self.shards = metrics.Gauge("moray_expert_shards", "Expert shards of this model copy")
        self.duration = metrics.Histogram("moray_replacement_duration_s", "Duration of elastic actions",
                                          boundaries=[0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60], tag_keys=("action",))
        self.events = metrics.Counter("moray_elastic_events_total", "Elastic actions", tag_keys=("action", "ok"))

    def observe_load(self, load_LE: torch.Tensor, shard_load_S: torch.Tensor, imbalance: float) -> None:
        for layer, row in enumerate(load_LE.tolist()):
            for expert, value in enumerate(row):
                self.expert_load.set(value, tags={"layer": str(layer), "expert": str(expert)})
        for shard, value in enumerate(shard_load_S.tolist()):
            self.shard_load.set(value, tags={"shard": str(shard)})
        self.imbalance.set(imbalance)
        self.shards.set(len(shard_load_S))

    def observe_event(self, event: dict) -> None:
        self.duration.observe(event["duration_s"], tags={"action": event["action"]})
        self.events.inc(tags={"action": event["action"], "ok": str(event["ok"]).lower()})


class Controller:
    """Background thread: every interval, rebalance when the window's imbalance passes the
    threshold, and scale shards by routed tokens per shard per second. Acts through the router."""

    def __init__(self, router, cfg: ElasticConfig):
        self.router, self.cfg = router, cfg
        self._stop = threading.Event()
        self.last_check: dict = {}
        self._thread = threading.Thread(target=self._run, name="moray-elastic-controller", daemon=True)
        if cfg.rebalance or cfg.autoscale:
            self._thread.start()

    def describe(self) -> dict:
        return {"enabled": self.cfg.rebalance or self.cfg.autoscale, **asdict(self.cfg), "last_check": self.last_check}

    def decide(self) -> tuple[str, int] | None:
        """("rebalance", n) or ("scale", n) or None, from the router's current window."""
        load = self.router.window_load()
        n = self.router.n_shards
        per_shard_s = self.router.window.tokens_per_s() / n
        imbalance = self.router.imbalance_of(load)
        self.last_check = {"time": time.time(), "imbalance": imbalance, "tokens_per_shard_s": per_shard_s,
                           "window_tokens": int(load.sum())}
        if self.cfg.autoscale and self.cfg.scale_up_tokens_s and per_shard_s > self.cfg.scale_up_tokens_s \
                and n < self.cfg.max_shards:
            return "scale", n + 1
        if self.cfg.autoscale and per_shard_s < self.cfg.scale_down_tokens_s and n > self.cfg.min_shards:
            return "scale", n - 1
        if self.cfg.rebalance and load.sum() >= self.cfg.min_window_tokens and imbalance > self.cfg.threshold:
            # only when it helps: a load the spare copies cannot even out must not cause churn
            if self.router.imbalance_of(load, self.router.balanced_for(n)) < imbalance - 0.01:
                return "rebalance", n
        return None

    def _run(self) -> None:
        while not self._stop.wait(self.cfg.interval_s):
            try:
                decision = self.decide()
                if decision is None:
                    continue
                kind, n = decision
                if kind == "scale":
                    self.router.scale_shards(n, action="auto-scale")
                else:
                    self.router.rebalance(action="auto-rebalance")
            except Exception as exc:  # the controller never takes serving down with it
                log.error("elastic controller: %s", exc)

    def stop(self) -> None:
        self._stop.set()
