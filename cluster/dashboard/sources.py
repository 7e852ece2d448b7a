"""What the dashboard shows, read from the running cluster through public APIs only.

Nodes from the Ray state API, their use from Ray's Prometheus metrics, jobs from the job
submission client, a training job's curves from its run's `metrics.jsonl`, Serve applications
and replicas from Serve's REST API, and each model replica's shards, expert placement and load
from the elastic controller's client API (`cluster.experts`). The dashboard process is a Ray
driver of the cluster it shows.
"""

from __future__ import annotations

import json
import secrets
import shlex
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import ray
import requests
from ray.job_submission import JobStatus
from ray.util.state import list_nodes

from cluster.config import load_config
from cluster.dashboard.prometheus import ClusterMetrics
from cluster.jobs import auth_headers, job_client, submit
from model.config import ConfigError

MAX_CURVE_POINTS = 2000
MAX_LOG_CHARS = 200_000


def _controller():
    """The elastic controller (imported when first used: the dashboard starts without a model)."""
    from cluster import experts

    return experts


class NotFound(LookupError):
    """The named job, application or node does not exist (HTTP 404)."""


class Rejected(ValueError):
    """The cluster refused the request as given (HTTP 422 with this message)."""


class Unavailable(RuntimeError):
    """The cluster cannot take the request right now (HTTP 503 with this message)."""


@dataclass
class Settings:
    ray_dashboard: str  # http://host:8265, for jobs and Serve's REST API
    runs_dir: Path  # where training runs that do not name their storage write metrics.jsonl
    data_dir: Path  # corpus for jobs submitted from the dashboard
    imbalance_alert: float = 2.0  # max/mean expert load above which the overview warns


def moray_version() -> str:
    try:
        return metadata.version("moray")
    except metadata.PackageNotFoundError:
        return "unknown"


def run_dir_of(entrypoint: str, default_runs: Path) -> Path | None:
    """The run directory of a `python -m train CONFIG [overrides]` job, from its own config."""
    words = shlex.split(entrypoint)
    if "train" not in words or words[words.index("train") - 1] != "-m":
        return None
    rest = words[words.index("train") + 1:]
    if not rest:
        return None
    try:
        cfg = load_config(rest[0], [w for w in rest[1:] if "=" in w and not w.startswith("-")])
    except ConfigError:
        return None
    storage = Path(cfg.train.storage_path)
    return (storage if storage.is_absolute() else default_runs) / cfg.train.run_name


def read_metrics(run_dir: Path | None) -> list[dict]:
    path = run_dir / "metrics.jsonl" if run_dir else None
    if path is None or not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines()[-MAX_CURVE_POINTS:]:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # the line being written right now
    return records


def app_url(serve_details: dict, app: str) -> str:
    """Where clients reach a Serve application over HTTP (Serve's proxy address + its route)."""
    http = serve_details.get("http_options") or {}
    route = (serve_details["applications"][app].get("route_prefix") or "/").rstrip("/")
    return f"http://{http.get('host', '127.0.0.1')}:{http.get('port', 8000)}{route}"


def _seconds(ms: int | None) -> float | None:
    return ms / 1000 if ms else None


