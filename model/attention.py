"""Attention: multi-head latent attention (MLA) and grouped-query attention (GQA), with KV caches.

A KV cache is a dict of tensors shaped [n_slots, max_len, ...]: each running sequence owns one
slot, so sequences of different lengths share one batch and can join or leave between steps
(continuous batching) without moving anyone else's cache. `StepLayout` says, for a [B, T]
token batch, which slot each row writes, at which positions, and how many of its T tokens are
real (the rest is right padding that nobody reads).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig
from model.layers import RMSNorm, apply_rope, rope_rotation, rope_frequencies, yarn_softmax_scale

KVCache = dict[str, torch.Tensor]


@dataclass(frozen=True)
class StepLayout:
    positions: torch.Tensor  # [B, T] absolute position of each token
    lengths: torch.Tensor  # [B] real tokens per row; the rest of the row is padding
    slots: torch.Tensor  # [B] cache slot of each row
    # what the host already knows, so no layer reads it back from the device (a sync per layer,
    # and none is allowed inside a CUDA graph): every token real; cache entries to read per row
    all_real: bool | None = None
    kv_len: int | None = None

    @staticmethod
    def build(batch: int, width: int, device: torch.device | str = "cpu", start_pos: torch.Tensor | None = None,
              lengths: torch.Tensor | None = None, slots: torch.Tensor | None = None, all_real: bool | None = None,
              kv_len: int | None = None) -> "StepLayout":
        if start_pos is None and lengths is None:
            all_real, kv_len = True, width
        elif lengths is None:
            all_real = True
        start = torch.zeros(batch, dtype=torch.long, device=device) if start_pos is None else start_pos.to(device)
        positions = start[:, None] + torch.arange(width, device=device)[None, :]
        lengths = torch.full((batch,), width, device=device) if lengths is None else lengths.to(device)
        slots = torch.arange(batch, device=device) if slots is None else slots.to(device)
        return StepLayout(positions=positions, lengths=lengths, slots=slots, all_real=all_real, kv_len=kv_len)

    def every_token_real(self) -> bool:
        return self.all_real if self.all_real is not None else bool(self.valid.all())

    @property
    def valid(self) -> torch.Tensor:
        """[B, T] bool: which tokens are real."""
        return torch.arange(self.positions.shape[1], device=self.positions.device)[None, :] < self.lengths[:, None]

    def write(self, cache: torch.Tensor, new: torch.Tensor) -> None:
        """Store the real tokens' entries new[b, t] at cache[slot_b, position_bt]."""
        if self.all_real:
            cache[self.slots[:, None], self.positions] = new.to(cache.dtype)
            return
        rows, cols = self.valid.nonzero(as_tuple=True)
        cache[self.slots[rows], self.positions[rows, cols]] = new[rows, cols].to(cache.dtype)

    def read(self, cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's cached entries [B, L, ...] up to the furthest position, and the causal mask [B, T, L]."""
        kv_len = self.kv_len if self.kv_len is not None else int((self.positions[:, 0] + self.lengths).max())
        entries = cache[self.slots, :kv_len]
        mask = torch.arange(kv_len, device=cache.device)[None, None, :] <= self.positions[:, :, None]
        return entries, mask


class MLA(nn.Module):
    """Multi-head latent attention (DeepSeek-V2/V3).

    K and V come from a low-rank latent c_kv (kv_lora_rank) plus one shared rotary key, so the
    cache holds kv_lora_rank + rope_dim numbers per token instead of 2 * heads * head_dim.
    Without a cache (training) the naive form materializes per-head K/V; with a cache the
    up-projection wkv_b is absorbed into the query and the output, so no per-head K/V exists.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.nope_dim, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_rank = cfg.kv_lora_rank
        self.interleaved = cfg.rope_interleaved
        qk_dim = cfg.qk_head_dim
        if cfg.q_lora_rank > 0:
            self.wq_a = nn.Linear(cfg.dim, cfg.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.norm_eps)
            self.wq_b = nn.Linear(cfg.q_lora_rank, cfg.n_heads * qk_dim, bias=False)
        else:
            self.wq = nn.Linear(cfg.dim, cfg.n_heads * qk_dim, bias=False)
        self.wkv_a = nn.Linear(cfg.dim, self.kv_rank + self.rope_dim, bias=False)
        self.kv_norm = RMSNorm(self.kv_rank, cfg.norm_eps)
        self.wkv_b = nn.Linear(self.kv_rank, cfg.n_heads * (self.nope_dim + self.v_dim), bias=False)
        self.wo = nn.Linear(cfg.n_heads * self.v_dim, cfg.dim, bias=False)
        self.scale = yarn_softmax_scale(cfg, qk_dim)
        self.register_buffer("freqs", rope_frequencies(cfg, self.rope_dim), persistent=False)

    def cache_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"latent": (self.kv_rank,), "rope_key": (self.rope_dim,)}

    def forward(self, x: torch.Tensor, layout: StepLayout, cache: KVCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq_b(self.q_norm(self.wq_a(x))) if hasattr(self, "wq_a") else self.wq(x)
        rotation = rope_rotation(self.freqs, layout.positions)
        latent, k_pe = self.wkv_a(x).split([self.kv_rank, self.rope_dim], dim=-1)
        latent = self.kv_norm(latent)
        if cache is None:
            out = self._naive(q, latent, k_pe, rotation)
        else:
            q_nope, q_pe = q.view(B, T, self.n_heads, -1).split([self.nope_dim, self.rope_dim], dim=-1)
            q_pe = apply_rope(q_pe, rotation, self.interleaved)
            k_pe = apply_rope(k_pe.unsqueeze(2), rotation, self.interleaved).squeeze(2)
            layout.write(cache["latent"], latent)
            layout.write(cache["rope_key"], k_pe)
            latent_BLC, mask = layout.read(cache["latent"])
            k_pe_BLR, _ = layout.read(cache["rope_key"])
            out = self._absorbed(q_nope, q_pe, latent_BLC.type_as(x), k_pe_BLR.type_as(x), mask)
        return self.wo(out.flatten(2))

    def _naive(self, q: torch.Tensor, latent: torch.Tensor, k_pe: torch.Tensor, rotation: torch.Tensor
               ) -> torch.Tensor:
        B, T, H = *q.shape[:2], self.n_heads
        kv = self.wkv_b(latent).view(B, T, H, self.nope_dim + self.v_dim)
        q, k, v = MLAHeads.apply(q, kv, k_pe, rotation, self.nope_dim, self.interleaved)
        q = q.view(B, T, H, -1)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=True, scale=self.scale)
        return out.transpose(1, 2)  # [B, T, H, v_dim]

    def _absorbed(self, q_nope: torch.Tensor, q_pe: torch.Tensor, latent_BLC: torch.Tensor, k_pe_BLR: torch.Tensor,
                  mask_BTL: torch.Tensor) -> torch.Tensor:
        w_HDC = self.wkv_b.weight.view(self.n_heads, self.nope_dim + self.v_dim, self.kv_rank)
        q_latent = torch.einsum("bthd,hdc->bthc", q_nope, w_HDC[:, : self.nope_dim])
        scores = (torch.einsum("bthc,blc->bhtl", q_latent, latent_BLC)
                  + torch.einsum("bthr,blr->bhtl", q_pe, k_pe_BLR)) * self.scale
        scores = scores.float().masked_fill(~mask_BTL[:, None], float("-inf"))
        probs = scores.softmax(dim=-1).type_as(q_nope)
        out_latent = torch.einsum("bhtl,blc->bthc", probs, latent_BLC)
        return torch.einsum("bthc,hdc->bthd", out_latent, w_HDC[:, self.nope_dim:])


class MLAHeads(torch.autograd.Function):
    """MLA's per-head queries, keys and values for attention without a cache:
    q = [q_nope, rope(q_pe)], k = [k_nope, rope(k_pe) shared by every head], v, from the query
    projection's output q [B, T, H * (nope + rope)] (not a view: it is rotated in place, which
    autograd allows a Function only for a tensor that is no view), kv [B, T, H, nope + v_dim] and
    the unrotated shared key k_pe [B, T, rope]; q comes back in its own shape.

    The plain composition (split, rope, two concatenations, an expand) copies q and k whole in
    forward, through PyTorch's strided concatenation kernel (slow on rows of ~100 bf16), and
    again in backward where the split's gradient is concatenated. Here the query's rope part is
    rotated in place (q comes fresh from its projection, which does not keep its output), k is
    written once, v stays a view of the up-projection, and backward writes each input gradient
    once; the rotary key's gradient is summed over heads in fp32 before it is rotated back.
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, kv: torch.Tensor, k_pe: torch.Tensor, rotation: torch.Tensor,
                nope: int, interleaved: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ctx.mark_dirty(q)
        heads = q.view(*kv.shape[:-1], -1)
        heads[..., nope:] = apply_rope(heads[..., nope:], rotation, interleaved)
        k = kv.new_empty(heads.shape)
        k[..., :nope] = kv[..., :nope]
        k[..., nope:] = apply_rope(k_pe.unsqueeze(2), rotation, interleaved)
        ctx.save_for_backward(rotation)
        ctx.nope, ctx.interleaved, ctx.k_pe_dtype = nope, interleaved, k_pe.dtype
        return q, k, kv[..., nope:]

    @staticmethod
    def backward(ctx, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor):
        (rotation,) = ctx.saved_tensors
        nope, back = ctx.nope, rotation.conj()
        dq = dq.reshape(dk.shape)  # a view when autograd hands it over contiguous, as it does here
        dq_in = torch.empty(dq.shape, dtype=dq.dtype, device=dq.device)
        dq_in[..., :nope] = dq[..., :nope]
        dq_in[..., nope:] = apply_rope(dq[..., nope:], back, ctx.interleaved)
        dkv = torch.empty((*dk.shape[:-1], nope + dv.shape[-1]), dtype=dk.dtype, device=dk.device)
        dkv[..., :nope] = dk[..., :nope]
        dkv[..., nope:] = dv
        dk_pe = apply_rope(dk[..., nope:].float().sum(2, keepdim=True), back, ctx.interleaved).squeeze(2)
        return dq_in.flatten(2), dkv, dk_pe.to(ctx.k_pe_dtype), None, None, None


