"""The transformer: dense first layers, MoE after, multi-token prediction heads for training.

Plain single-device PyTorch with no notion of ranks; parallelism is applied from outside.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from model.attention import KVCache, StepLayout, build_attention
from model.config import ModelConfig
from model.cross_entropy import cross_entropy
from model.layers import RMSNorm, SwiGLU
from model.moe import MoE


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, moe: bool):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = build_attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        # an MoE ffn takes (x, valid) and returns (out, aux_loss); training may swap in another
        # implementation with that signature (DeepSpeed's MoE layer)
        self.is_moe = moe
        self.ffn: nn.Module = MoE(cfg.dim, cfg.moe) if moe else SwiGLU(cfg.dim, cfg.inter_dim)

    def forward(self, x: torch.Tensor, layout: StepLayout, cache: KVCache | None = None,
                valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = x + self.attn(self.attn_norm(x), layout, cache)
        h = self.ffn_norm(x)
        if self.is_moe:
            out, aux = self.ffn(h, valid)
            return x + out, aux
        return x + self.ffn(h), None


class MTPModule(nn.Module):
    """DeepSeek-V3 multi-token prediction depth k: combines the previous depth's hidden state
    with the embedding of the token k ahead and predicts the token after it, through the main
    model's shared embedding and output head."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.hidden_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.embed_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.proj = nn.Linear(2 * cfg.dim, cfg.dim, bias=False)
        self.block = Block(cfg, moe=cfg.n_moe_layers > 0)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = self.proj(torch.cat([self.hidden_norm(h), self.embed_norm(emb)], dim=-1))
        layout = StepLayout.build(x.shape[0], x.shape[1], x.device)
        return self.block(x, layout)


@dataclass
class LossParts:
    loss: torch.Tensor  # what to backpropagate: main + MTP + auxiliary
    main: torch.Tensor
    mtp: torch.Tensor | None
    aux: torch.Tensor | None


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, init: bool = True):
        """init=False leaves weights uninitialized (memory untouched) for callers that load them."""
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, moe=i >= cfg.n_dense_layers) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        self.mtp = nn.ModuleList(MTPModule(cfg) for _ in range(cfg.mtp_depth))
        if init and not any(p.is_meta for p in self.parameters()):
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, std)

    def moe_layers(self) -> list[MoE]:
        """Every MoE of the main stack, in layer order (the MTP modules' are not included)."""
        return [block.ffn for block in self.layers if isinstance(block.ffn, MoE)]

    def all_moe(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    def expert_load(self) -> torch.Tensor:
        """Tokens per expert of the last forward: [n_moe_layers, n_routed_experts]."""
        layers = self.moe_layers()
        if not layers:
            return torch.zeros(0, 0, dtype=torch.long)
        return torch.stack([m.last_load for m in layers])

    def update_expert_bias(self) -> None:
        for moe in self.all_moe():
            moe.update_bias()

    def new_cache(self, n_slots: int, max_len: int | None = None, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None) -> list[KVCache]:
        """One KV cache per layer, [n_slots, max_len, ...] each."""
        ref = self.embed.weight
        max_len = max_len or self.cfg.max_seq_len
        return [{name: torch.zeros(n_slots, max_len, *shape, device=device or ref.device, dtype=dtype or ref.dtype)
                 for name, shape in block.attn.cache_shapes().items()} for block in self.layers]

    def hidden(self, tokens: torch.Tensor, layout: StepLayout | None = None, caches: list[KVCache] | None = None,
               ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Final hidden states before the output norm [B, T, D], and the MoE auxiliary losses."""
        layout = layout or StepLayout.build(tokens.shape[0], tokens.shape[1], tokens.device)
        valid = None if layout.every_token_real() else layout.valid
        x = self.embed(tokens)
        aux_losses = []
        for i, block in enumerate(self.layers):
            x, aux = block(x, layout, None if caches is None else caches[i], valid)
            if aux is not None:
                aux_losses.append(aux)
        return x, aux_losses

    def forward(self, tokens: torch.Tensor, layout: StepLayout | None = None, caches: list[KVCache] | None = None,
                logits_at: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, V]; with logits_at [B] only those positions' logits [B, V] (generation)."""
        h, _ = self.hidden(tokens, layout, caches)
        if logits_at is not None:
            h = h[torch.arange(h.shape[0], device=h.device), logits_at]
        return self.head(self.norm(h)).float()

    def loss(self, inputs: torch.Tensor, targets: torch.Tensor, with_mtp: bool = True) -> LossParts:
        """Next-token loss, plus MTP's lambda-weighted mean over depths and the balance loss."""
        h, aux_losses = self.hidden(inputs)
        main = cross_entropy(self.head(self.norm(h)).flatten(0, 1), targets.flatten())
        mtp_loss = None
        if with_mtp and len(self.mtp):
            T = inputs.shape[1]
            depth_losses = []
            for k, module in enumerate(self.mtp, start=1):
                if T - k <= 0:
                    break
                h, aux = module(h[:, : T - k], self.embed(inputs[:, k:]))
                if aux is not None:
                    aux_losses.append(aux)
                logits = self.head(module.norm(h))
                depth_losses.append(cross_entropy(logits.flatten(0, 1), targets[:, k:].flatten()))
            mtp_loss = self.cfg.mtp_lambda * torch.stack(depth_losses).mean() if depth_losses else None
        aux_loss = torch.stack(aux_losses).sum() if aux_losses else None
        total = main + (mtp_loss if mtp_loss is not None else 0) + (aux_loss if aux_loss is not None else 0)
        return LossParts(loss=total, main=main, mtp=mtp_loss, aux=aux_loss)