class ClusterView:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.metrics = ClusterMetrics()

    def _state(self) -> dict:
        """State API arguments: this cluster by its dashboard, never the machine's "latest" cluster."""
        return {"address": self.settings.ray_dashboard, "detail": True, "raise_on_missing_output": False}

    # overview

    def nodes(self) -> list[dict]:
        ray_nodes = ray.nodes()
        self.metrics.refresh(ray_nodes)
        rows = []
        for n in list_nodes(**self._state()):
            use = self.metrics.nodes.get(n.node_id, {})
            rows.append({"node_id": n.node_id, "ip": n.node_ip, "head": n.is_head_node, "state": n.state,
                         "cpus": n.resources_total.get("CPU", 0), "gpus": n.resources_total.get("GPU", 0),
                         "cpu_percent": use.get("cpu_percent"), "mem_used": use.get("mem_used"),
                         "mem_total": use.get("mem_total"), "gpu_percent": use.get("gpu_percent"),
                         "gpu_mem_used_mb": use.get("gpu_mem_used_mb")})
        return sorted(rows, key=lambda r: (not r["head"], r["state"] != "ALIVE", r["node_id"]))

    def overview(self, app: str) -> dict:
        nodes = self.nodes()
        alerts = [{"level": "error", "what": f"node {n['node_id'][:8]} ({n['ip']}) is {n['state'].lower()}"}
                  for n in nodes if n["state"] != "ALIVE"]
        alerts += [{"level": "error", "what": f"job {j['id']} failed: {(j['message'].splitlines() or [''])[0][:200]}"}
                   for j in self.jobs() if j["status"] == JobStatus.FAILED.value]
        status = self.experts_or_none(app)
        if status is not None:
            alerts += [{"level": "error", "what": f"expert shard {s['index']} of {app} is dead"}
                       for s in status["shards"] if not s["alive"]]
            if status["imbalance"] > self.settings.imbalance_alert:
                alerts.append({"level": "warning", "what": f"{app}: expert load imbalance {status['imbalance']:.2f} "
                               f"(max/mean) is over {self.settings.imbalance_alert:g}"})
        return {"ray_version": ray.__version__, "moray_version": moray_version(), "nodes": nodes,
                "alerts": alerts, "resources": ray.cluster_resources(), "available": ray.available_resources()}

    # training jobs

    def _client(self):
        return job_client(self.settings.ray_dashboard)

    def jobs(self) -> list[dict]:
        rows = []
        for job in self._client().list_jobs():
            if not job.submission_id:
                continue  # drivers started by hand (like this dashboard) are not jobs to manage
            start, end = _seconds(job.start_time), _seconds(job.end_time)
            run_dir = run_dir_of(job.entrypoint, self.settings.runs_dir)
            rows.append({"id": job.submission_id, "status": job.status.value, "entrypoint": job.entrypoint,
                         "message": job.message or "", "start_time": start, "end_time": end,
                         "duration_s": ((end or time.time()) - start) if start else None,
                         "run": run_dir.name if run_dir else None})
        return sorted(rows, key=lambda r: r["start_time"] or 0, reverse=True)

    def _job_row(self, job_id: str) -> dict:
        for row in self.jobs():
            if row["id"] == job_id:
                return row
        raise NotFound(f"no job {job_id!r}")

    def job(self, job_id: str) -> dict:
        row = self._job_row(job_id)
        return {**row, "metrics": read_metrics(run_dir_of(row["entrypoint"], self.settings.runs_dir))}

    def job_logs(self, job_id: str) -> str:
        self._job_row(job_id)
        return self._client().get_job_logs(job_id)[-MAX_LOG_CHARS:]

    def stop_job(self, job_id: str) -> str:
        row = self._job_row(job_id)
        if JobStatus(row["status"]).is_terminal():
            raise Rejected(f"job {job_id} has already ended ({row['status']})")
        self._client().stop_job(job_id)
        return f"stop requested (was {row['status']})"

    def submit_job(self, preset: str, overrides: list[str]) -> str:
        """A training job from a preset and dotlist overrides; every input error is a Rejected
        before anything reaches the cluster."""
        from train.data import DataError
        from train.job import check_before_start

        overrides = [f"train.data_dir={self.settings.data_dir}",
                     f"train.storage_path={self.settings.runs_dir}",
                     f"train.run_name=dash-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}", *overrides]
        try:
            cfg = load_config(preset, overrides)
            check_before_start(cfg)
        except (ConfigError, DataError) as exc:
            raise Rejected(str(exc)) from None
        # Ray's job supervisor finds "the" local cluster by auto-discovery, which on a host running
        # several clusters may be another one: the job is told the GCS address of this one
        gcs = f"RAY_ADDRESS={ray.get_runtime_context().gcs_address}"
        try:
            _, job_id = submit(self.settings.ray_dashboard, [gcs, "python", "-m", "train", preset, *overrides])
        except RuntimeError as exc:  # the job API answered 5xx (e.g. its node agent is not up yet)
            raise Unavailable(str(exc).splitlines()[0]) from None
        return job_id

    # endpoints

    def serve_details(self) -> dict:
        r = requests.get(f"{self.settings.ray_dashboard}/api/serve/applications/", headers=auth_headers(), timeout=10)
        r.raise_for_status()
        return r.json()

    def endpoints(self) -> dict:
        details = self.serve_details()
        ray_nodes = ray.nodes()
        self.metrics.refresh(ray_nodes)
        apps = []
        for name, app in (details.get("applications") or {}).items():
            # each model replica's shards as its router knows them (scaled-out ones included)
            model = _controller().MODEL_DEPLOYMENT in app.get("deployments", {})
            status = self.experts_or_none(name) if model else None
            shards_of = {replica: st["shards"] for replica, st in (status or {}).get("replicas", {}).items()}
            deployments = []
            for dep_name, dep in app.get("deployments", {}).items():
                config = dep.get("deployment_config") or {}
                replicas = [{"replica_id": r.get("replica_id"), "state": r.get("state"), "node_id": r.get("node_id"),
                             "pid": r.get("pid"), "shards": shards_of.get(r.get("replica_id"), [])}
                            for r in dep.get("replicas", [])]
                deployments.append({"name": dep_name, "status": dep.get("status"),
                                    "status_trigger": dep.get("status_trigger"), "message": dep.get("message", ""),
                                    "target_replicas": dep.get("target_num_replicas"),
                                    "autoscaling": config.get("autoscaling_config"), "replicas": replicas,
                                    "traffic": self.metrics.deployment(name, dep_name)})
            apps.append({"name": name, "status": app.get("status"), "message": app.get("message", ""),
                         "route_prefix": app.get("route_prefix"), "deployments": deployments,
                         "url": app_url(details, name)})
        return {"applications": apps}

    def test_completion(self, app: str, prompt: str, max_tokens: int, temperature: float) -> dict:
        """One completion through the application's public HTTP route, as a client would send it."""
        details = self.serve_details()
        if app not in (details.get("applications") or {}):
            raise NotFound(f"no Serve application {app!r}")
        url = app_url(details, app)
        models = requests.get(f"{url}/v1/models", timeout=30).json()["data"]
        started = time.perf_counter()
        r = requests.post(f"{url}/v1/completions", timeout=300, json={
            "model": models[0]["id"], "prompt": prompt, "max_tokens": max_tokens, "temperature": temperature})
        body = r.json()
        if r.status_code != 200:
            raise Rejected(body.get("error", {}).get("message", r.text))
        return {"text": body["choices"][0]["text"], "usage": body["usage"],
                "latency_s": time.perf_counter() - started}

    # experts

    def experts_or_none(self, app: str) -> dict | None:
        try:
            return _controller().experts_status(app)
        except (ValueError, KeyError, ray.exceptions.RayError):
            return None  # no such application (yet)

    def experts(self, app: str) -> dict:
        try:
            return _controller().experts_status(app)
        except _controller().ExpertsError as exc:
            raise NotFound(str(exc)) from None

    def rebalance(self, app: str) -> dict:
        return _controller().rebalance(app)

    def scale_shards(self, app: str, n: int) -> dict:
        return _controller().scale_shards(app, n)

    def drain_node(self, app: str, node_id: str) -> dict:
        return _controller().drain_node(app, node_id)
