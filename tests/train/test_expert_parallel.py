"""Expert-parallel MoE layer over real torch.distributed processes (2 and 4 ranks on gloo, 2 on
NCCL with 2 GPUs): the overlapped exchange gives the single-process layer's output and every gradient,
and the shared experts and a rank's own rows really run while the rows (forward) and their
gradients (backward) are in flight.

One spawn per backend runs every case, so the processes start (torch, DeepSpeed imports) once.
"""

from __future__ import annotations

import copy
import itertools
import os
import random

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from actors.transport import free_port
from model.config import MoEConfig
from model.moe import EXPERT_WEIGHTS, MoE
from train.expert_parallel import parallelize_experts

DIM, TOKENS = 16, 24


def _layer(seed: int, shared: bool, capacity_factor: float = 0.0) -> MoE:
    torch.manual_seed(seed)
    moe = MoE(DIM, MoEConfig(n_routed_experts=8, n_shared_experts=1 if shared else 0, top_k=2, moe_inter_dim=12,
                             capacity_factor=capacity_factor))
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, DIM**-0.5)
    return moe


def _differences(rank: int, seed: int, shared: bool, starve_last_rank: bool, device: torch.device,
                 capacity_factor: float = 0.0) -> dict:
    """Max differences (relative for weight gradients) of the expert-parallel layer from the
    single-process layer run on each rank's tokens in turn: output, input gradient, every
    parameter's gradient. (Each rank routes its own tokens, so a capacity limit drops the same
    copies in both.)"""
    world = dist.get_world_size()
    full = _layer(seed, shared, capacity_factor).to(device)
    if starve_last_rank:  # the selection bias keeps every token off the last rank's experts: it receives no rows
        full.expert_bias[8 - 8 // world:] = -100.0
    ep = copy.deepcopy(full)
    parallelize_experts(ep, world, rank, dist.group.WORLD)

    g = torch.Generator().manual_seed(seed + 1)  # every rank draws every rank's tokens, keeps its own
    xs, douts = (torch.randn(world, TOKENS, DIM, generator=g).to(device) for _ in range(2))
    x_all = xs.clone().requires_grad_()
    ref = torch.stack([full(x_all[r][None])[0][0] for r in range(world)])
    ref.backward(douts)
    x = xs[rank][None].clone().requires_grad_()
    out, _ = ep(x)
    out.backward(douts[rank][None])

    diff = {"output": (out[0] - ref.view(world, TOKENS, DIM)[rank]).abs().max(),
            "input grad": (x.grad[0] - x_all.grad.view(world, TOKENS, DIM)[rank]).abs().max()}
    # expert weights: this rank's slice of the full layer's gradients (every rank's tokens reach them)
    n_local = 8 // world
    for name, stack in zip(EXPERT_WEIGHTS, ep.experts.local_stacks()):
        grad = stack.grad
        want = getattr(full.experts, name).grad[rank * n_local:(rank + 1) * n_local]
        diff[f"experts.{name} grad"] = (grad - want).abs().max() / max(1.0, float(want.abs().max()))
    # gate and shared experts: data-parallel, so the ranks' gradients sum to the full layer's
    for name, p in ep.named_parameters():
        if not name.startswith("experts."):
            summed = p.grad.clone()
            dist.all_reduce(summed)
            want = dict(full.named_parameters())[name].grad
            diff[f"{name} grad"] = (summed - want).abs().max() / max(1.0, float(want.abs().max()))
    case = f"rank {rank} shared={shared} starved={starve_last_rank} capacity={capacity_factor}"
    result = {f"{case}: {k}": float(v) for k, v in diff.items()}
    if starve_last_rank and rank == world - 1:  # the premise: this rank's experts saw no row
        result[f"{case}: rows received"] = sum(float(p.grad.abs().sum()) for p in ep.experts.parameters())
    if capacity_factor:  # the premise: the limit drops copies
        result[f"{case}: copies dropped"] = full.gate_route(xs[rank].to(device))[1].dropped
    return result


def _event_order(rank: int, seed: int, device: torch.device) -> tuple[list[str], list[str]]:
    """The exchange steps and the SwiGLU products (routed and shared) in the order the host ran them."""
    full = _layer(seed, shared=True).to(device)
    ep = copy.deepcopy(full)
    parallelize_experts(ep, dist.get_world_size(), rank, dist.group.WORLD)
    x = torch.randn(1, TOKENS, DIM, device=device, requires_grad=True)
    wanted = ("_SendRows", "_ReceiveRows", "_ExpertSwiGLU")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out, _ = ep(x)
        out.sum().backward()
    events = sorted((e for e in prof.events() if any(w in e.name for w in wanted)),
                    key=lambda e: e.time_range.start)
    names = [next(w for w in wanted if w in e.name) + ("Backward" if "Backward" in e.name else "") for e in events]
    names = [n for i, n in enumerate(names) if i == 0 or n != names[i - 1]]  # one entry per step
    split = next(i for i, n in enumerate(names) if n.endswith("Backward"))
    return names[:split], names[split:]


def _worker(rank: int, backend: str, world: int, port: int, seed: int, results) -> None:
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        diffs = {}
        for shared, starve in itertools.product((True, False), (False, True)):
            diffs.update(_differences(rank, seed, shared, starve, device))
        diffs.update(_differences(rank, seed, True, False, device, capacity_factor=0.75))
        results[rank] = diffs, _event_order(rank, seed, device), device.type
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module", params=[("gloo", 2), ("gloo", 4), pytest.param(("nccl", 2), marks=pytest.mark.gpu)],
                ids=["gloo-2", "gloo-4", "nccl-2"])
