"""One MoE layer in bf16, forward and forward+backward: moray against the alternatives, one run.

Shapes (`--shape`):
  v2-lite  DeepSeek-V2-Lite's layer: hidden 2048, 64 routed experts of 1408, 2 shared, top-6, softmax
  v3-1gpu  DeepSeek-V3's layer scaled to one GPU: hidden 7168, experts of 2048, top-8, sigmoid with
           8 groups / top-4 groups, 1 shared; `--v3-experts` routed experts (as many as fit)

For each shape, token count and routing (uniform, or skewed towards a few hot experts) it times:
  moray      the layer as training runs it (model/moe.py: gate, top-k, sort permutation, the fused
             grouped SwiGLU + combine of model/expert_ffn.py, shared experts)
  unfused    the same math by plain autograd composition with the same grouped kernels
  loop       a per-expert loop of ordinary matmuls (what a first implementation does)
  deepspeed  the stock `deepspeed.moe.layer.MoE` (dropless, top-k gating at the same k)
and, in the same run, the card's dense bf16 matmul rate (8192^3) as the practical limit, and
the floor it sets: the layer's forward+backward if all its matmuls (3 forward and 6 backward per
routed and shared expert product, and the gate's) ran at that rate and nothing else took time.
A baseline can be beaten at most by its time over that floor. Expert-GEMM
TFLOP/s counts the three expert matmuls only (2*M*D*F each, M = tokens * k). The forward breakdown
times the routing (gate + top-k + permutation), the expert GEMMs alone and the shared experts,
each launched eagerly (wall time, host launch latency included: the small routing kernels wait
on the host when one layer runs alone) and replayed as a CUDA graph (device time alone, what
the layer costs inside a model, where the host runs ahead). moray's forward+backward is also
replayed as one CUDA graph, as training replays its blocks on one GPU (`train.cuda_graphs`),
its gradients checked against the eager step's; the stock layer reads counts on the host and
cannot be captured.
Memory: activation bytes kept between forward and backward, and the peak over forward+backward
less the weight gradients, both against what the layer must hold at least (its input and output
[N, D], and the two projections backward needs: [M, F] for the routed experts, [N, F_shared] for
the shared ones).

Every case checks moray's fused expert step against an fp32 per-expert loop on the same inputs and
routing (relative error of the output and of the input and weight gradients <= 1e-2).

`--chunks` adds the layer computed in blocks of rows (`MoEConfig.expert_chunks`): its time and peak
memory against one block. `--profile` prints the forward's kernels by GPU time.

Run: python3 benchmarks/moe_layer.py --shape v2-lite v3-1gpu --tokens 4096 8192 16384 32768
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import os
import statistics

import torch
import torch.nn.functional as F

from model.config import MoEConfig
from model.dispatch import unpermute
from model.moe import EXPERT_WEIGHTS, MoE, permute, route
from timing import cuda_times  # benchmarks/timing.py

SHAPES = {
    "v2-lite": dict(dim=2048, cfg=dict(n_routed_experts=64, moe_inter_dim=1408, n_shared_experts=2, top_k=6,
                                       score_func="softmax", norm_topk_prob=False)),
    "v3-1gpu": dict(dim=7168, cfg=dict(moe_inter_dim=2048, n_shared_experts=1, top_k=8, score_func="sigmoid",
                                       n_group=8, topk_group=4, group_score="top2_sum", norm_topk_prob=True,
                                       routed_scaling_factor=2.5)),
}
HOT_EXPERTS = 4


def timed(fn, iters: int, warmup: int = 3) -> float:
    """Median seconds of fn over iters."""
    return statistics.median(cuda_times(fn, iters, warmup))


def graph_timed(fn, iters: int) -> float:
    """Median seconds of fn replayed as a CUDA graph: device time alone, without the host's kernel
    launches, which is what a layer costs inside a model, where the host runs ahead of the GPU."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return timed(graph.replay, iters)


def dense_matmul_tflops(iters: int) -> float:
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    return 2 * 8192**3 / timed(lambda: a @ b, iters) / 1e12


def build_layer(dim: int, cfg: MoEConfig, seed: int) -> MoE:
    torch.manual_seed(seed)
    with torch.device("cuda"):
        moe = MoE(dim, cfg)
    with torch.no_grad():
        moe.gate.weight.normal_(0, dim**-0.5)
        moe.experts.w_gate_up.normal_(0, dim**-0.5)
        moe.experts.w_down.normal_(0, cfg.moe_inter_dim**-0.5)
    return moe.to(torch.bfloat16)


