"""The sharded runtime on a real multi-node Ray cluster equals the single-process model.

One `ray.cluster_utils.Cluster` (3 nodes on this machine) serves the whole module; shards are
spread across its nodes and talk over gloo.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import threading
import time

import pytest
import ray
import torch
from ray.cluster_utils import Cluster
from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group

from actors.router import ShardFailure
from actors.transport import FIXED_EXCHANGE_MAX_ROWS
from actors.vigil import Vigil
from cluster.sharded import RouterStuck, ShardedModel
from model.checkpoint import save_checkpoint
from model.generate import SamplingParams
from model.transformer import Transformer
from tests.conftest import build_model, poll, tiny_config, wait_for_events
from tests.routing_ties import untied_prompts, untied_tokens

TOL = 1e-5


@pytest.fixture(scope="module")
def cluster():
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    for _ in range(2):
        c.add_node(num_cpus=3)
    c.wait_for_nodes()
    ray.init(address=c.address)
    yield c
    ray.shutdown()
    c.shutdown()


def reference(preset: str, seed: int, *overrides: str):
    cfg = tiny_config(preset, *overrides)
    return cfg, build_model(cfg, seed)


def check_equal(sharded: ShardedModel, model, seed: int, batch: int = 3, length: int = 21) -> None:
    tokens, expected = untied_tokens(model, seed, batch, length)
    prefill = sharded.forward(tokens)
    assert (prefill - expected).abs().max() <= TOL, "prefill logits differ"
    decoded = sharded.forward(tokens, decode_from=7)
    assert (decoded - expected).abs().max() <= TOL, "KV-cached decode logits differ"


@pytest.mark.parametrize("preset, shards", [("tiny", 1), ("tiny", 2), ("tiny", 4), ("tiny-gqa", 2)])
def test_shards_equal_single_process(cluster, preset, shards, seed, tmp_path):
    cfg, model = reference(preset, seed)
    ckpt = save_checkpoint(tmp_path / "ckpt", cfg, model.state_dict())
    with ShardedModel.create(str(ckpt), num_shards=shards) as sharded:
        check_equal(sharded, model, seed)
        stats = sharded.shard_stats()
        # the shards report what they computed: together exactly the router's per-expert counts
        router_load = sharded.expert_load()
        shard_load = torch.zeros_like(router_load)
        for s in stats:
            for layer, (ids, load) in enumerate(zip(s["expert_ids"], s["expert_rows"])):
                shard_load[layer, ids] += torch.tensor(load)
        assert torch.equal(shard_load, router_load) and router_load.sum() > 0
        assert all(s["param_bytes"] > 0 and s["rss_bytes"] > 0 for s in stats)
        if shards == 4:
            assert len({s["node_id"] for s in stats}) >= 2, "shards should spread over nodes"
        if shards == 2:  # check_equal's steps are small: the fixed-size exchange; this prefill is not
            batch = 4
            length = FIXED_EXCHANGE_MAX_ROWS // (batch * cfg.moe.top_k) + 1
            tokens, expected = untied_tokens(model, seed, batch, length)
            assert (sharded.forward(tokens) - expected).abs().max() <= TOL, "prefill logits differ (exact counts)"


def test_non_contiguous_per_layer_map_and_idle_experts(cluster, seed, tmp_path):
    """Any expert map works, and experts that receive no tokens at all are handled."""
    cfg, model = reference("tiny", seed)
    with torch.no_grad():
        for moe in model.moe_layers():
            moe.expert_bias[[1, 6]] = -10.0  # experts 1 and 6 are never selected
    placement = [[[6, 3, 0], [5, 1, 7, 2, 4]], [[2, 7], [0, 1, 3, 4, 5, 6]]]
    ckpt = save_checkpoint(tmp_path / "ckpt", cfg, model.state_dict())
    with ShardedModel.create(str(ckpt), num_shards=2, placement=placement) as sharded:
        check_equal(sharded, model, seed)
        load = sharded.expert_load()
        assert load[:, [1, 6]].sum() == 0 and load.sum() > 0


def test_seeded_weights_equal_the_seeded_single_process_model(cluster, seed):
    cfg = tiny_config("tiny-gqa")
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    with ShardedModel.create(cfg, num_shards=2, seed=seed) as sharded:
        check_equal(sharded, model, seed)


def test_concurrent_generate_is_batched_and_equals_alone(cluster, seed, tmp_path):
    cfg, model = reference("tiny", seed)
    params = [SamplingParams(max_new_tokens=10, temperature=0.0 if i % 2 else 0.9, seed=seed + i) for i in range(6)]
    prompts, expected = untied_prompts(model, seed, (5, 12, 3, 8, 9, 4), params)
    ckpt = save_checkpoint(tmp_path / "ckpt", cfg, model.state_dict())
    with ShardedModel.create(str(ckpt), num_shards=2) as sharded:
        results: dict[int, list[int]] = {}
        barrier = threading.Barrier(len(prompts))

        def client(i: int) -> None:
            barrier.wait()
            results[i] = sharded.generate([prompts[i]], params[i])[0]

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert [results[i] for i in range(len(prompts))] == expected
        batch_sizes = sharded.stats()["batch_sizes"]
        print("router batch sizes:", batch_sizes)
        assert max(batch_sizes) > 1, "concurrent requests should share steps"


def test_killed_shard_is_an_error_then_replacement_restores_logits(cluster, seed, tmp_path):
    """With failover off a dead shard is a clear error until `replace_shard`."""
    cfg, model = reference("tiny", seed)
    ckpt = save_checkpoint(tmp_path / "ckpt", cfg, model.state_dict())
    with ShardedModel.create(str(ckpt), num_shards=2, elastic={"failover": False}) as sharded:
        check_equal(sharded, model, seed)
        ray.kill(sharded.shard_handles()[1], no_restart=True)
        with pytest.raises(ray.exceptions.RayTaskError) as err:
            sharded.forward([[1, 2, 3]])
        assert isinstance(err.value.as_instanceof_cause(), ShardFailure) and "shard 1" in str(err.value)
        # until replaced, the model refuses steps with the reason instead of hanging
        with pytest.raises(ray.exceptions.RayTaskError, match="replace the shard"):
            sharded.forward([[1, 2, 3]])
        sharded.replace_shard(1)
        check_equal(sharded, model, seed + 1)
        assert sharded.stats()["generation"] == 2


def test_vigil_reports_a_dead_shard_at_once_and_not_one_that_left(cluster, seed):
    """What the router's NCCL failover waits on (`actors/vigil.py`): a shard's vigil call fails as
    soon as its process dies, and ends quietly when the shard leaves its group."""
    cfg, _ = reference("tiny", seed)
    with ShardedModel.create(cfg, num_shards=2, seed=seed) as sharded:
        shards, generation = sharded.shard_handles(), sharded.stats()["generation"]
        deaths: queue.Queue = queue.Queue()
        vigil = Vigil(lambda gen, index: deaths.put((gen, index)), poll_s=0.1)
        try:
            vigil.watch(generation, shards)
            ray.get(shards[0].leave.remote())
            killed = time.monotonic()
            ray.kill(shards[1], no_restart=True)
            assert deaths.get(timeout=20) == (generation, 1)
            print(f"death reported {time.monotonic() - killed:.2f} s after the kill")
            with pytest.raises(queue.Empty):  # the shard that left is not reported
                deaths.get(timeout=1.0)
        finally:
            vigil.stop()


def test_a_shard_that_dies_between_requests_is_replaced_before_the_next(cluster, seed, tmp_path):
    """Its vigil reports the death and the router fails over at once, with no request to fail:
    the status shows the failover and every shard alive without a step having run, and the next
    request gets the single-process logits."""
    cfg, model = reference("tiny", seed)
    ckpt = save_checkpoint(tmp_path / "ckpt", cfg, model.state_dict())
    with ShardedModel.create(str(ckpt), num_shards=2) as sharded:
        check_equal(sharded, model, seed)
        ray.kill(sharded.shard_handles()[1], no_restart=True)
        events = wait_for_events(sharded)
        assert [(e["action"], e["ok"]) for e in events] == [("failover", True)], events
        assert "shards [1] died" in events[0]["message"]
        # and where its time went, within the event's duration
        parts = re.search(r"replaced shards \[1\] \(started in ([\d.]+) s, group re-formed in ([\d.]+) s\)",
                          events[0]["message"])
        assert parts and sum(map(float, parts.groups())) <= events[0]["duration_s"] + 0.01, events[0]["message"]
        assert all(s["alive"] for s in sharded.elastic_status()["shards"]) and sharded.stats()["generation"] == 2
        check_equal(sharded, model, seed + 1)


def test_a_standby_shard_takes_a_dead_or_new_shards_place(cluster, seed, tmp_path):
    """With `standby_shards` a shard process waits, started, without experts. When a shard dies
    the standby loads its experts and takes its place (no process to start: nearly all of a
    failover's time), answers stay the single-process ones, and a new standby is started behind
    it; a scale-out takes the standby too."""
    cfg, model = reference("tiny", seed)
    ckpt = save_checkpoint(tmp_path / "ckpt", cfg, model.state_dict())
    with ShardedModel.create(str(ckpt), num_shards=2, elastic={"standby_shards": 1}) as sharded:
        (standby,) = poll(lambda: sharded.elastic_status()["standby"], len)
        check_equal(sharded, model, seed)
        ray.kill(sharded.shard_handles()[1], no_restart=True)
        events = wait_for_events(sharded)
        assert [(e["action"], e["ok"]) for e in events] == [("failover", True)], events
        assert "(1 from standby;" in events[0]["message"], events[0]["message"]
        assert sharded.shard_stats()[1]["pid"] == standby["pid"]
        check_equal(sharded, model, seed + 1)
        (refilled,) = poll(lambda: sharded.elastic_status()["standby"], len)
        assert refilled["pid"] != standby["pid"]
        assert sharded.scale_shards(3)["ok"]
        assert sharded.shard_stats()[2]["pid"] == refilled["pid"]
        check_equal(sharded, model, seed + 2)


def test_a_stuck_step_is_an_error_not_a_call_that_never_returns(cluster, seed, tmp_path):
    """A shard process stopped (SIGSTOP) holds the router's step in its collective (gloo waits up
    to the 60 s timeout): past `stuck_step_s` generate raises RouterStuck instead of waiting. Once
    the shard runs again the step finishes and the model answers as before."""
    cfg, model = reference("tiny", seed)
    ckpt = save_checkpoint(tmp_path / "ckpt", cfg, model.state_dict())
    with ShardedModel.create(str(ckpt), num_shards=2, elastic={"stuck_step_s": 2}) as sharded:
        stopped = sharded.shard_stats()[1]["pid"]
        os.kill(stopped, signal.SIGSTOP)
        try:
            started = time.time()
            with pytest.raises(RouterStuck, match=r"past the 2 s a step may take .*create it again"):
                sharded.generate([[5, 6, 7]], SamplingParams(max_new_tokens=4))
            assert time.time() - started < 30
            assert sharded.stats()["step_running_s"] > 2
        finally:
            os.kill(stopped, signal.SIGCONT)
        check_equal(sharded, model, seed)


def test_shutdown_frees_actors_and_placement_group(cluster, seed):
    cfg, _ = reference("tiny", seed)
    sharded = ShardedModel.create(cfg, num_shards=2, seed=seed)
    shards = sharded.shard_handles()
    sharded.shutdown()
    assert placement_group_table(sharded.pg)["state"] == "REMOVED"
    for handle in shards + [sharded.router]:
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(handle.stats.remote(), timeout=30)


def test_bad_inputs_are_clear_errors_and_the_model_keeps_serving(cluster, seed, tmp_path):
    cfg, model = reference("tiny", seed)
    ckpt = save_checkpoint(tmp_path / "ckpt", cfg, model.state_dict())
    with pytest.raises(ValueError, match="cuda_graphs must be one of all, router, none, got 'eager'"):
        ShardedModel.create(str(ckpt), num_shards=2, cuda_graphs="eager")
    with ShardedModel.create(str(ckpt), num_shards=2) as sharded:
        with pytest.raises(ray.exceptions.RayTaskError, match="token ids must be in"):
            sharded.forward([[1, cfg.vocab_size]])
        with pytest.raises(ray.exceptions.RayTaskError, match="prompt 0: prompt is empty"):
            sharded.generate([[]], SamplingParams())
        check_equal(sharded, model, seed)


def test_replicas_and_live_replacement_keep_logits(cluster, seed, tmp_path):
    """A placement with replicated experts, applied to the running model, gives the plain
    placement's logits; the shards' counts show the replicas sharing their experts' tokens."""
    cfg, model = reference("tiny", seed)
    ckpt = save_checkpoint(tmp_path / "ckpt", cfg, model.state_dict())
    tokens, _ = untied_tokens(model, seed, 4, 19)
    with ShardedModel.create(str(ckpt), num_shards=2) as sharded:
        plain = sharded.forward(tokens)
        replicated = [[[0, 1, 2, 3, 4, 5], [4, 5, 6, 7, 0]], [[7, 2, 3, 1], [1, 7, 0, 4, 5, 6, 2]]]
        event = sharded.apply_placement(replicated)
        assert event["ok"], event["message"]
        assert event["before"]["placement"] != event["after"]["placement"] == replicated
        assert (sharded.forward(tokens) - plain).abs().max() <= TOL
        check_equal(sharded, model, seed)
        per_expert = torch.zeros(cfg.n_moe_layers, cfg.moe.n_routed_experts, dtype=torch.long)
        copies_used = 0
        for s in sharded.shard_stats():
            for layer, (ids, load) in enumerate(zip(s["expert_ids"], s["expert_rows"])):
                per_expert[layer, ids] += torch.tensor(load)
                copies_used += sum(1 for e, n in zip(ids, load) if n > 0)
        assert per_expert.sum() > 0 and copies_used > cfg.n_moe_layers * cfg.moe.n_routed_experts - 4


