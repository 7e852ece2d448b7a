"""The fused next-token loss (model/cross_entropy.py) against `F.cross_entropy` on fp32 logits:
loss and logits gradient, for a vocabulary that is not a whole number of the kernel's blocks,
large logits (the online log-sum-exp must not overflow) and a loss scaled before backward.
Its kernels serve CPU tensors only in Triton's interpreter (tests/model/test_kernels_interpreted.py
runs this file there) and GPU tensors on a GPU."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from model.cross_entropy import BLOCK, cross_entropy
from model.swiglu_kernels import triton_runs_on

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SEED = int(os.environ.get("MORAY_TEST_SEED", torch.seed() % 2**31))


def _kernel_path() -> None:
    if not triton_runs_on(torch.zeros(1, device=DEVICE)):
        pytest.skip("the kernels serve CPU tensors only under TRITON_INTERPRET=1 (test_kernels_interpreted.py)")


@pytest.mark.parametrize("scale", [1.0, 60.0], ids=["ordinary", "large logits"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_loss_and_gradient_equal_fp32_cross_entropy(scale, dtype):
    _kernel_path()
    gen = torch.Generator().manual_seed(SEED)
    N, V = 23, 2 * BLOCK + 123
    logits = (torch.randn(N, V, generator=gen) * scale).to(DEVICE, dtype).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=gen).to(DEVICE)
    reference = logits.detach().float().requires_grad_()
    loss = cross_entropy(logits, targets)
    want = F.cross_entropy(reference, targets)
    (2.5 * loss).backward()
    (2.5 * want).backward()
    got, want = float(loss.detach()), float(want.detach())
    assert loss.dtype == torch.float32
    assert abs(got - want) <= 1e-5 * abs(want), f"seed {SEED}: {got} vs {want}"
    assert logits.grad.dtype == dtype
    err = float((logits.grad.float() - reference.grad).norm() / reference.grad.norm())
    bound = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: the gradient rounded once, as .float()'s backward did
    assert err <= bound, f"seed {SEED}: gradient {err:.1e} off"
