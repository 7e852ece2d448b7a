"""Batched generation: mixed prompt lengths in one batch equal one-at-a-time; sampling controls."""

from __future__ import annotations

import pytest
import torch

from model.generate import ContinuousBatcher, SamplingParams, generate, sample_token
from tests.conftest import build_model, tiny_config
from tests.routing_ties import draw_untied, untied_prompts


@pytest.mark.parametrize("preset", ["tiny", "tiny-gqa"])
def test_batched_mixed_lengths_equal_one_at_a_time(preset, seed):
    cfg = tiny_config(preset)
    model = build_model(cfg, seed)
    params = [
        SamplingParams(max_new_tokens=12),
        SamplingParams(max_new_tokens=7, temperature=0.8, seed=seed),
        SamplingParams(max_new_tokens=12, temperature=1.0, top_k=20, top_p=0.9, seed=seed + 1),
        SamplingParams(max_new_tokens=4),
    ]
    prompts, alone = untied_prompts(model, seed, (3, 17, 9, 1), params)
    batched = generate(model, prompts, params)
    assert batched == alone
    assert [len(o) for o in batched] == [12, 7, 12, 4]


def test_greedy_continues_the_argmax_of_the_full_forward(seed):
    cfg = tiny_config("tiny")
    model = build_model(cfg, seed)

    def full_forward_argmax(prompt: list[int]) -> list[int]:
        seq = prompt[:]
        for _ in range(8):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
        return seq[len(prompt):]

    prompt, expected = draw_untied(model, lambda: torch.randint(3, cfg.vocab_size, (6,)).tolist(), full_forward_argmax)
    assert generate(model, [prompt], SamplingParams(max_new_tokens=8))[0] == expected


def test_stop_token_ends_the_sequence(seed):
    cfg = tiny_config("tiny")
    model = build_model(cfg, seed)
    prompt = torch.randint(3, cfg.vocab_size, (5,)).tolist()
    free = generate(model, [prompt], SamplingParams(max_new_tokens=10))[0]
    stopped = generate(model, [prompt], SamplingParams(max_new_tokens=10, stop_tokens=(free[3],)))[0]
    assert stopped == free[: free.index(free[3]) + 1]


def test_generation_stops_at_the_context_limit(seed):
    cfg = tiny_config("tiny", "model.max_seq_len=16")
    model = build_model(cfg, seed)
    out = generate(model, [[5] * 10], SamplingParams(max_new_tokens=50))[0]
    assert len(out) == 16 - 10 + 1  # the last token is sampled from the full context, never cached


def test_sampling_controls():
    logits = torch.tensor([0.0, 5.0, 4.9, -1.0])
    assert sample_token(logits, SamplingParams(), None) == 1
    g = torch.Generator().manual_seed(0)
    draws = {sample_token(logits, SamplingParams(temperature=1.0, top_k=1), g) for _ in range(20)}
    assert draws == {1}
    draws = {sample_token(logits, SamplingParams(temperature=1.0, top_p=0.3), g) for _ in range(20)}
    assert draws == {1}
    draws = {sample_token(logits, SamplingParams(temperature=1.0, top_k=2), g) for _ in range(200)}
    assert draws == {1, 2}
    seq = [sample_token(logits, SamplingParams(temperature=2.0, seed=3), torch.Generator().manual_seed(3)) for _ in range(5)]
    assert len(set(seq)) == 1  # same seed, same draw


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": -1.0}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"max_new_tokens": -1}, "max_new_tokens"),
])
def test_bad_sampling_params_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_bad_prompts_are_rejected(seed):
    cfg = tiny_config("tiny", "model.max_seq_len=16")
    model = build_model(cfg, seed)
    with pytest.raises(ValueError, match="prompt 1: prompt is empty"):
        generate(model, [[1, 2], []], SamplingParams())
    with pytest.raises(ValueError, match="context is 16"):
        generate(model, [[1] * 16], SamplingParams())


def test_sequences_join_and_leave_between_steps(seed):
    """Two cache slots, four requests: later ones wait, then join a batch already decoding."""
    cfg = tiny_config("tiny")
    model = build_model(cfg, seed)
    params = [SamplingParams(max_new_tokens=n) for n in (3, 8, 5, 6)]
    prompts, alone = untied_prompts(model, seed, (4, 9, 6, 2), params)
    batcher = ContinuousBatcher(model, model.new_cache(2), cfg.max_seq_len)
    seqs = [batcher.add(p, sp) for p, sp in zip(prompts, params)]
    batch_sizes = []
    with torch.no_grad():
        while batcher.has_work:
            batch_sizes.append(len(batcher.running) + min(len(batcher.waiting), len(batcher.free_slots)))
            batcher.step()
    assert max(batch_sizes) == 2
    assert [s.output for s in seqs] == alone
