"""The near-tie detector the equivalence tests rely on: its margins bound where `route` can flip,
are zero at an exact tie, and a model whose routing is always tied is reported, not retried forever."""

from __future__ import annotations

import pytest
import torch

from model.config import MoEConfig
from model.moe import route
from tests.conftest import build_model, tiny_config
from tests.routing_ties import MAX_DRAWS, decision_margins, draw_untied

CONFIGS = {
    "softmax": {},
    "sigmoid-grouped-top2": {"score_func": "sigmoid", "n_group": 4, "topk_group": 2, "group_score": "top2_sum"},
    "softmax-grouped-max": {"n_group": 4, "topk_group": 3, "group_score": "max", "top_k": 3},
}


def chosen(logits: torch.Tensor, bias: torch.Tensor, cfg: MoEConfig) -> torch.Tensor:
    return route(logits, bias, cfg).experts.sort(-1).values


@pytest.mark.parametrize("overrides", CONFIGS.values(), ids=CONFIGS.keys())
def test_margins_bound_where_route_can_flip(overrides, seed):
    cfg = MoEConfig(**{"n_routed_experts": 8, "top_k": 2, **overrides})
    logits, bias = torch.randn(500, 8), 0.05 * torch.randn(8)
    logits[:, 3], bias[3] = logits[:, 2], bias[2]  # experts 2 and 3 (one group) tie exactly
    margins = decision_margins(logits, bias, cfg)
    # a score moves by at most ~2x its logits' nudge, a gap of top-2 group sums by ~8x: a nudge
    # of a tenth of the token's margin keeps its experts
    nudge = (torch.rand(500, 8) * 2 - 1) * margins[:, None] / 10
    assert torch.equal(chosen(logits + nudge, bias, cfg), chosen(logits, bias, cfg))
    # where route took one of the two tied experts and not the other, the margin is exactly zero
    picks = chosen(logits, bias, cfg)
    split = (picks == 2).any(-1) ^ (picks == 3).any(-1)
    assert split.any() and (margins[split] == 0).all()
    assert (margins[~split] > 0).all()


def test_always_tied_routing_fails_after_a_few_draws(seed):
    model = build_model(tiny_config("tiny"), seed)
    with torch.no_grad():
        for moe in model.moe_layers():
            moe.gate.weight[3] = moe.gate.weight[2]
            moe.expert_bias[3] = moe.expert_bias[2]
    draws = []

    def draw() -> torch.Tensor:
        draws.append(torch.randint(0, model.cfg.vocab_size, (3, 40)))
        return draws[-1]

    with torch.no_grad(), pytest.raises(AssertionError, match=f"{MAX_DRAWS} draws in a row have near-tied routing"):
        draw_untied(model, draw, model)
    assert len(draws) == MAX_DRAWS