def make_tokens(n: int, dim: int, moe: MoE, skewed: bool, seed: int) -> torch.Tensor:
    """Random tokens; skewed routing adds a shared direction that a few experts' gate rows favour."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(n, dim, device="cuda", generator=g)
    if skewed:
        u = torch.randn(dim, device="cuda", generator=g)
        u /= u.norm()
        x += 1.5 * u
        with torch.no_grad():
            moe.gate.weight[:HOT_EXPERTS] += (1.5 * u).to(moe.gate.weight.dtype)
    return x.to(torch.bfloat16)


def expert_load(moe: MoE, x: torch.Tensor) -> float:
    with torch.no_grad():
        moe(x[None])
    load = moe.last_load.float()
    return float(load.max() / load.mean())


def fwd_bwd(layer_fn, x: torch.Tensor, dout: torch.Tensor, params: list[torch.Tensor]):
    def run():
        for p in params:
            p.grad = None
        x.grad = None
        out = layer_fn(x)
        out.backward(dout)
    return run


def graphed_fwd_bwd(moe: MoE, x: torch.Tensor, dout: torch.Tensor, params: list[torch.Tensor], iters: int) -> dict:
    """Forward+backward replayed as one CUDA graph, as training replays an MoE block on one GPU
    (train.cuda_graphs); the replay's gradients are checked against an eager step's."""
    seconds = graph_timed(fwd_bwd(moray_layer(moe), x, dout, params), iters)
    replayed = [t.grad.clone() for t in (*params, x)]
    fwd_bwd(moray_layer(moe), x, dout, params)()
    err = max(rel_err(r, t.grad) for r, t in zip(replayed, (*params, x)))
    return {"fwd_bwd_graph_s": seconds, "rel_err_graph_vs_eager": err}


def moray_layer(moe: MoE):
    return lambda x: moe(x[None])[0][0]


def unfused_layer(moe: MoE, impl: str):
    """The plain autograd composition (impl "native": grouped kernels; "loop": per-expert matmuls)."""
    def run(x):
        routing = route(moe.gate(x), None, moe.cfg)
        dispatch = permute(routing, moe.cfg.n_routed_experts)
        out = unpermute(moe.experts.reference(x[dispatch.token_index], dispatch.counts, impl), dispatch)
        return out + moe.shared(x) if moe.shared is not None else out
    return run


def check_against_fp32(moe: MoE, x: torch.Tensor, dout: torch.Tensor, chunks: int = 1) -> dict[str, float]:
    """The fused bf16 expert step against an fp32 per-expert loop on upcast weights, for the
    same routing: relative errors of the output and of the input and weight gradients."""
    with torch.no_grad():
        dispatch = permute(route(moe.gate(x), None, moe.cfg), moe.cfg.n_routed_experts)
    xb = x.detach().requires_grad_()
    moe.experts.zero_grad(set_to_none=True)
    out = moe.experts.combine(xb, dispatch, chunks=chunks)
    out.backward(dout)
    ref = copy.deepcopy(moe.experts).float()
    ref.zero_grad(set_to_none=True)
    xf = x.detach().float().requires_grad_()
    d32 = dataclasses.replace(dispatch, weights=dispatch.weights.float(), slot_weights=dispatch.slot_weights.float())
    ref_out = unpermute(ref.reference(xf[d32.token_index], d32.counts, "loop"), d32)
    ref_out.backward(dout.float())
    errs = {"rel_err_out": rel_err(out, ref_out), "rel_err_dx": rel_err(xb.grad, xf.grad)}
    errs["rel_err_dw"] = max(rel_err(getattr(moe.experts, n).grad, getattr(ref, n).grad)
                             for n in EXPERT_WEIGHTS)
    moe.experts.zero_grad(set_to_none=True)
    return errs


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm())


@dataclasses.dataclass
class Memory:
    kept_gb: float  # held from the end of forward to backward (input and output included)
    peak_gb: float  # peak over forward+backward, weight gradients excluded
    required_gb: float


def measure_memory(layer_fn, x: torch.Tensor, dout: torch.Tensor, moe: MoE, rows: int) -> Memory:
    params = list(moe.parameters())
    for p in params:
        p.grad = None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = layer_fn(x)
    kept = torch.cuda.memory_allocated() - base + x.numel() * x.element_size()
    out.backward(dout)
    del out
    weight_grads = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
    peak = torch.cuda.max_memory_allocated() - base - weight_grads + x.numel() * x.element_size()
    shared_width = moe.cfg.n_shared_experts * moe.cfg.moe_inter_dim
    required = (2 * x.numel() + 2 * rows * moe.cfg.moe_inter_dim + 2 * x.shape[0] * shared_width) * x.element_size()
    return Memory(kept / 1e9, peak / 1e9, required / 1e9)


class StockExpert(torch.nn.Module):
    """The expert a DeepSpeed user hands to its MoE layer: a plain SwiGLU MLP, plain autograd."""

    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.w_gate, self.w_up = torch.nn.Linear(dim, inter_dim, bias=False), torch.nn.Linear(dim, inter_dim, bias=False)
        self.w_down = torch.nn.Linear(inter_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


def deepspeed_layer(dim: int, cfg: MoEConfig):
    """The stock layer with the same experts' shape and k, dropless, plain experts."""
    import deepspeed.comm
    from deepspeed.moe.layer import MoE as DeepSpeedMoE

    if not deepspeed.comm.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl", verbose=False)
    layer = DeepSpeedMoE(dim, StockExpert(dim, cfg.moe_inter_dim), num_experts=cfg.n_routed_experts, ep_size=1,
                         k=cfg.top_k, drop_tokens=False, use_rts=False).cuda().to(torch.bfloat16)
    shared = StockExpert(dim, cfg.n_shared_experts * cfg.moe_inter_dim).cuda().to(torch.bfloat16)
    return (lambda x: layer(x)[0] + shared(x)), list(layer.parameters()) + list(shared.parameters())


