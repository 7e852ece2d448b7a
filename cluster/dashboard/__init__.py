"""moray's admin dashboard: the model as its operators think of it (jobs, endpoints, experts).

`moray dashboard` runs it in the foreground; `start_in_background` runs it on a thread of a
process that is already a Ray driver (the quickstart, the tests).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import uvicorn

from cluster.dashboard.app import create_app
from cluster.dashboard.security import new_token
from cluster.dashboard.sources import ClusterView, Settings

DEFAULT_PORT = 8270  # Ray's dashboard is 8265, Serve 8000 (HTTP) and 9000 (gRPC)
TOKEN_ENV = "MORAY_DASHBOARD_TOKEN"


def admin_token() -> tuple[str, bool]:
    """The configured token (MORAY_DASHBOARD_TOKEN), or a new one; True when it was generated."""
    token = os.environ.get(TOKEN_ENV, "").strip()
    return (token, False) if token else (new_token(), True)


def ray_dashboard_url(context) -> str:
    """The cluster's own dashboard (job and Serve REST APIs), from this driver's `ray.init` context."""
    url = getattr(context, "dashboard_url", None)
    if not url:
        raise RuntimeError("the Ray cluster runs without its dashboard; start it with ray[default] "
                           "(include_dashboard=True / ray start --include-dashboard=true)")
    return url if url.startswith("http") else f"http://{url}"


def build(context, runs_dir: str | Path = "runs", data_dir: str | Path = "data/corpus", app: str = "moray",
          token: str | None = None, protect_reads: bool = False, imbalance_alert: float = 2.0):
    """The app for the cluster this process joined with `context = ray.init(...)`."""
    settings = Settings(ray_dashboard=ray_dashboard_url(context), runs_dir=Path(runs_dir).resolve(),
                        data_dir=Path(data_dir).resolve(), imbalance_alert=imbalance_alert)
    return create_app(ClusterView(settings), token or admin_token()[0], default_app=app, protect_reads=protect_reads)


def port_or_free(host: str, port: int) -> int:
    """`port` if nothing listens there, else any free one."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
            return port
        except OSError:
            s.bind((host, 0))
            return s.getsockname()[1]


def start_in_background(context, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
                        **build_args) -> tuple[str, uvicorn.Server]:
    """Serve the dashboard from a daemon thread; returns its URL once it accepts connections."""
    server = uvicorn.Server(uvicorn.Config(build(context, **build_args), host=host, port=port, log_level="warning"))
    threading.Thread(target=server.run, name="moray-dashboard", daemon=True).start()
    deadline = time.time() + 30
    while not server.started:
        if time.time() > deadline or not threading.main_thread().is_alive():
            raise RuntimeError(f"the dashboard did not start on {host}:{port}")
        time.sleep(0.05)
    return f"http://{host}:{port}", server
