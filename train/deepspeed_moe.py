"""DeepSpeed's stock MoE layer (`deepspeed.moe.layer.MoE`) in place of moray's, for comparison.

DeepSpeed gates with softmax top-k and its own GShard-style balance loss (no selection bias,
no group-limited routing), runs experts one by one and exchanges capacity-padded [E, C, D]
buffers. Dropless here (drop_tokens=False) unless the config sets a capacity factor. Shared
experts are moray's, added on top. The exported checkpoint maps onto moray's MoE with
softmax scoring, normalized top-k weights and no bias.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.distributed as dist
from deepspeed.moe.layer import MoE as DeepSpeedMoE
from torch import nn

from model.config import ModelConfig
from model.layers import SwiGLU
from model.moe import EXPERT_WEIGHTS
from model.transformer import Transformer

DEFAULT_BALANCE_COEF = 0.01  # DeepSpeed's layer always computes its balance loss; weigh it like GShard


class StockMoEBlock(nn.Module):
    def __init__(self, dim: int, cfg: ModelConfig, ep_size: int):
        super().__init__()
        moe = cfg.moe
        self.moe = DeepSpeedMoE(dim, SwiGLU(dim, moe.moe_inter_dim), num_experts=moe.n_routed_experts, ep_size=ep_size,
                                k=moe.top_k, capacity_factor=max(moe.capacity_factor, 1.0),
                                eval_capacity_factor=max(moe.capacity_factor, 1.0), drop_tokens=moe.capacity_factor > 0,
                                use_rts=False)
        self.shared = SwiGLU(dim, moe.n_shared_experts * moe.moe_inter_dim) if moe.n_shared_experts else None
        self.balance_coef = moe.aux_loss_alpha or DEFAULT_BALANCE_COEF
        self.register_buffer("last_load", torch.zeros(moe.n_routed_experts, dtype=torch.long), persistent=False)

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        out, l_aux, counts = self.moe(x)
        self.last_load.copy_(counts.to(self.last_load))
        if self.shared is not None:
            out = out + self.shared(x)
        return out, (self.balance_coef * l_aux if self.training else None)


def use_stock_moe(model: Transformer, ep_size: int) -> None:
    """Replace every moray MoE (main stack and MTP) with DeepSpeed's layer, freshly initialized."""
    for block in [b for b in model.modules() if hasattr(b, "is_moe") and b.is_moe]:
        block.ffn = StockMoEBlock(model.cfg.dim, model.cfg, ep_size)


def stock_to_moray_state(state: dict[str, torch.Tensor], gathered_experts: dict[str, torch.Tensor]) -> dict:
    """State dict of a stock-MoE model -> moray names (experts stacked [E, D, F] / [E, F, D])."""
    out = {}
    for name, tensor in state.items():
        if ".deepspeed_moe." in name:
            if name.endswith("deepspeed_moe.gate.wg.weight"):
                out[name.replace("moe.deepspeed_moe.gate.wg.weight", "gate.weight")] = tensor
            continue
        out[name] = tensor
    out.update(gathered_experts)
    return out


def gather_stock_experts(model: Transformer) -> dict[str, torch.Tensor]:
    """Every stock layer's experts gathered over its ep group, as moray's stacked tensors
    (nn.Linear keeps [out, in]; moray stacks [in, out] per expert; the experts are moray's SwiGLU,
    so their gate and up rows are already side by side)."""
    out = {}
    for name, module in model.named_modules():
        if not isinstance(module, StockMoEBlock):
            continue
        experts = module.moe.deepspeed_moe.experts.deepspeed_experts
        for weight in EXPERT_WEIGHTS:
            local = torch.stack([getattr(e, weight).weight.detach().t() for e in experts]).contiguous()
            if module.moe.ep_size > 1:
                parts = [torch.empty_like(local) for _ in range(module.moe.ep_size)]
                dist.all_gather(parts, local, group=module.moe.deepspeed_moe.ep_group)
                local = torch.cat(parts)
            out[f"{name}.experts.{weight}"] = local.cpu()
        out[f"{name}.expert_bias"] = torch.zeros(module.moe.num_experts)
    return out


def stock_export_config(cfg: ModelConfig) -> ModelConfig:
    """The moray config under which an exported stock-MoE model computes the same routing."""
    return replace(cfg, moe=replace(cfg.moe, score_func="softmax", norm_topk_prob=True, n_group=1, topk_group=1,
                                    routed_scaling_factor=1.0, bias_balancing=False, capacity_factor=0.0))

