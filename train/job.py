"""Launching a training run: a Ray Train `TorchTrainer` whose workers run `train_worker`.

Everything that can be wrong with the input (config, data dir, worker/expert counts) is
checked here, before any worker starts, and fails with one line.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import ray
from omegaconf import OmegaConf
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from cluster.config import MorayConfig, check_train_config
from model.checkpoint import load_config as load_checkpoint_config
from model.config import ConfigError
from model.hf import as_moray_checkpoint
from train.data import load_manifest
from train.worker import MODEL_DIR, train_worker

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_dir: str
    checkpoint_dir: str | None  # the last checkpoint (DeepSpeed state + model/)
    model_checkpoint: str | None  # moray-format model inside it, for serving
    metrics: dict
    error: str | None


def check_before_start(cfg: MorayConfig) -> None:
    """Data present, vocabulary fits, resources exist: refuse to start otherwise."""
    if cfg.train.seq_len > cfg.model.max_seq_len:
        raise ConfigError(f"train.seq_len: {cfg.train.seq_len} exceeds the model's max_seq_len {cfg.model.max_seq_len}")
    manifest = load_manifest(cfg.train.data_dir)
    if manifest.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size: {cfg.model.vocab_size} is smaller than the tokenizer's "
                          f"{manifest.vocab_size} in {cfg.train.data_dir}")
    if ray.is_initialized():
        have = ray.cluster_resources().get("GPU" if cfg.train.use_gpu else "CPU", 0)
        if have < cfg.train.num_workers:
            kind = "GPUs" if cfg.train.use_gpu else "CPUs"
            raise ConfigError(f"train.num_workers: {cfg.train.num_workers} workers need {cfg.train.num_workers} "
                              f"{kind}; the cluster has {have:g}")


def start_from(cfg: MorayConfig, init_from: str) -> tuple[MorayConfig, str]:
    """Training that starts from a checkpoint trains that checkpoint's model: `init_from` (a moray
    checkpoint, or a Hugging Face dir converted once into the cache) and its model config replace
    the config's."""
    ckpt = str(as_moray_checkpoint(init_from))
    model = load_checkpoint_config(ckpt)
    check_train_config(cfg.train, model)
    return replace(cfg, model=model), ckpt


def run_training(cfg: MorayConfig, init_from: str | None = None, resume_from: str | None = None) -> TrainResult:
    """Train on the connected Ray cluster; `resume_from` is a checkpoint dir of an earlier run
    (possibly with another number of workers)."""
    check_before_start(cfg)
    storage = str(Path(cfg.train.storage_path).resolve())
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"cfg": OmegaConf.to_container(OmegaConf.structured(cfg)), "init_from": init_from,
                           "resume_from": str(Path(resume_from).resolve()) if resume_from else None},
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu),
        run_config=RunConfig(
            name=cfg.train.run_name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
        ),
    )
    result = trainer.fit()
    ckpt = result.checkpoint.path if result.checkpoint is not None else None
    return TrainResult(run_dir=str(result.path), checkpoint_dir=ckpt,
                       model_checkpoint=str(Path(ckpt) / MODEL_DIR) if ckpt else None,
                       metrics=dict(result.metrics or {}), error=str(result.error) if result.error else None)
