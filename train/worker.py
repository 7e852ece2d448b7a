"""What each Ray Train worker runs: the model under a DeepSpeed engine with expert parallelism.

Per optimizer step: `accum` micro-batches of this worker's slice of the step's global batch
-> loss (next token + MTP + balance) -> DeepSpeed backward/step (gradients reduced over the
data-parallel group, expert gradients over the expert-data-parallel group, clipped, ZeRO
1/2) -> the routed load all-reduced and the balancing bias updated identically on every rank
-> metrics; every `checkpoint_every` steps a checkpoint: DeepSpeed's (for resuming with the
same world size) plus the model in moray's format (for serving, and for resuming with any).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path

import deepspeed
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
from omegaconf import OmegaConf
from torch.profiler import record_function

from cluster.config import MorayConfig, effective_ep_size, micro_batch
from model import checkpoint as model_checkpoint
from model.moe import MoE
from model.transformer import Transformer
from train.block_graphs import capture_block_graphs
from train.data import TokenStream
from train.deepspeed_moe import StockMoEBlock, gather_stock_experts, stock_export_config, stock_to_moray_state, use_stock_moe
from train.expert_parallel import gather_expert_stacks, parallelize_experts
from train.grad_norm import norm_gradients_in_fp32
from train.plain import load_imbalance, load_imbalance_on_device, lr_at

log = logging.getLogger(__name__)
DS_TAG = "deepspeed"
MODEL_DIR = "model"
STATE_FILE = "train_state.json"
# what a run checkpoint's DeepSpeed files hold: 2 = each rank's experts as one stack per weight
# kind (train/expert_parallel.py); before it (no entry) one parameter per expert. Only the
# current layout is read back; an older one resumes from the model weights
DEEPSPEED_LAYOUT = 2
# the ranges a step is made of, as a profile of `train_step` shows them (benchmarks/train_step.py)
PHASES = ("moray.forward", "moray.backward", "moray.optimizer", "moray.balance", "moray.metrics")


def build_model(cfg: MorayConfig, rank: int, init_from: str | None) -> Transformer:
    """The same initial weights on every rank, then this rank's share of the experts."""
    torch.manual_seed(cfg.train.seed)
    model = Transformer(cfg.model)
    if init_from is not None:
        model_checkpoint.load_into(model, init_from, strict=True)
    ep = effective_ep_size(cfg.train)
    if cfg.train.moe_impl == "moray":
        parallelize_experts(model, ep, rank % ep)
    else:
        use_stock_moe(model, ep)
    return model


def optimizer_clips(cfg: MorayConfig) -> bool:
    """Whether the optimizer applies gradient clipping (ZeRO stage 1 or 2: DeepSpeed hands it
    the global gradient norm before the update) rather than DeepSpeed."""
    return cfg.train.zero_stage in (1, 2) and cfg.train.grad_clip > 0


