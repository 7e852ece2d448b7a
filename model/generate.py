"""Batched generation with a KV cache: mixed prompt lengths in one batch, per-sequence sampling.

Each sequence samples with its own seeded generator, so its tokens do not depend on which
other sequences shared its batch: batched generation equals one-at-a-time generation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from model.attention import StepLayout
from model.transformer import Transformer


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 means no top-k cut
    top_p: float = 1.0
    seed: int | None = None
    stop_tokens: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def sample_token(logits_V: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Greedy at temperature 0; otherwise temperature, then top-k, then top-p (nucleus) sampling."""
    if params.temperature == 0:
        return int(logits_V.argmax())
    logits = logits_V.float() / params.temperature
    if params.top_k:
        kth = logits.topk(min(params.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        drop = sorted_probs.cumsum(-1) - sorted_probs >= params.top_p
        probs = probs.scatter(0, order, sorted_probs.masked_fill(drop, 0.0))
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def _generator(params: SamplingParams) -> torch.Generator | None:
    if params.temperature == 0:
        return None
    g = torch.Generator()
    if params.seed is None:
        g.seed()
    else:
        g.manual_seed(params.seed)
    return g


@torch.no_grad()
def generate(model: Transformer, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[list[int]]:
    """New tokens for each prompt (stop token included when one ended the sequence)."""
    if not prompts:
        return []
    per_seq = params if isinstance(params, list) else [params] * len(prompts)
    if len(per_seq) != len(prompts):
        raise ValueError(f"got {len(per_seq)} sampling params for {len(prompts)} prompts")
    max_len = model.cfg.max_seq_len
    for i, prompt in enumerate(prompts):
        if not prompt:
            raise ValueError(f"prompt {i} is empty")
        if len(prompt) >= max_len:
            raise ValueError(f"prompt {i} has {len(prompt)} tokens; the model's context is {max_len}")
    device = model.embed.weight.device
    n = len(prompts)
    caches = model.new_cache(n, max_len)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    padded = torch.zeros(n, int(lengths.max()), dtype=torch.long, device=device)
    for i, prompt in enumerate(prompts):
        padded[i, : len(prompt)] = torch.tensor(prompt, device=device)
    logits = model(padded, StepLayout.build(n, padded.shape[1], device, lengths=lengths), caches, logits_at=lengths - 1)
    generators = [_generator(p) for p in per_seq]
    outputs: list[list[int]] = [[] for _ in range(n)]
    active = [i for i in range(n) if per_seq[i].max_new_tokens > 0]
    rows = {i: i for i in active}  # sequence -> row of the current logits
    cur_len = lengths.clone()
    while active:
        still = []
        for i in active:
            token = sample_token(logits[rows[i]], per_seq[i], generators[i])
            outputs[i].append(token)
            finished = (token in per_seq[i].stop_tokens or len(outputs[i]) >= per_seq[i].max_new_tokens
                        or int(cur_len[i]) >= max_len)
            if not finished:
                still.append(i)
        active = still
        if not active:
            break
        idx = torch.tensor(active, device=device)
        step_tokens = torch.tensor([[outputs[i][-1]] for i in active], device=device)
        layout = StepLayout.build(len(active), 1, device, start_pos=cur_len[idx], slots=idx)
        logits = model(step_tokens, layout, caches, logits_at=torch.zeros(len(active), dtype=torch.long, device=device))
        cur_len[idx] += 1
        rows = {i: r for r, i in enumerate(active)}
    return outputs
