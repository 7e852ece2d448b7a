"""The job config: one OmegaConf structured schema for model, training, serving and the cluster.

A config comes from a preset name (`manifests/models/<name>.yaml`) or a YAML path, then CLI
dotlist overrides (`train.max_steps=50 model.moe.top_k=4`). Everything is validated while
loading, so a typo or an impossible value fails with one line naming the key, before any
worker or actor starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from model.config import ConfigError, ModelConfig, check_model_config, merge_checked

PRESETS_DIR = Path(__file__).resolve().parent.parent / "manifests" / "models"


@dataclass
class TrainConfig:
    data_dir: str = "data/corpus"
    seq_len: int = 128
    batch_size: int = 8
    max_steps: int = 200
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 10


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


@dataclass
class MorayConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


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
    return obj


