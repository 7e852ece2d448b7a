"""All-to-all dispatch + combine through moray's actors against raw NCCL, same bytes, same run.

Two Ray actors, one GPU each, in one NCCL group formed by moray's transport. For each message
size (tokens per step x top_k rows of `dim` bf16 values, as the chosen preset routes them):

- raw:   two `dist.all_to_all_single` calls with the splits known in advance (rows to the
         peer, rows back): the NCCL limit for these bytes;
- moray: `router_dispatch` + `router_collect` / `shard_serve_layer`, the exact functions the router and the
         expert shards run per MoE layer: per-expert counts exchange, rows out, rows back
         (the shard's expert computation replaced by the identity so only transport is timed).

Run: python benchmarks/ep_dispatch.py --preset small --tokens 1024 4096 16384
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")

import ray  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from actors.transport import Rendezvous, join_group, router_collect, router_dispatch, shard_serve_layer  # noqa: E402
from cluster.config import load_config  # noqa: E402
from timing import cuda_times  # noqa: E402  (benchmarks/timing.py)


@ray.remote(num_gpus=1)
class Peer:
    def __init__(self):
        self.device = torch.device("cuda", 0)
        self.rendezvous = None

    def open(self) -> object:
        self.rendezvous = Rendezvous(ray.util.get_node_ip_address(), 2, "nccl", 120.0, 1)
        return self.rendezvous.spec

    def join(self, spec, rank: int) -> None:
        join_group(spec, rank, self.rendezvous.store if rank == 0 else None)
        self.rank = rank
        dist.barrier(device_ids=[0])

    def _time(self, fn, iters: int, warmup: int) -> list[float]:
        return cuda_times(fn, iters, warmup, before=lambda: dist.barrier(device_ids=[0]))

    def raw(self, rows: int, dim: int, iters: int, warmup: int) -> list[float]:
        x = torch.randn(rows if self.rank == 0 else 0, dim, device=self.device, dtype=torch.bfloat16)
        back = torch.empty(rows if self.rank == 0 else 0, dim, device=self.device, dtype=torch.bfloat16)
        mid = torch.empty(rows if self.rank == 1 else 0, dim, device=self.device, dtype=torch.bfloat16)
        out_splits, in_splits = ([0, 0], [0, rows]) if self.rank == 0 else ([rows, 0], [0, 0])

        def step():
            dist.all_to_all_single(mid, x, out_splits, in_splits)
            dist.all_to_all_single(back, mid, in_splits, out_splits)

        return self._time(step, iters, warmup)

    def moray(self, rows: int, dim: int, n_experts: int, iters: int, warmup: int) -> list[float]:
        if self.rank == 0:
            x = torch.randn(rows, dim, device=self.device, dtype=torch.bfloat16)
            counts = torch.full((n_experts,), rows // n_experts, device=self.device, dtype=torch.long)
            counts[0] += rows - int(counts.sum())

            def step():
                router_collect(router_dispatch(x, counts, [n_experts]))
        else:
            def step():
                shard_serve_layer(n_experts, dim, torch.bfloat16, self.device, lambda r, c: r)

        return self._time(step, iters, warmup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    cfg = load_config(args.preset).model
    ray.init(include_dashboard=False)
    a, b = Peer.remote(), Peer.remote()
    spec = ray.get(a.open.remote())
    ray.get([a.join.remote(spec, 0), b.join.remote(spec, 1)])
    rows_out = []
    print(f"{'tokens':>7} {'rows':>7} {'MB/dir':>7} {'raw ms':>8} {'moray ms':>9} {'raw GB/s':>9} {'moray GB/s':>11} {'ratio':>6}")
    for tokens in args.tokens:
        rows = tokens * cfg.moe.top_k
        mb = rows * cfg.dim * 2 / 1e6
        raw = ray.get([p.raw.remote(rows, cfg.dim, args.iters, args.warmup) for p in (a, b)])[0]
        ours = ray.get([a.moray.remote(rows, cfg.dim, cfg.moe.n_routed_experts, args.iters, args.warmup),
                        b.moray.remote(rows, cfg.dim, cfg.moe.n_routed_experts, args.iters, args.warmup)])[0]
        raw_s, ours_s = statistics.median(raw), statistics.median(ours)
        row = {"tokens": tokens, "rows": rows, "mb_per_direction": mb, "raw_ms": raw_s * 1e3, "moray_ms": ours_s * 1e3,
               "raw_gbps": 2 * mb / 1e3 / raw_s, "moray_gbps": 2 * mb / 1e3 / ours_s, "ratio": raw_s / ours_s}
        rows_out.append(row)
        print(f"{tokens:>7} {rows:>7} {mb:>7.1f} {row['raw_ms']:>8.3f} {row['moray_ms']:>9.3f} "
              f"{row['raw_gbps']:>9.1f} {row['moray_gbps']:>11.1f} {row['ratio']:>6.2f}")
    meta = {"date": datetime.date.today().isoformat(), "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available()
            else ray.get(a.__ray_call__.remote(lambda self: torch.cuda.get_device_name(0))),
            "preset": args.preset, "dim": cfg.dim, "top_k": cfg.moe.top_k, "torch": torch.__version__}
    print(json.dumps(meta))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows_out}, f, indent=2)


if __name__ == "__main__":
    main()
