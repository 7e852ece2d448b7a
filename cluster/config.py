"""The job config: one OmegaConf structured schema for model, training, serving and the cluster.

A config comes from a preset name (`manifests/models/<name>.yaml`) or a YAML path, then CLI
dotlist overrides (`train.max_steps=50 model.moe.top_k=4`). Everything is validated while
loading, so a typo or an impossible value fails with one line naming the key, before any
worker or actor starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from actors.elastic import ElasticConfig, check_elastic_config
from model.config import ConfigError, ModelConfig, check_model_config, merge_checked

PRESETS_DIR = Path(__file__).resolve().parent.parent / "manifests" / "models"


@dataclass
class TrainConfig:
    data_dir: str = "data/corpus"
    seq_len: int = 128
    # sequences per optimizer step over all workers (micro batch x accumulation x workers)
    batch_size: int = 8
    # sequences per worker per forward; 0 means batch_size / num_workers (no accumulation)
    micro_batch_size: int = 0
    max_steps: int = 200
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 10
    # distributed training (Ray Train + DeepSpeed)
    num_workers: int = 2
    use_gpu: bool = False
    # bf16 weights, activations and gradients under fp32 master weights; unset: on GPUs only
    bf16: Optional[bool] = None
    # each block's forward and backward replayed as CUDA graphs (train/block_graphs.py); unset:
    # on GPUs, for the blocks that allow it; true: every block must, or the run does not start
    cuda_graphs: Optional[bool] = None
    # "moray" (dropless grouped MoE, expert parallel) or "deepspeed" (deepspeed.moe.layer.MoE)
    moe_impl: str = "moray"
    # expert-parallel group size; 0 means all workers. Must divide num_workers and the experts.
    ep_size: int = 0
    zero_stage: int = 1
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    max_failures: int = 1
    storage_path: str = "runs"
    run_name: str = "moray-train"


@dataclass
class ServeConfig:
    num_shards: int = 2
    max_batch_size: int = 32
    http_port: int = 8000
    grpc_port: int = 9000
    min_replicas: int = 1
    max_replicas: int = 1


@dataclass
class ClusterConfig:
    # None starts an embedded local Ray cluster; "auto" or "ray://host:port" joins one
    address: str | None = None
    num_cpus: int | None = None
    host: str = "127.0.0.1"
    # elastic experts of each served model copy: failover, rebalancing, shard autoscaling
    elastic: ElasticConfig = field(default_factory=ElasticConfig)


@dataclass
class MorayConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def load_cluster_config(overrides: list[str] | tuple[str, ...] = ()) -> ClusterConfig:
    """Only the `cluster` section from dotlist overrides (`cluster.elastic.rebalance=true`), checked
    against the same schema; for commands that take a checkpoint rather than a preset."""
    cfg = OmegaConf.structured(ClusterConfig)
    for item in overrides:
        key, sep, _ = item.partition("=")
        if not sep or not key.startswith("cluster."):
            raise ConfigError(f"override {item!r}: expected cluster.<key>=value")
        try:
            dot = OmegaConf.from_dotlist([item[len("cluster."):]])
        except OmegaConfBaseException as exc:
            raise ConfigError(f"override {item!r}: {str(exc).splitlines()[0]}") from None
        cfg = merge_checked(cfg, dot, f"override {item!r}")
    obj: ClusterConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    check_elastic_config(obj.elastic)
    return obj


def _resolve_source(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file {name_or_path} does not exist")
        return path
    preset = PRESETS_DIR / f"{name_or_path}.yaml"
    if not preset.is_file():
        raise ConfigError(f"unknown preset {name_or_path!r}; presets: {', '.join(preset_names())}")
    return preset


def load_config(name_or_path: str = "tiny", overrides: list[str] | tuple[str, ...] = ()) -> MorayConfig:
    """Preset or YAML file, then dotlist overrides, checked against the schema and its rules."""
    source = _resolve_source(name_or_path)
    try:
        file_cfg = OmegaConf.load(source)
    except Exception as exc:  # a YAML syntax error: say which file
        raise ConfigError(f"{source}: not valid YAML: {str(exc).splitlines()[0]}") from None
    cfg = merge_checked(OmegaConf.structured(MorayConfig), file_cfg, str(source))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        try:
            dot = OmegaConf.from_dotlist([item])
        except OmegaConfBaseException as exc:
            raise ConfigError(f"override {item!r}: {str(exc).splitlines()[0]}") from None
        cfg = merge_checked(cfg, dot, f"override {item!r}")
    obj: MorayConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    check_model_config(obj.model)
    check_train_config(obj.train, obj.model)
    check_elastic_config(obj.cluster.elastic)
    return obj


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"train.{key}: {message}")


def effective_ep_size(train: TrainConfig) -> int:
    return train.ep_size or train.num_workers


def micro_batch(train: TrainConfig, num_workers: int | None = None) -> tuple[int, int]:
    """(micro batch per worker, gradient accumulation steps) for this many workers."""
    workers = num_workers or train.num_workers
    micro = train.micro_batch_size or train.batch_size // workers
    return micro, train.batch_size // (micro * workers)


def check_train_config(train: TrainConfig, model: ModelConfig) -> None:
    for key in ("seq_len", "batch_size", "max_steps", "num_workers", "checkpoint_every", "keep_checkpoints"):
        _require(getattr(train, key) > 0, key, f"must be > 0, got {getattr(train, key)}")
    _require(train.moe_impl in ("moray", "deepspeed"), "moe_impl",
             f"must be 'moray' or 'deepspeed', got {train.moe_impl!r}")
    _require(train.zero_stage in (0, 1, 2), "zero_stage", f"must be 0, 1 or 2 (MoE), got {train.zero_stage}")
    _require(not (train.cuda_graphs and not train.use_gpu), "cuda_graphs", "CUDA graphs need use_gpu: true")
    ep = effective_ep_size(train)
    _require(train.num_workers % ep == 0, "ep_size", f"{ep} does not divide num_workers {train.num_workers}")
    if model.n_moe_layers:
        _require(model.moe.n_routed_experts % ep == 0, "ep_size",
                 f"{ep} does not divide the {model.moe.n_routed_experts} routed experts")
    micro, accum = micro_batch(train)
    _require(micro > 0 and micro * accum * train.num_workers == train.batch_size, "batch_size",
             f"{train.batch_size} is not micro_batch_size ({micro}) x accumulation x num_workers "
             f"({train.num_workers})")