def bench_case(moe: MoE, ds, dim: int, tokens: int, skewed: bool, iters: int, seed: int,
               chunk_counts: list[int], dense_tflops: float) -> dict:
    cfg = moe.cfg
    gate_before = moe.gate.weight.detach().clone()
    x = make_tokens(tokens, dim, moe, skewed, seed).requires_grad_()
    dout = torch.randn(tokens, dim, device="cuda", dtype=torch.bfloat16)
    params = list(moe.parameters())
    row: dict = {"tokens": tokens, "routing": "skewed" if skewed else "uniform", "max_mean_load": expert_load(moe, x)}

    row.update(check_against_fp32(moe, x, dout))

    # forward breakdown
    with torch.no_grad():
        routing = route(moe.gate(x), None, cfg)
        dispatch = permute(routing, cfg.n_routed_experts)
        rows = x[dispatch.token_index]
        counts = dispatch.counts
        M = rows.shape[0]
        t_route = timed(lambda: permute(route(moe.gate(x), None, cfg), cfg.n_routed_experts), iters)
        t_gemm = timed(lambda: moe.experts(rows, counts), iters)
        t_combine = timed(lambda: moe.experts.combine(x, dispatch), iters) - t_gemm
        t_shared = timed(lambda: moe.shared(x), iters) if moe.shared is not None else 0.0
        row["fwd_s"] = timed(lambda: moray_layer(moe)(x), iters)
        # the same pieces as CUDA graphs: device time without the host's launch latency
        g_route = graph_timed(lambda: permute(route(moe.gate(x), None, cfg), cfg.n_routed_experts), iters)
        g_gemm = graph_timed(lambda: moe.experts(rows, counts), iters)
        g_combine = graph_timed(lambda: moe.experts.combine(x, dispatch), iters) - g_gemm
        row["fwd_graph_s"] = graph_timed(lambda: moray_layer(moe)(x), iters)
        del rows
        torch.cuda.empty_cache()
    gemm_flop = 3 * 2 * M * dim * cfg.moe_inter_dim
    row.update(route_s=t_route, gemm_s=t_gemm, gather_combine_s=t_combine, shared_s=t_shared,
               gemm_tflops=gemm_flop / t_gemm / 1e12, route_permute_combine_frac=(t_route + t_combine) / row["fwd_s"],
               route_graph_s=g_route, gather_combine_graph_s=g_combine,
               route_permute_combine_frac_graph=(g_route + g_combine) / row["fwd_graph_s"])
    row["fwd_bwd_s"] = timed(fwd_bwd(moray_layer(moe), x, dout, params), iters)
    row["fwd_bwd_gemm_tflops"] = 3 * gemm_flop / row["fwd_bwd_s"] / 1e12
    row.update(graphed_fwd_bwd(moe, x, dout, params, iters))
    shared_flop = 3 * 2 * tokens * dim * cfg.n_shared_experts * cfg.moe_inter_dim
    gate_flop = 2 * tokens * dim * cfg.n_routed_experts
    row["matmul_floor_fwd_bwd_s"] = 3 * (gemm_flop + shared_flop + gate_flop) / (dense_tflops * 1e12)
    mem = measure_memory(moray_layer(moe), x, dout, moe, M)
    row.update(mem_kept_gb=mem.kept_gb, mem_peak_gb=mem.peak_gb, mem_required_gb=mem.required_gb)
    for chunks in chunk_counts:  # the same layer in blocks of rows (MoEConfig.expert_chunks)
        moe.cfg.expert_chunks = chunks
        errs = check_against_fp32(moe, x, dout, chunks)
        chunked_mem = measure_memory(moray_layer(moe), x, dout, moe, M)
        row[f"chunks{chunks}"] = {"fwd_s": timed(lambda: moray_layer(moe)(x), iters),
                                  "fwd_bwd_s": timed(fwd_bwd(moray_layer(moe), x, dout, params), iters),
                                  "mem_peak_gb": chunked_mem.peak_gb, "mem_kept_gb": chunked_mem.kept_gb,
                                  "rel_err": max(errs.values())}
        moe.cfg.expert_chunks = 1
    unfused_mem = measure_memory(unfused_layer(moe, "native"), x, dout, moe, M)
    row["unfused_fwd_bwd_s"] = timed(fwd_bwd(unfused_layer(moe, "native"), x, dout, params), iters)
    row.update(unfused_mem_kept_gb=unfused_mem.kept_gb, unfused_mem_peak_gb=unfused_mem.peak_gb)
    loop_iters = max(3, iters // 4)
    with torch.no_grad():
        row["loop_fwd_s"] = timed(lambda: unfused_layer(moe, "loop")(x), loop_iters)
    row["loop_fwd_bwd_s"] = timed(fwd_bwd(unfused_layer(moe, "loop"), x, dout, params), loop_iters)
    row["ds_fwd_s"] = row["ds_fwd_bwd_s"] = None
    if ds is not None:
        ds_fn, ds_params = ds
        try:
            with torch.no_grad():
                row["ds_fwd_s"] = timed(lambda: ds_fn(x), loop_iters)
            row["ds_fwd_bwd_s"] = timed(fwd_bwd(ds_fn, x, dout, ds_params), loop_iters)
        except torch.OutOfMemoryError:
            row["ds_note"] = "OOM"
        for p in ds_params:
            p.grad = None
        torch.cuda.empty_cache()
    with torch.no_grad():  # undo the hot experts' gate shift for the next case
        moe.gate.weight.copy_(gate_before)
    return row


def profile_forward(moe: MoE, x: torch.Tensor) -> None:
    """Where the forward's GPU time goes, kernel by kernel (what the routing share is made of)."""
    from torch.profiler import ProfilerActivity, profile
    layer = moray_layer(moe)
    with torch.no_grad():
        for _ in range(3):
            layer(x)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                layer(x)
            torch.cuda.synchronize()
    print(f"forward of {x.shape[0]} tokens, 5 calls:")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))


def fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", nargs="+", default=["v2-lite", "v3-1gpu"], choices=sorted(SHAPES))
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    parser.add_argument("--routing", nargs="+", default=["uniform", "skewed"], choices=["uniform", "skewed"])
    parser.add_argument("--v3-experts", type=int, default=64)
    parser.add_argument("--no-deepspeed", action="store_true")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--chunks", type=int, nargs="*", default=[4, 8],
                        help="also run the layer with MoEConfig.expert_chunks set to each of these")
    parser.add_argument("--profile", action="store_true",
                        help="print the forward's kernels by GPU time for each shape at the first token count")
    parser.add_argument("--json", help="also write all rows here")
    args = parser.parse_args()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    dense = dense_matmul_tflops(args.iters)
    meta = {"date": datetime.date.today().isoformat(), "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
            "dense_bf16_tflops": dense}
    print(json.dumps(meta))
    results = []
    for shape in args.shape:
        spec = SHAPES[shape]
        cfg = MoEConfig(**spec["cfg"], bias_balancing=False,
                        **({"n_routed_experts": args.v3_experts} if shape == "v3-1gpu" else {}))
        moe = build_layer(spec["dim"], cfg, seed=1)
        ds = None if args.no_deepspeed else deepspeed_layer(spec["dim"], cfg)
        if args.profile:
            profile_forward(moe, make_tokens(args.tokens[0], spec["dim"], moe, False, seed=0))
        for routing in args.routing:
            for tokens in args.tokens:
                row = {"shape": shape, "experts": cfg.n_routed_experts, "k": cfg.top_k,
                       **bench_case(moe, ds, spec["dim"], tokens, routing == "skewed", args.iters, seed=tokens,
                                    chunk_counts=args.chunks, dense_tflops=dense)}
                results.append(row)
                print(json.dumps(row), flush=True)
        del moe, ds
        torch.cuda.empty_cache()
    print(f"\ndense bf16 matmul: {dense:.0f} TFLOP/s on {meta['gpu']}")
    print(f"{'shape':8} {'routing':7} {'tokens':>6} {'load':>5} {'fwd ms':>7} {'f+b ms':>7} {'GEMM TF':>7} {'%dense':>6} "
          f"{'route%':>6} {'graph':>6} {'floor':>6} {'unfused f+b':>11} {'loop f+b':>8} {'DS f+b':>8} {'xDS':>5} {'graph f+b':>9} {'xDS':>5} "
          f"{'DS/floor':>8} {'mem kept/req':>12} "
          f"{'peak/req':>8} {'err':>7}")
    for r in results:
        ds = r["ds_fwd_bwd_s"]
        print(f"{r['shape']:8} {r['routing']:7} {r['tokens']:>6} {r['max_mean_load']:>5.2f} {r['fwd_s'] * 1e3:>7.2f} "
              f"{r['fwd_bwd_s'] * 1e3:>7.2f} {r['gemm_tflops']:>7.0f} {100 * r['gemm_tflops'] / dense:>5.0f}% "
              f"{100 * r['route_permute_combine_frac']:>5.1f}% {100 * r['route_permute_combine_frac_graph']:>5.1f}% "
              f"{r['matmul_floor_fwd_bwd_s'] * 1e3:>6.2f} {r['unfused_fwd_bwd_s'] * 1e3:>11.2f} "
              f"{r['loop_fwd_bwd_s'] * 1e3:>8.2f} {fmt(ds and ds * 1e3, '>8.2f'):>8} "
              f"{fmt(ds and ds / r['fwd_bwd_s'], '>5.1f'):>5} {r['fwd_bwd_graph_s'] * 1e3:>9.2f} "
              f"{fmt(ds and ds / r['fwd_bwd_graph_s'], '>5.1f'):>5} {fmt(ds and ds / r['matmul_floor_fwd_bwd_s'], '>8.1f'):>8} "
              f"{r['mem_kept_gb'] / r['mem_required_gb']:>12.2f} "
              f"{r['mem_peak_gb'] / r['mem_required_gb']:>8.2f} {max(r['rel_err_out'], r['rel_err_dx'], r['rel_err_dw']):>7.1e}")
    if args.chunks:
        print(f"\nin blocks of rows (MoEConfig.expert_chunks): f+b time and peak against one block")
        print(f"{'shape':8} {'routing':7} {'tokens':>6} {'chunks':>6} {'f+b ms':>7} {'vs 1':>5} {'peak/req':>8} {'err':>7}")
        for r in results:
            for c in args.chunks:
                cr = r[f"chunks{c}"]
                print(f"{r['shape']:8} {r['routing']:7} {r['tokens']:>6} {c:>6} {cr['fwd_bwd_s'] * 1e3:>7.2f} "
                      f"{cr['fwd_bwd_s'] / r['fwd_bwd_s']:>5.2f} {cr['mem_peak_gb'] / r['mem_required_gb']:>8.2f} "
                      f"{cr['rel_err']:>7.1e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": results}, f, indent=2)


if __name__ == "__main__":
    main()
