"""The MoE layer's GPU path (native grouped GEMMs in bf16, Triton SwiGLU kernels) against fp32."""

from __future__ import annotations

import pytest
import torch

from model.config import MoEConfig
from model.dispatch import permute, unpermute
from model.moe import MoE, route
from model.swiglu_kernels import gather_scaled_rows, gather_weighted_sum, swiglu, swiglu_backward

pytestmark = pytest.mark.gpu


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float().cpu() - b.float().cpu()).norm() / b.float().cpu().norm())


def test_triton_swiglu_equals_torch_ops(seed):
    """The kernels read gate and up side by side in one [rows, 2F] tensor; F = 1408 spans two
    of the forward's column blocks and two passes of the backward's row loop."""
    gu, dz = torch.randn(300, 2 * 1408, device="cuda"), torch.randn(300, 1408, device="cuda")
    g, u = gu.chunk(2, dim=-1)
    w = torch.rand(300, device="cuda")
    assert rel(swiglu(gu), torch.nn.functional.silu(g) * u) <= 1e-6
    assert rel(swiglu(gu), swiglu(gu.cpu())) <= 1e-6
    consumed = dz.clone(), gu.clone()
    fast = swiglu_backward(*consumed, w)
    plain = swiglu_backward(dz.cpu().clone(), gu.cpu(), w.cpu())
    for a, b in zip(fast, plain):
        assert rel(a, b) <= 1e-5
    assert rel(fast[1], w[:, None] * torch.nn.functional.silu(g) * u) <= 1e-6  # h, scaled by the row's weight
    # against autograd: [dg | du] of (w dz) . silu(g) u, and <dz, h> per row
    gu_leaf = gu.clone().requires_grad_()
    g_leaf, u_leaf = gu_leaf.chunk(2, dim=-1)
    h = torch.nn.functional.silu(g_leaf) * u_leaf
    (dgu_autograd,) = torch.autograd.grad(h, gu_leaf, dz * w[:, None])
    assert rel(fast[0], dgu_autograd) <= 1e-5
    assert rel(fast[2], (dz * h.detach()).sum(-1)) <= 1e-5
    # backward makes no [rows, F] tensor: [dg | du] is written over [g | u], w h over dz
    assert [t.data_ptr() for t in fast[:2]] == [t.data_ptr() for t in (consumed[1], consumed[0])]


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
    # rows [s0, s1) in a tensor of their own (an expert-parallel rank's own rows): the same sum
    for s0, s1 in [(0, 200), (150, 320), (300, 500)]:
        rest = torch.cat([rows[:s0], rows[s1:]])
        assert rel(gather_weighted_sum(rest, slots, weights, inset=(rows[s0:s1], s0)), expected.sum(1)) <= 1e-6