def deepspeed_config(cfg: MorayConfig, micro: int, accum: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        # ZeRO 1/2: the fused AdamW clips (finish_step_on_device), DeepSpeed's clip asks the
        # host per parameter group whether the norm is valid
        "gradient_clipping": 0.0 if optimizer_clips(cfg) else cfg.train.grad_clip,
        "zero_optimization": {"stage": cfg.train.zero_stage},
        # no per-parameter inf/NaN scan before each step (a fifth of small's step on a GPU, and
        # host syncs): the global norm covers every gradient, finish_step_on_device acts on it
        "bf16": {"enabled": cfg.train.use_gpu if cfg.train.bf16 is None else cfg.train.bf16,
                 "check_grad_overflow": False},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def build_optimizer(model: Transformer, cfg: MorayConfig) -> torch.optim.Optimizer:
    """AdamW over DeepSpeed's MoE parameter groups (expert weights apart: they are reduced over
    the expert-data-parallel group only). Fused: one kernel over each of ZeRO's flat fp32
    partitions instead of the foreach path's pass per arithmetic op (a fifth of small's GPU
    time per step on an H100, benchmarks/RESULTS.md)."""
    params = list(model.parameters())
    decay = {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.train.weight_decay, "name": "decay"}
    no_decay = {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0, "name": "no_decay"}
    groups = split_params_into_different_moe_groups_for_optimizer([decay, no_decay])
    return torch.optim.AdamW(groups, lr=cfg.train.lr, betas=(0.9, 0.95), fused=True)


def finish_step_on_device(engine: deepspeed.DeepSpeedEngine, optimizer: torch.optim.Optimizer,
                          max_norm: float | None) -> None:
    """Clip the gradients to `max_norm` and skip a step whose gradients are not all finite on
    any rank, inside the fused AdamW kernel, so that no host waits on the device to decide.
    ZeRO computes the global gradient norm (over every rank's gradients) before the update; it
    becomes the kernel's `grad_scale` (the gradients divided by it: DeepSpeed's clip factor,
    (norm + 1e-6) / max_norm when that is above 1) and `found_inf` (the norm is infinite when
    any gradient is not: the kernel leaves weights and moments as they were). The step's
    `grad_norm` and `skipped` metrics show it (train_step). Where DeepSpeed gives no norm first
    (ZeRO stage 0) it clips and skips itself and this does nothing."""
    zero, seen = engine.optimizer, [None]

    def before_step(opt: torch.optim.Optimizer, args, kwargs) -> None:
        norm = getattr(zero, "_global_grad_norm", None)  # set by ZeRO's step before the update
        if not torch.is_tensor(norm) or norm is seen[0]:
            return  # ZeRO steps each parameter group in turn: one norm, decided once
        seen[0] = norm
        norm = norm.float().reshape(())
        invalid = ~torch.isfinite(norm) | (norm < 0)
        opt.found_inf = invalid.float()
        if max_norm is not None:
            opt.grad_scale = torch.where(invalid, 1.0, ((norm + 1e-6) / max_norm).clamp(min=1.0))

    optimizer.register_step_pre_hook(before_step)


def layer_loads(model: Transformer) -> torch.Tensor:
    """Per-layer routed token counts of the last forward, either MoE implementation."""
    loads = [m.last_load for m in model.modules() if isinstance(m, (MoE, StockMoEBlock))]
    return torch.stack(loads) if loads else torch.zeros(0, 0, dtype=torch.long)


def update_bias_everywhere(model: Transformer) -> torch.Tensor | None:
    """Sum the routed load over ranks, so every rank applies the same bias change, and check
    that it did: ranks routing with different biases would silently train different models.
    All layers at once: two collectives a step, not three per layer. Returns whether the biases
    differ between ranks, on the device (None without bias balancing): the step reads it back
    with its metrics, so the check costs no host sync of its own."""
    layers = [m for m in model.modules() if isinstance(m, MoE)]
    if not layers:
        return None
    loads = torch.cat([moe.pending_load.flatten() for moe in layers])
    dist.all_reduce(loads)
    for moe, load in zip(layers, loads.split([moe.pending_load.numel() for moe in layers])):
        moe.update_bias(load.view_as(moe.pending_load))
    biases = torch.cat([moe.expert_bias.flatten() for moe in layers])
    own = torch.cat([biases, -biases])
    extremes = own.clone()  # the max over ranks of both: the highest bias and minus the lowest
    dist.all_reduce(extremes, op=dist.ReduceOp.MAX)
    return (extremes != own).any()


def export_state_dict(model: Transformer, impl: str) -> dict[str, torch.Tensor]:
    """The whole model in moray's checkpoint names (every rank must call: experts are gathered)."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if impl == "moray":
        state = {k: v for k, v in state.items() if ".deepspeed_moe." not in k}
        state.update(gather_expert_stacks(model))
        return state
    return stock_to_moray_state(state, gather_stock_experts(model))


class RunLog:
    """Where a run shows itself: a progress line on the console, `metrics.jsonl` in the run
    directory, Prometheus gauges through ray.util.metrics, and each worker's pid file."""

    def __init__(self, cfg: MorayConfig, rank: int):
        from ray.util.metrics import Gauge

        self.rank, self.max_steps = rank, cfg.train.max_steps
        self.run_dir = Path(cfg.train.storage_path).resolve() / cfg.train.run_name
        (self.run_dir / "workers").mkdir(parents=True, exist_ok=True)
        (self.run_dir / "workers" / f"rank{rank}.pid").write_text(str(os.getpid()))
        tags = {"run": cfg.train.run_name}
        self.gauges = {name: Gauge(f"moray_train_{name}", description=f"training {name}", tag_keys=("run",))
                       for name in ("loss", "mtp_loss", "aux_loss", "tokens_per_s", "lr", "imbalance")}
        for gauge in self.gauges.values():
            gauge.set_default_tags(tags)

    def record(self, metrics: dict) -> None:
        for name, gauge in self.gauges.items():
            gauge.set(float(metrics[name]))
        if self.rank != 0:
            return
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")
        norm = "" if metrics.get("grad_norm") is None else f"  grad norm {metrics['grad_norm']:.3f}"
        print(f"step {metrics['step']}/{self.max_steps}  loss {metrics['loss']:.4f}  mtp {metrics['mtp_loss']:.4f}  "
              f"aux {metrics['aux_loss']:.4f}  lr {metrics['lr']:.2e}  tokens/s {metrics['tokens_per_s']:.0f}  "
              f"max/mean expert load {metrics['imbalance']:.2f}{norm}", flush=True)
        if metrics.get("skipped"):
            print(f"step {metrics['step']}: gradients not finite on some rank; the weights and the optimizer "
                  "state were left as they were", flush=True)


def build_engine(cfg: MorayConfig, rank: int, world: int, init_from: str | None, device: torch.device
                 ) -> tuple[deepspeed.DeepSpeedEngine, Transformer]:
    """This rank's model under its DeepSpeed engine (which steps the learning-rate schedule):
    what every worker trains, and what benchmarks/train_step.py times outside Ray Train."""
    model = build_model(cfg, rank, init_from).to(device)
    micro, accum = micro_batch(cfg.train, world)
    scheduler_fn = lambda step: lr_at(step, cfg.train) / cfg.train.lr  # noqa: E731
    optimizer = build_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, scheduler_fn)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(cfg, micro, accum))
    norm_gradients_in_fp32(engine.optimizer)
    finish_step_on_device(engine, optimizer, cfg.train.grad_clip if optimizer_clips(cfg) else None)
    for moe in (m for m in model.modules() if isinstance(m, MoE)):
        moe.expert_bias.data = moe.expert_bias.data.float()  # bf16 would swallow the small bias steps
    return engine, model


