"""The router: one complete sharded copy of the model's dense part, driving its expert shards.

It holds embeddings, attention with the KV caches, dense layers, gates, shared experts and the
head: a plain `Transformer` whose routed experts are swapped for `RemoteExperts`. It creates
its `ExpertShard` actors, forms the process group with them (router = rank 0), and batches
the tokens of every active sequence into each step (continuous batching). Each step is one
Ray call per shard plus, per MoE layer, the all-to-all exchanges.

Runs as a Ray actor (`RouterActor`, for the Python API) or inside a Serve replica.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator

import ray
import torch
from ray.exceptions import RayError
from torch import nn

from actors.placement import ExpertPlacement
from actors.remote_experts import RemoteExperts
from actors.shard import ExpertShardActor
from actors.transport import Rendezvous, backend_for, join_group, leave_group
from actors.weights import WeightSource
from model.attention import KVCache, StepLayout
from model.config import ModelConfig
from model.generate import ContinuousBatcher, SamplingParams, Sequence
from model.transformer import Transformer

log = logging.getLogger(__name__)


class ShardFailure(RuntimeError):
    """A shard died or its collective failed; the message names the shard. The group must be
    re-formed (`replace_shard`) before the next step."""


class Router:
    def __init__(self, cfg: ModelConfig, source: WeightSource, placement: ExpertPlacement,
                 shard_options: list[dict] | None = None, dtype: str = "float32", max_batch_size: int = 32,
                 timeout_s: float = 60.0, use_gpu: bool = False):
        """shard_options: Ray actor options per shard (placement group bundle, resources).
        use_gpu: router and shards each run on their (Ray-assigned) GPU and talk over NCCL."""
        if placement.n_shards < 1 or len(placement.layers) != cfg.n_moe_layers:
            raise ValueError(f"placement covers {len(placement.layers)} MoE layers with {placement.n_shards} shards; "
                             f"the model has {cfg.n_moe_layers} MoE layers and needs at least one shard")
        self.cfg, self.source, self.placement = cfg, source, placement
        self.dtype_name, self.timeout_s = dtype, timeout_s
        self.device = torch.device("cuda", 0) if use_gpu else torch.device("cpu")
        self.model = self._build_model(cfg, source, placement).to(self.device, getattr(torch, dtype)).eval()
        self.shard_options = shard_options or [{} for _ in range(placement.n_shards)]
        self.shards = [self._start_shard(i) for i in range(placement.n_shards)]
        self.generation = 0
        self._failure: str | None = None
        self._step_lock = threading.RLock()
        self._form_group()

        self.total_load = torch.zeros(cfg.n_moe_layers, cfg.moe.n_routed_experts, dtype=torch.long)
        self.batch_sizes: list[int] = []
        caches = self.model.new_cache(max_batch_size, cfg.max_seq_len)
        self.batcher = ContinuousBatcher(self._step, caches, cfg.max_seq_len, self.device)
        self._cond = threading.Condition()
        self._streams: dict[int, tuple[Sequence, queue.Queue, int]] = {}  # id -> (seq, tokens, tokens sent)
        self._closed = False
        self._loop = threading.Thread(target=self._serve_loop, name="moray-router-loop", daemon=True)
        self._loop.start()

    # --- building ---------------------------------------------------------------------------

    @staticmethod
    def _build_model(cfg: ModelConfig, source: WeightSource, placement: ExpertPlacement) -> Transformer:
        model = Transformer(cfg, init=False)
        model.mtp = nn.ModuleList()  # training-only heads
        for moe, shard_experts in zip(model.moe_layers(), placement.layers):
            moe.experts = RemoteExperts(shard_experts)
        model.load_state_dict(source.non_expert_state(cfg), strict=True)
        return model

    def _start_shard(self, index: int):
        experts = self.placement.shard_experts(index)
        return ExpertShardActor.options(**self.shard_options[index]).remote(self.cfg, self.source, experts,
                                                                            self.dtype_name, self.device.type)

    def _form_group(self) -> None:
        """Everyone leaves the old group, then joins a new one on a new store (router = rank 0)."""
        leave_group()
        self.generation += 1
        host = ray.util.get_node_ip_address()
        rendezvous = Rendezvous(host, len(self.shards) + 1, backend_for(self.device), self.timeout_s, self.generation)
        joins = [shard.join.remote(rendezvous.spec, rank) for rank, shard in enumerate(self.shards, start=1)]
        join_group(rendezvous.spec, 0, rendezvous.store)
        ray.get(joins, timeout=self.timeout_s)
        self._rendezvous = rendezvous  # the store must outlive the group
        self._failure = None

    # --- one step -----------------------------------------------------------------------------

    def _dead_shards(self, refs: list) -> list[str]:
        """Which shards' step calls failed, with Ray's reason."""
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=min(5.0, self.timeout_s))
        dead = []
        for i, ref in enumerate(refs):
            if ref in ready:
                try:
                    ray.get(ref)
                except RayError as exc:
                    dead.append(f"shard {i} ({type(exc).__name__})")
        return dead

    def _step(self, tokens: torch.Tensor, layout: StepLayout, caches: list[KVCache] | None,
              logits_at: torch.Tensor | None) -> torch.Tensor:
        with self._step_lock:
            if self._failure:
                raise ShardFailure(f"the sharded model is down since {self._failure}; replace the shard first")
            refs = [shard.run_step.remote() for shard in self.shards]
            try:
                logits = self.model(tokens, layout, caches, logits_at)
                ray.get(refs, timeout=self.timeout_s)
            except Exception as exc:
                dead = self._dead_shards(refs) or ["a shard's collective"]
                self._failure = f"{', '.join(dead)} failed: {str(exc).splitlines()[0][:200]}"
                leave_group()  # unblocks the surviving shards' collectives
                raise ShardFailure(self._failure) from exc
            self.total_load += self.model.expert_load().cpu()
            return logits

    # --- public API -------------------------------------------------------------------------------

    @torch.no_grad()
    def forward(self, tokens: list[list[int]] | torch.Tensor, decode_from: int | None = None) -> torch.Tensor:
        """Logits [B, T, V] for equal-length rows. With decode_from=k the first k tokens are a
        prefill and the rest are fed one at a time through the KV cache, as generation does."""
        tokens = torch.as_tensor(tokens, dtype=torch.long, device=self.device)
        if tokens.dim() != 2 or tokens.shape[1] == 0:
            raise ValueError(f"tokens must be [batch, length] with length >= 1, got shape {list(tokens.shape)}")
        if tokens.shape[1] > self.cfg.max_seq_len:
            raise ValueError(f"{tokens.shape[1]} tokens exceed the context of {self.cfg.max_seq_len}")
        if int(tokens.min()) < 0 or int(tokens.max()) >= self.cfg.vocab_size:
            raise ValueError(f"token ids must be in [0, {self.cfg.vocab_size})")
        B, T = tokens.shape
        if decode_from is None:
            return self._step(tokens, StepLayout.build(B, T, self.device), None, None).cpu()
        caches = self.model.new_cache(B, T)
        parts = [self._step(tokens[:, :decode_from], StepLayout.build(B, decode_from, self.device), caches, None)]
        for t in range(decode_from, T):
            start = torch.full((B,), t, device=self.device)
            parts.append(self._step(tokens[:, t:t + 1], StepLayout.build(B, 1, self.device, start_pos=start), caches,
                                    None))
        return torch.cat(parts, dim=1).cpu()

    def _check_prompt(self, prompt: list[int]) -> None:
        self.batcher.check_prompt(prompt)
        if max(prompt) >= self.cfg.vocab_size or min(prompt) < 0:
            raise ValueError(f"token ids must be in [0, {self.cfg.vocab_size})")

    def submit(self, prompt: list[int], params: SamplingParams) -> tuple[Sequence, queue.Queue]:
        """Join the running batch; the queue receives each new token, then None (or an exception)."""
        self._check_prompt(prompt)
        tokens: queue.Queue = queue.Queue()
        with self._cond:
            seq = self.batcher.add(prompt, params)
            if seq.done:
                tokens.put(None)
            else:
                self._streams[seq.id] = (seq, tokens, 0)
                self._cond.notify_all()
        return seq, tokens

    def cancel(self, seq: Sequence) -> None:
        """The client went away: free the sequence's slot before its next step."""
        with self._cond:
            self.batcher.cancel(seq)
            self._streams.pop(seq.id, None)

    @staticmethod
    def _drain(tokens: queue.Queue) -> Iterator[int]:
        while (item := tokens.get()) is not None:
            if isinstance(item, Exception):
                raise item
            yield item

    def stream(self, prompt: list[int], params: SamplingParams) -> Iterator[int]:
        """New tokens one by one as the batch produces them; closing the iterator cancels."""
        seq, tokens = self.submit(prompt, params)
        try:
            yield from self._drain(tokens)
        finally:
            if not seq.done:
                self.cancel(seq)

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[list[int]]:
        """Joins the running batch; returns the new tokens of each prompt."""
        per_seq = params if isinstance(params, list) else [params] * len(prompts)
        if len(per_seq) != len(prompts):
            raise ValueError(f"got {len(per_seq)} sampling params for {len(prompts)} prompts")
        for i, prompt in enumerate(prompts):
            try:
                self._check_prompt(prompt)
            except ValueError as exc:
                raise ValueError(f"prompt {i}: {exc}") from None
        submitted = [self.submit(p, sp) for p, sp in zip(prompts, per_seq)]  # all join before any wait
        return [list(self._drain(tokens)) for _, tokens in submitted]

    def _serve_loop(self) -> None:
        while True:
            with self._cond:
                while not self.batcher.has_work and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                try:
                    self.batcher.step()
                    self.batch_sizes.append(self.batcher.last_batch_size)
                except Exception as exc:  # every sequence in flight gets the error, the loop goes on
                    log.error("router step failed: %s", exc)
                    for seq in list(self.batcher.running) + list(self.batcher.waiting):
                        self.batcher.cancel(seq)
                    for _, tokens, _ in self._streams.values():
                        tokens.put(exc)
                    self._streams.clear()
                    continue
                for seq_id, (seq, tokens, sent) in list(self._streams.items()):
                    for token in seq.output[sent:]:
                        tokens.put(token)
                    if seq.done:
                        tokens.put(None)
                        del self._streams[seq_id]
                    else:
                        self._streams[seq_id] = (seq, tokens, len(seq.output))

    def stats(self) -> dict:
        return {
            "generation": self.generation,
            "n_shards": len(self.shards),
            "batch_sizes": list(self.batch_sizes),
            "running": len(self.batcher.running),
            "waiting": len(self.batcher.waiting),
            "expert_load": self.total_load.tolist(),
            "failure": self._failure,
            "device": str(self.device),
        }

    def shard_stats(self) -> list[dict]:
        return ray.get([shard.stats.remote() for shard in self.shards], timeout=self.timeout_s)

    def shard_handles(self) -> list:
        return list(self.shards)

    def replace_shard(self, index: int) -> None:
        """Start a new shard with the same experts in the old one's place and re-form the group."""
        with self._step_lock:
            ray.kill(self.shards[index], no_restart=True)
            self.shards[index] = self._start_shard(index)
            self._form_group()

    def shutdown(self) -> None:
        """Stops the loop and the shards. The router's own group handle goes with its process:
        tearing down an NCCL communicator whose peers are being killed can block."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for shard in self.shards:
            ray.kill(shard, no_restart=True)
        self.shards = []


RouterActor = ray.remote(Router)
