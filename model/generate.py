"""Generation with a KV cache and continuous batching.

`ContinuousBatcher` runs one forward per step over every active sequence: newly admitted
ones contribute their whole prompt (prefill), running ones their last token (decode), all in
one padded batch, each row in its own cache slot. Sequences join and leave between steps.
The single-process `generate` and the expert-parallel router both drive it.

Each sequence samples with its own seeded generator, so its tokens do not depend on which
other sequences shared its batch: batched generation equals one-at-a-time generation.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from model.attention import KVCache, StepLayout
from model.decode_graphs import DecodeGraphs
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


def sample_tokens(logits_BV: torch.Tensor, seqs: list["Sequence"]) -> list[int]:
    """One token per row: the greedy rows by one argmax and one device->host copy together,
    the sampling rows one by one with their own generators."""
    out = logits_BV.argmax(-1).tolist()
    for i, seq in enumerate(seqs):
        if seq.params.temperature != 0:
            out[i] = sample_token(logits_BV[i], seq.params, seq.generator)
    return out


def _generator(params: SamplingParams) -> torch.Generator | None:
    if params.temperature == 0:
        return None
    g = torch.Generator()
    if params.seed is None:
        g.seed()
    else:
        g.manual_seed(params.seed)
    return g


@dataclass(eq=False)
class Sequence:
    id: int
    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator | None
    output: list[int] = field(default_factory=list)
    slot: int | None = None
    cached: int = 0  # tokens already in the KV cache
    done: bool = False

    def pending_tokens(self) -> list[int]:
        """What the next step feeds: the whole prompt first, then the last sampled token."""
        return self.prompt if self.cached == 0 else self.output[-1:]


StepFn = Callable[[torch.Tensor, StepLayout, list[KVCache], torch.Tensor], torch.Tensor]


class ContinuousBatcher:
    """Slots of a KV cache shared by sequences that come and go between steps."""

    def __init__(self, step_fn: StepFn, caches: list[KVCache], max_len: int, device: torch.device | str = "cpu"):
        self.step_fn = step_fn
        self.caches = caches
        self.max_len = max_len
        self.device = device
        self.free_slots = deque(range(caches[0][next(iter(caches[0]))].shape[0]))
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.last_batch_size = 0  # rows of the last step, for batching statistics
        self._ids = itertools.count()

    def check_prompt(self, prompt: list[int]) -> None:
        if not prompt:
            raise ValueError("prompt is empty")
        if len(prompt) >= self.max_len:
            raise ValueError(f"prompt has {len(prompt)} tokens; the model's context is {self.max_len}")

    def add(self, prompt: list[int], params: SamplingParams) -> Sequence:
        self.check_prompt(prompt)
        seq = Sequence(id=next(self._ids), prompt=list(prompt), params=params, generator=_generator(params))
        if params.max_new_tokens == 0:
            seq.done = True
        else:
            self.waiting.append(seq)
        return seq

    def cancel(self, seq: Sequence) -> None:
        """Drop a sequence whose client went away; its slot is free for the next step."""
        if seq in self.waiting:
            self.waiting.remove(seq)
        if seq in self.running:
            self._finish(seq)
        seq.done = True

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _finish(self, seq: Sequence) -> None:
        seq.done = True
        self.running.remove(seq)
        self.free_slots.append(seq.slot)

    def step(self) -> list[Sequence]:
        """One forward for all running sequences plus as many waiting ones as slots allow."""
        while self.waiting and self.free_slots:
            seq = self.waiting.popleft()
            seq.slot = self.free_slots.popleft()
            self.running.append(seq)
        batch = list(self.running)
        self.last_batch_size = len(batch)
        if not batch:
            return []
        rows = [seq.pending_tokens() for seq in batch]
        # built on the host and copied over once each: no per-row device round trips
        width = max(len(r) for r in rows)
        tokens = torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.long).to(self.device)
        lengths, start_pos, slots = torch.tensor([[len(r) for r in rows], [s.cached for s in batch],
                                                  [s.slot for s in batch]]).to(self.device)
        layout = StepLayout.build(len(batch), width, self.device, start_pos=start_pos, lengths=lengths, slots=slots,
                                  all_real=all(len(r) == width for r in rows),
                                  kv_len=max(s.cached + len(r) for s, r in zip(batch, rows)))
        logits = self.step_fn(tokens, layout, self.caches, lengths - 1)
        finished = []
        for i, (seq, token) in enumerate(zip(batch, sample_tokens(logits, batch))):
            seq.cached += len(rows[i])
            seq.output.append(token)
            if (token in seq.params.stop_tokens or len(seq.output) >= seq.params.max_new_tokens
                    or seq.cached >= self.max_len):
                self._finish(seq)
                finished.append(seq)
        return finished


@torch.no_grad()
def generate(model: Transformer, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
             graphs: DecodeGraphs | None = None) -> list[list[int]]:
    """New tokens for each prompt (stop token included when one ended the sequence).

    graphs: decode steps replayed as CUDA graphs (`model.decode_graphs`), kept across calls so
    each batch bucket is captured once; it must have a slot per prompt. None runs eagerly."""
    per_seq = params if isinstance(params, list) else [params] * len(prompts)
    if len(per_seq) != len(prompts):
        raise ValueError(f"got {len(per_seq)} sampling params for {len(prompts)} prompts")
    if not prompts:
        return []
    if graphs is not None and len(prompts) > graphs.n_slots:
        raise ValueError(f"{len(prompts)} prompts need more than the decode graphs' {graphs.n_slots} slots")
    step_fn, caches = (model, model.new_cache(len(prompts))) if graphs is None else (graphs, graphs.slot_caches)
    batcher = ContinuousBatcher(step_fn, caches, model.cfg.max_seq_len, model.embed.weight.device)
    for i, prompt in enumerate(prompts):
        try:
            batcher.check_prompt(prompt)
        except ValueError as exc:
            raise ValueError(f"prompt {i}: {exc}") from None
    seqs = [batcher.add(p, sp) for p, sp in zip(prompts, per_seq)]
    while batcher.has_work:
        batcher.step()
    return [s.output for s in seqs]
