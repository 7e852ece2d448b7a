"""The same equivalence over NCCL: router on one GPU, its expert shard on another."""

from __future__ import annotations

import os
import threading
import time

import pytest
import ray
import torch

from cluster.sharded import ShardedModel
from model.checkpoint import save_checkpoint
from model.generate import SamplingParams
from tests.conftest import build_model, tiny_config, wait_for_events
from tests.routing_ties import untied_prompts, untied_tokens

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def gpu_ray():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA GPUs")
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    ray.init(num_cpus=8, num_gpus=2, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.mark.parametrize("preset", ["tiny", "tiny-gqa"])
def test_nccl_sharded_equals_single_process(gpu_ray, preset, seed, tmp_path):
    cfg = tiny_config(preset)
    model = build_model(cfg, seed)
    ckpt = save_checkpoint(tmp_path / "ckpt", cfg, model.state_dict())
    tokens, expected = untied_tokens(model, seed, 3, 21)
    with ShardedModel.create(str(ckpt), num_shards=1, use_gpu=True) as sharded:
        assert sharded.stats()["device"].startswith("cuda")
        assert all(s["device"].startswith("cuda") for s in sharded.shard_stats())
        assert (sharded.forward(tokens) - expected).abs().max() <= 1e-5
        assert (sharded.forward(tokens, decode_from=7) - expected).abs().max() <= 1e-5


def test_nccl_replacement_and_failover_keep_logits(gpu_ray, seed, tmp_path):
    """Live re-placement (the shard's stack rebuilt on its GPU) and failover (a new shard on the
    freed GPU, NCCL group re-formed, step re-run) give the single-process logits."""
    cfg = tiny_config("tiny")
    model = build_model(cfg, seed)
    ckpt = save_checkpoint(tmp_path / "ckpt", cfg, model.state_dict())
    tokens, expected = untied_tokens(model, seed, 3, 21)
    with ShardedModel.create(str(ckpt), num_shards=1, use_gpu=True) as sharded:
        event = sharded.apply_placement([list(reversed(range(cfg.moe.n_routed_experts)))])
        assert event["ok"], event["message"]
        assert (sharded.forward(tokens, decode_from=7) - expected).abs().max() <= 1e-5
        ray.kill(sharded.shard_handles()[0], no_restart=True)
        assert (sharded.forward(tokens) - expected).abs().max() <= 1e-5
        assert [e["action"] for e in sharded.elastic_status()["events"]] == ["place", "failover"]


def test_shard_step_graphs_give_the_eager_shards_tokens(gpu_ray, seed, tmp_path):
    """In bf16 (the expert products read nothing on the host) the shard replays its decode steps
    as CUDA graphs. The same kernels run eagerly with `cuda_graphs="router"`: the same tokens, to
    the bit, on fresh random prompts, and again after a re-placement (graphs captured anew)."""
    cfg = tiny_config("tiny")
    model = build_model(cfg, seed)
    ckpt = save_checkpoint(tmp_path / "ckpt", cfg, model.state_dict())
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=gen).tolist() for n in (5, 9, 3)]
    params = SamplingParams(max_new_tokens=12, temperature=0.0)
    reversed_map = [list(reversed(range(cfg.moe.n_routed_experts)))]
    tokens, step_graphs = {}, {}
    for mode in ("router", "all"):
        with ShardedModel.create(str(ckpt), num_shards=1, use_gpu=True, dtype="bfloat16", cuda_graphs=mode) as sharded:
            first = sharded.generate(prompts, params)
            step_graphs[mode] = sharded.shard_stats()[0]["step_graphs"]
            assert sharded.apply_placement(reversed_map)["ok"]
            tokens[mode] = (first, sharded.generate(prompts, params))
    assert step_graphs["router"] is None and step_graphs["all"] > 0
    assert tokens["all"] == tokens["router"]


