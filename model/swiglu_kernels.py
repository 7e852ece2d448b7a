"""The expert step's memory-bound work as single-pass GPU kernels: SwiGLU forward and backward,
the gather + weighted sum that combines each token's expert rows, and the gather + scale (+ dot
product) that is that combine's backward for rows computed elsewhere.

In plain PyTorch, silu(g) * u and its backward make several full-size temporaries and passes,
and the combine materializes every token's K rows before summing them; on a GPU with Triton
each is one kernel that reads its inputs once and writes its outputs once, which is both the
time and the peak memory of the expert step outside its matmuls. Elsewhere (CPU, no Triton)
callers use the PyTorch ops; both give the same values.

With TRITON_INTERPRET=1 Triton runs the kernels on CPU tensors in its interpreter (numpy): the
CPU test suite checks every kernel and the layers that call them that way
(tests/model/test_kernels_interpreted.py), since GPUs come and go.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU build of torch comes without Triton
    triton = None
HAVE_TRITON = triton is not None
INTERPRETED = HAVE_TRITON and os.environ.get("TRITON_INTERPRET") == "1"


def triton_runs_on(t: torch.Tensor) -> bool:
    """Whether the Triton kernels serve this tensor: on a GPU, or anywhere in the interpreter."""
    return HAVE_TRITON and (t.is_cuda or INTERPRETED)


def swiglu(gu: torch.Tensor) -> torch.Tensor:
    """silu(g) * u of the gate and up projections side by side, gu = [g | u] [rows, 2F] -> [rows, F]."""
    g, u = gu.chunk(2, dim=-1)
    if _use_triton(gu):
        M, F_ = g.shape
        h = gu.new_empty(M, F_)
        if M:
            _swiglu_fwd_kernel[(M, triton.cdiv(F_, 1024))](gu, h, F_, BLOCK=1024)
        return h
    return F.silu(g) * u


def swiglu_backward(dz: torch.Tensor, gu: torch.Tensor, row_weights: torch.Tensor | None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Given dz = d(loss)/d(h) before each row's combine weight w and the projections gu = [g | u],
    returns (dgu, w h, d_w): the gradient [dg | du] of the projections (times w), h = silu(g) * u
    recomputed and scaled by w, and d_w = <dz, h> per row (None without row weights). w h is what
    the down projection's weight gradient needs, (w h)^T dy = h^T (w dy): scaling here, where h is
    written anyway, saves a pass over the wider [rows, D] output gradient. Both inputs are
    consumed: on the GPU gu's storage becomes dgu and dz's w h, so backward makes no [rows, F]
    tensor of its own, and dgu is one operand for the input gradient's single product over 2F."""
    if _use_triton(dz) and gu.is_contiguous():
        M, F_ = dz.shape
        d_w = torch.empty(M, dtype=torch.float32, device=dz.device) if row_weights is not None else None
        if M:  # each element is read before it is overwritten, by the same program
            _swiglu_bwd_kernel[(M,)](dz, gu, row_weights if row_weights is not None else dz,
                                     d_w if d_w is not None else dz, F_, HAS_W=row_weights is not None, BLOCK=1024)
        return gu, dz, d_w
    g, u = gu.chunk(2, dim=-1)
    sig = torch.sigmoid(g)
    silu_g = g * sig
    h = silu_g * u
    d_w = None
    if row_weights is not None:
        d_w = (dz.float() * h.float()).sum(-1)
        dz = dz * row_weights[:, None].to(dz.dtype)
        h = h * row_weights[:, None].to(h.dtype)
    dgu = torch.cat([dz * u * sig * (1 + g * (1 - sig)), dz * silu_g], dim=-1)
    return dgu, h, d_w


