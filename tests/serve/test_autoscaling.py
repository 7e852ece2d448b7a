"""Serve autoscaling adds and removes whole sharded copies: under a bounded concurrent load on
loopback the model deployment goes from 1 replica (router + 2 shards) to more, and back to 1
after the load stops. A 3-node `ray.cluster_utils.Cluster` on this machine."""

from __future__ import annotations

import sysconfig
import threading
import time
from pathlib import Path

import pytest
import ray
import requests
import torch
from ray import serve
from ray.cluster_utils import Cluster

from actors.transport import free_port
from model.checkpoint import save_checkpoint
from model.transformer import Transformer
from serve.app import build_app
from tests.conftest import tiny_config
from train.data import prepare_corpus


def replicas(app: str = "moray") -> int:
    status = serve.status().applications[app].deployments["MoEModel"]
    return sum(n for state, n in status.replica_states.items() if str(state).endswith("RUNNING"))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("autoscale")
    json_package = Path(sysconfig.get_paths()["stdlib"]) / "json"
    manifest = prepare_corpus([json_package], root / "corpus", vocab_size=512, progress=False)
    cfg = tiny_config("tiny", "model.vocab_size=512")
    torch.manual_seed(0)
    ckpt = save_checkpoint(root / "ckpt", cfg, Transformer(cfg).state_dict(), tokenizer_file=manifest.tokenizer_path)
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 4})
    for _ in range(2):
        c.add_node(num_cpus=4)
    c.wait_for_nodes()
    ray.init(address=c.address)
    yield ckpt
    serve.shutdown()
    ray.shutdown()
    c.shutdown()


def test_replicas_scale_up_under_load_and_back_down(cluster):
    port = free_port("127.0.0.1")
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"checkpoint": str(cluster), "num_shards": 2, "min_replicas": 1, "max_replicas": 2,
                         "target_ongoing_requests": 1, "upscale_delay_s": 1, "downscale_delay_s": 4}),
              name="moray", route_prefix="/")
    assert replicas() == 1
    stop = threading.Event()
    errors: list[str] = []
    peak = [1]

    def client() -> None:
        for _ in range(200):  # bounded; stops early when told
            if stop.is_set():
                return
            r = requests.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                              json={"model": "tiny", "prompt": "import json", "max_tokens": 24, "temperature": 0})
            if r.status_code != 200:
                errors.append(r.text)

    threads = [threading.Thread(target=client) for _ in range(6)]
    for t in threads:
        t.start()
    deadline = time.time() + 120
    while time.time() < deadline and peak[0] < 2:
        peak[0] = max(peak[0], replicas())
        time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join(timeout=120)
    assert peak[0] == 2, "load did not add a sharded replica"
    assert not errors, errors[:2]
    deadline = time.time() + 120
    while time.time() < deadline and replicas() > 1:
        time.sleep(1)
    assert replicas() == 1, "the idle deployment did not scale back down"
