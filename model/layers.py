"""Small building blocks shared by attention, MoE and the transformer: RMSNorm, SwiGLU, RoPE."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig
from model.expert_ffn import expert_swiglu


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalized in fp32 whatever x's dtype (bf16 activations would lose the small-variance
        # rows), rounded once at the end; one fused kernel each way on a GPU, where the spelled
        # out form was nine forward and a dozen backward, and ~50 norms run per step
        return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps)


class SwiGLU(nn.Module):
    """The dense FFN and the shared experts: down(silu(gate(x)) * up(x)), the gate and up
    projections one [2F, D] linear map (gate rows first), as the routed experts hold them."""

    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.w_gate_up = nn.Linear(dim, 2 * inter_dim, bias=False)
        self.w_down = nn.Linear(inter_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """As one expert of `expert_swiglu`: backward keeps the projections, not four tensors."""
        weights = (w.weight.t()[None] for w in (self.w_gate_up, self.w_down))
        return expert_swiglu(x.reshape(-1, x.shape[-1]), *weights, counts_E=None).view(x.shape)


def _yarn_correction_range(cfg: ModelConfig, dim: int) -> tuple[int, int]:
    def correction_dim(num_rotations: float) -> float:
        return dim * math.log(cfg.original_seq_len / (num_rotations * 2 * math.pi)) / (2 * math.log(cfg.rope_theta))

    low = math.floor(correction_dim(cfg.beta_fast))
    high = math.ceil(correction_dim(cfg.beta_slow))
    return max(low, 0), min(high, dim - 1)


def rope_frequencies(cfg: ModelConfig, dim: int) -> torch.Tensor:
    """Inverse frequencies [dim/2], YaRN-interpolated when the context is stretched past training."""
    freqs = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if cfg.rope_factor > 1.0 and cfg.max_seq_len > cfg.original_seq_len:
        low, high = _yarn_correction_range(cfg, dim)
        ramp = (torch.arange(dim // 2, dtype=torch.float32) - low) / max(high - low, 1e-3)
        smooth = 1 - ramp.clamp(0, 1)
        freqs = freqs / cfg.rope_factor * (1 - smooth) + freqs * smooth
    return freqs


def yarn_softmax_scale(cfg: ModelConfig, head_dim: int) -> float:
    """Attention scale; YaRN sharpens it by mscale^2 when the rope is stretched."""
    scale = head_dim ** -0.5
    if cfg.rope_factor > 1.0 and cfg.max_seq_len > cfg.original_seq_len:
        m = 0.1 * cfg.mscale * math.log(cfg.rope_factor) + 1.0
        scale = scale * m * m
    return scale


def rope_rotation(freqs: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The unit complex numbers e^(i * position * freq) [..., dim/2] for integer positions of any shape."""
    angles = positions.to(torch.float32).unsqueeze(-1) * freqs.to(positions.device)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope(x: torch.Tensor, rotation: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate x [B, T, H, d] by rotation [B, T, d/2] (complex): each pair of x's features as
    one complex number times its rotation, in fp32; one kernel, where the pairs spelled out
    as real products took ten forward and more backward.

    interleaved=True pairs (0,1), (2,3), ... as DeepSeek's reference code does; False pairs
    (i, i + d/2) as Llama/Mixtral do. Both are kept so imported weights need no permutation.
    """
    rotation = rotation.unsqueeze(2)
    if interleaved:
        pairs = x.float().unflatten(-1, (-1, 2))
    else:
        pairs = x.float().unflatten(-1, (2, -1)).transpose(-1, -2).contiguous()
    rotated = torch.view_as_real(torch.view_as_complex(pairs) * rotation)
    return (rotated if interleaved else rotated.transpose(-1, -2)).flatten(-2).type_as(x)
