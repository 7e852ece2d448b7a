"""Elastic experts while serving: under a bounded concurrent load of greedy requests on loopback,
the model replica's shards scale 2 -> 3 -> 2, its experts are rebalanced with replicas, a node's
shards are drained, and a node holding a shard is killed. No request fails, and every answer
equals the single-process model's greedy output for its prompt.

One 3-node `ray.cluster_utils.Cluster` on this machine. The application is deployed while only
the head node exists, so Serve's proxy, the ingress and the model replica (router and its
placement group) are on the head; the worker nodes join afterwards and receive the shards that
scale-out and drain start, so killing a worker takes down shards only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import ray
import requests
from ray import serve
from ray.cluster_utils import Cluster

from actors.transport import free_port
from cluster import experts
from model.generate import SamplingParams, generate
from model.tokenizer import Tokenizer
from serve.app import build_app
from tests.routing_ties import untied
from tests.serve.text_checkpoint import json_tiny_checkpoint

PROMPTS = ["import json", "def load(", "class Decoder:", "# parse the"]
MAX_TOKENS = 20


class Load:
    """Client threads sending greedy completions until stopped (each at most 300 requests)."""

    def __init__(self, url: str, clients: int = 3):
        self.url, self.stop = url, threading.Event()
        self.answers: list[tuple[str, str]] = []
        self.errors: list[str] = []
        self.threads = [threading.Thread(target=self._client, args=(i,)) for i in range(clients)]

    def _client(self, index: int) -> None:
        for n in range(300):
            if self.stop.is_set():
                return
            prompt = PROMPTS[(index + n) % len(PROMPTS)]
            try:
                r = requests.post(f"{self.url}/v1/completions", timeout=300,
                                  json={"model": "tiny", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0})
            except requests.RequestException as exc:
                self.errors.append(f"{prompt!r}: {exc}")
                continue
            if r.status_code != 200:
                self.errors.append(f"{prompt!r}: {r.status_code} {r.text[:300]}")
            else:
                self.answers.append((prompt, r.json()["choices"][0]["text"]))

    def wait_for(self, more: int, timeout_s: float = 300) -> None:
        """Until `more` further answers (or errors) have come back."""
        target = len(self.answers) + len(self.errors) + more
        deadline = time.time() + timeout_s
        while len(self.answers) + len(self.errors) < target and time.time() < deadline:
            time.sleep(0.2)
        assert len(self.answers) + len(self.errors) >= target, "the load made no progress"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("elastic")
    ckpt, model, tokenizer_file = json_tiny_checkpoint(root, seed=4321)
    tok = Tokenizer.load(tokenizer_file)
    expected = {}
    for prompt in PROMPTS:
        params = SamplingParams(max_new_tokens=MAX_TOKENS, stop_tokens=(tok.eos_id,))
        out = untied(model, lambda: generate(model, [tok.encode(prompt)], params)[0])
        expected[prompt] = tok.decode([t for t in out if t != tok.eos_id])
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 6})
    ray.init(address=c.address)
    port = free_port("127.0.0.1")
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"checkpoint": str(ckpt), "num_shards": 2,
                         "elastic": {"redundant_experts": 2, "start_timeout_s": 120}}), name="moray", route_prefix="/")
    workers = [c.add_node(num_cpus=3) for _ in range(2)]
    c.wait_for_nodes()
    yield {"cluster": c, "workers": workers, "url": f"http://127.0.0.1:{port}", "expected": expected}
    serve.shutdown()
    ray.shutdown()
    c.shutdown()


def moray(*args: str) -> subprocess.CompletedProcess:
    """The `moray` CLI in a subprocess, against this module's cluster."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    return subprocess.run([sys.executable, "-m", "cluster.cli", *args, "--address", ray.get_runtime_context().gcs_address],
                          capture_output=True, text=True, timeout=300, env=env)


def shard_nodes() -> list[str]:
    return [s["node_id"] for s in experts.experts_status("moray")["shards"]]