def use_block_graphs(cfg: MorayConfig, model: Transformer, rank: int, world: int) -> int:
    """Replay the blocks' training steps as CUDA graphs where `train.cuda_graphs` asks for it
    (unset: on GPUs). Call after the engine is built and any checkpoint loaded: the graphs read
    the parameters where DeepSpeed put them. Returns how many blocks were left eager."""
    if cfg.train.cuda_graphs is False or not (cfg.train.use_gpu and torch.cuda.is_available()):
        return 0
    micro, _ = micro_batch(cfg.train, world)
    eager = capture_block_graphs(model, micro, cfg.train.seq_len, strict=bool(cfg.train.cuda_graphs))
    if eager and rank == 0:
        log.warning("training blocks left out of CUDA graphs (they run eagerly): %s",
                    "; ".join(f"{name}: {why}" for name, why in eager.items()))
    return len(eager)


def train_step(engine: deepspeed.DeepSpeedEngine, model: Transformer, stream: TokenStream, cfg: MorayConfig,
               step: int, rank: int, world: int, device: torch.device) -> tuple[dict, torch.Tensor]:
    """One optimizer step over this rank's micro-batches; returns the step's metrics (means over
    ranks) and the routed load per layer summed over ranks."""
    return queue_step(engine, model, stream, cfg, step, rank, world, device).result()


