"""Gate scores to top-k experts in one GPU kernel: score function, balancing bias, group-limited
selection, top-k, and (for inference) the normalized, scaled combine weights.

`route` in model/moe.py spells the same rule as about ten PyTorch ops, each a kernel launch of
a few microseconds of work; a decode step runs them for every MoE layer, so the host's launch
rate, not the GPU, sets the pace. One program per token holds its row of expert scores in
registers and picks the k largest by repeated argmax, the way `torch.topk` orders them. Under
autograd only the choice comes from here (indices carry no gradient); the weights are then
gathered from PyTorch's scores so the gradient reaches the gate.
"""

from __future__ import annotations

import torch

from model.config import MoEConfig
from model.swiglu_kernels import HAVE_TRITON, triton_runs_on

if HAVE_TRITON:
    import triton
    import triton.language as tl

MAX_FUSED_EXPERTS = 256  # one row of scores per program, in registers


def fused_route_applies(logits_NE: torch.Tensor, cfg: MoEConfig) -> bool:
    """On a GPU with Triton, up to 256 experts; group-limited routing needs a power-of-two count."""
    E = cfg.n_routed_experts
    if not (triton_runs_on(logits_NE) and E <= MAX_FUSED_EXPERTS):
        return False
    return cfg.n_group == 1 or E & (E - 1) == 0


def fused_route(logits_NE: torch.Tensor, bias_E: torch.Tensor | None, cfg: MoEConfig, with_weights: bool
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(experts [N, K] int64, combine weights [N, K] fp32 or None) as `route` chooses them."""
    N, E = logits_NE.shape
    K = cfg.top_k
    logits_NE = logits_NE.contiguous()
    experts = torch.empty(N, K, dtype=torch.long, device=logits_NE.device)
    weights = torch.empty(N, K, dtype=torch.float32, device=logits_NE.device) if with_weights else None
    if N:
        _route_kernel[(N,)](
            logits_NE, bias_E if bias_E is not None else logits_NE, experts,
            weights if weights is not None else logits_NE, E, float(cfg.routed_scaling_factor),
            EP=triton.next_power_of_2(E), K=K, KP=triton.next_power_of_2(K), SIGMOID=cfg.score_func == "sigmoid",
            HAS_BIAS=bias_E is not None, G=cfg.n_group, TOPK_G=cfg.topk_group,
            TOP2_SUM=cfg.group_score == "top2_sum", NORM=cfg.norm_topk_prob and K > 1, WEIGHTS=with_weights)
    return experts, weights


if HAVE_TRITON:
    @triton.jit
    def _route_kernel(logits_ptr, bias_ptr, experts_ptr, weights_ptr, E, scale, EP: tl.constexpr, K: tl.constexpr,
                      KP: tl.constexpr, SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr, G: tl.constexpr,
                      TOPK_G: tl.constexpr, TOP2_SUM: tl.constexpr, NORM: tl.constexpr, WEIGHTS: tl.constexpr):
        n = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, EP)
        valid = offs < E
        x = tl.load(logits_ptr + n * E + offs, mask=valid, other=float("-inf")).to(tl.float32)
        if SIGMOID:
            s = tl.where(valid, tl.sigmoid(x), 0.0)
        else:
            ex = tl.exp(x - tl.max(x, 0))
            s = ex / tl.sum(ex, 0)
        sel = s
        if HAS_BIAS:
            sel = s + tl.load(bias_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        sel = tl.where(valid, sel, float("-inf"))
        if G > 1:  # keep the TOPK_G best groups (by max, or by the sum of their two best)
            grouped = tl.reshape(sel, (G, EP // G))
            group_score = tl.max(grouped, 1)
            if TOP2_SUM:
                col = tl.arange(0, EP // G)[None, :]
                best = tl.argmax(grouped, 1)
                group_score += tl.max(tl.where(col == best[:, None], float("-inf"), grouped), 1)
            gidx = tl.arange(0, G)
            keep = gidx < 0
            for _ in tl.static_range(TOPK_G):
                g = tl.argmax(group_score, 0)
                keep = keep | (gidx == g)
                group_score = tl.where(gidx == g, float("-inf"), group_score)
            sel = tl.reshape(tl.where(keep[:, None], grouped, float("-inf")), (EP,))
        kidx = tl.arange(0, KP)
        chosen = tl.zeros([KP], dtype=tl.int64)
        w = tl.zeros([KP], dtype=tl.float32)
        for k in tl.static_range(K):
            j = tl.argmax(sel, 0)
            chosen = tl.where(kidx == k, j.to(tl.int64), chosen)
            w = tl.where(kidx == k, tl.sum(tl.where(offs == j, s, 0.0), 0), w)
            sel = tl.where(offs == j, float("-inf"), sel)
        tl.store(experts_ptr + n * K + kidx, chosen, mask=kidx < K)
        if WEIGHTS:
            if NORM:
                w = w / (tl.sum(w, 0) + 1e-20)
            tl.store(weights_ptr + n * K + kidx, w * scale, mask=kidx < K)
