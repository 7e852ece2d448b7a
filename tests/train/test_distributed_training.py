"""Training under Ray Train with DeepSpeed (CPU, gloo, 2 workers): both MoE implementations
learn; the exported checkpoint serves; a killed worker resumes exactly; the world size can
change across a resume.

One Ray instance and one prepared corpus serve the whole module.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time

import pytest
import ray

from cluster.config import load_config
from cluster.sharded import ShardedModel
from model.checkpoint import load_config as load_model_config
from model.checkpoint import load_into
from model.transformer import Transformer
from tests.format_1 import rewrite_as_format_1
from tests.routing_ties import untied_tokens
from train.data import prepare_corpus
from train.job import run_training
from train.worker import DS_TAG, MODEL_DIR


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    corpus = root / "corpus"
    prepare_corpus(None, corpus, vocab_size=2048, progress=False)
    ray.init(address="local", num_cpus=4, include_dashboard=False)
    yield root, corpus
    ray.shutdown()


def config(env, name: str, *overrides: str):
    root, corpus = env
    return load_config("tiny", [f"train.data_dir={corpus}", f"train.storage_path={root / 'runs'}",
                                f"train.run_name={name}", *overrides])


def metrics_by_step(env, name: str) -> dict[int, dict]:
    """The last record of each step (a resumed run logs the replayed steps again)."""
    records = [json.loads(line) for line in (env[0] / "runs" / name / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in records}


@pytest.mark.parametrize("impl", ["moray", "deepspeed"])
def test_training_learns_and_the_export_serves(env, impl, seed):
    cfg = config(env, f"learn-{impl}", f"train.moe_impl={impl}", "train.max_steps=30", "train.log_every=5",
                 "train.checkpoint_every=30", "train.warmup_steps=5")
    result = run_training(cfg)
    assert result.error is None
    steps = metrics_by_step(env, f"learn-{impl}")
    assert steps[30]["loss"] < steps[5]["loss"] - 0.8, f"loss did not fall: {steps[5]['loss']} -> {steps[30]['loss']}"
    assert steps[30]["tokens_per_s"] > 0 and len(steps[30]["layer_imbalance"]) == 3
    if impl == "moray":
        assert steps[30]["mtp_loss"] > 0
    # the exported model: single-process and sharded runtime agree
    model_cfg = load_model_config(result.model_checkpoint)
    model = Transformer(model_cfg).eval()
    load_into(model, result.model_checkpoint)
    tokens, expected = untied_tokens(model, seed, 2, 17)
    with ShardedModel.create(result.model_checkpoint, num_shards=2) as sharded:
        assert (sharded.forward(tokens) - expected).abs().max() <= 1e-5


def _kill_rank_when(env, name: str, rank: int, step: int, deadline_s: float = 240) -> threading.Thread:
    run_dir = env[0] / "runs" / name

    def watch():
        end = time.time() + deadline_s
        while time.time() < end:
            log = run_dir / "metrics.jsonl"
            if log.exists() and any(json.loads(line)["step"] >= step for line in log.read_text().splitlines()):
                os.kill(int((run_dir / "workers" / f"rank{rank}.pid").read_text()), signal.SIGKILL)
                return
            time.sleep(0.2)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_killed_worker_resumes_from_checkpoint_on_the_same_curve(env):
    common = ("train.max_steps=12", "train.log_every=1", "train.checkpoint_every=4", "train.keep_checkpoints=10")
    reference = run_training(config(env, "uninterrupted", *common))
    assert reference.error is None
    watcher = _kill_rank_when(env, "interrupted", rank=1, step=6)
    result = run_training(config(env, "interrupted", *common, "train.max_failures=2"))
    watcher.join(timeout=1)
    assert result.error is None and result.metrics["step"] == 12
    lines = (env[0] / "runs" / "interrupted" / "metrics.jsonl").read_text().splitlines()
    logged_steps = [json.loads(line)["step"] for line in lines]
    assert logged_steps.count(5) == 2, f"no replay from the step-4 checkpoint: {logged_steps}"
    ref, got = metrics_by_step(env, "uninterrupted"), metrics_by_step(env, "interrupted")
    for step in range(5, 13):
        assert abs(got[step]["loss"] - ref[step]["loss"]) <= 1e-5, f"step {step}: {got[step]['loss']} vs {ref[step]['loss']}"


def _checkpoint_at(env, name: str, step: int) -> str:
    run_dir = env[0] / "runs" / name
    for ckpt in (p for p in run_dir.glob("checkpoint_*") if p.is_dir()):  # Ray Train keeps a snapshot file beside
        if json.loads((ckpt / "train_state.json").read_text())["step"] == step:
            return str(ckpt)
    raise AssertionError(f"no checkpoint of step {step} in {run_dir}")


def test_resume_with_another_world_size_continues_the_loss(env):
    """2 -> 1 worker (global batch kept by accumulation) and 1 -> 2: the next step's loss is
    what the original world size computes for it."""
    ref = metrics_by_step(env, "uninterrupted")  # 2 workers, from the test above
    ckpt8 = _checkpoint_at(env, "uninterrupted", 8)
    one = run_training(config(env, "one-worker", "train.num_workers=1", "train.micro_batch_size=4",
                              "train.max_steps=9", "train.log_every=1", "train.checkpoint_every=9"),
                       resume_from=ckpt8)
    assert one.error is None
    assert abs(metrics_by_step(env, "one-worker")[9]["loss"] - ref[9]["loss"]) <= 1e-5
    ckpt9 = _checkpoint_at(env, "one-worker", 9)
    back_to_two = run_training(config(env, "two-again", "train.max_steps=10", "train.log_every=1",
                                      "train.checkpoint_every=10"), resume_from=ckpt9)
    still_one = run_training(config(env, "still-one", "train.num_workers=1", "train.micro_batch_size=4",
                                    "train.max_steps=10", "train.log_every=1", "train.checkpoint_every=10"),
                             resume_from=ckpt9)
    assert back_to_two.error is None and still_one.error is None
    assert abs(metrics_by_step(env, "two-again")[10]["loss"] - metrics_by_step(env, "still-one")[10]["loss"]) <= 1e-5


@pytest.mark.parametrize("older", ["model format 1", "per-expert DeepSpeed parameters"])
def test_a_run_checkpoint_of_an_older_layout_resumes_from_its_model_weights(env, tmp_path, older):
    """A run checkpoint written before the gate and up weights were joined (model format 1), or
    before each rank's experts became one DeepSpeed parameter per weight kind (no
    `deepspeed_layout` in its state), has DeepSpeed files of other parameters, which this moray
    must not read: with the same world size it resumes from the model weights, on the original
    curve. Here its DeepSpeed files are gone, so reading them would fail the run."""
    ref = metrics_by_step(env, "uninterrupted")
    old = tmp_path / "old-run-checkpoint"
    shutil.copytree(_checkpoint_at(env, "uninterrupted", 8), old)
    shutil.rmtree(old / DS_TAG)
    if older == "model format 1":
        rewrite_as_format_1(old / MODEL_DIR)
    else:
        state = json.loads((old / "train_state.json").read_text())
        del state["deepspeed_layout"]
        (old / "train_state.json").write_text(json.dumps(state))
    name = f"from-{older.replace(' ', '-')}"
    result = run_training(config(env, name, "train.max_steps=9", "train.log_every=1", "train.checkpoint_every=9"),
                          resume_from=str(old))
    assert result.error is None
    assert abs(metrics_by_step(env, name)[9]["loss"] - ref[9]["loss"]) <= 1e-5


def test_bad_input_fails_before_any_worker_starts(env):
    from model.config import ConfigError
    from train.data import DataError

    with pytest.raises(DataError, match="data dir not found"):
        run_training(config(env, "bad", "train.data_dir=/no/such/dir"))
    with pytest.raises(ConfigError, match="train.ep_size"):
        config(env, "bad", "train.ep_size=3", "train.num_workers=3")
    with pytest.raises(ConfigError, match="num_workers: 8 workers need 8 CPUs"):
        run_training(config(env, "bad", "train.num_workers=8", "train.batch_size=8"))
    assert not (env[0] / "runs" / "bad").exists()