def gather_weighted_sum(rows_MD: torch.Tensor, slots_NK: torch.Tensor, weights_NK: torch.Tensor | None,
                        out_ND: torch.Tensor | None = None, row0: int = 0,
                        inset: tuple[torch.Tensor, int] | None = None) -> torch.Tensor:
    """out[n] = sum_k weights[n, k] * rows[slots[n, k] - row0] on the GPU, reading each row once;
    a slot outside [row0, row0 + M) (a dropped copy, or a row of another chunk) adds nothing.
    With `out_ND` (fp32) the sum is added to it in place: the chunked expert step combines one
    block of rows at a time. With `inset` (rows, start), the sorted rows [start, start + len)
    are that tensor's and rows_MD holds the others in order: expert parallelism's own rows and
    those that came back over the network are summed where they lie, never joined. No autograd."""
    N, K = slots_NK.shape
    rows_MD, slots_NK = rows_MD.contiguous(), slots_NK.contiguous()
    inset_rows, s0 = (rows_MD, rows_MD.shape[0]) if inset is None else (inset[0].contiguous(), inset[1])
    s1 = s0 + (0 if inset is None else inset_rows.shape[0])
    M, D = rows_MD.shape[0] + s1 - s0, rows_MD.shape[1]
    accumulate = out_ND is not None
    out = out_ND if accumulate else torch.empty(N, D, dtype=rows_MD.dtype, device=rows_MD.device)
    if N:
        weights = weights_NK.contiguous() if weights_NK is not None else slots_NK
        _gather_sum_kernel[(N, triton.cdiv(D, 1024))](rows_MD, inset_rows, s0, s1, slots_NK, weights, out, row0, M,
                                                      D, K=K, HAS_W=weights_NK is not None,
                                                      ACCUMULATE=accumulate, BLOCK=1024)
    return out


def gather_scaled_rows(src_ND: torch.Tensor, index_M: torch.Tensor, weights_M: torch.Tensor,
                       dot_with_MD: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None,
                       inset: slice | None = None
                       ) -> tuple[torch.Tensor | tuple[torch.Tensor, torch.Tensor], torch.Tensor | None]:
    """(weights[m] * src[index[m]] [M, D], <src[index[m]], dot_with[m]> [M] in fp32, or None):
    each source row read once per copy, the products and dots in fp32. With `inset` (sorted rows
    [start, stop)) the rows come out as two tensors, (the others in order, the inset's), and
    dot_with is given as such a pair: `gather_weighted_sum`'s inset, backwards. No autograd."""
    src_ND = src_ND.contiguous()
    M, D = index_M.numel(), src_ND.shape[1]
    s0, s1 = (M, M) if inset is None else (inset.start, inset.stop)
    if not _use_triton(src_ND):
        if isinstance(dot_with_MD, tuple):
            dot_with_MD = torch.cat([dot_with_MD[0][:s0], dot_with_MD[1], dot_with_MD[0][s0:]])
        rows = src_ND[index_M]
        dots = None if dot_with_MD is None else (rows.float() * dot_with_MD.float()).sum(-1)
        rows.mul_(weights_M[:, None].to(rows.dtype))
        return (rows if inset is None else (torch.cat([rows[:s0], rows[s1:]]), rows[s0:s1])), dots
    out = torch.empty(M - (s1 - s0), D, dtype=src_ND.dtype, device=src_ND.device)
    out_inset = out if inset is None else torch.empty(s1 - s0, D, dtype=src_ND.dtype, device=src_ND.device)
    dots = torch.empty(M, dtype=torch.float32, device=src_ND.device) if dot_with_MD is not None else None
    if M:
        other, other_inset = (out, out) if dot_with_MD is None else \
            (dot_with_MD, dot_with_MD) if inset is None else dot_with_MD
        _gather_scale_kernel[(M,)](src_ND, index_M.contiguous(), weights_M.contiguous(), other.contiguous(),
                                   other_inset.contiguous(), out, out_inset, s0, s1,
                                   dots if dots is not None else weights_M, D, HAS_DOT=dot_with_MD is not None,
                                   BLOCK=1024)
    return (out if inset is None else (out, out_inset)), dots


def _use_triton(t: torch.Tensor) -> bool:
    return triton_runs_on(t) and t.is_contiguous()


