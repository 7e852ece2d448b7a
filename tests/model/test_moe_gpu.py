"""The MoE layer's GPU path (native grouped GEMMs in bf16, Triton SwiGLU kernels) against fp32."""

from __future__ import annotations

import pytest
import torch

from model.config import MoEConfig
from model.dispatch import permute, unpermute
from model.moe import MoE, route
from model.swiglu_kernels import gather_weighted_sum, swiglu, swiglu_backward

pytestmark = pytest.mark.gpu


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float().cpu() - b.float().cpu()).norm() / b.float().cpu().norm())


def test_triton_swiglu_equals_torch_ops(seed):
    g, u, dz = (torch.randn(300, 1408, device="cuda") for _ in range(3))
    w = torch.rand(300, device="cuda")
    assert rel(swiglu(g, u), swiglu(g.cpu(), u.cpu())) <= 1e-6
    fast = swiglu_backward(dz.clone(), g, u, w)
    plain = swiglu_backward(dz.cpu().clone(), g.cpu(), u.cpu(), w.cpu())
    for a, b in zip(fast, plain):
        assert rel(a, b) <= 1e-5


@pytest.mark.parametrize("weighted", [True, False])
def test_triton_gather_sum_equals_torch(weighted, seed):
    rows = torch.randn(500, 300, device="cuda")
    slots = torch.randint(0, 501, (120, 6), device="cuda")  # 500 = a dropped copy
    weights = torch.rand(120, 6, device="cuda") if weighted else None
    padded = torch.cat([rows, rows.new_zeros(1, 300)])
    expected = padded[slots] * (weights[..., None] if weighted else 1)
    assert rel(gather_weighted_sum(rows, slots, weights), expected.sum(1)) <= 1e-6
    # block by block into an fp32 sum, as the chunked expert step combines: the same total
    total = torch.zeros(120, 300, device="cuda")
    for r0 in range(0, 500, 128):
        gather_weighted_sum(rows[r0:r0 + 128], slots, weights, total, r0)
    assert rel(total, expected.sum(1)) <= 1e-6


@pytest.mark.parametrize("capacity,chunks", [(None, 1), (40, 1), (None, 3), (40, 4)])
def test_bf16_fused_layer_close_to_fp32(capacity, chunks, seed):
    cfg = MoEConfig(n_routed_experts=16, top_k=4, moe_inter_dim=256, n_shared_experts=1)
    moe = MoE(512, cfg).cuda()
    for p in moe.parameters():
        p.data.normal_(0, 512**-0.5)
    ref = moe.experts  # fp32 first, then the same module in bf16
    x = torch.randn(333, 512, device="cuda")
    with torch.no_grad():
        dispatch = permute(route(moe.gate(x), None, cfg), 16, capacity)
    dout = torch.randn(333, 512, device="cuda")
    xf = x.clone().requires_grad_()
    expected = unpermute(ref.reference(xf[dispatch.token_index], dispatch.counts, "loop"), dispatch)
    expected.backward(dout)
    grads_fp32 = [p.grad.clone() for p in (ref.w_gate, ref.w_up, ref.w_down)]
    moe.experts.to(torch.bfloat16).zero_grad(set_to_none=True)
    xb = x.to(torch.bfloat16).requires_grad_()
    out = moe.experts.combine(xb, dispatch, chunks=chunks)
    out.backward(dout.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    assert rel(out, expected) <= 1e-2
    assert rel(xb.grad, xf.grad) <= 1e-2
    for p, g in zip((moe.experts.w_gate, moe.experts.w_up, moe.experts.w_down), grads_fp32):
        assert rel(p.grad, g) <= 1e-2


@pytest.mark.parametrize("preset,overrides", [("tiny", []), ("tiny-gqa", []), ("tiny", ["model.moe.expert_chunks=4"])],
                         ids=["tiny", "tiny-gqa", "tiny-training-blocks"])
def test_cuda_graph_decode_steps_equal_eager(preset, overrides, seed):
    """Decode steps replayed from CUDA graphs (padded batch buckets, full-length masked cache
    reads, a scratch slot for padding rows) give the eager steps' logits, bf16, while the batch
    shrinks so rows left over from a larger step must not touch live caches. A model configured
    with training-time expert blocks decodes the same (blocks, and their host sync, stay out of
    inference)."""
    from cluster.config import load_config
    from model.attention import StepLayout
    from model.decode_graphs import DecodeGraphs
    from model.transformer import Transformer

    cfg = load_config(preset, overrides).model
    torch.manual_seed(seed)
    model = Transformer(cfg).cuda().to(torch.bfloat16).eval()
    graphs = DecodeGraphs(model, 8)
    eager_caches = model.new_cache(8)
    lengths = [3, 9, 5, 12, 7]
    gen = torch.Generator(device="cuda").manual_seed(seed)
    with torch.no_grad():
        for i, n in enumerate(lengths):  # the same eager prefill into both cache sets
            prompt = torch.randint(0, cfg.vocab_size, (1, n), device="cuda", generator=gen)
            layout = StepLayout.build(1, n, "cuda", slots=torch.tensor([i], device="cuda"))
            for caches in (graphs.caches, eager_caches):
                model(prompt, layout, caches)
        for step, B in enumerate([5, 5, 3, 4, 2, 1, 5]):
            tokens = torch.randint(0, cfg.vocab_size, (B, 1), device="cuda", generator=gen)
            pos = torch.tensor([lengths[i] + step for i in range(B)], device="cuda")
            layout = StepLayout.build(B, 1, "cuda", start_pos=pos, slots=torch.arange(B, device="cuda"),
                                      all_real=True, kv_len=int(pos.max()) + 1)
            at = torch.zeros(B, dtype=torch.long, device="cuda")
            assert rel(graphs(tokens, layout, graphs.slot_caches, at), model(tokens, layout, eager_caches, at)) <= 2e-2
    assert sorted(graphs.graphs) == [1, 2, 4, 8]
