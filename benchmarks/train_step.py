"""Where a training step's time goes: the worker's own step, one process, no Ray Train around it.

`train_throughput.py` measures whole runs under Ray Train; this one times `train.worker`'s
`build_engine` + `queue_step` (the code every worker runs: DeepSpeed engine, moray's or the
stock MoE, the balancing bias update, the metric reductions) on one device and asks the
profiler what the step is made of: the GPU's busy share of the timed step (what is left
is the GPU waiting on the host), the host's time in each phase (forward, backward, optimizer,
bias update, metrics), the host syncs, and the kernels by GPU time.
A step that is host-bound shows a low busy share whatever its kernels cost. The timed steps run
as `train_worker` runs them, each queued before the previous one's metrics are read (RESULTS.md's
rows before "Steps queued ahead of their metrics" were timed with a synchronize around each step).

Run: python benchmarks/train_step.py --preset small --impl moray deepspeed
     python benchmarks/train_step.py --cpu --preset tiny      (gloo: checks that it runs)
     python benchmarks/train_step.py --cpu --micro-batch 1 --seq-len 16 --set model.dim=64 ...
         (`small`'s layers, experts and parameter count at negligible width: the host's cost)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile, schedule

from cluster.config import load_config
from train.data import TokenStream, prepare_corpus
from train.worker import PHASES, build_engine, queue_step, train_step, use_block_graphs
from train_throughput import dense_matmul_tflops, flops_per_token  # benchmarks/

SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
SYNC_DEPTH = 4  # ops above a sync call named in its source


def busy_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals: time in which at least one kernel ran."""
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if e <= end:
            continue
        total += e - max(s, end)
        end = e
    return total


def sync_source(event) -> str:
    """Who made the host wait: the step's phase and the innermost ops above a sync call (e.g.
    `moray.optimizer: ... > aten::item > aten::_local_scalar_dense`), so that each can be found."""
    names, parent = [], event.cpu_parent
    while parent is not None and parent.name not in PHASES:
        names.append(parent.name)
        parent = parent.cpu_parent
    phase = parent.name if parent is not None else "(no phase)"
    return f"{phase}: " + " > ".join(reversed(names[:SYNC_DEPTH]))


def kernel_time(events) -> Counter:
    """GPU time by kernel name (us)."""
    total: Counter = Counter()
    for e in events:
        total[e.name] += e.time_range.end - e.time_range.start
    return total


def per_step(counts: Counter, steps: int, scale: float = 1.0, top: int = 40) -> dict[str, float]:
    return {name: round(v * scale / steps, 3) for name, v in counts.most_common(top)}


def step_profile(prof, steps: int, gpu: bool) -> dict:
    """Per step: wall time, GPU busy time, host syncs and each phase's wall time on the host
    (per phase GPU time is not attributed: autograd launches backward's kernels from a thread
    of its own)."""
    events = prof.events()
    # record_function ranges (moray's phases, the optimizer's step) show on the GPU's timeline
    # too, as annotations: not work. Kernels and copies never share a name with a host op.
    host_names = {e.name for e in events if e.device_type.name == "CPU"}
    kernel_events = [e for e in events if e.device_type.name == "CUDA" and e.name not in host_names]
    kernels = [(e.time_range.start, e.time_range.end) for e in kernel_events]
    steps_ev = [e for e in events if e.name == "moray.step" and e.device_type.name == "CPU"]
    wall = sum(e.time_range.end - e.time_range.start for e in steps_ev)
    out = {"wall_ms": wall / steps / 1e3, "gpu_busy_ms": busy_us(kernels) / steps / 1e3 if gpu else None,
           "host_syncs": sum(1 for e in events if e.name in SYNC_CALLS) / steps,
           "kernels": len(kernel_events) / steps, "phases": {},
           "sync_sources": per_step(Counter(sync_source(e) for e in events if e.name in SYNC_CALLS), steps),
           "kernels_ms": per_step(kernel_time(kernel_events), steps, scale=1e-3)}
    for phase in PHASES:
        spans = [e for e in events if e.name == phase and e.device_type.name == "CPU"]
        out["phases"][phase.removeprefix("moray.")] = sum(e.time_range.end - e.time_range.start
                                                          for e in spans) / steps / 1e3
    return out