def test_nccl_decode_graphs_generate_the_single_process_tokens(gpu_ray, seed, tmp_path):
    """Generation replays the router's decode steps as CUDA graphs, the shard serving them over
    the fixed-size exchange: the single-process greedy tokens, again after a re-placement (graphs
    captured anew for the new dispatch map), and the padding rows of a graph's batch bucket count
    in no expert's load."""
    cfg = tiny_config("tiny")
    model = build_model(cfg, seed)
    params = SamplingParams(max_new_tokens=12, temperature=0.0)
    prompts, expected = untied_prompts(model, seed, (5, 9, 3), params)  # 3 sequences: a bucket of 4
    ckpt = save_checkpoint(tmp_path / "ckpt", cfg, model.state_dict())
    with ShardedModel.create(str(ckpt), num_shards=1, use_gpu=True) as sharded:
        before = sharded.expert_load().clone()
        assert sharded.generate(prompts, params) == expected
        assert sharded.stats()["decode_graphs"] > 0, "no decode step of the router ran as a graph"
        # in fp32 the shard's expert products read their counts on the host: no graph to capture
        assert sharded.shard_stats()[0]["step_graphs"] is None
        copies = (sum(len(p) for p in prompts) + len(prompts) * (params.max_new_tokens - 1)) * cfg.moe.top_k
        loads = sharded.expert_load() - before
        assert bool((loads.sum(1) == copies).all()), f"load counts padding rows: {loads.sum(1).tolist()} != {copies}"
        event = sharded.apply_placement([list(reversed(range(cfg.moe.n_routed_experts)))])
        assert event["ok"], event["message"]
        assert sharded.generate(prompts, params) == expected


def test_nccl_failover_after_graph_decode_gives_the_single_process_tokens(gpu_ray, seed, tmp_path):
    """The shard dies between generations, after decode steps replayed from graphs: its vigil
    reports the death and the router fails over at once, on the vigil's thread, to a new shard,
    before any request comes; the next generation (graphs captured anew for the new group) gives
    the single-process tokens. The graphs are destroyed before the communicator is aborted: an
    abort does not return while a graph holds its work (`actors/transport.abort_group_soon`)."""
    cfg = tiny_config("tiny")
    model = build_model(cfg, seed)
    params = SamplingParams(max_new_tokens=12, temperature=0.0)
    prompts, expected = untied_prompts(model, seed, (5, 9, 3), params)
    ckpt = save_checkpoint(tmp_path / "ckpt", cfg, model.state_dict())
    with ShardedModel.create(str(ckpt), num_shards=1, use_gpu=True, timeout_s=20) as sharded:
        assert sharded.generate(prompts, params) == expected
        ray.kill(sharded.shard_handles()[0], no_restart=True)
        events = wait_for_events(sharded)
        assert [(e["action"], e["ok"]) for e in events] == [("failover", True)], events
        assert sharded.stats()["generation"] == 2
        assert sharded.generate(prompts, params) == expected
        assert sharded.stats()["decode_graphs"] > 0  # captured again for the new group


def test_nccl_failover_does_not_wait_for_the_collective_timeout(gpu_ray, seed, tmp_path):
    """A shard dies while generation goes on (decode steps replayed from graphs), under a
    10-minute collective timeout: the vigil (actors/vigil.py) sees the death and aborts the group,
    so the step fails over at once; every generation gives the single-process tokens, and none
    waits long enough for `stuck_step_s` (120 s here) to raise RouterStuck."""
    cfg = tiny_config("tiny")
    model = build_model(cfg, seed)
    params = SamplingParams(max_new_tokens=24, temperature=0.0)
    prompts, expected = untied_prompts(model, seed, (5, 9, 3), params)
    ckpt = save_checkpoint(tmp_path / "ckpt", cfg, model.state_dict())
    with ShardedModel.create(str(ckpt), num_shards=1, use_gpu=True, timeout_s=600,
                             elastic={"stuck_step_s": 120}) as sharded:
        assert sharded.generate(prompts, params) == expected
        results: list = []
        worker = threading.Thread(target=lambda: results.extend(sharded.generate(prompts, params) for _ in range(8)))
        worker.start()
        time.sleep(0.5)  # decoding from graphs by now
        killed = time.monotonic()
        ray.kill(sharded.shard_handles()[0], no_restart=True)
        worker.join(timeout=150)
        assert not worker.is_alive(), "generation did not finish within 150 s of the kill"
        print(f"8 generations finished {time.monotonic() - killed:.1f} s after the kill")
        assert results == [expected] * 8
        assert [e["action"] for e in sharded.elastic_status()["events"]] == ["failover"]
        assert sharded.stats()["decode_graphs"] > 0  # captured again for the new group
