"""KV-cached decoding equals the full forward; absorbed MLA equals naive MLA; MLA's fused per-head
q/k/v equal the plain split-rope-concatenate composition; padded batches are exact."""

from __future__ import annotations

import pytest
import torch

from model.attention import MLA, MLAHeads, StepLayout
from model.layers import apply_rope, rope_rotation
from tests.conftest import build_model, tiny_config
from tests.routing_ties import draw_untied

VARIANTS = [
    ("tiny",),
    ("tiny", "model.q_lora_rank=48"),
    ("tiny", "model.rope_factor=4.0", "model.original_seq_len=64", "model.mscale=0.707"),
    ("tiny-gqa",),
    ("tiny-gqa", "model.n_kv_heads=4", "model.rope_interleaved=true"),
]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "+".join(v))
def test_cached_decoding_equals_full_forward(variant, seed):
    cfg = tiny_config(*variant)
    model = build_model(cfg, seed)
    with torch.no_grad():
        tokens, full = draw_untied(model, lambda: torch.randint(0, cfg.vocab_size, (3, 40)), model)
        caches = model.new_cache(3)
        steps = [model(tokens[:, :17], StepLayout.build(3, 17), caches)]
        for t in range(17, 40):
            layout = StepLayout.build(3, 1, start_pos=torch.full((3,), t))
            steps.append(model(tokens[:, t:t + 1], layout, caches))
    incremental = torch.cat(steps, dim=1)
    assert (incremental - full).abs().max() <= 1e-5


def test_absorbed_mla_equals_naive(seed):
    cfg = tiny_config("tiny", "model.q_lora_rank=48")
    mla = MLA(cfg)
    for p in mla.parameters():
        p.data.normal_(0, 0.1)
    x = torch.randn(2, 33, cfg.dim)
    layout = StepLayout.build(2, 33)
    with torch.no_grad():
        naive = mla(x, layout)  # per-head K/V materialized
        cache = {name: torch.zeros(2, 64, *shape) for name, shape in mla.cache_shapes().items()}
        absorbed = mla(x, layout, cache)  # wkv_b absorbed into query and output
    assert (absorbed - naive).abs().max() <= 1e-5
    # the cache holds only the latent and the rotary key
    assert set(cache) == {"latent", "rope_key"}
    assert cache["latent"].shape[-1] == cfg.kv_lora_rank and cache["rope_key"].shape[-1] == cfg.qk_rope_head_dim



def _plain_heads(q, kv, k_pe, rotation, nope: int, interleaved: bool):
    """MLA's q, k, v as the textbook composition: split, rotate, concatenate, expand (q given as
    its projection gives it, [B, T, H * (nope + rope)], and no view, as in the model)."""
    B, T, H, _ = kv.shape
    q_nope, q_pe = q.view(B, T, H, -1).split([nope, q.shape[-1] // H - nope], dim=-1)
    k_nope, v = kv.split([nope, kv.shape[-1] - nope], dim=-1)
    k_pe = apply_rope(k_pe.unsqueeze(2), rotation, interleaved).expand(B, T, H, -1)
    return torch.cat([q_nope, apply_rope(q_pe, rotation, interleaved)], -1), torch.cat([k_nope, k_pe], -1), v


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("interleaved", [False, True])
def test_mla_heads_equal_the_plain_composition(dtype, tol, interleaved, device, seed):
    """Forward and every input gradient, with random upstream gradients on fresh random inputs
    (on a GPU at `small`'s head sizes, where the strided copies take other kernels)."""
    B, T, H, nope, rope, v_dim = (2, 9, 3, 8, 6, 5) if device == "cpu" else (2, 256, 16, 64, 32, 64)
    q0, kv, k_pe = (torch.randn(*shape, dtype=dtype, device=device, requires_grad=True)
                    for shape in ((B, T, H, nope + rope), (B, T, H, nope + v_dim), (B, T, rope)))
    rotation = rope_rotation(torch.rand(rope // 2, device=device), torch.randint(0, 50, (B, T), device=device))
    runs = []
    for heads in (_plain_heads, MLAHeads.apply):
        outs = list(heads((q0 * 1).flatten(2).clone(), kv, k_pe, rotation, nope, interleaved))
        outs[0] = outs[0].view(B, T, H, -1)
        ups = [torch.randn(o.shape, dtype=dtype, generator=torch.Generator().manual_seed(i)).to(device)
               for i, o in enumerate(outs)]
        grads = torch.autograd.grad(outs, (q0, kv, k_pe), ups)
        runs.append([o.detach().float() for o in (*outs, *grads)])
    for name, plain, fused in zip(["q", "k", "v", "dq", "dkv", "dk_pe"], *runs):
        assert plain.shape == fused.shape, name
        assert (fused - plain).abs().max() <= tol * plain.abs().max(), name


@pytest.mark.parametrize("preset", ["tiny", "tiny-gqa"])
def test_padded_rows_in_other_slots_equal_separate_runs(preset, seed):
    """Rows of different lengths, padded, written to arbitrary slots, match each row run alone."""
    cfg = tiny_config(preset)
    model = build_model(cfg, seed)
    lengths = [5, 19, 11]

    def draw():  # the rows, and the next token of each
        return [torch.randint(0, cfg.vocab_size, (n,)) for n in lengths], torch.randint(0, cfg.vocab_size, (3, 1))

    def each_alone(inputs):
        seqs, nxt = inputs
        return [model(torch.cat([s, nxt[i]])[None])[0] for i, s in enumerate(seqs)]

    padded = torch.zeros(3, 19, dtype=torch.long)
    slots = torch.tensor([4, 0, 2])
    with torch.no_grad():
        (seqs, nxt), alone = draw_untied(model, draw, each_alone)
        for i, s in enumerate(seqs):
            padded[i, : len(s)] = s
        caches = model.new_cache(5)
        layout = StepLayout.build(3, 19, lengths=torch.tensor(lengths), slots=slots)
        batched = model(padded, layout, caches)
        for i, s in enumerate(seqs):
            assert (batched[i, : len(s)] - alone[i][: len(s)]).abs().max() <= 1e-5
        # a decode step for all three continues each sequence from its own length
        step = model(nxt, StepLayout.build(3, 1, start_pos=torch.tensor(lengths), slots=slots), caches)
        for i, s in enumerate(seqs):
            assert (step[i, 0] - alone[i][-1]).abs().max() <= 1e-5