def test_generation_continues_through_scale_rebalance_and_failover(cluster, seed, tmp_path):
    """Sequences in flight keep their KV caches while shards are added, experts re-placed with
    replicas, a shard is killed (replaced, step re-run) and shards removed: outputs equal the
    single-process model's."""
    cfg, model = reference("tiny", seed)
    params = SamplingParams(max_new_tokens=40, temperature=0.0)
    prompts, expected = untied_prompts(model, seed, (4, 9, 6), params)
    ckpt = save_checkpoint(tmp_path / "ckpt", cfg, model.state_dict())
    with ShardedModel.create(str(ckpt), num_shards=2, elastic={"redundant_experts": 2}) as sharded:
        for round_ in range(2):
            pending = sharded.router.generate.remote(prompts, params)
            if round_ == 0:
                events = [sharded.scale_shards(3), sharded.rebalance()]
            else:
                ray.kill(sharded.shard_handles()[0], no_restart=True)
                assert ray.get(pending, timeout=300) == expected
                pending = sharded.router.generate.remote(prompts, params)
                events = [sharded.scale_shards(2)]
            assert all(e["ok"] for e in events), [e["message"] for e in events]
            assert ray.get(pending, timeout=300) == expected
        status = sharded.elastic_status()
        assert [e["action"] for e in status["events"]] == ["scale", "rebalance", "failover", "scale"]
        assert len(status["shards"]) == 2 and all(s["alive"] for s in status["shards"])
        check_equal(sharded, model, seed)


