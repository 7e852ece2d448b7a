"""Inputs whose MoE routing is well conditioned, for the exact equivalence tests.

Two correct paths through the model (a batched forward and one-token KV-cached steps, the
single process and the sharded router, moray and `transformers`) compute the gate with different
matmul shapes, so their scores differ by an ulp or two (measured on scores in [0, 1]: <= 1.2e-7
between batched and cached paths, <= 3.1e-7 between moray and `transformers`). Where a token's
k-th and (k+1)-th selection scores are closer than that, top-k may pick another expert in each
path and that token's output moves by ~0.1, far past the 1e-5 the tests allow. Nothing is wrong
then: the model's own decision there is not defined to fp32 precision.

Skipping the tied tokens in the comparison is not sound: a flipped expert at position t changes
the hidden state at t, every later position of its sequence reads it through attention (a cached
path through its KV cache), and generation feeds the changed token back. Skipping everything
from the first tie on would be sound but would drop, at random, the later decode steps where a
cached path's bugs show. So the tests draw their random inputs again when the reference run
decided any routing choice by less than TIE_MARGIN (10x the largest noise measured): the next
draw of the same seeded stream, at most MAX_DRAWS times. A margin as wide as 1e-4 would redraw
most inputs (half of the tiny preset's draws have a gap that small somewhere); at 3e-6 the
tests' first draws tie 2 to 7 times in 100.

The run watched is the reference, the plain single-process model, so a bug in the path under
test cannot cause a redraw, and the comparison that follows is as strict as before. Against
`transformers` it is moray's own single-process run (the one model we can hook; its scores are
within 3.1e-7 of transformers'). Tests with fixed inputs use `untied`: a tie there fails every
time, with the reason, instead of now and then.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import torch
from torch import nn

from model.config import MoEConfig
from model.generate import SamplingParams, generate
from model.moe import MoE
from model.transformer import Transformer

TIE_MARGIN = 3e-6
MAX_DRAWS = 8  # the tests tie 2 to 7 first draws in 100 (measured), so 8 in a row is < 1e-9

Inputs = TypeVar("Inputs")
Result = TypeVar("Result")


def _gap(values_NC: torch.Tensor, k: int) -> torch.Tensor:
    """Per row, how far the k-th largest value is above the (k+1)-th (inf if there is none)."""
    if k >= values_NC.shape[-1]:
        return values_NC.new_full(values_NC.shape[:1], float("inf"))
    top = values_NC.topk(k + 1, dim=-1).values
    return top[:, k - 1] - top[:, k]


def decision_margins(logits_NE: torch.Tensor, bias_E: torch.Tensor | None, cfg: MoEConfig) -> torch.Tensor:
    """Per token, the smallest score gap `model.moe.route` decided on: between the last group kept
    and the best group left out (group-limited routing), and between the last expert chosen and
    the best one left out among the kept groups. An independent restatement of route's rule, as
    `loop_reference` in test_moe restates the experts."""
    scores = logits_NE.float().softmax(-1) if cfg.score_func == "softmax" else logits_NE.float().sigmoid()
    select = scores if bias_E is None else scores + bias_E.float()
    if cfg.n_group <= 1:
        return _gap(select, cfg.top_k)
    grouped = select.view(select.shape[0], cfg.n_group, -1)
    group_scores = grouped.amax(-1) if cfg.group_score == "max" else grouped.topk(2, dim=-1).values.sum(-1)
    kept = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(
        1, group_scores.topk(cfg.topk_group, dim=-1).indices, True)
    in_kept_groups = grouped.masked_fill(~kept[:, :, None], float("-inf")).flatten(1)
    return torch.minimum(_gap(group_scores, cfg.topk_group), _gap(in_kept_groups, cfg.top_k))


@contextmanager
def routing_margins(model: nn.Module) -> Iterator[list[float]]:
    """Within the block, the smallest decision margin of every gate call of the model's MoE layers."""
    margins: list[float] = []

    def watch(moe: MoE):
        def hook(gate: nn.Module, args, logits_NE: torch.Tensor) -> None:
            bias = moe.expert_bias if moe.cfg.bias_balancing else None
            if logits_NE.shape[0]:
                margins.append(float(decision_margins(logits_NE.detach(), bias, moe.cfg).min()))
        return hook

    handles = [m.gate.register_forward_hook(watch(m)) for m in model.modules() if isinstance(m, MoE)]
    try:
        yield margins
    finally:
        for handle in handles:
            handle.remove()


def _watched(model: nn.Module, run: Callable[[], Result]) -> tuple[Result, float]:
    with routing_margins(model) as margins:
        result = run()
    return result, min(margins, default=float("inf"))


def untied(model: nn.Module, reference: Callable[[], Result]) -> Result:
    """For fixed inputs, where there is nothing to redraw: the reference run's result, or a
    failure on every run (never a flake) naming the near-tie, so the test's inputs get changed."""
    result, margin = _watched(model, reference)
    assert margin >= TIE_MARGIN, f"the fixed inputs have near-tied routing (margin {margin:.2e} < {TIE_MARGIN})"
    return result


def draw_untied(model: nn.Module, draw: Callable[[], Inputs], reference: Callable[[Inputs], Result],
                ) -> tuple[Inputs, Result]:
    """The first inputs from `draw` on which `reference` (a run of the plain `model`) routes every
    token by a margin of at least TIE_MARGIN, with that run's result. `draw` continues one seeded
    stream, so a seed replays exactly."""
    smallest = []
    for _ in range(MAX_DRAWS):
        inputs = draw()
        result, margin = _watched(model, lambda: reference(inputs))
        smallest.append(margin)
        if margin >= TIE_MARGIN:
            if len(smallest) > 1:
                print(f"near-tied routing (margins {smallest[:-1]}): inputs drawn {len(smallest)} times")
            return inputs, result
    raise AssertionError(f"{MAX_DRAWS} draws in a row have near-tied routing (smallest margins {smallest}); "
                         f"ties should be rare, so the gate or the inputs have lost their spread")


def untied_tokens(model: Transformer, seed: int, batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random tokens [batch, length] (a stream seeded with `seed`) and the model's logits for them."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return draw_untied(model, lambda: torch.randint(0, model.cfg.vocab_size, (batch, length), generator=gen), model)


def untied_prompts(model: Transformer, seed: int, lengths: tuple[int, ...],
                   params: SamplingParams | list[SamplingParams]) -> tuple[list[list[int]], list[list[int]]]:
    """Random prompts of these lengths and the model's generations for them: all together under
    one `SamplingParams`, or each prompt alone under its own."""
    gen = torch.Generator().manual_seed(seed)

    def reference(prompts: list[list[int]]) -> list[list[int]]:
        if isinstance(params, SamplingParams):
            return generate(model, prompts, params)
        return [generate(model, [p], sp)[0] for p, sp in zip(prompts, params)]

    return draw_untied(model, lambda: [torch.randint(3, model.cfg.vocab_size, (n,), generator=gen).tolist()
                                       for n in lengths], reference)