@pytest.mark.parametrize("dot", [True, False])
def test_triton_gather_scale_equals_torch(dot, seed):
    """The combine's backward for rows computed elsewhere: rows D wider than one block (2500 >
    1024), tokens gathered repeatedly, in bf16 against fp32 on the CPU."""
    src = torch.randn(90, 2500, device="cuda", dtype=torch.bfloat16)
    index = torch.randint(0, 90, (400,), device="cuda")
    weights = torch.rand(400, device="cuda")
    other = torch.randn(400, 2500, device="cuda", dtype=torch.bfloat16) if dot else None
    rows, dots = gather_scaled_rows(src, index, weights, other)
    want_rows, want_dots = gather_scaled_rows(src.cpu().float(), index.cpu(), weights.cpu(),
                                              other.cpu().float() if dot else None)
    assert rel(rows, want_rows) <= 1e-2
    assert (dots is None) == (not dot) and (not dot or rel(dots, want_dots) <= 1e-5)
    # the rows [s0, s1) written to a tensor of their own, the dot's partner given the same way
    for s0, s1 in [(0, 150), (100, 260), (240, 400)]:
        pair = None if other is None else (torch.cat([other[:s0], other[s1:]]), other[s0:s1])
        (rest, inset), split_dots = gather_scaled_rows(src, index, weights, pair, slice(s0, s1))
        assert torch.equal(rest, torch.cat([rows[:s0], rows[s1:]])) and torch.equal(inset, rows[s0:s1])
        assert (split_dots is None) == (not dot) and (not dot or torch.equal(split_dots, dots))


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
    grads_fp32 = [p.grad.clone() for p in (ref.w_gate_up, ref.w_down)]
    moe.experts.to(torch.bfloat16).zero_grad(set_to_none=True)
    xb = x.to(torch.bfloat16).requires_grad_()
    out = moe.experts.combine(xb, dispatch, chunks=chunks)
    out.backward(dout.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    assert rel(out, expected) <= 1e-2
    assert rel(xb.grad, xf.grad) <= 1e-2
    for p, g in zip((moe.experts.w_gate_up, moe.experts.w_down), grads_fp32):
        assert rel(p.grad, g) <= 1e-2


@pytest.mark.parametrize("preset,overrides", [("tiny", []), ("tiny-gqa", []), ("tiny", ["model.moe.expert_chunks=4"])],
                         ids=["tiny", "tiny-gqa", "tiny-training-blocks"])
def test_cuda_graph_decode_steps_equal_eager(preset, overrides, seed):
    """Decode steps replayed from CUDA graphs (padded batch buckets, bucketed masked cache
    reads, a scratch slot for padding rows) give the eager steps' logits, bf16, while the batch
    shrinks so rows left over from a larger step must not touch live caches, and as the longest
    sequence in the batch moves between cache-length buckets. A model configured
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
    lengths = [3, 9, 5, 130, 7]  # sequence 3 puts steps with it in the 256-entry cache bucket
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
    assert sorted(graphs.graphs) == [(1, 128), (2, 128), (4, 128), (4, 256), (8, 256)]


@pytest.mark.parametrize("preset,overrides", [("tiny", []), ("tiny-gqa", ["model.rope_interleaved=false"])],
                         ids=["mla-interleaved-rope", "gqa-half-split-rope"])
def test_model_loss_and_gradients_on_gpu_equal_cpu(preset, overrides, seed):
    """The whole model's GPU path (fused RMSNorm, complex rope, cuDNN attention, the MoE's GPU
    kernels) in fp32 gives the CPU reference's loss and every parameter's gradient."""
    from cluster.config import load_config
    from model.transformer import Transformer

    cfg = load_config(preset, overrides).model
    torch.manual_seed(seed)
    cpu = Transformer(cfg)
    gpu = Transformer(cfg).cuda()
    gpu.load_state_dict(cpu.state_dict())
    inputs, targets = torch.randint(0, cfg.vocab_size, (2, 2, 48)).unbind(0)
    expected = cpu.loss(inputs, targets).loss
    expected.backward()
    loss = gpu.loss(inputs.cuda(), targets.cuda()).loss
    loss.backward()
    assert rel(loss.detach(), expected.detach()) <= 1e-5
    for (name, p), q in zip(cpu.named_parameters(), gpu.parameters()):
        assert p.grad is not None and rel(q.grad, p.grad) <= 1e-5, (name, rel(q.grad, p.grad))


def by_expert(experts_NK: torch.Tensor, weights_NK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's chosen experts in id order, with their weights alongside."""
    order = experts_NK.argsort(-1)
    return experts_NK.gather(-1, order), weights_NK.gather(-1, order)