def test_failover_without_resources_is_a_clear_error_then_recovers(cluster, seed, tmp_path):
    """A dead shard that cannot be replaced (no free CPU anywhere) fails the step with the reason,
    in the request and in the status, instead of hanging; once resources return, the next
    request after `retry_after_s` gets a replacement and the right answer."""
    cfg, model = reference("tiny", seed)
    ckpt = save_checkpoint(tmp_path / "ckpt", cfg, model.state_dict())
    elastic = {"start_timeout_s": 5, "retry_after_s": 3}
    with ShardedModel.create(str(ckpt), num_shards=2, elastic=elastic) as sharded:
        free = int(ray.available_resources().get("CPU", 0))
        blocker = placement_group([{"CPU": 1}] * free)
        ray.get(blocker.ready(), timeout=60)
        try:
            ray.kill(sharded.shard_handles()[1], no_restart=True)
            with pytest.raises(ray.exceptions.RayTaskError, match="no node has the resources"):
                sharded.forward([[1, 2, 3]])
            with pytest.raises(ray.exceptions.RayTaskError, match="tried again every 3 s"):
                sharded.forward([[1, 2, 3]])  # at once, without waiting for another try
            status = sharded.elastic_status()
            assert "shard 1" in status["failure"] and "no node has the resources" in status["failure"]
            assert status["events"][-1]["action"] == "failover" and not status["events"][-1]["ok"]
        finally:
            remove_placement_group(blocker)
        time.sleep(3.5)
        check_equal(sharded, model, seed)
        assert sharded.elastic_status()["failure"] is None
        assert [e["ok"] for e in sharded.elastic_status()["events"]] == [False, True]


