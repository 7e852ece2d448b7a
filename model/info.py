"""Model size arithmetic: total and per-token activated parameters, KV-cache bytes per token.

Counted from the real module tree built on the meta device (no memory, no init), so the numbers
cannot drift from the code: a DeepSeek-V3-sized model costs nothing to inspect.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from model.config import ModelConfig
from model.moe import MoE
from model.transformer import Transformer

BF16_BYTES = 2


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _activated(module: nn.Module) -> int:
    """Parameters a token touches: everything but the routed experts it is not sent to."""
    total = _count(module)
    for moe in (m for m in module.modules() if isinstance(m, MoE)):
        routed = _count(moe.experts)
        total -= routed - routed * moe.cfg.top_k // moe.cfg.n_routed_experts
    return total


@dataclass
class LayerInfo:
    index: int
    kind: str  # "dense" or "moe"
    attention: int
    ffn: int
    activated: int


@dataclass
class ModelInfo:
    name: str
    total_params: int  # main model, without the MTP modules
    # per token, without the input-embedding lookup (a table read, not compute), as DeepSeek counts
    activated_params: int
    mtp_params: int
    embedding_params: int  # input embedding + output head
    kv_cache_bytes_per_token: int  # bf16, all layers
    layers: list[LayerInfo]

    def to_dict(self) -> dict:
        return asdict(self)


def kv_cache_bytes_per_token(cfg: ModelConfig) -> int:
    if cfg.attention == "mla":
        per_layer = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    else:
        per_layer = 2 * cfg.n_kv_heads * cfg.head_dim
    return per_layer * cfg.n_layers * BF16_BYTES


def model_info(cfg: ModelConfig) -> ModelInfo:
    with torch.device("meta"):
        model = Transformer(cfg)
    mtp = _count(model.mtp)
    layers = [LayerInfo(index=i, kind="moe" if isinstance(b.ffn, MoE) else "dense", attention=_count(b.attn),
                        ffn=_count(b.ffn), activated=_activated(b)) for i, b in enumerate(model.layers)]
    embedding = _count(model.embed) + (0 if cfg.tie_embeddings else _count(model.head))
    return ModelInfo(
        name=cfg.name,
        total_params=_count(model) - mtp,
        activated_params=_activated(model) - _activated(model.mtp) - _count(model.embed),
        mtp_params=mtp,
        embedding_params=embedding,
        kv_cache_bytes_per_token=kv_cache_bytes_per_token(cfg),
        layers=layers,
    )


def human(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))
