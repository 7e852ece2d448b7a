"""Token copies sorted by expert in three GPU launches: a stable counting sort.

`permute` in model/dispatch.py spells the sort as PyTorch ops: a radix sort of the expert ids,
then a histogram, an inverse permutation, an index division and a gather, about a dozen launches
of a few microseconds' work each per MoE layer. The expert ids are small integers, so a counting
sort does the same in one pass over the copies: each tile of copies counts its experts (a
[tiles, experts] histogram), one cumulative sum over the tiles places every tile's run of each
expert, and each tile sorts its own copies in registers by (expert, position) and writes them
at their expert's start + that expert's copies in earlier tiles + their rank in the tile. Ties
go by position, so the result is the stable sort's, bit for bit, the same in every run (no
atomics), and the sorted rows are written in runs rather than scattered.
"""

from __future__ import annotations

import torch

from model.swiglu_kernels import HAVE_TRITON, triton_runs_on

if HAVE_TRITON:
    import triton
    import triton.language as tl

MAX_SORTED_EXPERTS = 1024
_TILE = 512  # copies per program: a few per SM at 16k tokens, and few enough to sort in registers


def fused_permute_applies(experts_NK: torch.Tensor, n_experts: int) -> bool:
    """On a GPU with Triton, for up to 1,024 experts: each program holds one offset per expert."""
    return triton_runs_on(experts_NK) and experts_NK.numel() > 0 and n_experts <= MAX_SORTED_EXPERTS


def fused_permute(experts_NK: torch.Tensor, weights_NK: torch.Tensor, n_experts: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(token_index [M], sorted weights [M] (detached), counts [E] int64, slots [N, K]) as the
    stable sort of the copies by expert makes them; M = N * K, nothing dropped."""
    N, K = experts_NK.shape
    M, E = N * K, n_experts
    EP = triton.next_power_of_2(E)
    tiles = triton.cdiv(M, _TILE)
    experts = experts_NK.reshape(-1)
    device = experts.device
    hist = torch.empty(tiles, E, dtype=torch.int32, device=device)
    _tile_histogram[(tiles,)](experts, hist, M, E, BLOCK=_TILE, EP=EP)
    through = hist.cumsum(0, dtype=torch.int32)  # copies of each expert in this tile and the ones before
    token_index = torch.empty(M, dtype=torch.long, device=device)
    weights = torch.empty(M, dtype=weights_NK.dtype, device=device)
    counts = torch.empty(E, dtype=torch.long, device=device)
    slots = torch.empty(N, K, dtype=torch.long, device=device)
    _tile_place[(tiles,)](experts, weights_NK.detach().reshape(-1), hist, through, token_index, weights, counts, slots,
                          M, E, K, tiles, BLOCK=_TILE, EP=EP)
    return token_index, weights, counts, slots


if HAVE_TRITON:
    @triton.jit
    def _tile_experts(experts_ptr, t, M, BLOCK: tl.constexpr, EP: tl.constexpr):
        """The tile's expert ids (int32), EP past the last copy (sorts after every real expert)."""
        offs = t * BLOCK + tl.arange(0, BLOCK)
        return tl.load(experts_ptr + offs, mask=offs < M, other=EP).to(tl.int32)

    @triton.jit
    def _tile_histogram(experts_ptr, hist_ptr, M, E, BLOCK: tl.constexpr, EP: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        e = _tile_experts(experts_ptr, t, M, BLOCK, EP)
        cols = tl.arange(0, EP)
        past_end = tl.sum((e == EP).to(tl.int32), 0)  # counted in bin 0 below, taken out again
        hist = tl.histogram(tl.where(e == EP, 0, e), EP) - tl.where(cols == 0, past_end, 0)
        tl.store(hist_ptr + t * E + cols, hist, mask=cols < E)

    @triton.jit
    def _tile_place(experts_ptr, weights_ptr, hist_ptr, through_ptr, token_ptr, sorted_w_ptr, counts_ptr, slots_ptr,
                    M, E, K, tiles, BLOCK: tl.constexpr, EP: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, EP)
        in_range = cols < E
        totals = tl.load(through_ptr + (tiles - 1) * E + cols, mask=in_range, other=0)
        hist = tl.load(hist_ptr + t * E + cols, mask=in_range, other=0)
        earlier_tiles = tl.load(through_ptr + t * E + cols, mask=in_range, other=0) - hist
        # sorted position p of an expert's copy in this tile -> its row: p + shift[expert]
        shift = (tl.cumsum(totals, 0) - totals) + earlier_tiles - (tl.cumsum(hist, 0) - hist)
        p = tl.arange(0, BLOCK)
        key = tl.sort(_tile_experts(experts_ptr, t, M, BLOCK, EP) * BLOCK + p)  # by expert, then position
        expert = key // BLOCK
        src = t * BLOCK + key % BLOCK
        real = expert < E
        row = (tl.gather(shift, tl.minimum(expert, EP - 1), 0) + p).to(tl.int64)
        tl.store(slots_ptr + src, row, mask=real)
        tl.store(token_ptr + row, src // K, mask=real)
        tl.store(sorted_w_ptr + row, tl.load(weights_ptr + src, mask=real), mask=real)
        if t == 0:
            tl.store(counts_ptr + cols, totals.to(tl.int64), mask=in_range)
