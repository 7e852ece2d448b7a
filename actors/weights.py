"""Where a sharded model's weights come from: a moray checkpoint, or a seed (tests, benchmarks).

Seeded weights equal those of `Transformer(cfg)` built after `torch.manual_seed(seed)`, so a
sharded model from a seed can be checked against the single-process model from the same seed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache

import torch

from model import checkpoint
from model.config import ModelConfig, model_config_from_dict, model_config_to_dict
from model.moe import EXPERT_WEIGHTS
from model.transformer import Transformer



@lru_cache(maxsize=2)
def _seeded_state(cfg_json: str, seed: int) -> dict[str, torch.Tensor]:
    """Built once per process and config: a shard reads one layer's slice at a time."""
    torch.manual_seed(seed)
    return Transformer(model_config_from_dict(json.loads(cfg_json))).state_dict()


@dataclass(frozen=True)
class WeightSource:
    checkpoint: str | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if (self.checkpoint is None) == (self.seed is None):
            raise ValueError("a weight source is either a checkpoint path or a seed")

    def _seeded(self, cfg: ModelConfig) -> dict[str, torch.Tensor]:
        return _seeded_state(json.dumps(model_config_to_dict(cfg), sort_keys=True), self.seed)

    def non_expert_state(self, cfg: ModelConfig) -> dict[str, torch.Tensor]:
        """Everything the router holds: all but routed experts and the training-only MTP modules."""
        if self.checkpoint is not None:
            state = checkpoint.load_non_expert_state_dict(self.checkpoint)
        else:
            state = {k: v for k, v in self._seeded(cfg).items() if not checkpoint.is_expert_tensor(k)}
        return {k: v for k, v in state.items() if not k.startswith("mtp.")}

    def expert_state(self, cfg: ModelConfig, layer: int, expert_ids: list[int]) -> dict[str, torch.Tensor]:
        """One layer's routed experts, rows in the order of expert_ids: {w_gate_up, w_down}."""
        prefix = f"layers.{layer}.ffn.experts."
        if self.checkpoint is not None:
            state = checkpoint.load_expert_slice(self.checkpoint, expert_ids, prefix=prefix)
            return {name: state[prefix + name] for name in EXPERT_WEIGHTS}
        full = self._seeded(cfg)
        index = torch.tensor(expert_ids, dtype=torch.long)
        return {name: full[prefix + name].index_select(0, index) for name in EXPERT_WEIGHTS}
