"""The MoE layer: grouped experts equal a per-expert loop, routing rules, capacity dropping, balancing."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from model.config import MoEConfig
from model.dispatch import BlockSum, combine_rows, dispatch_rows, unpermute
from model.layers import SwiGLU
from model.moe import MoE, Routing, permute, route, sequence_balance_loss


def make_moe(seed: int, dim: int = 32, **overrides) -> MoE:
    cfg = MoEConfig(**{"n_routed_experts": 8, "top_k": 2, "moe_inter_dim": 24, "n_shared_experts": 1, **overrides})
    torch.manual_seed(seed)
    moe = MoE(dim, cfg)
    for p in moe.parameters():
        p.data.normal_(0, 0.2)
    moe.expert_bias.normal_(0, 0.1)
    return moe


def loop_reference(moe: MoE, x_ND: torch.Tensor, keep=None) -> torch.Tensor:
    """One token, one expert at a time: the definition the grouped path must equal."""
    routing = route(moe.gate(x_ND), moe.expert_bias if moe.cfg.bias_balancing else None, moe.cfg)
    ex = moe.experts
    out = torch.zeros_like(x_ND)
    for n in range(x_ND.shape[0]):
        for k in range(moe.cfg.top_k):
            e = int(routing.experts[n, k])
            if keep is not None and not keep[n, k]:
                continue
            w_gate, w_up = ex.w_gate_up[e].chunk(2, dim=-1)
            h = F.silu(x_ND[n] @ w_gate) * (x_ND[n] @ w_up)
            out[n] += routing.weights[n, k] * (h @ ex.w_down[e])
    if moe.shared is not None:
        out += moe.shared(x_ND)
    return out


@pytest.mark.parametrize("impl", ["native", "loop"])
@pytest.mark.parametrize("overrides", [
    {},
    {"score_func": "sigmoid", "n_group": 4, "topk_group": 2, "group_score": "top2_sum", "routed_scaling_factor": 2.5},
    {"n_shared_experts": 0, "norm_topk_prob": False, "bias_balancing": False, "top_k": 3},
    {"expert_chunks": 3},
], ids=["softmax", "sigmoid-grouped", "no-shared", "3-blocks"])
def test_grouped_experts_equal_per_expert_loop(impl, overrides, seed):
    moe = make_moe(seed, **overrides)
    x = torch.randn(2, 13, 32, requires_grad=True)
    routing = route(moe.gate(x.view(-1, 32)), moe.expert_bias if moe.cfg.bias_balancing else None, moe.cfg)
    dispatch = permute(routing, 8)
    flat = x.view(-1, 32)
    y = moe.experts(flat[dispatch.token_index], dispatch.counts, impl=impl)
    out = unpermute(y, dispatch)  # the gradient reaches the gate through slot_weights (dispatch.weights is read detached)
    if moe.shared is not None:
        out = out + moe.shared(flat)
    ref = loop_reference(moe, flat)
    assert (out - ref).abs().max() <= 1e-5
    # the full layer agrees too, and so do the gradients of input and expert weights
    layer_out, _ = moe(x)
    assert (layer_out.view(-1, 32) - ref).abs().max() <= 1e-5
    g = torch.randn_like(ref)
    params = [x, moe.experts.w_down, moe.experts.w_gate_up]
    ref_grads = torch.autograd.grad((ref * g).sum(), params)
    for result in (out, layer_out.view(-1, 32)):
        grads = torch.autograd.grad((result * g).sum(), params, retain_graph=True)
        for a, b in zip(grads, ref_grads):
            # sums of many fp32 products in another order: relative, as gradients grow with the weights
            assert (a - b).abs().max() <= 1e-5 * max(1.0, float(b.abs().max()))


@pytest.mark.parametrize("impl", ["native", "loop"])
@pytest.mark.parametrize("with_combine,chunks,capacity,hot", [
    (True, 1, None, False), (False, 1, None, False), (True, 4, None, False), (True, 20, 12, False), (True, 4, None, True),
], ids=["tokens", "rows", "tokens-4-blocks", "tokens-1-expert-blocks-capacity", "tokens-4-blocks-hot-expert-cut"])
def test_fused_expert_step_equals_plain_autograd(impl, with_combine, chunks, capacity, hot, seed):
    """The memory-saving autograd function (model/expert_ffn.py) gives the plain composition's
    output and every gradient: input, the two expert stacks and, through the combine weights,
    the gate; with an idle expert and fresh random inputs. In blocks of whole experts (down to one
    expert a block, the idle one included), with a hot expert cut across blocks, with copies
    dropped by a capacity (blocks make their weight gradients one expert at a time, in place)."""
    moe = make_moe(seed, top_k=3)
    with torch.no_grad():
        moe.gate.weight[5] = -10.0 * moe.gate.weight[5].sign()  # expert 5 gets few or no tokens
    x = torch.randn(37, 32, requires_grad=True)
    if hot:  # every token picks expert 2: more rows than a block's share, so it is cut into pieces
        moe.expert_bias[2] = 100.0
    routing = route(moe.gate(x), moe.expert_bias, moe.cfg)
    dispatch = permute(routing, 8, capacity)
    if capacity is not None:
        assert dispatch.dropped > 0, "the test needs dropped copies"
    ex = moe.experts
    params = [x, ex.w_gate_up, ex.w_down, moe.gate.weight]
    if with_combine:
        fused = ex.combine(x, dispatch, impl=impl, chunks=chunks)
        plain = unpermute(ex.reference(x[dispatch.token_index], dispatch.counts), dispatch)
    else:
        rows = x[dispatch.token_index]
        fused, plain = ex(rows, dispatch.counts, impl=impl), ex.reference(rows, dispatch.counts)
    assert (fused - plain).abs().max() <= 1e-5
    g = torch.randn_like(plain)
    grads = torch.autograd.grad((fused * g).sum(), params, allow_unused=True, retain_graph=True)
    ref_grads = torch.autograd.grad((plain * g).sum(), params, allow_unused=True)
    for name, a, b in zip(["x", "w_gate_up", "w_down", "gate"], grads, ref_grads):
        if b is None:  # the rows path does not reach the gate
            assert a is None and not with_combine, name
            continue
        assert (a - b).abs().max() <= 1e-5 * max(1.0, float(b.abs().max())), name


@pytest.mark.parametrize("capacity,inset", [(None, None), (5, None), (None, "first"), (5, "middle"), (None, "last")])
def test_dispatch_and_combine_rows_equal_plain_autograd(capacity, inset, seed):
    """The permutation and combine of experts elsewhere (expert parallelism), whose backwards
    are written out, give plain indexing's and `unpermute`'s output and gradients: tokens, expert
    outputs and the combine weights; with copies dropped by a capacity, and
    with some sorted rows held apart (a rank's own rows) at the front, inside or at the end."""
    moe = make_moe(seed, top_k=3)
    x = torch.randn(29, 32, requires_grad=True)
    dispatch = permute(route(moe.gate(x), moe.expert_bias, moe.cfg), 8, capacity)
    assert (dispatch.dropped > 0) == (capacity is not None), "the test needs dropped copies"
    w = torch.randn(32, 32)
    M = dispatch.token_index.numel()
    if inset is None:
        moved = combine_rows(dispatch_rows(x, dispatch) @ w, dispatch)
    else:
        part = {"first": slice(0, 20), "middle": slice(17, 40), "last": slice(M - 25, M)}[inset]
        rest, own = dispatch_rows(x, dispatch, part)
        assert rest.shape[0] == M - own.shape[0] and torch.equal(own, x[dispatch.token_index[part]])
        moved = combine_rows(rest @ w, dispatch, (own @ w, part.start))
    outs = [moved, unpermute(x[dispatch.token_index] @ w, dispatch)]
    assert (outs[0] - outs[1]).abs().max() <= 1e-5
    g = torch.randn_like(outs[1])
    # the combine weights' gradient, not the gate's: through the softmax that one is a difference of
    # near-equal terms, as small as their fp32 rounding, so no tolerance could tell right from wrong
    params = [x, dispatch.slot_weights]
    written, plain = (torch.autograd.grad((out * g).sum(), params, retain_graph=True) for out in outs)
    for name, a, b in zip(["x", "combine weights"], written, plain):
        assert (a - b).abs().max() <= 1e-5 * max(1.0, float(b.abs().max())), name


@pytest.mark.parametrize("chunks", [1, 3])
def test_experts_without_tokens(chunks, seed):
    """Experts that receive nothing (here 0, 3, 7) are skipped cleanly and get zero gradient,
    also when the layer runs in blocks (idle experts then belong to no block)."""
    moe = make_moe(seed, bias_balancing=False, expert_chunks=chunks)
    with torch.no_grad():
        moe.gate.weight[[0, 3, 7]] = 0.0
        moe.gate.weight[[0, 3, 7], 0] = -100.0
    x = torch.randn(20, 32)
    x[:, 0] = x[:, 0].abs() + 1.0  # makes those experts' scores tiny for every token
    out, _ = moe(x[None])
    assert moe.last_load[[0, 3, 7]].sum() == 0
    assert (out[0] - loop_reference(moe, x)).abs().max() <= 1e-5
    out.sum().backward()
    assert moe.experts.w_gate_up.grad[[0, 3, 7]].abs().max() == 0
    assert moe.experts.w_gate_up.grad.abs().sum() > 0


def test_padding_rows_of_a_graph_bucket_count_in_no_experts_load(seed):
    """A replayed decode graph (model/decode_graphs.py) pads its batch to a bucket: with
    `real_rows` set, last_load is the load of the real rows alone, and their outputs are those
    of the unpadded batch."""
    moe = make_moe(seed, bias_balancing=False).eval()
    x = torch.randn(7, 32)
    padded = torch.cat([x, torch.randn(5, 32)])
    with torch.no_grad():
        alone, _ = moe(x[None])
        expected = moe.last_load.clone()
        moe.real_rows = torch.tensor(7)
        out, _ = moe(padded[None])
    assert torch.equal(moe.last_load, expected)
    assert (out[0, :7] - alone[0]).abs().max() <= 1e-5


@pytest.mark.parametrize("dtype, k, n", [(torch.float32, 32, 16), (torch.float32, 6, 16), (torch.float32, 32, 6),
                                         (torch.bfloat16, 32, 16)])
def test_native_kernel_claim_is_the_path_grouped_mm_takes(dtype, k, n):
    """A shard captures its decode step as a CUDA graph only where `native_kernel_serves` says
    the native kernel runs (the loop reads counts on the host, which fails a capture), so the
    claim must be the path grouped_mm really takes: fp32 on the CPU with 16-byte aligned rows."""
    from model.grouped import _use_native, native_kernel_serves
    x, w = torch.randn(10, k, dtype=dtype), torch.randn(3, k, n, dtype=dtype)
    claim = native_kernel_serves(dtype, x.device, k, n)
    assert claim == _use_native(x, w, "auto")
    assert claim == (dtype == torch.float32 and k % 4 == 0 and n % 4 == 0)


def test_capacity_drops_exactly_the_overflow():
    """Each expert keeps its first `capacity` tokens in token order; the rest are dropped."""
    experts = torch.tensor([[0, 1], [0, 2], [1, 0], [0, 3], [2, 1], [0, 1]])
    weights = torch.rand(6, 2)
    routing = Routing(weights=weights, experts=experts, scores=torch.rand(6, 4))
    dispatch = permute(routing, n_experts=4, capacity=2)
    kept = {(int(t), int(e)) for t, e in zip(dispatch.token_index, torch.repeat_interleave(torch.arange(4), dispatch.counts))}
    # expert 0 is chosen by tokens 0,1,2,3,5 -> keeps 0,1; expert 1 by 0,2,4,5 -> keeps 0,2
    assert kept == {(0, 0), (1, 0), (0, 1), (2, 1), (1, 2), (4, 2), (3, 3)}
    assert dispatch.dropped == 5
    assert dispatch.counts.tolist() == [2, 2, 2, 1]


def test_capacity_layer_equals_loop_without_dropped_pairs(seed):
    moe = make_moe(seed, capacity_factor=0.5)
    x = torch.randn(1, 24, 32)
    out, _ = moe(x)
    routing = route(moe.gate(x[0]), moe.expert_bias, moe.cfg)
    capacity = math.ceil(0.5 * 24 * 2 / 8)
    keep = torch.zeros(24, 2, dtype=torch.bool)
    seen = [0] * 8
    for n in range(24):
        for k in range(2):
            e = int(routing.experts[n, k])
            keep[n, k] = seen[e] < capacity
            seen[e] += 1
    assert (~keep).sum() > 0, "the test needs some dropped tokens"
    assert (out[0] - loop_reference(moe, x[0], keep)).abs().max() <= 1e-5


def test_bias_steers_selection_not_weights(seed):
    cfg = MoEConfig(n_routed_experts=8, top_k=2, score_func="sigmoid")
    logits = torch.randn(50, 8)
    bias = torch.zeros(8)
    bias[5] = 10.0  # expert 5 wins every selection
    r = route(logits, bias, cfg)
    assert (r.experts == 5).any(-1).all()
    plain = logits.sigmoid().gather(1, r.experts)
    assert torch.allclose(r.weights, plain / plain.sum(-1, keepdim=True))


def test_group_limited_routing_stays_in_chosen_groups(seed):
    cfg = MoEConfig(n_routed_experts=16, top_k=4, n_group=4, topk_group=2, score_func="sigmoid", group_score="top2_sum")
    r = route(torch.randn(100, 16), None, cfg)
    groups_used = (r.experts // 4).sort(-1).values
    assert all(len(set(row.tolist())) <= 2 for row in groups_used)


def test_bias_update_rule():
    moe = make_moe(0, bias_update_rate=0.1)
    moe.expert_bias.zero_()
    load = torch.tensor([10, 0, 5, 5, 5, 5, 5, 5])
    moe.update_bias(load)
    assert torch.allclose(moe.expert_bias, torch.tensor([-0.1, 0.1, 0, 0, 0, 0, 0, 0.0]))


def test_sequence_balance_loss_is_alpha_when_balanced_and_larger_when_collapsed():
    cfg = MoEConfig(n_routed_experts=4, top_k=2, aux_loss_alpha=0.01)
    balanced = Routing(weights=torch.ones(4, 2), experts=torch.tensor([[0, 1], [2, 3], [0, 1], [2, 3]]),
                       scores=torch.full((4, 4), 0.25))
    assert torch.isclose(sequence_balance_loss(balanced, 1, cfg), torch.tensor(0.01))
    collapsed = Routing(weights=torch.ones(4, 2), experts=torch.tensor([[0, 1]] * 4),
                        scores=torch.tensor([[0.5, 0.4, 0.05, 0.05]] * 4))
    assert sequence_balance_loss(collapsed, 1, cfg) > 0.015


def test_dense_swiglu_equals_plain_autograd(seed):
    """The dense FFN / shared experts run as one expert of the memory-saving function: same
    output and gradients as down(silu(gate(x)) * up(x)) by plain autograd, any leading shape."""
    ffn = SwiGLU(32, 48)
    x = torch.randn(3, 7, 32, requires_grad=True)
    out = ffn(x)
    gate, up = ffn.w_gate_up(x).chunk(2, dim=-1)
    plain = ffn.w_down(F.silu(gate) * up)
    assert out.shape == plain.shape and (out - plain).abs().max() <= 1e-5
    g = torch.randn_like(out)
    params = [x, ffn.w_gate_up.weight, ffn.w_down.weight]
    for a, b in zip(torch.autograd.grad((out * g).sum(), params), torch.autograd.grad((plain * g).sum(), params)):
        assert (a - b).abs().max() <= 1e-5 * max(1.0, float(b.abs().max()))


def test_expert_step_refuses_a_second_backward(seed):
    """Backward overwrites the saved projections with their gradients, so backward through the
    same forward again (retain_graph) must fail loudly rather than return wrong gradients."""
    moe = make_moe(seed)
    x = torch.randn(1, 9, 32, requires_grad=True)
    out, _ = moe(x)
    out.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward once per forward"):
        out.sum().backward()


@pytest.mark.parametrize("n,d", [(3001, 6), (40, 5), (1, 8)], ids=["in-place", "odd-width", "one-token"])
def test_block_sum_equals_one_fp32_sum_rounded_once(n, d, seed):
    """The chunked step's per-token sum, added block by block and narrowed to bf16 partly inside
    its own storage (model.dispatch.BlockSum), equals the fp32 sum rounded once, bit for bit:
    the in-place narrowing overwrites nothing it has not read yet."""
    k, m = 3, 5 * n
    rows, slots, weights = torch.randn(m, d), torch.randint(0, m, (n, k)), torch.rand(n, k)
    narrowed, fp32 = (BlockSum(n, d, dtype, torch.device("cpu")) for dtype in (torch.bfloat16, torch.float32))
    for r0 in range(0, m, 97):
        for total in (narrowed, fp32):
            total.add(rows[r0:r0 + 97], r0, slots, weights)
    expected = fp32.result()
    assert torch.allclose(expected, (weights[..., None] * rows[slots]).sum(1), atol=1e-5)
    result = narrowed.result()
    assert result.dtype == torch.bfloat16 and result.shape == (n, d)
    assert torch.equal(result, expected.to(torch.bfloat16))