def skewed_model(cfg, seed: int, hot: list[int]):
    """Routing that prefers a few experts: their selection bias is raised in every layer."""
    model = build_model(cfg, seed)
    with torch.no_grad():
        for moe in model.moe_layers():
            moe.expert_bias[hot] += 0.6
    return model


def test_controller_rebalances_a_skewed_load(cluster, seed, tmp_path):
    """With a few hot experts the contiguous placement is unbalanced; the controller notices in
    its window and re-places experts with replicas, after which the shards' measured load is
    within 1.15 of even, and answers are unchanged."""
    cfg, _ = reference("tiny", seed)
    model = skewed_model(cfg, seed, hot=[0, 1, 2])
    params = SamplingParams(max_new_tokens=12, temperature=0.0)
    prompts, expected = untied_prompts(model, seed, (12,) * 6, params)
    ckpt = save_checkpoint(tmp_path / "ckpt", cfg, model.state_dict())
    elastic = {"rebalance": True, "threshold": 1.15, "interval_s": 0.5, "min_window_tokens": 200,
               "redundant_experts": 3}
    with ShardedModel.create(str(ckpt), num_shards=2, elastic=elastic) as sharded:
        assert sharded.generate(prompts, params) == expected
        event = wait_for_events(sharded)[0]
        assert event["action"] == "auto-rebalance" and event["ok"], event
        print(f"imbalance: contiguous {event['before']['imbalance']:.3f} -> rebalanced {event['after']['imbalance']:.3f}")
        assert event["before"]["imbalance"] > 1.3 and event["after"]["imbalance"] <= 1.15
        assert sharded.generate(prompts, params) == expected
        measured = [sum(sum(layer) for layer in s["expert_rows"]) for s in sharded.shard_stats()]
        assert max(measured) / (sum(measured) / len(measured)) <= 1.15, measured


