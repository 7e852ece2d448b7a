"""Imported Hugging Face models on the sharded runtime (2 expert shards, real Ray) give
`transformers`' logits and greedy tokens."""

from __future__ import annotations

import pytest
import ray

pytest.importorskip("transformers")

from cluster.sharded import ShardedModel  # noqa: E402
from model.generate import SamplingParams  # noqa: E402
from model.hf import import_hf  # noqa: E402
from tests.hf_models import (build_hf_model, hf_greedy, hf_logits, moray_model, relative_error,  # noqa: E402
                             save_hf_model, untied_inputs)


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(address="local", num_cpus=4, include_dashboard=False)
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
