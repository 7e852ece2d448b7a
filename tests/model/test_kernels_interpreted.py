"""The GPU kernels (Triton: the MoE layer's routing, counting sort, SwiGLU forward and backward,
the gather-sums and gather-scales of the combine; the fused next-token loss) checked on the CPU,
between GPU sessions.

With TRITON_INTERPRET=1 Triton runs its kernels on CPU tensors in an interpreter, and moray's
kernel gates (`model.swiglu_kernels.triton_runs_on`) let them serve CPU tensors. The MoE tests
(tests/model/test_moe.py: grouped experts against a per-expert loop, the fused step against
plain autograd in blocks, with capacity drops and a hot expert cut across blocks, the expert-
parallel permutation and combine) and the expert-parallel layer over two gloo ranks
(tests/train/test_expert_parallel.py) then run through every kernel in fp32 against the plain
PyTorch references at 1e-5; the routing kernel and the counting sort, which those tests' own
references go through too, are checked against PyTorch's rule and stable sort directly
(`_route_and_sort_equal_pytorch`). The interpreter is chosen when Triton is imported, so all of
it runs in processes of their own. The GPU suite (test_moe_gpu.py) still checks bf16 and the
compiled kernels; this checks the kernels' logic wherever the suite runs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
# the in-place BlockSum case sums 3,001 tokens program by program: minutes in the interpreter,
# for a kernel the other block-wise cases run too
SLOW = "tests/model/test_moe.py::test_block_sum_equals_one_fp32_sum_rounded_once[in-place]"


def _interpreted(*args: str, timeout: int, seed: int | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "TRITON_INTERPRET": "1", **({"MORAY_TEST_SEED": str(seed)} if seed is not None else {})}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_every_kernel_serves_cpu_tensors_in_the_interpreter():
    """The premise of the run below: in the interpreter each kernel's gate opens for CPU tensors,
    so the MoE tests take the kernels' path, not PyTorch's."""
    probe = ("import torch; from model.config import MoEConfig; "
             "from model.swiglu_kernels import triton_runs_on; from model.route_kernel import fused_route_applies; "
             "from model.permute_kernel import fused_permute_applies; x = torch.zeros(4, 8); "
             "print(triton_runs_on(x), fused_route_applies(x, MoEConfig(n_routed_experts=8)), "
             "fused_permute_applies(torch.zeros(4, 2, dtype=torch.long), 8))")
    proc = _interpreted("-c", probe, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["True", "True", "True"]


@pytest.mark.parametrize("selection", [
    ("tests/model/test_moe.py", "--deselect", SLOW),
    ("tests/train/test_expert_parallel.py", "-k", "gloo-2"),  # the rows' gathers and combines between two ranks
    ("tests/model/test_cross_entropy.py",),  # the next-token loss
], ids=["moe", "expert-parallel", "cross-entropy"])
def test_moe_tests_pass_through_the_triton_kernels(selection):
    proc = _interpreted("-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:warnings", *selection, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and " failed" not in proc.stdout


def _route_and_sort_equal_pytorch() -> None:
    """Run in the interpreter: the routing kernel picks PyTorch's experts (rows where the rule
    itself is tied within 1e-5 aside) and weights; the counting sort makes the stable sort's
    permutation, index for index, across tile edges (512 copies a tile)."""
    from model.config import MoEConfig
    from model.dispatch import Routing, permute
    from model.moe import _top_k, route
    from model.permute_kernel import fused_permute_applies
    from model.route_kernel import fused_route_applies

    torch.manual_seed(int(os.environ["MORAY_TEST_SEED"]))
    for cfg in (MoEConfig(n_routed_experts=64, top_k=6, score_func="softmax"),
                MoEConfig(n_routed_experts=32, top_k=4, score_func="sigmoid", n_group=4, topk_group=2,
                          group_score="top2_sum", routed_scaling_factor=2.5)):
        logits, bias = torch.randn(300, cfg.n_routed_experts), 0.05 * torch.randn(cfg.n_routed_experts)
        assert fused_route_applies(logits, cfg)
        scores = logits.softmax(-1) if cfg.score_func == "softmax" else logits.sigmoid()
        experts = _top_k(scores, bias, cfg)
        margin = (scores + bias).sort(-1, descending=True).values
        untied = (margin[:, cfg.top_k - 1] - margin[:, cfg.top_k]).abs() > 1e-5
        with torch.no_grad():
            fused = route(logits, bias, cfg)
        assert torch.equal(fused.experts.sort(-1).values[untied], experts.sort(-1).values[untied]), cfg
        weights = scores.gather(1, fused.experts)
        weights = weights / weights.sum(-1, keepdim=True) if cfg.norm_topk_prob else weights
        assert (fused.weights - weights * cfg.routed_scaling_factor).abs().max() <= 1e-5, cfg
    experts = torch.rand(700, 64).topk(6, dim=-1).indices  # 4,200 copies: 9 tiles
    weights = torch.rand(700, 6)
    assert fused_permute_applies(experts, 64)
    dispatch = permute(Routing(weights=weights, experts=experts, scores=None), 64)
    order = torch.argsort(experts.reshape(-1), stable=True)
    assert torch.equal(dispatch.token_index, order // 6)
    assert torch.equal(dispatch.weights, weights.reshape(-1)[order])
    assert torch.equal(dispatch.counts, torch.bincount(experts.reshape(-1), minlength=64))
    assert torch.equal(dispatch.slots.reshape(-1)[order], torch.arange(order.numel()))


def test_route_and_sort_kernels_equal_pytorch(seed):
    proc = _interpreted("-c", "from tests.model.test_kernels_interpreted import _route_and_sort_equal_pytorch as check; "
                        "check(); print('ok')", timeout=300, seed=seed)
    assert proc.returncode == 0 and proc.stdout.split() == ["ok"], proc.stdout[-2000:] + proc.stderr[-3000:]
