"""Imported Hugging Face models on the sharded runtime (expert shards, real Ray, one machine)
give `transformers`' logits and greedy tokens, also after a shard was killed and replaced."""

from __future__ import annotations

import pytest
import ray

pytest.importorskip("transformers")

from cluster.sharded import ShardedModel  # noqa: E402
from model.generate import SamplingParams  # noqa: E402
from model.hf import import_hf  # noqa: E402
from tests.hf_models import (build_hf_model, hf_greedy, hf_logits, moray_model, relative_error,  # noqa: E402
                             save_hf_model, untied_inputs)


CPUS = 4


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(address="local", num_cpus=CPUS, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.mark.parametrize("name", ["v2-lite-like", "v3-grouped", "mixtral-gqa"])
def test_two_shards_equal_transformers(ray_cluster, name, seed, tmp_path):
    hf = build_hf_model(name, seed)
    ckpt = import_hf(save_hf_model(hf, tmp_path / "hf"), tmp_path / "moray", progress=False)
    tokens, prompts, _, _ = untied_inputs(moray_model(ckpt), seed, (3, 11), cuts=(4, 11), greedy_tokens=5)
    with ShardedModel.create(str(ckpt), num_shards=2) as sharded:
        expected = hf_logits(hf, tokens)
        assert relative_error(sharded.forward(tokens), expected) <= 1e-4, "prefill logits differ"
        assert relative_error(sharded.forward(tokens, decode_from=5), expected) <= 1e-4, "decode logits differ"
        assert sharded.generate(prompts, SamplingParams(max_new_tokens=5)) == hf_greedy(hf, prompts, 5)


def test_failover_on_one_full_machine_reuses_the_freed_bundle(ray_cluster, seed, tmp_path):
    """The model's placement group holds every CPU of the only node (as it holds every GPU of a
    one-machine GPU box): the replacement of a killed shard can only go into the bundle the dead
    shard freed, on the node it died on."""
    hf = build_hf_model("v2-lite-like", seed)
    ckpt = import_hf(save_hf_model(hf, tmp_path / "hf"), tmp_path / "moray", progress=False)
    tokens, _, _, _ = untied_inputs(moray_model(ckpt), seed, (3, 11), cuts=(4, 11), greedy_tokens=5)
    expected = hf_logits(hf, tokens)
    with ShardedModel.create(str(ckpt), num_shards=CPUS - 1, elastic={"start_timeout_s": 30}) as sharded:
        assert ray.available_resources().get("CPU", 0) == 0
        ray.kill(sharded.shard_handles()[1], no_restart=True)
        assert relative_error(sharded.forward(tokens), expected) <= 1e-4, "logits differ after the failover"
        status = sharded.elastic_status()
        assert [(e["action"], e["ok"]) for e in status["events"]] == [("failover", True)], status["events"]
        assert all(s["alive"] for s in status["shards"])
