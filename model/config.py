"""The model's config schema: one structured OmegaConf tree, validated when it is loaded.

Field names follow DeepSeek-V3's `ModelArgs` where one exists, so a reader of the paper or of
Hugging Face configs recognizes them. Cross-field rules live in `check_model_config`, so an
impossible combination fails at load time, with the key named, instead of deep in a forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A config value is wrong; the message names the key and says what is expected."""


# where a sharded model's decode steps replay as CUDA graphs (GPU only): router and shards, the
# router only, nowhere (`actors/router.py`, `actors/shard_graphs.py`)
CUDA_GRAPH_MODES = ("all", "router", "none")


def check_cuda_graphs(mode: str) -> None:
    if mode not in CUDA_GRAPH_MODES:
        raise ConfigError(f"cuda_graphs must be one of {', '.join(CUDA_GRAPH_MODES)}, got {mode!r}")


@dataclass
class MoEConfig:
    n_routed_experts: int = 8
    n_shared_experts: int = 1
    top_k: int = 2
    moe_inter_dim: int = 128
    # "softmax" (DeepSeek-V2, Mixtral) or "sigmoid" (DeepSeek-V3)
    score_func: str = "softmax"
    # group-limited routing: experts fall in n_group groups, tokens pick topk_group groups first
    n_group: int = 1
    topk_group: int = 1
    # how a group is scored: "max" (DeepSeek-V2) or "top2_sum" (DeepSeek-V3)
    group_score: str = "max"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    # auxiliary-loss-free balancing: a per-expert bias used for selection only
    bias_balancing: bool = True
    bias_update_rate: float = 1e-3
    # sequence-wise auxiliary balance loss coefficient (0 disables it)
    aux_loss_alpha: float = 0.0
    # 0 means dropless; > 0 caps each expert at ceil(cf * tokens * top_k / n_routed_experts)
    capacity_factor: float = 0.0
    # > 1 computes the routed experts in that many blocks of sorted rows, so the transient [M, D]
    # tensors (M = tokens * top_k) shrink by that factor: lower peak memory in training for one
    # host sync per layer and an extra pass over the [N, D] sum per block (model/expert_ffn.py);
    # applies where gradients are recorded (training), never to inference
    expert_chunks: int = 1


@dataclass
class ModelConfig:
    name: str = "custom"
    vocab_size: int = 4096
    dim: int = 128
    n_layers: int = 4
    n_dense_layers: int = 1
    # hidden width of the dense SwiGLU FFN of the first n_dense_layers
    inter_dim: int = 512
    n_heads: int = 4
    max_seq_len: int = 256
    norm_eps: float = 1e-6
    # "mla" (multi-head latent attention) or "gqa" (grouped-query, MHA when n_kv_heads == n_heads)
    attention: str = "mla"
    # MLA: q_lora_rank 0 means a plain query projection
    q_lora_rank: int = 0
    kv_lora_rank: int = 64
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    # GQA
    n_kv_heads: int = 4
    head_dim: int = 32
    # rotary embedding; rope_factor > 1 turns on YaRN scaling past original_seq_len
    rope_theta: float = 10000.0
    rope_interleaved: bool = True
    rope_factor: float = 1.0
    original_seq_len: int = 4096
    beta_fast: int = 32
    beta_slow: int = 1
    mscale: float = 1.0
    moe: MoEConfig = field(default_factory=MoEConfig)
    # multi-token prediction: depth D extra modules, loss weight lambda
    mtp_depth: int = 0
    mtp_lambda: float = 0.3
    tie_embeddings: bool = False
    init_std: float = 0.02

    @property
    def n_moe_layers(self) -> int:
        return self.n_layers - self.n_dense_layers

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"model.{key}: {message}")