def test_scale_rebalance_drain_and_node_failure_lose_no_request(served):
    c, head = served["cluster"], ray.get_runtime_context().get_node_id()
    workers = {w.node_id: w for w in served["workers"]}
    load = Load(served["url"])
    for t in load.threads:
        t.start()
    try:
        load.wait_for(3)
        assert moray("shards", "scale", "3").returncode == 0  # the CLI against this cluster
        assert len(shard_nodes()) == 3 and set(shard_nodes()) & set(workers), "the new shard should use a new node"
        load.wait_for(3)

        event = experts.rebalance("moray")
        assert event["ok"], event["message"]
        placement = event["after"]["placement"]
        copies = [sum(len(s) for s in layer) for layer in placement]
        assert all(n == 8 + 2 for n in copies), f"2 replicas of hot experts per layer expected, got {placement}"
        load.wait_for(3)

        event = experts.scale_shards("moray", 2)
        assert event["ok"], event["message"]
        load.wait_for(3)

        event = experts.drain_node("moray", head)
        assert event["ok"], event["message"]
        assert len(shard_nodes()) == 2 and head not in shard_nodes()
        load.wait_for(3)

        victim = next(node for node in shard_nodes() if node in workers)
        c.remove_node(workers[victim], allow_graceful=False)
        deadline = time.time() + 240
        while time.time() < deadline:
            status = experts.experts_status("moray")
            if any(e["action"] == "failover" for e in status["events"]):
                break
            time.sleep(1)
        failovers = [e for e in status["events"] if e["action"] == "failover"]
        assert failovers and failovers[-1]["ok"], [e["message"] for e in failovers]
        assert victim not in shard_nodes() and all(s["alive"] for s in status["shards"])
        load.wait_for(4)
    finally:
        load.stop.set()
        for t in load.threads:
            t.join(timeout=300)
    assert not load.errors, load.errors[:3]
    wrong = [(p, text) for p, text in load.answers if text != served["expected"][p]]
    assert not wrong, wrong[:3]
    print(f"{len(load.answers)} answers, all equal to the single-process model's")
    events = experts.experts_status("moray")["events"]
    print("events:", [(e["action"], round(e["duration_s"], 2), e["message"][:80]) for e in events])
    assert [e["action"] for e in events] == ["scale", "rebalance", "scale", "drain", "failover"]
    status = json.loads(moray("cluster", "status", "--json").stdout)
    assert len(status["experts"]["shards"]) == 2 and len(status["nodes"]) == 3
    assert status["applications"]["moray"]["deployments"]["MoEModel"] == {"RUNNING": 1}


def test_cli_status_table_and_a_broken_placement_file(served, tmp_path):
    table = moray("cluster", "status")
    assert table.returncode == 0, table.stderr
    assert "experts of 'moray'" in table.stdout and "imbalance" in table.stdout and "shard 1" in table.stdout
    assert "MoE layer 1: 10 expert copies on 2 shards, replicated" in table.stdout
    path = tmp_path / "placement.yaml"
    path.write_text("- [0, 1, 2, 3]\n- [4, 5, 6, 9]\n")
    proc = moray("experts", "place", str(path))
    assert proc.returncode == 2 and "out of range [9]" in proc.stderr and len(proc.stderr.splitlines()) == 1


def test_shards_that_cannot_be_replaced_answer_503_with_the_reason():
    """The ingress's error handler on loopback: the router's ShardFailure, as Ray delivers it
    (wrapped in a RayTaskError), becomes an OpenAI-style 503 naming the reason."""
    import uvicorn
    from fastapi import FastAPI
    from ray.exceptions import RayTaskError

    from actors.router import ShardFailure
    from serve.openai_api import register_error_handlers

    app = FastAPI()
    register_error_handlers(app)
    reason = "shard 1 (ActorDiedError) failed; no replacement: no node has the resources for one (1 CPU)"

    @app.get("/v1/fail")
    async def fail():
        raise RayTaskError("generate", "Traceback (most recent call last): ...", ShardFailure(reason)).as_instanceof_cause()

    port = free_port("127.0.0.1")
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(100):  # bounded wait for the server to listen
            if server.started:
                break
            time.sleep(0.1)
        r = requests.get(f"http://127.0.0.1:{port}/v1/fail", timeout=30)
        assert r.status_code == 503
        assert r.json()["error"] == {"message": reason, "type": "server_error", "param": None,
                                     "code": "shards_unavailable"}
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def test_cli_names_a_cluster_that_is_not_there():
    address = f"127.0.0.1:{free_port('127.0.0.1')}"
    proc = subprocess.run([sys.executable, "-m", "cluster.cli", "cluster", "status", "--address", address],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert proc.returncode == 2 and proc.stderr.strip() == f"moray: error: no Ray cluster at {address}: Connection refused"