class GQA(nn.Module):
    """Grouped-query attention with a standard K/V cache (Mixtral/Llama style); MHA when kv heads == heads."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.interleaved = cfg.rope_interleaved
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.scale = yarn_softmax_scale(cfg, cfg.head_dim)
        self.register_buffer("freqs", rope_frequencies(cfg, cfg.head_dim), persistent=False)

    def cache_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"k": (self.n_kv_heads, self.head_dim), "v": (self.n_kv_heads, self.head_dim)}

    def forward(self, x: torch.Tensor, layout: StepLayout, cache: KVCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        rotation = rope_rotation(self.freqs, layout.positions)
        q = apply_rope(self.wq(x).view(B, T, self.n_heads, self.head_dim), rotation, self.interleaved)
        k = apply_rope(self.wk(x).view(B, T, self.n_kv_heads, self.head_dim), rotation, self.interleaved)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        mask = None
        if cache is not None:
            layout.write(cache["k"], k)
            layout.write(cache["v"], v)
            k, mask = layout.read(cache["k"])
            v, _ = layout.read(cache["v"])
            k, v, mask = k.type_as(x), v.type_as(x), mask[:, None]
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=mask, is_causal=mask is None, scale=self.scale,
                                             enable_gqa=True)
        return self.wo(out.transpose(1, 2).flatten(2))


def build_attention(cfg: ModelConfig) -> nn.Module:
    return MLA(cfg) if cfg.attention == "mla" else GQA(cfg)