@pytest.mark.parametrize("overrides", [
    dict(n_routed_experts=64, top_k=6, score_func="softmax", norm_topk_prob=False),
    dict(n_routed_experts=256, top_k=8, score_func="sigmoid", n_group=8, topk_group=4, group_score="top2_sum",
         routed_scaling_factor=2.5),
    dict(n_routed_experts=64, top_k=4, score_func="softmax", n_group=8, topk_group=3, group_score="max"),
    dict(n_routed_experts=60, top_k=1, score_func="sigmoid"),
], ids=["v2-lite", "v3", "grouped-max", "60-experts-top1"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_fused_route_kernel_equals_torch_rule(overrides, with_bias, seed):
    """The one-kernel routing (model/route_kernel.py) picks the experts and weights of the PyTorch
    rule, in inference (weights from the kernel) and under autograd (weights from PyTorch's scores,
    gradient reaching the logits). A row may differ only where the rule itself is tied: the k-th
    and (k+1)-th selection scores among the kept groups' experts, or the kept and next group's
    scores, within 1e-5."""
    from model.moe import _top_k
    from model.route_kernel import fused_route_applies

    cfg = MoEConfig(**overrides)
    E, K = cfg.n_routed_experts, cfg.top_k
    logits = torch.randn(4096, E, device="cuda")
    bias = 0.05 * torch.randn(E, device="cuda") if with_bias else None
    assert fused_route_applies(logits, cfg)
    scores = logits.softmax(-1) if cfg.score_func == "softmax" else logits.sigmoid()
    expected_experts = _top_k(scores, bias, cfg)
    expected = route(logits.cpu(), None if bias is None else bias.cpu(), cfg)  # the CPU path is the definition

    select = scores if bias is None else scores + bias
    tied = torch.zeros(4096, dtype=torch.bool, device="cuda")
    if cfg.n_group > 1:  # the choice of groups, then the top k among the kept groups' experts only
        grouped = select.view(4096, cfg.n_group, -1)
        g = grouped.amax(-1) if cfg.group_score == "max" else grouped.topk(2, dim=-1).values.sum(-1)
        g_sorted = g.sort(-1, descending=True).values
        tied |= (g_sorted[:, cfg.topk_group - 1] - g_sorted[:, cfg.topk_group]).abs() < 1e-5
        dropped = torch.ones_like(g, dtype=torch.bool).scatter_(1, g.topk(cfg.topk_group, dim=-1).indices, False)
        select = grouped.masked_fill(dropped[:, :, None], float("-inf")).view(4096, E)
    margin = select.sort(-1, descending=True).values
    if K < E:  # -inf - -inf is nan: never tied
        tied |= (margin[:, K - 1] - margin[:, K]).abs() < 1e-5

    with torch.no_grad():
        fused = route(logits, bias, cfg)
    assert fused.scores is None
    differ = (fused.experts.sort(-1).values != expected_experts.sort(-1).values).any(-1)
    assert not (differ & ~tied).any(), "experts differ on rows whose routing is not tied"
    same = (~differ & ~tied).cpu()  # the CPU rule may break a tie the other way
    # the same experts with the same weights; their order may differ where two chosen ones are
    # within rounding of each other (it only orders a token's k terms of the combine)
    fused_experts, fused_weights = by_expert(fused.experts.cpu(), fused.weights.cpu())
    cpu_experts, cpu_weights = by_expert(expected.experts, expected.weights)
    assert torch.equal(fused_experts[same], cpu_experts[same])
    assert (fused_weights[same] - cpu_weights[same]).abs().max() <= 1e-5

    live = logits.clone().requires_grad_()
    trained = route(live, bias, cfg)
    assert trained.scores is not None
    differ = (trained.experts.sort(-1).values != expected_experts.sort(-1).values).any(-1)
    assert not (differ & ~tied).any()
    trained.weights.sum().backward()
    assert live.grad is not None and live.grad.abs().sum() > 0


@pytest.mark.parametrize("n_tokens,k,n_experts,skewed", [
    (16384, 6, 64, False), (4099, 8, 256, True), (777, 2, 5, False), (3, 4, 1000, False), (1, 1, 1, False),
], ids=["v2-lite", "v3-skewed", "5-experts", "1000-experts", "one-copy"])
def test_counting_sort_equals_stable_sort(n_tokens, k, n_experts, skewed, seed):
    """The GPU permutation (model/permute_kernel.py: tiles, one cumulative sum, ranks within a
    tile) makes what the stable sort on the CPU makes, index for index, across tile edges, with
    idle experts, hot ones, and more experts than a tile has copies."""
    from model.dispatch import Routing
    from model.permute_kernel import fused_permute_applies

    scores = torch.rand(n_tokens, n_experts, device="cuda")
    if skewed:  # a third of the experts get most copies
        scores[:, : n_experts // 3] += 1
    experts = scores.topk(k, dim=-1).indices
    routing = Routing(weights=torch.rand(n_tokens, k, device="cuda"), experts=experts, scores=None)
    assert fused_permute_applies(experts, n_experts)
    fast = permute(routing, n_experts)
    plain = permute(Routing(weights=routing.weights.cpu(), experts=experts.cpu(), scores=None), n_experts)
    for name in ("token_index", "weights", "counts", "routed_counts", "slots"):
        assert torch.equal(getattr(fast, name).cpu(), getattr(plain, name)), name
    assert fast.counts.dtype == torch.long and fast.dropped == 0
