"""Grouped matrix product: one call multiplies each expert's contiguous block of rows by its weight.

This is what makes fine-grained MoE fast: a few large kernels instead of one small matmul per
expert. `torch._grouped_mm` does it natively on Hopper GPUs (bf16) and on the CPU (fp32); the
loop over experts is the exact fallback everywhere else and the reference the fast path is
tested against.
"""

from __future__ import annotations

import torch


def native_kernel_serves(dtype: torch.dtype, device: torch.device, *widths: int) -> bool:
    """Whether the native kernel multiplies this dtype on this device, for operands whose rows are
    `widths` wide. Only then does a grouped product read nothing on the host (the loop reads the
    counts), which a CUDA graph needs."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    # the kernel needs 16-byte aligned row strides
    if any(width * dtype.itemsize % 16 for width in widths):
        return False
    if device.type == "cuda":
        return dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) >= (9, 0)
    return device.type == "cpu" and dtype == torch.float32


def _native_supported(x: torch.Tensor, w: torch.Tensor) -> bool:
    return x.dtype == w.dtype and native_kernel_serves(x.dtype, x.device, x.shape[-1], w.shape[-1])


def _check_impl(impl: str) -> None:
    if impl not in ("auto", "native", "loop"):
        raise ValueError(f"grouped_mm impl must be auto, native or loop, got {impl!r}")


def _use_native(x: torch.Tensor, w: torch.Tensor, impl: str) -> bool:
    return impl == "native" or (impl == "auto" and _native_supported(x, w))


def group_offsets(counts_E: torch.Tensor | None) -> torch.Tensor | None:
    """The native kernel's group ends (counts_E's cumulative sum, int32). An expert step makes
    up to nine grouped products over the same groups; computing these once saves a launch each,
    which counts where the host, not the device, sets the pace (small steps, expert parallelism's
    per-layer host sync)."""
    return None if counts_E is None else torch.cumsum(counts_E, dim=0, dtype=torch.int32)


def grouped_mm(x_MK: torch.Tensor, w_EKN: torch.Tensor, counts_E: torch.Tensor | None,
               impl: str = "auto", offsets: torch.Tensor | None = None) -> torch.Tensor:
    """Rows of x sorted by expert (counts_E rows each) times their expert's weight: [M, N].
    counts_E None means a single expert owning every row: a plain matmul. Rows past the last
    group (padding) give rows of no defined value (the native kernel leaves them unwritten).

    impl: "auto" picks the native kernel where it runs, "native" forces it, "loop" forces the
    per-expert loop. offsets: `group_offsets(counts_E)`, where the caller has it already.
    """
    _check_impl(impl)
    if counts_E is None:
        return x_MK @ w_EKN[0]
    if _use_native(x_MK, w_EKN, impl) and x_MK.shape[0] > 0:
        return torch._grouped_mm(x_MK, w_EKN, offs=group_offsets(counts_E) if offsets is None else offsets)
    counts = counts_E.tolist()
    rest = x_MK.shape[0] - sum(counts)  # rows past the last group (a padded exchange's): zeros here
    blocks = torch.split(x_MK, counts + [rest], dim=0)
    outs = [block @ w_EKN[e] for e, block in enumerate(blocks[:-1])] + [x_MK.new_zeros(rest, w_EKN.shape[-1])]
    return torch.cat(outs, dim=0)


def grouped_mm_weight_grad(x_MK: torch.Tensor, dy_MN: torch.Tensor, counts_E: torch.Tensor | None,
                           impl: str = "auto", offsets: torch.Tensor | None = None) -> torch.Tensor:
    """Per expert, its block of x transposed times its block of dy: the weight gradient [E, K, N]
    of `grouped_mm`, in one kernel (the groups split the reduction dimension)."""
    _check_impl(impl)
    if counts_E is None:
        return (x_MK.t() @ dy_MN)[None]
    if _use_native(x_MK, dy_MN, impl) and x_MK.shape[0] > 0:
        return torch._grouped_mm(x_MK.t(), dy_MN, offs=group_offsets(counts_E) if offsets is None else offsets)
    blocks = zip(torch.split(x_MK, counts_E.tolist()), torch.split(dy_MN, counts_E.tolist()))
    return torch.stack([a.t() @ b for a, b in blocks]) if counts_E.numel() else \
        x_MK.new_zeros(0, x_MK.shape[1], dy_MN.shape[1])
