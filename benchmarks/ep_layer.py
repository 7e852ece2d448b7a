"""One MoE layer expert-parallel over 2 devices against 1 device and against raw all-to-all.

Two Ray actors (one GPU each, NCCL; or `--cpu`, gloo, for a functional check) build the same
layer from one seed. Each rank gets its own `--tokens` tokens (the same per-device count as the
one-device baseline) and runs forward+backward of the whole moray layer (gate, top-k, sort
permutation, `train/expert_parallel.py`'s all-to-all dispatch, this rank's half of the experts
as fused grouped GEMMs, combine, shared experts). Timed in the same run:

  one device  rank 0 alone with every expert local, same tokens (rank 1 waits)
  two devices both ranks, experts split: throughput ratio = 2 x (one-device time) / (two-device time);
              the shared experts compute while the rows (and in backward their gradients) travel
  no overlap  the same two-device layer with each exchange waited for at once (`ExchangeFirst`): the
              shared experts and the rank's own rows wait for the network; overlap gain = its time
              / the two-device time
  moray comm  `ep_dispatch_start/finish` + `ep_combine_start/finish` on tokens routed at random,
              the expert computation replaced by the identity, forward and backward (counts exchange,
              host split sizes, rows out and back, both ways; a rank's rows for its own experts
              stay, as in the layer); it includes the permutation and combine of the rows
  permute     that permutation and combine alone (`dispatch_rows` / `combine_rows`, no exchange): the
              exchange's own cost is moray comm - permute
  raw comm    the same four `all_to_all_single` calls (the same rows crossing, no own rows) with the
              splits known in advance; raw/moray = raw comm / (moray comm - permute)
  step peak   (GPU, rank 0, JSON only) what one two-device step allocates at its peak above what
              was allocated before it

Each rank checks its expert-parallel output against the one-device layer on its own tokens, and
its experts' weight gradients after one step against the one-device layer's on both ranks'
tokens ("err": the larger relative error).

`--sm-carveout N` keeps the matmuls (cuBLASLt) of both two-device variants off N SMs, so NCCL's
kernel can run beside the shared experts' full-width persistent GEMMs instead of pushing a
second wave onto them (the overlap measured nothing without it on H100s); the one-device
baseline keeps every SM.

`--profile DIR` records one more call of each variant at the largest token count with
torch.profiler on every rank and writes each rank's kernel table (`<variant>_rank<r>.txt`,
device time by kernel), host table (`<variant>_rank<r>_host.txt`, host time by op), trace (`<variant>_rank<r>.json`, for chrome://tracing or Perfetto) and
overlap summary (`<variant>_rank<r>_overlap.txt`: device idle time, and how much of each NCCL
kernel ran beside computation) into DIR: where the exchange's time goes beyond raw NCCL, and
which exchanges are exposed.

Run: python3 benchmarks/ep_layer.py --shape v2-lite --tokens 4096 8192 16384 [--sm-carveout 16]
     python3 benchmarks/ep_layer.py --cpu --shape tiny --tokens 256     (gloo, a functional check)
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import statistics
import time

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")

import ray  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

from actors.transport import Rendezvous, join_group  # noqa: E402
from model.config import MoEConfig  # noqa: E402
from model.dispatch import Dispatch, Routing, combine_rows, dispatch_rows, permute  # noqa: E402
from model.expert_ffn import expert_swiglu  # noqa: E402
from model.moe import EXPERT_WEIGHTS, MoE  # noqa: E402
from timing import cuda_times  # noqa: E402  (benchmarks/timing.py)
from train.expert_parallel import (ExpertParallelExperts, ep_combine_finish, ep_combine_start,  # noqa: E402
                                   ep_dispatch_finish, ep_dispatch_start,
                                   parallelize_experts)

SHAPES = {
    "v2-lite": (2048, dict(n_routed_experts=64, moe_inter_dim=1408, n_shared_experts=2, top_k=6)),
    "tiny": (64, dict(n_routed_experts=8, moe_inter_dim=32, n_shared_experts=1, top_k=2)),
}


class ExchangeFirst(nn.Module):
    """The baseline without overlap: the same experts, every exchange waited for as soon as it
    starts (the own rows computed before the others' outputs are sent back), all inside `start`."""

    def __init__(self, experts: ExpertParallelExperts):
        super().__init__()
        self.inner = experts

    def start(self, x_ND: torch.Tensor, dispatch: Dispatch) -> torch.Tensor:
        sent = self.inner.start(x_ND, dispatch)
        rows, exchange = ep_dispatch_finish(sent), sent.exchange
        w = self.inner.local_stacks()
        y_own = expert_swiglu(sent.own_rows, *w, exchange.own_counts)
        y_theirs = expert_swiglu(rows, *w, exchange.their_counts)
        returning = ep_combine_start(y_theirs, exchange, self.inner.deepspeed_moe.ep_group)
        return ep_combine_finish(returning, y_own, exchange)

    def finish(self, out_ND: torch.Tensor) -> torch.Tensor:
        return out_ND


def overlap_summary(trace_path: str) -> str:
    """From a profiler trace: the device's span and busy time, and for each NCCL kernel how
    much of it ran beside other kernels (a collective that overlaps nothing is exposed in full)."""
    with open(trace_path) as f:
        kernels = sorted((e for e in json.load(f)["traceEvents"] if e.get("ph") == "X" and
                          e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")), key=lambda e: e["ts"])
    if not kernels:
        return "no device activity\n"
    t0, busy, open_span = kernels[0]["ts"], 0.0, None
    for e in kernels:  # union of the kernels' intervals
        if open_span is None or e["ts"] > open_span[1]:
            busy += 0 if open_span is None else open_span[1] - open_span[0]
            open_span = [e["ts"], e["ts"] + e["dur"]]
        else:
            open_span[1] = max(open_span[1], e["ts"] + e["dur"])
    busy += open_span[1] - open_span[0]
    span = max(e["ts"] + e["dur"] for e in kernels) - t0
    lines = [f"device span {span:.0f} us, busy {busy:.0f} us, idle {span - busy:.0f} us"]
    compute = [e for e in kernels if "nccl" not in e["name"].lower()]
    for e in (e for e in kernels if "nccl" in e["name"].lower()):
        start, end = e["ts"], e["ts"] + e["dur"]
        beside = sum(max(0.0, min(end, c["ts"] + c["dur"]) - max(start, c["ts"])) for c in compute)
        lines.append(f"NCCL kernel at {start - t0:9.0f} us: {e['dur']:7.0f} us, {min(beside, e['dur']):7.0f} us "
                     "beside other kernels")
    return "\n".join(lines) + "\n"


class Rank:
    def __init__(self, cpu: bool):
        self.device = torch.device("cpu") if cpu else torch.device("cuda", 0)
        self.dtype = torch.float32 if cpu else torch.bfloat16
        self.rendezvous = None

    def open(self, backend: str) -> object:
        self.rendezvous = Rendezvous(ray.util.get_node_ip_address(), 2, backend, 300.0, 1)
        return self.rendezvous.spec

    def join(self, spec, rank: int) -> None:
        join_group(spec, rank, self.rendezvous.store if rank == 0 else None)
        self.rank = rank

    def barrier(self) -> None:
        dist.barrier(device_ids=[0]) if self.device.type == "cuda" else dist.barrier()

    def build(self, shape: str, seed: int) -> None:
        dim, moe_cfg = SHAPES[shape]
        cfg = MoEConfig(**moe_cfg, bias_balancing=False)
        torch.manual_seed(seed)
        full = MoE(dim, cfg)
        for p in full.parameters():
            p.data.normal_(0, dim**-0.5)
        self.full = full.to(self.device, self.dtype)
        self.ep, self.serial = self._expert_parallel(), self._expert_parallel()
        self.serial.experts = ExchangeFirst(self.serial.experts)
        self.dim, self.cfg = dim, cfg

    def _expert_parallel(self) -> MoE:
        layer = copy.deepcopy(self.full)
        parallelize_experts(layer, 2, self.rank, dist.group.WORLD)
        return layer

    def _tokens(self, n: int, seed: int, rank: int | None = None) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed * 2 + (self.rank if rank is None else rank))
        return torch.randn(n, self.dim, generator=g).to(self.device, self.dtype)

    def _expert_grad_err(self, tokens: int, seed: int) -> float:
        """The expert weights' gradients after one step (summed over both expert calls, and over
        both ranks' rows) against the one-device layer run on both ranks' tokens: relative error."""
        xs = torch.stack([self._tokens(tokens, seed, r) for r in range(2)])
        douts = torch.stack([self._tokens(tokens, seed + 7919, r) for r in range(2)])
        for layer in (self.full, self.ep):
            layer.zero_grad(set_to_none=True)
        self.full(xs)[0].backward(douts)
        self.ep(xs[self.rank][None])[0].backward(douts[self.rank][None])
        err = 0.0
        for name, stack in zip(EXPERT_WEIGHTS, self.ep.experts.local_stacks()):
            got, n_local = stack.grad.float(), stack.shape[0]
            want = getattr(self.full.experts, name).grad[self.rank * n_local:(self.rank + 1) * n_local].float()
            err = max(err, float((got - want).norm() / want.norm()))
        return err

    def _timed(self, fn, iters: int) -> float:
        if self.device.type == "cuda":
            return statistics.median(cuda_times(fn, iters, 3, before=self.barrier))
        times = []
        for _ in range(iters):
            self.barrier()
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    def _step_peak(self, fn) -> float | None:
        """Memory one step allocates above what was allocated before it, at its peak (GB)."""
        if self.device.type != "cuda":
            return None
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 1e9

    def _profile(self, variants: dict, sm_carveout: int, out_dir: str) -> None:
        from torch.profiler import ProfilerActivity, profile
        os.makedirs(out_dir, exist_ok=True)
        for name, fn in variants.items():
            torch._C._set_sm_carveout_experimental(sm_carveout or None if name in ("two", "serial") else None)
            for _ in range(3):  # warm: first launches load kernels (and Triton compiles its variants)
                fn()
            self.barrier()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                fn()
                torch.cuda.synchronize()
            torch._C._set_sm_carveout_experimental(None)
            stem = os.path.join(out_dir, f"{name}_rank{self.rank}")
            with open(stem + ".txt", "w") as f:
                f.write(prof.key_averages().table(sort_by="device_time_total", row_limit=40))
            with open(stem + "_host.txt", "w") as f:
                f.write(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40))
            prof.export_chrome_trace(stem + ".json")
            with open(stem + "_overlap.txt", "w") as f:
                f.write(overlap_summary(stem + ".json"))

    def run(self, tokens: int, iters: int, seed: int, sm_carveout: int, profile_dir: str | None = None) -> dict:
        x = self._tokens(tokens, seed).requires_grad_()
        dout = torch.randn_like(x)

        def step(layer):
            def go():
                layer.zero_grad(set_to_none=True)
                layer(x[None])[0].backward(dout[None])
            return go

        with torch.no_grad():
            expected = self.full(x[None])[0].float()
            err = max(float((layer(x[None])[0].float() - expected).norm() / expected.norm())
                      for layer in (self.ep, self.serial))
        err = max(err, self._expert_grad_err(tokens, seed))
        one = self._timed(step(self.full), iters) if self.rank == 0 else None
        if self.rank == 1:  # meet rank 0's barriers while it times the one-device layer
            for _ in range(iters):
                self.barrier()
        torch._C._set_sm_carveout_experimental(sm_carveout or None)
        two = self._timed(step(self.ep), iters)
        serial = self._timed(step(self.serial), iters)
        torch._C._set_sm_carveout_experimental(None)
        step_peak = self._step_peak(step(self.ep))

        # communication alone: tokens routed uniformly at random, the expert computation the identity
        E, K = self.cfg.n_routed_experts, self.cfg.top_k
        weights, experts = torch.rand(tokens, E, device=self.device).topk(K, dim=-1)
        dispatch = permute(Routing(weights, experts, None), E)
        x_comm = torch.randn(tokens, self.dim, device=self.device, dtype=self.dtype, requires_grad=True)
        group = dist.group.WORLD

        def moray_comm():
            x_comm.grad = None  # as in the layer: the gradient is stored, not added to an old one
            sent = ep_dispatch_start(x_comm, dispatch, 2, group)
            returning = ep_combine_start(ep_dispatch_finish(sent), sent.exchange, group)
            ep_combine_finish(returning, sent.own_rows, sent.exchange).backward(x_comm.detach())

        def local_permute():  # what moray_comm does besides exchanging: the permutation and combine
            x_comm.grad = None
            combine_rows(dispatch_rows(x_comm, dispatch), dispatch).backward(x_comm.detach())

        # the same bytes: each rank's rows for the other rank's experts, there and back
        in_splits = dispatch.counts.view(2, -1).sum(1).tolist()
        in_splits[self.rank] = 0
        peer_splits = [torch.zeros(2, dtype=torch.long, device=self.device) for _ in range(2)]
        dist.all_gather(peer_splits, torch.tensor(in_splits, device=self.device))
        out_splits = [int(peer_splits[p][self.rank]) for p in range(2)]
        send = torch.randn(sum(in_splits), self.dim, device=self.device, dtype=self.dtype)
        recv = torch.empty(sum(out_splits), self.dim, device=self.device, dtype=self.dtype)
        back = torch.empty_like(send)

        def raw_comm():
            for _ in range(2):  # forward, then backward: out and back each time
                dist.all_to_all_single(recv, send, out_splits, in_splits)
                dist.all_to_all_single(back, recv, in_splits, out_splits)

        if profile_dir and self.device.type == "cuda":
            self._profile({"one": step(self.full), "two": step(self.ep), "serial": step(self.serial),
                           "moray_comm": moray_comm, "local_permute": local_permute, "raw_comm": raw_comm},
                          sm_carveout, profile_dir)
        return {"rank": self.rank, "rel_err": err, "one_s": one, "two_s": two, "serial_s": serial,
                "step_peak_gb": step_peak,
                "moray_comm_s": self._timed(moray_comm, iters), "local_permute_s": self._timed(local_permute, iters),
                "raw_comm_s": self._timed(raw_comm, iters),
                "bytes_per_direction": sum(in_splits) * self.dim * x.element_size()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="v2-lite", choices=sorted(SHAPES))
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 8192, 16384])
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--cpu", action="store_true", help="gloo on CPU: checks that it runs and agrees")
    parser.add_argument("--sm-carveout", type=int, default=0, help="SMs the two-device variants' matmuls leave free")
    parser.add_argument("--profile", metavar="DIR", help="write per-rank profiles of the largest token count here")
    parser.add_argument("--json")
    args = parser.parse_args()
    ray.init(include_dashboard=False)
    actor = ray.remote(num_cpus=1 if args.cpu else 0, num_gpus=0 if args.cpu else 1)(Rank)
    ranks = [actor.remote(args.cpu) for _ in range(2)]
    spec = ray.get(ranks[0].open.remote("gloo" if args.cpu else "nccl"))
    ray.get([r.join.remote(spec, i) for i, r in enumerate(ranks)])
    ray.get([r.build.remote(args.shape, 1) for r in ranks])
    tol = 1e-5 if args.cpu else 1e-2
    rows = []
    for tokens in args.tokens:
        profile = args.profile if tokens == args.tokens[-1] else None
        r0, r1 = ray.get([r.run.remote(tokens, args.iters, tokens, args.sm_carveout, profile) for r in ranks])
        row = {"tokens_per_device": tokens, "one_device_ms": r0["one_s"] * 1e3,
               "two_devices_ms": max(r0["two_s"], r1["two_s"]) * 1e3,
               "throughput_ratio": 2 * r0["one_s"] / max(r0["two_s"], r1["two_s"]),
               "no_overlap_ms": max(r0["serial_s"], r1["serial_s"]) * 1e3,
               "moray_comm_ms": max(r0["moray_comm_s"], r1["moray_comm_s"]) * 1e3,
               "local_permute_ms": max(r0["local_permute_s"], r1["local_permute_s"]) * 1e3,
               "raw_comm_ms": max(r0["raw_comm_s"], r1["raw_comm_s"]) * 1e3,
               "rel_err": max(r0["rel_err"], r1["rel_err"]), "two_devices_step_peak_gb": r0["step_peak_gb"],
               "mb_per_direction": r0["bytes_per_direction"] / 1e6}
        row["moray_exchange_ms"] = row["moray_comm_ms"] - row["local_permute_ms"]
        row["comm_raw_over_moray"] = row["raw_comm_ms"] / row["moray_exchange_ms"]
        row["overlap_gain"] = row["no_overlap_ms"] / row["two_devices_ms"]
        rows.append(row)
        print(json.dumps(row), flush=True)
        if row["rel_err"] > tol:
            raise SystemExit(f"expert-parallel output or expert gradients differ from one device: relative error {row['rel_err']:.2e}")
    meta = {"date": datetime.date.today().isoformat(), "shape": args.shape, "torch": torch.__version__,
            "sm_carveout": args.sm_carveout,
            "device": "cpu (gloo)" if args.cpu else ray.get(ranks[0].__ray_call__.remote(
                lambda self: torch.cuda.get_device_name(0)))}
    print(json.dumps(meta))
    print(f"{'tokens/dev':>10} {'1 dev ms':>9} {'2 dev ms':>9} {'x thru':>6} {'no ovl ms':>9} {'ovl gain':>8} "
          f"{'moray comm':>10} {'permute':>8} {'raw comm':>9} {'raw/moray':>9} {'err':>8}")
    for r in rows:
        print(f"{r['tokens_per_device']:>10} {r['one_device_ms']:>9.2f} {r['two_devices_ms']:>9.2f} "
              f"{r['throughput_ratio']:>6.2f} {r['no_overlap_ms']:>9.2f} {r['overlap_gain']:>8.2f} "
              f"{r['moray_comm_ms']:>10.2f} {r['local_permute_ms']:>8.2f} {r['raw_comm_ms']:>9.2f} "
              f"{r['comm_raw_over_moray']:>9.2f} "
              f"{r['rel_err']:>8.1e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