def check_model_config(cfg: ModelConfig) -> None:
    """Reject combinations the model cannot be built with, naming the offending key."""
    for key in ("vocab_size", "dim", "n_layers", "inter_dim", "n_heads", "max_seq_len"):
        _require(getattr(cfg, key) > 0, key, f"must be > 0, got {getattr(cfg, key)}")
    _require(0 <= cfg.n_dense_layers <= cfg.n_layers, "n_dense_layers",
             f"must be between 0 and n_layers ({cfg.n_layers}), got {cfg.n_dense_layers}")
    _require(cfg.attention in ("mla", "gqa"), "attention", f"must be 'mla' or 'gqa', got {cfg.attention!r}")
    if cfg.attention == "mla":
        for key in ("kv_lora_rank", "qk_nope_head_dim", "v_head_dim"):
            _require(getattr(cfg, key) > 0, key, f"must be > 0 for MLA, got {getattr(cfg, key)}")
        _require(cfg.q_lora_rank >= 0, "q_lora_rank", f"must be >= 0, got {cfg.q_lora_rank}")
        _require(cfg.qk_rope_head_dim > 0 and cfg.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim",
                 f"must be a positive even number, got {cfg.qk_rope_head_dim}")
    else:
        _require(cfg.n_kv_heads > 0 and cfg.n_heads % cfg.n_kv_heads == 0, "n_kv_heads",
                 f"must divide n_heads ({cfg.n_heads}), got {cfg.n_kv_heads}")
        _require(cfg.head_dim > 0 and cfg.head_dim % 2 == 0, "head_dim",
                 f"must be a positive even number, got {cfg.head_dim}")
    _require(cfg.rope_factor >= 1.0, "rope_factor", f"must be >= 1, got {cfg.rope_factor}")
    _require(cfg.mtp_depth >= 0, "mtp_depth", f"must be >= 0, got {cfg.mtp_depth}")
    moe = cfg.moe
    if cfg.n_moe_layers == 0:
        return
    _require(moe.n_routed_experts > 0, "moe.n_routed_experts", f"must be > 0, got {moe.n_routed_experts}")
    _require(1 <= moe.top_k <= moe.n_routed_experts, "moe.top_k",
             f"must be between 1 and n_routed_experts ({moe.n_routed_experts}), got {moe.top_k}")
    _require(moe.n_shared_experts >= 0, "moe.n_shared_experts", f"must be >= 0, got {moe.n_shared_experts}")
    _require(moe.moe_inter_dim > 0, "moe.moe_inter_dim", f"must be > 0, got {moe.moe_inter_dim}")
    _require(moe.score_func in ("softmax", "sigmoid"), "moe.score_func",
             f"must be 'softmax' or 'sigmoid', got {moe.score_func!r}")
    _require(moe.group_score in ("max", "top2_sum"), "moe.group_score",
             f"must be 'max' or 'top2_sum', got {moe.group_score!r}")
    _require(moe.n_group >= 1 and moe.n_routed_experts % moe.n_group == 0, "moe.n_group",
             f"must divide n_routed_experts ({moe.n_routed_experts}), got {moe.n_group}")
    _require(1 <= moe.topk_group <= moe.n_group, "moe.topk_group",
             f"must be between 1 and n_group ({moe.n_group}), got {moe.topk_group}")
    per_group = moe.n_routed_experts // moe.n_group
    _require(moe.top_k <= moe.topk_group * per_group, "moe.top_k",
             f"{moe.top_k} exceeds the experts reachable in topk_group groups ({moe.topk_group * per_group})")
    if moe.group_score == "top2_sum" and moe.n_group > 1:
        _require(per_group >= 2, "moe.group_score", "top2_sum needs at least 2 experts per group")
    _require(moe.capacity_factor >= 0, "moe.capacity_factor", f"must be >= 0, got {moe.capacity_factor}")
    _require(moe.expert_chunks >= 1, "moe.expert_chunks", f"must be >= 1, got {moe.expert_chunks}")
    _require(moe.aux_loss_alpha >= 0, "moe.aux_loss_alpha", f"must be >= 0, got {moe.aux_loss_alpha}")
    _require(moe.bias_update_rate >= 0, "moe.bias_update_rate", f"must be >= 0, got {moe.bias_update_rate}")


def merge_checked(base: DictConfig, other: Any, what: str) -> DictConfig:
    """OmegaConf merge whose schema errors become one ConfigError line naming the key."""
    try:
        return OmegaConf.merge(base, other)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        reason = str(exc).splitlines()[0]
        raise ConfigError(f"{what}: key {key!r}: {reason}") from None


def model_config_from_dict(data: dict, what: str = "model config") -> ModelConfig:
    """A model config as stored in a checkpoint's config.yaml, checked like a preset."""
    cfg = merge_checked(OmegaConf.structured(ModelConfig), data, what)
    model_cfg: ModelConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    check_model_config(model_cfg)
    return model_cfg


def model_config_to_dict(cfg: ModelConfig) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg))  # type: ignore[return-value]
