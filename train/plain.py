"""The single-process training loop in plain PyTorch: the reference the distributed trainer
must reproduce, and the quickest way to see the model learn.

One step: loss (next token + MTP + balance loss) -> backward -> clip -> AdamW -> schedule ->
the auxiliary-loss-free bias update from the load this step routed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from cluster.config import TrainConfig
from model.transformer import Transformer


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr, then cosine decay to cfg.lr * min_lr_ratio at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def load_imbalance(load_LE: torch.Tensor) -> float:
    """Max over mean tokens per expert, averaged over MoE layers: 1.0 is perfect balance."""
    return float(load_imbalance_on_device(load_LE))


def load_imbalance_on_device(load_LE: torch.Tensor) -> torch.Tensor:
    """`load_imbalance` left where the loads are, so a step can read it back with its other metrics."""
    load = load_LE.float()
    if load.numel() == 0:
        return torch.ones((), device=load.device)
    return (load.max(-1).values / load.mean(-1).clamp(min=1e-9)).mean()


@dataclass
class StepStats:
    step: int
    loss: float  # main next-token loss
    mtp_loss: float | None
    aux_loss: float | None
    lr: float
    imbalance: float
    grad_norm: float  # before clipping


def build_optimizer(model: Transformer, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (norm gains are left alone)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))


def train_loop(model: Transformer, batches: Iterator[tuple[torch.Tensor, torch.Tensor]], cfg: TrainConfig,
               on_step: Callable[[StepStats], None] | None = None) -> list[StepStats]:
    model.train()
    optimizer = build_optimizer(model, cfg)
    history = []
    for step in range(cfg.max_steps):
        inputs, targets = next(batches)
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        parts = model.loss(inputs, targets)
        optimizer.zero_grad(set_to_none=True)
        parts.loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        stats = StepStats(step=step, loss=parts.main.item(), lr=lr, imbalance=load_imbalance(model.expert_load()),
                          grad_norm=float(grad_norm),
                          mtp_loss=None if parts.mtp is None else parts.mtp.item(),
                          aux_loss=None if parts.aux is None else parts.aux.item())
        model.update_expert_bias()
        history.append(stats)
        if on_step is not None:
            on_step(stats)
    return history