def test_controller_scales_shards_by_load(cluster, seed):
    """Under load, above scale_up_tokens_s routed tokens/s per shard, the controller adds a shard
    (up to max_shards); once idle, below scale_down_tokens_s, it removes one again. Answers stay."""
    cfg = tiny_config("tiny")
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    params = SamplingParams(max_new_tokens=16, temperature=0.0)
    prompts, expected = untied_prompts(model, seed, (4, 3), params)
    elastic = {"autoscale": True, "scale_up_tokens_s": 5.0, "scale_down_tokens_s": 2.0, "min_shards": 2,
               "max_shards": 3, "interval_s": 0.5, "window_steps": 8}
    with ShardedModel.create(cfg, num_shards=2, seed=seed, elastic=elastic) as sharded:
        answers = []
        for _ in range(60):  # load until the controller has scaled out (bounded)
            answers.append(sharded.generate(prompts, params))
            if sharded.elastic_status()["events"]:
                break
        events = wait_for_events(sharded, count=2, timeout_s=90)
        assert [(e["action"], e["message"], e["ok"]) for e in events] == [
            ("auto-scale", "2 -> 3 shards", True), ("auto-scale", "3 -> 2 shards", True)], events
        assert all(a == expected for a in answers) and sharded.generate(prompts, params) == expected
