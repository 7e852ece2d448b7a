"""Decode tokens/s of a preset on GPU at several batch sizes: one process, and sharded over Ray.

  --shards 0   the single-process model (`model.generate.generate`) on one GPU, eager and with
               its decode steps replayed as CUDA graphs (`model/decode_graphs.py`): the floor the
               sharded runtime is measured against
  --shards N   `ShardedModel` with N expert shards: router and each shard on a GPU of their own
               (N + 1 GPUs), NCCL all-to-all per MoE layer; skipped, saying so, with fewer GPUs;
               once per `--cuda-graphs` setting (all: router and shards replay decode steps as
               CUDA graphs, router: the router only, none: eager), so each is its own baseline

Random weights in bf16, B prompts of `--prompt-len` random tokens, greedy, `--new-tokens` each,
nothing stops early. Decode rate = B x (new_tokens - 1) / (time for new_tokens - time for 1 new
token), so the prefill is left out. In the same run, the time to read every weight once
(a device-to-device copy of the parameters' bytes) gives the memory floor of one decode step.

Run: python3 benchmarks/serve_decode.py --preset small --batch 1 16 64 --shards 0 1 2 --cuda-graphs all router
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")

import torch  # noqa: E402

from cluster.config import load_config  # noqa: E402
from model.config import CUDA_GRAPH_MODES  # noqa: E402
from model.decode_graphs import DecodeGraphs  # noqa: E402
from model.generate import SamplingParams, generate  # noqa: E402
from model.transformer import Transformer  # noqa: E402
from timing import cuda_times  # noqa: E402  (benchmarks/timing.py)


def decode_rate(run, batch: int, new_tokens: int, repeats: int) -> tuple[float, float]:
    """(tokens/s, seconds per decode step) from timing new_tokens against 1 new token."""
    def wall(n: int) -> float:
        times = []
        for _ in range(repeats):
            torch.cuda.synchronize()
            start = time.perf_counter()
            run(n)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    run(2)  # warm-up
    step = (wall(new_tokens) - wall(1)) / (new_tokens - 1)
    return batch / step, step


def weight_read_seconds(model: torch.nn.Module) -> float:
    """Reading every parameter once at the card's copy bandwidth (read + write counted, halved)."""
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    dst = torch.empty_like(flat)
    return statistics.median(cuda_times(lambda: dst.copy_(flat), 20, 3)) / 2


def profile_decode(model: torch.nn.Module, prompts: list[list[int]], new_tokens: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    generate(model, prompts, SamplingParams(max_new_tokens=2))
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        generate(model, prompts, SamplingParams(max_new_tokens=new_tokens))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=30, max_name_column_width=60))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--shards", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", action="store_true",
                        help="print where a single-process decode step of the first batch size spends its time")
    parser.add_argument("--cuda-graphs", nargs="+", choices=CUDA_GRAPH_MODES, default=["all"],
                        help="sharded runs: where decode steps replay as CUDA graphs, one run per setting")
    parser.add_argument("--json")
    args = parser.parse_args()
    cfg = load_config(args.preset).model
    torch.manual_seed(0)
    model = Transformer(cfg).cuda().to(torch.bfloat16).eval()
    floor_s = weight_read_seconds(model)
    gen = torch.Generator().manual_seed(1)
    prompts = {b: torch.randint(0, cfg.vocab_size, (b, args.prompt_len), generator=gen).tolist() for b in args.batch}
    rows = []

    def record(shards: int, batch: int, rate: float, step: float, mode: str = "eager", **extra) -> None:
        row = {"shards": shards, "mode": mode, "batch": batch, "decode_tokens_per_s": rate, "step_ms": step * 1e3,
               "weight_read_floor_ms": floor_s * 1e3, **extra}
        rows.append(row)
        print(json.dumps(row), flush=True)

    if args.profile:
        profile_decode(model, prompts[args.batch[0]], args.new_tokens)
    for shards in args.shards:
        if shards == 0:
            graphs = DecodeGraphs(model, max(args.batch))
            for b in args.batch:
                for mode, g in (("eager", None), ("cuda-graphs", graphs)):
                    record(0, b, *decode_rate(lambda n: generate(model, prompts[b], SamplingParams(max_new_tokens=n), g),
                                              b, args.new_tokens, args.repeats), mode)
            continue
        if torch.cuda.device_count() < shards + 1:
            print(f"shards={shards}: needs {shards + 1} GPUs (router + shards), this machine has "
                  f"{torch.cuda.device_count()}; skipped")
            continue
        import ray

        from cluster.sharded import ShardedModel
        ray.init(include_dashboard=False, ignore_reinit_error=True)
        for setting in args.cuda_graphs:
            with ShardedModel.create(cfg, num_shards=shards, seed=0, dtype="bfloat16", use_gpu=True,
                                     max_batch_size=max(args.batch), cuda_graphs=setting) as sharded:
                for b in args.batch:
                    rate = decode_rate(lambda n: sharded.generate(prompts[b], SamplingParams(max_new_tokens=n)),
                                       b, args.new_tokens, args.repeats)
                    # what replayed: the router's and each shard's captured graphs
                    record(shards, b, *rate, f"graphs:{setting}", router_graphs=sharded.stats()["decode_graphs"],
                           shard_graphs=[s["step_graphs"] for s in sharded.shard_stats()])
    meta = {"date": datetime.date.today().isoformat(), "gpu": torch.cuda.get_device_name(0), "preset": args.preset,
            "gpus": torch.cuda.device_count(), "torch": torch.__version__, "weight_read_floor_ms": floor_s * 1e3}
    print(json.dumps(meta))
    print(f"{'shards':>6} {'mode':>13} {'batch':>5} {'tokens/s':>9} {'step ms':>8} {'floor ms':>8}")
    for r in rows:
        print(f"{r['shards']:>6} {r['mode']:>13} {r['batch']:>5} {r['decode_tokens_per_s']:>9.0f} {r['step_ms']:>8.2f} "
              f"{r['weight_read_floor_ms']:>8.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