if triton is not None:
    @triton.jit
    def _swiglu_fwd_kernel(gu_ptr, h_ptr, F, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < F
        g = tl.load(gu_ptr + row * 2 * F + offs, mask=mask).to(tl.float32)
        u = tl.load(gu_ptr + row * 2 * F + F + offs, mask=mask).to(tl.float32)
        tl.store(h_ptr + row * F + offs, (g * tl.sigmoid(g) * u).to(h_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _swiglu_bwd_kernel(dz_ptr, gu_ptr, w_ptr, dw_ptr, F, HAS_W: tl.constexpr, BLOCK: tl.constexpr):
        """Row by row: dg over g, du over u (gu's two halves), w h over dz."""
        row = tl.program_id(0).to(tl.int64)
        base, g_base = row * F, row * 2 * F
        w = tl.load(w_ptr + row).to(tl.float32) if HAS_W else 1.0
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, F, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < F
            dz = tl.load(dz_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
            g = tl.load(gu_ptr + g_base + offs, mask=mask, other=0.0).to(tl.float32)
            u = tl.load(gu_ptr + g_base + F + offs, mask=mask, other=0.0).to(tl.float32)
            sig = tl.sigmoid(g)
            silu = g * sig
            h = silu * u
            acc += dz * h
            dz = dz * w
            tl.store(dz_ptr + base + offs, (w * h).to(dz_ptr.dtype.element_ty), mask=mask)
            tl.store(gu_ptr + g_base + F + offs, (dz * silu).to(gu_ptr.dtype.element_ty), mask=mask)
            tl.store(gu_ptr + g_base + offs, (dz * u * sig * (1 + g * (1 - sig))).to(gu_ptr.dtype.element_ty),
                     mask=mask)
        if HAS_W:
            tl.store(dw_ptr + row, tl.sum(acc, axis=0))

    @triton.jit
    def _gather_sum_kernel(rows_ptr, inset_ptr, s0, s1, slots_ptr, w_ptr, out_ptr, row0, M, D, K: tl.constexpr,
                           HAS_W: tl.constexpr, ACCUMULATE: tl.constexpr, BLOCK: tl.constexpr):
        n = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < D
        if ACCUMULATE:  # a token with no row in this block neither reads nor writes its sum
            hits = 0
            for k in tl.static_range(K):
                row = tl.load(slots_ptr + n * K + k).to(tl.int64) - row0
                hits += ((row >= 0) & (row < M)).to(tl.int32)
            mask = mask & (hits > 0)
            acc = tl.load(out_ptr + n * D + offs, mask=mask, other=0.0).to(tl.float32)
        else:
            acc = tl.zeros([BLOCK], dtype=tl.float32)
        for k in tl.static_range(K):
            row = tl.load(slots_ptr + n * K + k).to(tl.int64) - row0
            w = tl.load(w_ptr + n * K + k).to(tl.float32) if HAS_W else 1.0
            hit = (row >= 0) & (row < M)
            in_inset = (row >= s0) & (row < s1)  # rows [s0, s1) lie in the inset, the rest close up after it
            rest_row = tl.where(row >= s1, row - (s1 - s0), row)
            vals = tl.load(rows_ptr + rest_row * D + offs, mask=mask & hit & ((row < s0) | (row >= s1)), other=0.0)
            vals += tl.load(inset_ptr + (row - s0) * D + offs, mask=mask & hit & in_inset, other=0.0)
            acc += w * vals.to(tl.float32)
        tl.store(out_ptr + n * D + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _gather_scale_kernel(src_ptr, index_ptr, w_ptr, other_ptr, other_inset_ptr, out_ptr, out_inset_ptr, s0, s1,
                             dot_ptr, D, HAS_DOT: tl.constexpr, BLOCK: tl.constexpr):
        m = tl.program_id(0).to(tl.int64)
        src = tl.load(index_ptr + m).to(tl.int64) * D
        w = tl.load(w_ptr + m).to(tl.float32)
        in_inset = (m >= s0) & (m < s1)  # as in _gather_sum_kernel: row m of the inset or of the rest
        rest = tl.where(m >= s1, m - (s1 - s0), m) * D
        inset = (m - s0) * D
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, D, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < D
            vals = tl.load(src_ptr + src + offs, mask=mask, other=0.0).to(tl.float32)
            if HAS_DOT:
                other = tl.load(other_ptr + rest + offs, mask=mask & (in_inset == 0), other=0.0).to(tl.float32)
                other += tl.load(other_inset_ptr + inset + offs, mask=mask & in_inset, other=0.0).to(tl.float32)
                acc += vals * other
            scaled = (w * vals).to(out_ptr.dtype.element_ty)
            tl.store(out_ptr + rest + offs, scaled, mask=mask & (in_inset == 0))
            tl.store(out_inset_ptr + inset + offs, scaled, mask=mask & in_inset)
        if HAS_DOT:
            tl.store(dot_ptr + m, tl.sum(acc, axis=0))
