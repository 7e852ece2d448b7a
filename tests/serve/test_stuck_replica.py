"""A Serve replica whose router is stuck in a step is replaced: once a step attempt has run past
`stuck_step_s` the replica's health check fails, Serve starts a new replica (router and shards),
and the endpoint answers again, the same text as before.

The stuck step is real: one shard's process is stopped (SIGSTOP), so the router's gloo
collectives wait for it up to the collective timeout (60 s), past `stuck_step_s` (3 s). On GPUs
the same health check ends a wait that nothing else would: a collective replayed from a CUDA
graph whose peer died (README, failover)."""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import ray
import requests
from ray import serve
from ray.util.state import list_actors

from actors.transport import free_port
from serve.app import build_app
from tests.serve.text_checkpoint import json_tiny_checkpoint

PROMPT = "import json"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("stuck")
    ckpt, _, _ = json_tiny_checkpoint(root, seed=99)
    port, dashboard_port = free_port("127.0.0.1"), free_port("127.0.0.1")
    # Ray's dashboard serves the state API the test finds processes with
    ray.init(address="local", num_cpus=6, include_dashboard=True, dashboard_host="127.0.0.1",
             dashboard_port=dashboard_port)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"checkpoint": str(ckpt), "num_shards": 2, "elastic": {"stuck_step_s": 3}}),
              name="moray", route_prefix="/")
    yield {"url": f"http://127.0.0.1:{port}", "state_api": f"http://127.0.0.1:{dashboard_port}"}
    serve.shutdown()
    ray.shutdown()


def complete(url: str, timeout_s: float = 120) -> requests.Response:
    return requests.post(f"{url}/v1/completions", timeout=timeout_s,
                         json={"model": "tiny", "prompt": PROMPT, "max_tokens": 8, "temperature": 0})


def test_a_stuck_step_fails_the_health_check_and_serve_replaces_the_replica(served):
    def alive_pids(class_part: str) -> list[int]:
        actors = list_actors(address=served["state_api"], filters=[("state", "=", "ALIVE")], limit=1000)
        return [a.pid for a in actors if class_part in a.class_name]

    url = served["url"]
    first = complete(url)
    assert first.status_code == 200, first.text
    (replica,) = alive_pids("MoEModel")
    stopped = alive_pids("ExpertShard")[0]
    os.kill(stopped, signal.SIGSTOP)
    try:
        with ThreadPoolExecutor(1) as pool:
            on_the_stuck_replica = pool.submit(complete, url, 180)
            deadline, again = time.time() + 180, None
            while time.time() < deadline:  # bounded: the new replica answers or the test fails
                if [pid for pid in alive_pids("MoEModel") if pid != replica]:
                    again = complete(url)
                    if again.status_code == 200:
                        break
                time.sleep(1)
            assert again is not None and again.status_code == 200, "no new replica answered within 180 s"
            # the request the stuck replica held came back (an error: its replica was killed), not never
            assert on_the_stuck_replica.result(timeout=60).status_code >= 500
    finally:
        try:
            os.kill(stopped, signal.SIGCONT)
        except ProcessLookupError:
            pass
    assert again.json()["choices"][0]["text"] == first.json()["choices"][0]["text"]
    assert replica not in alive_pids("MoEModel")
    for _ in range(60):  # the stopped shard went with its replica's placement group
        try:
            os.kill(stopped, 0)
        except ProcessLookupError:
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"the stopped shard (pid {stopped}) outlived its replica")