def run(impl: str, args, work: Path, device: torch.device, dense: float | None) -> dict:
    gpu = device.type == "cuda"
    cfg = load_config(args.preset, [
        f"train.moe_impl={impl}", "train.num_workers=1", f"train.use_gpu={str(gpu).lower()}",
        f"train.batch_size={args.micro_batch}", f"train.seq_len={args.seq_len}",
        f"train.max_steps={args.steps + 1 + args.profile_steps}", "train.warmup_steps=2",
        f"train.data_dir={work / 'corpus'}", *args.set])
    if gpu:
        torch.cuda.reset_peak_memory_stats(device)
    engine, model = build_engine(cfg, 0, 1, None, device)
    start = time.perf_counter()
    eager_blocks = use_block_graphs(cfg, model, 0, 1)
    capture_s = time.perf_counter() - start
    stream = TokenStream(cfg.train.data_dir)
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    # as train_worker runs them: each step queued before the previous step's metrics are read;
    # a step's time is from one step's metrics back to the next's
    times = []
    pending = queue_step(engine, model, stream, cfg, 0, 0, 1, device)
    last = None
    for step in range(1, args.steps):
        queued = queue_step(engine, model, stream, cfg, step, 0, 1, device)
        metrics, _ = pending.result()
        now = time.perf_counter()
        if last is not None:
            times.append(now - last)
        last, pending = now, queued
    metrics, _ = pending.result()
    sync()
    warm = times[args.warmup:] or times
    memory_gib = {"peak_allocated": torch.cuda.max_memory_allocated(device) / 2**30,
                  "peak_reserved": torch.cuda.max_memory_reserved(device) / 2**30} if gpu else None
    step_s = statistics.median(warm)
    tokens = args.micro_batch * args.seq_len
    tflops = flops_per_token(cfg.model, args.seq_len) * tokens / step_s / 1e12
    # one step recorded and thrown away first: the profiler's own start-up lands in it
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else []),
                 schedule=schedule(wait=0, warmup=1, active=args.profile_steps, repeat=1)) as prof:
        for step in range(args.steps, args.steps + 1 + args.profile_steps):
            train_step(engine, model, stream, cfg, step, 0, 1, device)
            sync()
            prof.step()
    row = {"impl": impl, "preset": args.preset, "parameters": sum(1 for _ in model.parameters()),
           "cuda_graphs": cfg.train.cuda_graphs, "eager_blocks": eager_blocks, "capture_s": capture_s,
           "memory_gib": memory_gib,
           "tokens_per_step": tokens, "step_ms": step_s * 1e3,
           "step_ms_all": [round(t * 1e3, 2) for t in warm], "tokens_per_s": tokens / step_s, "model_tflops": tflops,
           "mfu_vs_measured_dense": tflops / dense if dense else None, "loss": metrics["loss"],
           **step_profile(prof, args.profile_steps, gpu)}
    sort_key = "cuda_time_total" if gpu else "self_cpu_time_total"
    print(f"\n{impl}: {args.profile_steps} steps, top ops by {sort_key}")
    print(prof.key_averages().table(sort_by=sort_key, row_limit=args.top, max_name_column_width=60))
    del engine, model
    if gpu:
        torch.cuda.empty_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--impl", nargs="+", default=["moray", "deepspeed"])
    parser.add_argument("--micro-batch", type=int, default=8, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=12, help="timed steps (the first --warmup not counted)")
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=25, help="rows of the profiler's op table")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides, e.g. a preset's structure at negligible width, whose step time is "
                             "then its host overhead: model.dim=64 model.moe.moe_inter_dim=32 ...")
    parser.add_argument("--cpu", action="store_true", help="gloo on CPU (use with a small preset): checks that it runs")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    os.environ.update(MASTER_ADDR="127.0.0.1", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    os.environ.setdefault("MASTER_PORT", "29541")
    gpu = not args.cpu
    dist.init_process_group("nccl" if gpu else "gloo", rank=0, world_size=1)
    device = torch.device("cuda", 0) if gpu else torch.device("cpu")
    dense = dense_matmul_tflops() if gpu else None
    work = Path(tempfile.mkdtemp(prefix="moray-step-"))
    prepare_corpus(None, work / "corpus", vocab_size=2048, progress=False)
    rows = [run(impl, args, work, device, dense) for impl in args.impl]
    meta = {"date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name(0) if gpu else "cpu",
            "torch": torch.__version__, "overrides": args.set, "threads": torch.get_num_threads(),
            "dense_bf16_tflops": dense, "micro_batch": args.micro_batch,
            "seq_len": args.seq_len}
    print(json.dumps(meta))
    for r in rows:
        print(json.dumps(r))
    print(f"\n{'impl':>10} {'params':>6} {'step ms':>8} {'tokens/s':>9} {'TFLOP/s':>8} {'MFU':>6} {'GPU busy':>8} {'kernels':>7} {'syncs':>6}  "
          + " ".join(f"{p.removeprefix('moray.'):>9}" for p in PHASES))
    for r in rows:
        # against the timed step: the profiled steps' host span (wall_ms) ends before the GPU is
        # done with them since the metrics come back apart (QueuedStep), so it would read > 100%
        busy = "-" if r["gpu_busy_ms"] is None else f"{r['gpu_busy_ms'] / r['step_ms']:.0%}"
        mfu = "-" if r["mfu_vs_measured_dense"] is None else f"{r['mfu_vs_measured_dense']:.1%}"
        phases = " ".join(f"{ms:>9.1f}" for ms in r["phases"].values())
        print(f"{r['impl']:>10} {r['parameters']:>6} {r['step_ms']:>8.1f} {r['tokens_per_s']:>9.0f} {r['model_tflops']:>8.1f} {mfu:>6} "
              f"{busy:>8} {r['kernels']:>7.0f} {r['host_syncs']:>6.0f}  {phases}")
    print("(phases: ms of each step's wall time the host spent in each; GPU busy: GPU time a step, as a share of the timed step; "
          "kernels: launched per step)")
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