@dataclasses.dataclass
class QueuedStep:
    """A step whose work is queued on the device and whose metrics are on their way to the host.
    `result` waits for them: a loop that queues the next step first never leaves the GPU idle
    while the host prepares a step (`train_worker`)."""
    values: torch.Tensor  # [loss, mtp, aux, imbalance, biases differ, (norm)], in host memory once `ready` fires
    ready: torch.cuda.Event | None
    loads: torch.Tensor  # routed tokens per layer and expert, summed over ranks, on the device
    lr: float  # the learning rate after this step's update (the schedule's next), read when it was queued
    has_norm: bool

    def result(self) -> tuple[dict, torch.Tensor]:
        if self.ready is not None:
            self.ready.synchronize()
        values = self.values.tolist()
        if values[4]:
            raise RuntimeError("expert balancing biases differ between ranks")
        metrics = {"loss": values[0], "mtp_loss": values[1], "aux_loss": values[2], "imbalance": values[3]}
        if self.has_norm:  # a skipped step (finish_step_on_device) has no finite norm
            finite = math.isfinite(values[5]) and values[5] >= 0
            metrics.update(grad_norm=values[5] if finite else None, skipped=not finite)
        return metrics, self.loads


def queue_step(engine: deepspeed.DeepSpeedEngine, model: Transformer, stream: TokenStream, cfg: MorayConfig,
               step: int, rank: int, world: int, device: torch.device) -> QueuedStep:
    """`train_step` without waiting for the device: its metrics come back through pinned memory."""
    micro, accum = micro_batch(cfg.train, world)
    with record_function("moray.step"):
        model.train()
        losses = []  # per micro-batch [main, mtp, aux], left on the device
        for m in range(accum):
            first = (m * world + rank) * micro
            inputs, targets = stream.step_batch(step, cfg.train.batch_size, cfg.train.seq_len, cfg.train.seed,
                                                first, micro)
            with record_function("moray.forward"):
                parts = engine.module.loss(to_device(inputs, device), to_device(targets, device))
            with record_function("moray.backward"):
                engine.backward(parts.loss)
            with record_function("moray.optimizer"):
                engine.step()
            losses.append(torch.stack([part.detach().float() if part is not None else torch.zeros((), device=device)
                                       for part in (parts.main, parts.mtp, parts.aux)]))
        with record_function("moray.balance"):
            biases_differ = update_bias_everywhere(model)
        with record_function("moray.metrics"):
            loads = layer_loads(model).clone()
            dist.all_reduce(loads)
            means = torch.stack(losses).double().mean(0)
            dist.all_reduce(means)
            norm = engine.get_global_grad_norm()  # None without clipping; the same on every rank
            tail = [load_imbalance_on_device(loads), torch.zeros((), device=device) if biases_differ is None else biases_differ]
            if norm is not None:
                tail.append(torch.as_tensor(norm, device=device))
            values = torch.cat([means / world, torch.stack([t.double() for t in tail])])
            ready = None
            if device.type == "cuda":  # one copy back a step, waited for only by `result`
                values = values.to("cpu", non_blocking=True)  # pinned by the caching host allocator
                ready = torch.cuda.Event()
                ready.record()
    return QueuedStep(values, ready, loads, engine.get_lr()[0], norm is not None)