def run(request):
    """Every rank's results; with 4 ranks each receives rows from several others, which must be
    reordered by expert (2 ranks: one sender, rows arrive in order)."""
    backend, world = request.param
    if backend == "nccl" and torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} CUDA GPUs")
    seed = random.SystemRandom().randrange(2**31)
    print(f"expert-parallel processes ({backend}, {world} ranks): seed {seed}")
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(backend, world, free_port("127.0.0.1"), seed, results), nprocs=world, join=True)
    return dict(results)


def test_overlapped_exchange_equals_the_single_process_layer(run):
    """Output, input gradient, expert, gate and shared-expert gradients, with and without shared
    experts, with random routing, with a rank that receives no rows, and with a capacity limit
    dropping copies."""
    assert sorted(run) == list(range(len(run))) and len(run) in (2, 4)
    for diffs, _, _ in run.values():
        for case, diff in diffs.items():
            if case.endswith("rows received"):
                assert diff == 0, f"{case}: the starved rank's experts got gradient"
            elif case.endswith("copies dropped"):
                assert diff > 0, f"{case}: the capacity limit dropped nothing"
            else:
                assert diff <= 1e-5, f"{case}: {diff:.2e}"


def test_shared_experts_run_while_rows_and_gradients_travel(run):
    """And a rank's own rows (which never travel) are computed while the other ranks' outputs,
    and in backward their gradients, travel."""
    for rank, (_, (forward, backward), _) in run.items():
        # the rows sent, the shared experts, the rows received; then the routed experts on the
        # other ranks' rows, their outputs sent back, the routed experts on the own rows, the
        # outputs received
        assert forward == ["_SendRows", "_ExpertSwiGLU", "_ReceiveRows", "_ExpertSwiGLU", "_SendRows",
                           "_ExpertSwiGLU", "_ReceiveRows"], f"rank {rank}: {forward}"
        # the returned outputs' gradients sent, the own rows' backward, the wait; the other ranks'
        # rows' backward; their gradients sent, the shared experts' backward, and only then the wait
        assert backward == ["_ReceiveRowsBackward", "_ExpertSwiGLUBackward", "_SendRowsBackward",
                            "_ExpertSwiGLUBackward", "_ReceiveRowsBackward", "_ExpertSwiGLUBackward",
                            "_SendRowsBackward"], f"rank {rank}: {backward}"
