"""The router: one complete sharded copy of the model's dense part, driving its expert shards.

It holds embeddings, attention with the KV caches, dense layers, gates, shared experts and the
head: a plain `Transformer` whose routed experts are swapped for `RemoteExperts`. It creates
its `ExpertShard` actors, forms the process group with them (router = rank 0), and batches
the tokens of every active sequence into each step (continuous batching). Each step is one
Ray call per shard plus, per MoE layer, the all-to-all exchanges.

Runs as a Ray actor (`RouterActor`, for the Python API) or inside a Serve replica.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator

import ray
import torch
from ray.exceptions import RayActorError, RayError
from ray.util.placement_group import placement_group_table
from torch import nn

from actors.bundles import elastic_shard_options
from actors.elastic import Controller, ElasticConfig, ElasticMetrics, LoadWindow, elastic_config_from
from actors.placement import ExpertPlacement, balanced_placement, imbalance
from actors.remote_experts import RemoteExperts
from actors.shard import ExpertShardActor
from actors.transport import (FIXED_EXCHANGE_MAX_ROWS, Rendezvous, abort_group_soon, backend_for, graph_buckets,
                              join_group, leave_group)
from actors.vigil import Vigil
from actors.weights import WeightSource
from model.attention import KVCache, StepLayout
from model.config import ModelConfig, check_cuda_graphs
from model.decode_graphs import DecodeGraphs
from model.generate import ContinuousBatcher, SamplingParams, Sequence
from model.transformer import Transformer

log = logging.getLogger(__name__)


class ShardFailure(RuntimeError):
    """A shard died or its collective failed and it could not be replaced; the message names the
    shard and why. With failover off, `replace_shard` must re-form the group before the next step."""

    def __init__(self, message: str, dead: list[int] | None = None):
        super().__init__(message)
        self.dead = dead or []


class Router:
    def __init__(self, cfg: ModelConfig, source: WeightSource, placement: ExpertPlacement,
                 shard_options: list[dict] | None = None, dtype: str = "float32", max_batch_size: int = 32,
                 timeout_s: float = 60.0, use_gpu: bool = False, elastic: ElasticConfig | dict | None = None,
                 cuda_graphs: str = "all"):
        """shard_options: Ray actor options per shard (placement group bundle, resources); shards
        added later take a free one or go outside them (`elastic_shard_options`).
        use_gpu: router and shards each run on their (Ray-assigned) GPU and talk over NCCL.
        elastic: failover and controller settings (`ElasticConfig`).
        cuda_graphs (GPU): "all" replays decode steps as CUDA graphs on the router and the shards,
        "router" on the router only, "none" runs everything eagerly (to tell a graph's fault or
        gain from the rest)."""
        check_cuda_graphs(cuda_graphs)
        if placement.n_shards < 1 or len(placement.layers) != cfg.n_moe_layers:
            raise ValueError(f"placement covers {len(placement.layers)} MoE layers with {placement.n_shards} shards; "
                             f"the model has {cfg.n_moe_layers} MoE layers and needs at least one shard")
        self.cfg, self.source, self.placement = cfg, source, placement
        self.dtype_name, self.timeout_s, self.use_gpu, self.cuda_graphs = dtype, timeout_s, use_gpu, cuda_graphs
        self.elastic = elastic_config_from(elastic)
        self.device = torch.device("cuda", 0) if use_gpu else torch.device("cpu")
        self.model = self._build_model(cfg, source, placement).to(self.device, getattr(torch, dtype)).eval()
        self.node_id = ray.get_runtime_context().get_node_id()
        self.bundle_options = shard_options or [{} for _ in range(placement.n_shards)]
        self.shard_bundles: list[int | None] = list(range(placement.n_shards))  # bundle of each shard, or None
        self.shards = [self._start_shard(placement.shard_experts(i), self.bundle_options[i])
                       for i in range(placement.n_shards)]
        self.shard_nodes = self._wait_started(self.shards)
        self.generation = 0
        self._failure: str | None = None  # why the model is down (a failover found no replacement)
        self._failed_at, self._failed_shards, self._failed_cause = 0.0, [], ""
        self.graphs: DecodeGraphs | None = None  # made below, once the group exists
        self._peer_refs: list = []  # the shards' calls serving a capture's warm-up step
        self._step_lock = threading.RLock()
        self._step_since: float | None = None  # when the step attempt in progress started (monotonic)
        self._admin_lock = threading.Lock()  # one re-placement at a time
        self._state_lock = threading.Lock()  # shards, their nodes and the placement change together
        self._group_lock = threading.Lock()  # the group's generation and the deaths seen in it change together
        self._died: dict[int, str] = {}  # shards of this group seen dead by the vigil
        self.standby: list[tuple] = []  # (handle, node, bundle, pid) of started shards without experts
        self._starting: set[int] = set()  # bundles of shards being started
        self._starting_shards: list = []  # and their handles (shutdown stops them too)
        self._placing_lock = threading.Lock()  # a new shard's bundle is chosen and claimed at once
        self._refill_lock = threading.Lock()  # one standby refill at a time
        self.vigil: Vigil | None = None  # started once the router is built (below)
        self._form_group()

        self.total_load = torch.zeros(cfg.n_moe_layers, cfg.moe.n_routed_experts, dtype=torch.long)
        self.window = LoadWindow(self.elastic.window_steps)
        self.events: deque[dict] = deque(maxlen=100)
        self.metrics = ElasticMetrics()
        self.batch_sizes: deque[int] = deque(maxlen=10_000)
        # on GPU, decode steps replayed as CUDA graphs (bf16 shards replay their side too), in batch
        # buckets up to the fixed exchange's size: a captured step cannot read counts on the host
        buckets = graph_buckets(cfg.moe.top_k)
        if use_gpu and buckets and cuda_graphs != "none":
            self.graphs = DecodeGraphs(self.model, max_batch_size, buckets, peers=self._shards_serve)
        caches = self.graphs.slot_caches if self.graphs else self.model.new_cache(max_batch_size, cfg.max_seq_len)
        self.batcher = ContinuousBatcher(self._step, caches, cfg.max_seq_len, self.device)
        self._cond = threading.Condition()
        self._streams: dict[int, tuple[Sequence, queue.Queue, int]] = {}  # id -> (seq, tokens, tokens sent)
        self._closed = False
        self._loop = threading.Thread(target=self._serve_loop, name="moray-router-loop", daemon=True)
        self._loop.start()
        # NCCL does not fail a collective whose peer died: watch for deaths instead (actors/vigil.py)
        self.vigil = Vigil(self._shard_died)
        self.vigil.watch(self.generation, self.shards)
        self.controller = Controller(self, self.elastic)
        self._refill_standby()

    # --- building ---------------------------------------------------------------------------

    @staticmethod
    def _build_model(cfg: ModelConfig, source: WeightSource, placement: ExpertPlacement) -> Transformer:
        model = Transformer(cfg, init=False)
        model.mtp = nn.ModuleList()  # training-only heads
        for moe, shard_experts in zip(model.moe_layers(), placement.layers):
            moe.experts = RemoteExperts(shard_experts, cfg.moe.n_routed_experts)
        model.load_state_dict(source.non_expert_state(cfg), strict=True)
        return model

    def _start_shard(self, experts: list[list[int]], options: dict):
        return ExpertShardActor.options(**options).remote(self.cfg, self.source, experts, self.dtype_name,
                                                          self.device.type, self.cuda_graphs == "all")

    def _wait_started(self, shards: list) -> list[str]:
        """Node of each new shard once it is up with its experts. A shard that is not up in time
        (no node has the resources, or it died loading) is killed and the error says so: never a hang."""
        refs = [shard.node_id.remote() for shard in shards]
        _, pending = ray.wait(refs, num_returns=len(refs), timeout=self.elastic.start_timeout_s)
        try:
            if pending:
                raise ShardFailure(f"{len(pending)} new shard(s) did not start within "
                                   f"{self.elastic.start_timeout_s:.0f} s: no node has the resources for one "
                                   f"({'1 GPU' if self.use_gpu else '1 CPU'})")
            return ray.get(refs)
        except Exception:
            for shard in shards:
                ray.kill(shard, no_restart=True)
            raise

    def _bundle_node(self, bundle: int) -> str | None:
        strategy = self.bundle_options[bundle].get("scheduling_strategy")
        pg = getattr(strategy, "placement_group", None)
        if pg is None:
            return None
        return placement_group_table(pg).get("bundles_to_node_id", {}).get(bundle + 1)

    def _new_shard_options(self, avoid: Iterable[str], away: Iterable[str], taken: set,
                           planned: list[str]) -> tuple[dict, int | None]:
        """(options, bundle) for a new shard. It must not go to `avoid` nodes (drained) or dead
        ones, and should not go to `away` nodes (where a shard just died). A free bundle of the
        placement group on an acceptable node comes first; else a shard outside the group that
        prefers the live node holding fewest of this model's actors (`planned`: nodes already
        picked for shards starting with it), and takes another one if that node has no room.
        Where no live node is left but `away` ones (one machine), a free bundle there is taken:
        the group holds its node's GPUs, so a shard outside it would wait for one forever."""
        nodes = ray.nodes()
        alive = {n["NodeID"] for n in nodes if n["Alive"]}
        unwanted = set(avoid) | set(away)
        acceptable = alive - unwanted or alive - set(avoid)
        for b, options in enumerate(self.bundle_options):
            if options and b not in taken and self._bundle_node(b) in acceptable:
                return options, b
        avoid = sorted(set(avoid) | {n["NodeID"] for n in nodes if not n["Alive"]})
        held = {n: self.shard_nodes.count(n) + planned.count(n) + (n == self.node_id) for n in alive - unwanted}
        target = min(sorted(held), key=held.get, default=None)
        if target is not None:
            planned.append(target)
        return elastic_shard_options(self.use_gpu, avoid, [target] if target else []), None

    def _start_new_shards(self, experts: list[list[list[int]]], avoid: Iterable[str] = (),
                          away: Iterable[str] = ()) -> list[tuple]:
        """(handle, node, bundle) of new shards, all up with their experts, or an error and none:
        standby shards first (`standby_shards`: they only load their experts), then new ones."""
        avoid = set(avoid)  # read by both steps below
        ready = self._from_standby(experts, avoid)
        try:
            return ready + self._start_processes(experts[len(ready):], avoid, away)
        except Exception:
            for shard, _, _ in ready:
                ray.kill(shard, no_restart=True)
            raise

    def _taken_bundles(self) -> set[int]:
        """Bundles held by shards, standbys and shards being started (call under _placing_lock)."""
        return {b for b in self.shard_bundles if b is not None} | self._starting | \
            {b for _, _, b, _ in self.standby if b is not None}

    def _room_for_standby(self) -> bool:
        """A free bundle, or a free GPU (CPU) outside the placement group, now. A standby that
        waited for one would take the resource a dying shard frees from its replacement."""
        with self._placing_lock:
            taken = self._taken_bundles()
        if any(options and b not in taken for b, options in enumerate(self.bundle_options)):
            return True
        return ray.available_resources().get("GPU" if self.use_gpu else "CPU", 0) >= 1

    def _start_processes(self, experts: list[list[list[int]]], avoid: Iterable[str] = (),
                         away: Iterable[str] = ()) -> list[tuple]:
        with self._placing_lock:
            taken = self._taken_bundles()
            handles, bundles, planned = [], [], []
            for ids in experts:
                options, bundle = self._new_shard_options(avoid, away, taken, planned)
                taken.add(bundle)
                handles.append(self._start_shard(ids, options))
                bundles.append(bundle)
            claimed = {b for b in bundles if b is not None}
            self._starting |= claimed
            self._starting_shards.extend(handles)
        try:
            return list(zip(handles, self._wait_started(handles), bundles))
        finally:
            with self._placing_lock:
                self._starting -= claimed
                self._starting_shards = [h for h in self._starting_shards if h not in handles]

    def _from_standby(self, experts: list[list[list[int]]], avoid: set[str]) -> list[tuple]:
        """Standby shards (not on `avoid` nodes) that loaded the first of `experts`, as many as
        there were; one that fails to (its process or node died) is dropped for a new process."""
        ready: list[tuple] = []
        while len(ready) < len(experts):
            with self._state_lock:
                usable = [s for s in self.standby if s[1] not in avoid]
                if not usable:
                    break
                self.standby.remove(usable[0])
            shard, node, bundle, _ = usable[0]
            try:
                ray.get(shard.prepare.remote(experts[len(ready)]), timeout=self.elastic.start_timeout_s)
                ray.get(shard.commit.remote(), timeout=self.timeout_s)
            except Exception as exc:
                log.warning("standby shard on node %s dropped: %s", node[:12], str(exc).splitlines()[0][:200])
                ray.kill(shard, no_restart=True)
                continue
            ready.append((shard, node, bundle))
        return ready

    def _refill_standby(self) -> None:
        """Start shards without experts until `standby_shards` wait, on a thread of its own: no
        step or event waits for it. Where no resource is free now it stops until the next event
        (`_room_for_standby`)."""
        if self._closed or len(self.standby) >= self.elastic.standby_shards or \
                not self._refill_lock.acquire(blocking=False):
            return

        def refill() -> None:
            try:
                while not self._closed and len(self.standby) < self.elastic.standby_shards:
                    if not self._room_for_standby():
                        log.info("no free resource for a standby shard; trying again after the next event")
                        return
                    ((shard, node, bundle),) = self._start_processes([[[] for _ in range(self.cfg.n_moe_layers)]])
                    pid = ray.get(shard.stats.remote(), timeout=self.timeout_s)["pid"]
                    with self._state_lock:
                        self.standby.append((shard, node, bundle, pid))
                    if self._closed:
                        ray.kill(shard, no_restart=True)
            except Exception as exc:
                if not self._closed:
                    log.warning("standby shard not started: %s", str(exc).splitlines()[0][:300])
            finally:
                self._refill_lock.release()

        threading.Thread(target=refill, name="moray-standby", daemon=True).start()

    def _form_group(self) -> None:
        """Everyone leaves the old group, then joins a new one on a new store (router = rank 0)."""
        self._leave_group()
        with self._group_lock:
            self.generation += 1
            self._died = {}
        host = ray.util.get_node_ip_address()
        rendezvous = Rendezvous(host, len(self.shards) + 1, backend_for(self.device), self.timeout_s, self.generation)
        joins = [shard.join.remote(rendezvous.spec, rank) for rank, shard in enumerate(self.shards, start=1)]
        join_group(rendezvous.spec, 0, rendezvous.store)
        ray.get(joins, timeout=self.timeout_s)
        if self.vigil is not None:
            self.vigil.watch(self.generation, self.shards)
        self._rendezvous = rendezvous  # the store must outlive the group
        self._failure = None

    def _leave_group(self) -> None:
        """Leave the group, dropping the decode graphs first: they hold work of its NCCL
        communicator, which cannot be aborted while they exist."""
        if self.graphs is not None:
            self.graphs.clear()
        leave_group()

    def _shard_died(self, generation: int, index: int) -> None:
        """From the vigil's thread: shard `index` of group `generation` died. Its collectives will
        never be answered, and on NCCL nothing times out those a decode step replays from a CUDA
        graph, so the group is aborted here, and on the surviving shards: the step thread's wait
        ends, it sees the death (`_try_step`) and fails over."""
        with self._group_lock:
            if generation != self.generation:
                return  # a shard of a group re-formed since, or removed from it
            first = not self._died
            self._died[index] = "died"
            survivors = [shard for i, shard in enumerate(self.shards) if i != index]
            if first:
                abort_group_soon()
        log.warning("shard %d of group %d died%s", index, generation, "; aborting the group's collectives" if first else "")
        if first:
            for shard in survivors:
                shard.abort_collectives.remote(generation)
            if self.elastic.failover:
                threading.Thread(target=self._heal, args=(generation,), name="moray-heal", daemon=True).start()

    def _heal(self, generation: int) -> None:
        """Replace the shards of group `generation` that died, now: a shard that dies between
        requests is replaced before the next one comes, which then waits for nothing. A step in
        progress fails over by itself first (it holds the step lock), and then this finds the
        group re-formed and does nothing; if the replacement fails, the model is down with the
        reason and the next step tries again, as after a step's own failover."""
        with self._step_lock:
            if generation != self.generation or not self._died or self._failure or self._closed:
                return
            dead = sorted(self._died)
            try:
                self._fail_over(ShardFailure(f"shards {dead} died", dead))
            except ShardFailure:
                pass  # recorded in the status and the events; steps report it

    def _install(self, placement: ExpertPlacement) -> None:
        """The router's side of a placement: each layer's dispatch map, swapped between steps."""
        for moe, shard_experts in zip(self.model.moe_layers(), placement.layers):
            moe.experts = RemoteExperts(shard_experts, self.cfg.moe.n_routed_experts).to(self.device)
        self.placement = placement
        if self.graphs is not None:  # they captured the old dispatch maps
            self.graphs.clear()

    # --- one step -----------------------------------------------------------------------------

    def _dead_shards(self, refs: list) -> dict[int, str]:
        """Which shards are gone, with Ray's reason. Called after the router left the group, so a
        live shard's step call ends at once (its collective lost the router); a call that has not
        ended within a few seconds belongs to a shard that is dead (its node may not be declared
        dead yet) or hung, and is replaced either way."""
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=min(5.0, self.timeout_s)) if refs else ([], [])
        dead = dict(self._died)
        for i, ref in enumerate(refs):
            if ref not in ready:
                dead[i] = "no answer"
                continue
            try:
                ray.get(ref)
            except RayActorError as exc:
                dead[i] = type(exc).__name__
            except RayError:
                pass  # alive: its collective failed because a peer did
        return dead

    def _try_step(self, tokens: torch.Tensor, layout: StepLayout, caches: list[KVCache] | None,
                  logits_at: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """One attempt: the logits and the routed load, once the step's device work is done."""
        graphed = self.graphs is not None and caches is self.graphs.slot_caches
        key = self.graphs.graph_key(tokens, layout) if graphed else None
        refs: list = []
        try:
            self._raise_if_died()
            if key is not None:  # before this step's shard calls: a capture's warm-ups bring their own
                self.graphs.prepare(key)
            rows_per_shard = self._fixed_rows(key[0] if key is not None else tokens.numel())
            refs = [shard.run_step.remote(rows_per_shard) for shard in self.shards]
            if graphed:
                # the replay and the vigil's abort one at a time (the replay only queues work): a
                # replay queued once the abort has begun could wait for the dead shard for ever
                with self._group_lock:
                    self._raise_if_died()
                    logits = self.graphs(tokens, layout, caches, logits_at)
            else:
                logits = self.model(tokens, layout, caches, logits_at)
            ray.get(refs, timeout=self.timeout_s)
            load = self.model.expert_load().cpu()  # waits for the step's device work
            self._raise_if_died()  # during the step: what it computed is not to be trusted
        except Exception as exc:
            self._leave_group()  # unblocks the surviving shards' collectives
            dead = self._dead_shards(refs or self._peer_refs)
            names = [f"shard {i} ({reason})" for i, reason in dead.items()] or ["a shard's collective"]
            raise ShardFailure(f"{', '.join(names)} failed: {str(exc).splitlines()[0][:200]}", list(dead)) from exc
        return logits, load

    def _raise_if_died(self) -> None:
        if self._died:
            raise RuntimeError(f"shards {sorted(self._died)} died (their collectives were aborted)")

    def _fixed_rows(self, n_tokens: int) -> int | None:
        """Each shard's fixed row count for a step of n_tokens (see FIXED_EXCHANGE_MAX_ROWS), given
        to every MoE layer's dispatch; None for exact counts."""
        copies = n_tokens * self.cfg.moe.top_k
        rows_per_shard = copies if copies <= FIXED_EXCHANGE_MAX_ROWS else None
        for moe in self.model.moe_layers():
            moe.experts.rows_per_shard = rows_per_shard
        return rows_per_shard

    @contextlib.contextmanager
    def _shards_serve(self, bucket: int) -> Iterator[None]:
        """The shards' side of one eager warm-up step of a graph capture for `bucket` rows."""
        rows_per_shard = self._fixed_rows(bucket)
        self._peer_refs = [shard.run_step.remote(rows_per_shard) for shard in self.shards]
        yield
        ray.get(self._peer_refs, timeout=self.timeout_s)
        self._peer_refs = []

    def _step(self, tokens: torch.Tensor, layout: StepLayout, caches: list[KVCache] | None,
              logits_at: torch.Tensor | None) -> torch.Tensor:
        """One forward step. With failover a failed step is re-run once the group is re-formed
        with replacement shards: KV-cache writes go to fixed (slot, position) places, so the
        re-run writes the same entries again and gives the same logits."""
        with self._step_lock:
            if self._failure:
                self._retry_failover()
            try:
                for attempt in range(self.elastic.failover_retries + 1):
                    self._step_since = time.monotonic()  # a failover between attempts has its own timeouts
                    try:
                        logits, load = self._try_step(tokens, layout, caches, logits_at)
                        break
                    except ShardFailure as failure:
                        self._step_since = None
                        if not self.elastic.failover or attempt == self.elastic.failover_retries:
                            self._failure = str(failure)
                            raise
                        self._fail_over(failure)
            finally:
                self._step_since = None
            self.total_load += load
            self.window.add(load)
            return logits

    def stuck_step(self) -> str | None:
        """Why this router is stuck, if it is: a step attempt that ran past `stuck_step_s`. A
        shard that dies is seen by its vigil, and the step fails over; an eager collective is
        bounded by the collective timeout; but a collective replayed from a CUDA graph whose
        peer is alive and hung is watched by nothing (README, failover). The Serve replica's
        health check reports it, and Serve replaces the replica."""
        since, limit = self._step_since, self._stuck_limit_s()
        if since is None or time.monotonic() - since <= limit:
            return None
        return (f"a forward step has run for {time.monotonic() - since:.0f} s, past the {limit:g} s a step may take "
                f"(cluster.elastic.stuck_step_s): its device work waits on a peer that will not answer")

    def _stuck_limit_s(self) -> float:
        # a step waits at most two collective timeouts: a graph capture's warm-up, then its own
        return self.elastic.stuck_step_s or 3 * self.timeout_s

    def _retry_failover(self) -> None:
        """While down: the same error at once, except every `retry_after_s`, when the failover is
        tried again (resources may have come back); it raises again if it still cannot."""
        elastic = self.elastic
        if not elastic.failover:
            raise ShardFailure(f"the sharded model is down since {self._failure}; replace the shard first")
        if time.time() - self._failed_at < elastic.retry_after_s:
            raise ShardFailure(f"the sharded model is down since {self._failure}; a replacement is tried again "
                               f"every {elastic.retry_after_s:g} s")
        self._fail_over(ShardFailure(self._failed_cause, self._failed_shards))

    def _fail_over(self, failure: ShardFailure) -> None:
        """Replace the dead shards, away from their nodes, and re-form the group; an event either way."""
        started, before, dead = time.time(), self._snapshot(), sorted(failure.dead)
        try:
            for i in dead:
                ray.kill(self.shards[i], no_restart=True)
                self.shard_bundles[i] = None
            standby_handles = [shard for shard, _, _, _ in self.standby]
            started_shards = self._start_new_shards([self.placement.shard_experts(i) for i in dead],
                                                    away=[self.shard_nodes[i] for i in dead])
            with self._state_lock:
                for i, (shard, node, bundle) in zip(dead, started_shards):
                    self.shards[i], self.shard_nodes[i], self.shard_bundles[i] = shard, node, bundle
            up, from_standby = time.time(), sum(1 for shard, _, _ in started_shards if shard in standby_handles)
            self._form_group()
        except Exception as exc:
            self._failure = f"{failure}; no replacement: {str(exc).splitlines()[0][:300]}"
            self._failed_at, self._failed_shards, self._failed_cause = time.time(), dead, str(failure)
            self._record("failover", started, before, False, self._failure)
            self._refill_standby()  # any it took went with the attempt
            raise ShardFailure(self._failure, dead) from exc
        # where the time went: the new shards' start (process, device, experts), then the group
        standby = f"{from_standby} from standby; " if from_standby else ""
        self._record("failover", started, before, True, f"{failure}; replaced shards {dead} ({standby}started in "
                     f"{up - started:.2f} s, group re-formed in {time.time() - up:.2f} s)")
        self._refill_standby()

    # --- load, events, re-placement -----------------------------------------------------------

    def window_load(self) -> torch.Tensor:
        """[n_moe_layers, n_experts] routed tokens per expert over the sliding window."""
        return self.window.load((self.cfg.n_moe_layers, self.cfg.moe.n_routed_experts))

    @property
    def n_shards(self) -> int:
        return len(self.shards)

    def imbalance_of(self, load_LE: torch.Tensor, placement: ExpertPlacement | None = None) -> float:
        return imbalance((placement or self.placement).shard_load(load_LE))

    def _snapshot(self) -> dict:
        with self._state_lock:
            placement, nodes = self.placement, list(self.shard_nodes)
        shard_load = placement.shard_load(self.window_load())
        return {"placement": placement.to_lists(), "shard_load": shard_load.sum(0).tolist(),
                "imbalance": imbalance(shard_load), "shard_nodes": nodes}

    def _record(self, action: str, started: float, before: dict, ok: bool, message: str) -> dict:
        event = {"time": started, "action": action, "before": before, "after": self._snapshot(),
                 "duration_s": time.time() - started, "ok": ok, "message": message}
        self.events.append(event)
        self.metrics.observe_event(event)
        (log.info if ok else log.error)("%s %s in %.2f s: %s", action, "done" if ok else "FAILED",
                                        event["duration_s"], message)
        return event

    def reconfigure(self, placement: ExpertPlacement, keep: list[int | None], action: str = "place",
                    avoid: Iterable[str] = (), message: str = "") -> dict:
        """Move to `placement` while serving; returns the event. keep[i] is the current shard that
        becomes shard i (None: a new one); current shards not kept are removed. New shards start
        and kept ones load their new experts beside the running steps; then, between two steps,
        the shards swap their stacks, the group is re-formed if its members changed, the router
        swaps its dispatch map, and removed shards are freed. Sequences in flight keep their KV
        caches (they live here) and continue."""
        if len(keep) != placement.n_shards or len(placement.layers) != self.cfg.n_moe_layers:
            raise ValueError(f"placement has {placement.n_shards} shards for {len(keep)} slots and "
                             f"{len(placement.layers)} MoE layers; the model has {self.cfg.n_moe_layers}")
        with self._admin_lock:
            started, before, generation = time.time(), self._snapshot(), self.generation
            new: dict[int, tuple] = {}
            try:
                prepares = [self.shards[k].prepare.remote(placement.shard_experts(i))
                            for i, k in enumerate(keep) if k is not None]
                slots = [i for i, k in enumerate(keep) if k is None]
                new = dict(zip(slots, self._start_new_shards([placement.shard_experts(i) for i in slots], avoid,
                                                             away=before["shard_nodes"])))
                ray.get(prepares, timeout=self.elastic.start_timeout_s)
            except Exception as exc:
                return self._abandon(action, started, before, new, str(exc).splitlines()[0][:300])
            with self._step_lock:
                if self._failure or self.generation != generation:
                    return self._abandon(action, started, before, new, f"the sharded model is down: {self._failure}"
                                         if self._failure else "a shard failed while the new placement loaded; "
                                         "nothing changed")
                commits = [self.shards[k].commit.remote() for k in keep if k is not None]
                ray.wait(commits, num_returns=len(commits), timeout=self.timeout_s)
                # the kept shards hold the new stacks now: the router follows, whatever else happens
                # (a shard that died meanwhile fails the next step and failover replaces it)
                removed = [s for j, s in enumerate(self.shards) if j not in keep]
                old = list(zip(self.shards, self.shard_nodes, self.shard_bundles))
                with self._state_lock:
                    self.shards, self.shard_nodes, self.shard_bundles = (list(x) for x in zip(
                        *[old[k] if k is not None else new[i] for i, k in enumerate(keep)]))
                    self._install(placement)
                try:
                    if new or removed:
                        self._form_group()
                except Exception as exc:  # the next step fails over
                    self._leave_group()
                    message = f"{message}; group not re-formed: {str(exc).splitlines()[0][:200]}"
            for shard in removed:
                ray.kill(shard, no_restart=True)
            after = imbalance(placement.shard_load(self.window_load()))
            event = self._record(action, started, before, True,
                                 message or f"imbalance {before['imbalance']:.3f} -> {after:.3f}")
        self._refill_standby()  # a scale-out may have taken standby shards
        return event

    def _abandon(self, action: str, started: float, before: dict, new: dict, message: str) -> dict:
        """A re-placement that failed before the switch: new shards go, nothing else changed."""
        for shard, _, _ in new.values():
            ray.kill(shard, no_restart=True)
        self._refill_standby()  # standby shards it took went with them
        return self._record(action, started, before, False, message)

    def _keep_for(self, n: int) -> list[int | None]:
        """Which current shards stay when there are to be n: on scale-in, shards outside the
        placement group's bundles go first, newest first."""
        if n >= self.n_shards:
            return list(range(self.n_shards)) + [None] * (n - self.n_shards)
        order = sorted(range(self.n_shards), key=lambda i: (self.shard_bundles[i] is None, i))
        return sorted(order[:n])

    def balanced_for(self, n: int) -> ExpertPlacement:
        """The balanced placement on n shards for the window's load."""
        E = self.cfg.moe.n_routed_experts
        redundant = min(self.elastic.redundant_experts, E * (n - 1))
        return balanced_placement(self.window_load(), n, redundant)

    def rebalance(self, action: str = "rebalance") -> dict:
        """Re-place experts (with replicas of hot ones, `redundant_experts`) by the window's load."""
        return self.reconfigure(self.balanced_for(self.n_shards), list(range(self.n_shards)), action)

    def apply_placement(self, lists: list, action: str = "place") -> dict:
        """An explicit placement: [layer][shard] -> expert ids (or one [shard] -> ids for every
        layer); its number of shards may differ from the current one."""
        placement = ExpertPlacement.from_lists(lists, self.cfg.n_moe_layers, self.cfg.moe.n_routed_experts)
        return self.reconfigure(placement, self._keep_for(placement.n_shards), action)

    def scale_shards(self, n: int, action: str = "scale") -> dict:
        """n shards with a balanced placement for the window's load."""
        if not 1 <= n <= self.cfg.moe.n_routed_experts:
            raise ValueError(f"number of shards must be between 1 and the {self.cfg.moe.n_routed_experts} experts, "
                             f"got {n}")
        return self.reconfigure(self.balanced_for(n), self._keep_for(n), action,
                                message=f"{self.n_shards} -> {n} shards")

    def drain_node(self, node_id: str) -> dict:
        """Move every shard on the node to other nodes (same experts); the router stays where it is."""
        keep = [None if node == node_id else i for i, node in enumerate(self.shard_nodes)]
        moved = [i for i, k in enumerate(keep) if k is None]
        note = "; the router itself runs on this node" if node_id == self.node_id else ""
        return self.reconfigure(self.placement, keep, "drain", avoid=[node_id],
                                message=f"moved shards {moved} off node {node_id[:12]}{note}")

    def elastic_status(self) -> dict:
        """Placement, window load, imbalance, shards, events and controller settings (JSON-able)."""
        with self._state_lock:
            placement, shards = self.placement, list(zip(self.shards, self.shard_nodes, self.shard_bundles))
        load = self.window_load()
        shard_load = placement.shard_load(load)
        alive = self._alive([shard for shard, _, _ in shards])
        value = imbalance(shard_load)
        self.metrics.observe_load(load, shard_load.sum(0), value)
        return {
            "placement": placement.to_lists(),
            "load": load.tolist(),
            "shard_load": shard_load.sum(0).tolist(),
            "imbalance": value,
            "shards": [{"index": i, "node_id": node, "alive": alive[i], "bundle": bundle,
                        "n_experts": sum(len(ids) for ids in placement.shard_experts(i)),
                        "experts_per_layer": [len(ids) for ids in placement.shard_experts(i)]}
                       for i, (_, node, bundle) in enumerate(shards)],
            "standby": [{"node_id": node, "bundle": bundle, "pid": pid} for _, node, bundle, pid in self.standby],
            "router_node_id": self.node_id,
            "generation": self.generation,
            "failure": self._failure,
            "events": list(self.events),
            "controller": self.controller.describe(),
        }

    @staticmethod
    def _alive(shards: list) -> list[bool]:
        refs = [shard.node_id.remote() for shard in shards]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=5.0)
        alive = []
        for ref in refs:
            try:
                alive.append(ref in ready and bool(ray.get(ref)))
            except RayError:
                alive.append(False)
        return alive

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
        since = self._step_since  # once: the step thread may clear it meanwhile
        return {
            "generation": self.generation,
            "n_shards": len(self.shards),
            "batch_sizes": list(self.batch_sizes),
            "running": len(self.batcher.running),
            "waiting": len(self.batcher.waiting),
            "expert_load": self.total_load.tolist(),
            "failure": self._failure,
            "device": str(self.device),
            # decode steps replayed as CUDA graphs: how many (batch, cache-length) buckets are captured
            "decode_graphs": len(self.graphs.graphs) if self.graphs else None,
            # how long the step attempt in progress has run (0 between steps): see stuck_step
            "step_running_s": 0.0 if since is None else time.monotonic() - since,
        }

    def shard_stats(self) -> list[dict]:
        return ray.get([shard.stats.remote() for shard in self.shards], timeout=self.timeout_s)

    def shard_handles(self) -> list:
        return list(self.shards)

    def replace_shard(self, index: int) -> None:
        """Start a new shard with the same experts in the old one's place and re-form the group."""
        with self._step_lock:
            ray.kill(self.shards[index], no_restart=True)
            if self.shard_bundles[index] is None:
                self.shards[index], self.shard_nodes[index], self.shard_bundles[index] = \
                    self._start_new_shards([self.placement.shard_experts(index)])[0]
            else:
                self.shards[index] = self._start_shard(self.placement.shard_experts(index),
                                                       self.bundle_options[self.shard_bundles[index]])
                self.shard_nodes[index] = self._wait_started([self.shards[index]])[0]
            self._form_group()

    def shutdown(self) -> None:
        """Stops the loop and the shards. The router's own group handle goes with its process:
        tearing down an NCCL communicator whose peers are being killed can block."""
        self.controller.stop()
        if self.vigil is not None:
            self.vigil.stop()
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        with self._state_lock:
            standby, self.standby = [shard for shard, _, _, _ in self.standby], []
        with self._placing_lock:
            standby += self._starting_shards
        for shard in self.shards + standby:
            ray.kill(shard, no_restart=True)
        self.shards = []


RouterActor = ray.remote(Router)