def to_device(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU batch copied to the GPU through pinned memory without the host waiting: a pageable
    copy would hold the host until every kernel queued before it had run."""
    if device.type != "cuda":
        return batch.to(device)
    return batch.pin_memory().to(device, non_blocking=True)


def train_worker(config: dict) -> None:
    cfg: MorayConfig = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(MorayConfig), config["cfg"]))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    deepspeed.init_distributed(dist_backend="nccl" if cfg.train.use_gpu else "gloo")
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    device = ray.train.torch.get_device() if cfg.train.use_gpu else torch.device("cpu")

    # after a worker failure Ray Train hands back the run's latest checkpoint; a new run may
    # start from another run's checkpoint
    resume = ray.train.get_checkpoint()
    resume_dir = Path(resume.to_directory()) if resume is not None else None
    if resume_dir is None and config.get("resume_from"):
        resume_dir = Path(config["resume_from"])
    state = json.loads((resume_dir / STATE_FILE).read_text()) if resume_dir else {"step": 0, "world_size": world}
    # same world size: DeepSpeed's checkpoint restores weights and optimizer exactly; another
    # world size re-shards the experts, so the engine starts from the exported model weights. So
    # does a checkpoint whose DeepSpeed files an older moray wrote (their parameters are laid out
    # otherwise), or whose model is format 1 (gate and up apart)
    current = resume_dir is None or (
        state.get("deepspeed_layout") == DEEPSPEED_LAYOUT
        and model_checkpoint.format_version(resume_dir / MODEL_DIR) == model_checkpoint.FORMAT_VERSION)
    same_world = state["world_size"] == world and current
    if state["world_size"] == world and not current and rank == 0:
        log.warning("%s was written by an older moray (DeepSpeed layout %s, model format %d): resuming from its "
                    "model weights, with a fresh optimizer state", resume_dir, state.get("deepspeed_layout", 1),
                    model_checkpoint.format_version(resume_dir / MODEL_DIR))
    init_from = str(resume_dir / MODEL_DIR) if resume_dir and not same_world else config.get("init_from")
    engine, model = build_engine(cfg, rank, world, init_from, device)
    if resume_dir is not None and same_world:
        engine.load_checkpoint(str(resume_dir), tag=DS_TAG)
    use_block_graphs(cfg, model, rank, world)

    stream = TokenStream(cfg.train.data_dir)
    run_log = RunLog(cfg, rank)
    window: list[dict] = []
    last_report = time.perf_counter()

    def finish(done: int, queued: QueuedStep) -> None:
        """A step's metrics once they are back: logged and reported, with a checkpoint when due."""
        nonlocal window, last_report
        step_metrics, loads = queued.result()
        window.append(step_metrics)
        if done % cfg.train.log_every == 0 or checkpoint_due(done):
            elapsed = time.perf_counter() - last_report
            last_report = time.perf_counter()
            metrics = {k: sum(w[k] for w in window) / len(window) for k in window[0]}
            metrics.update(step=done, lr=queued.lr, world_size=world,
                           tokens_per_s=len(window) * cfg.train.batch_size * cfg.train.seq_len / elapsed,
                           step_loss=window[-1]["loss"],
                           layer_imbalance=[load_imbalance(row[None]) for row in loads])
            window = []
            run_log.record(metrics)
            if checkpoint_due(done):
                _report_with_checkpoint(engine, model, cfg, metrics, rank, world, done)
            else:
                ray.train.report(metrics)

    def checkpoint_due(done: int) -> bool:
        return done % cfg.train.checkpoint_every == 0 or done == cfg.train.max_steps

    # each step is queued before the previous one's metrics are read, so the GPU never waits for
    # the host between steps; a checkpoint step is finished before the next is queued, so the
    # checkpoint holds that step's weights
    pending: tuple[int, QueuedStep] | None = None
    for step in range(state["step"], cfg.train.max_steps):
        queued = queue_step(engine, model, stream, cfg, step, rank, world, device)
        if pending is not None:
            finish(*pending)
        pending = (step + 1, queued)
        if checkpoint_due(step + 1):
            finish(*pending)
            pending = None


def _report_with_checkpoint(engine, model: Transformer, cfg: MorayConfig, metrics: dict, rank: int, world: int,
                            step: int) -> None:
    exported = export_state_dict(model, cfg.train.moe_impl)  # collective: every rank
    with tempfile.TemporaryDirectory() as d:
        engine.save_checkpoint(d, tag=DS_TAG)
        if rank == 0:
            model_cfg = stock_export_config(cfg.model) if cfg.train.moe_impl == "deepspeed" else cfg.model
            model_checkpoint.save_checkpoint(Path(d) / MODEL_DIR, model_cfg, exported,
                                             tokenizer_file=Path(cfg.train.data_dir) / "tokenizer.json")
            state = {"step": step, "world_size": world, "deepspeed_layout": DEEPSPEED_LAYOUT}
            (Path(d) / STATE_FILE).write_text(json.dumps(state))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
