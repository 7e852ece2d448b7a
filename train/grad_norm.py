"""ZeRO 1/2's gradient norm in fp32 on the device: a few multi-tensor kernels, no host syncs.

DeepSpeed's ZeRO optimizer (`get_grad_norm_direct`, once per parameter group before each
update) copies every gradient to fp64 and takes its norm there: 186 copies and 186 reductions a
step for `small`, 6.5 ms of an H100's 73 ms (benchmarks/RESULTS.md); its nan/inf masking then
builds a tensor from a Python number on the device and passes it to `masked_fill_`, which reads
it back: two host syncs per group. Clipping needs the norm to a few digits, not to fp64: here
each gradient's norm comes from one `torch._foreach_norm` pass accumulating in fp32 (what
`torch.nn.utils.clip_grad_norm_` does), their squares summed in fp32, and a non-finite result
becomes DeepSpeed's -1 sentinel by `torch.where`, on the device. The reductions over ranks are
DeepSpeed's own (data-parallel group, then model-parallel), so the result is its norm to fp32
rounding. A gradient above ~1e19 in magnitude overflows fp32's square and reads as non-finite
(the step is skipped, `train.worker.finish_step_on_device`) where fp64 would still clip it.
"""

from __future__ import annotations

import types

import deepspeed.comm as ds_dist
import torch
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

INVALID = -1.0  # DeepSpeed's group norm for non-finite gradients (combine_grad_norm_groups reads it)


def norm_gradients_in_fp32(zero: object) -> bool:
    """Give ZeRO 1/2's optimizer the fp32 norm; returns whether it took it. Left as DeepSpeed
    has it: other optimizers (stage 0 has its own), CPU offload (its norm is computed apart)
    and tensor parallelism (which parameters count on which rank is DeepSpeed's business)."""
    if not isinstance(zero, DeepSpeedZeroOptimizer) or zero.cpu_offload or zero.model_parallel_group is not None:
        return False
    zero.get_grad_norm_direct = types.MethodType(_grad_norm_fp32, zero)
    return True


def _grad_norm_fp32(zero: DeepSpeedZeroOptimizer, gradients: list[torch.Tensor], params: list[torch.nn.Parameter],
                    norm_type: float = 2) -> torch.Tensor:
    """`DeepSpeedZeroOptimizer.get_grad_norm_direct`'s contract for the L2 norm: this rank's
    gradients of one parameter group (ZeRO's padding left out), summed over the data-parallel
    group, -1 when not finite."""
    if float(norm_type) != 2.0:
        return type(zero).get_grad_norm_direct(zero, gradients, params, norm_type)
    grads = [g for g in gradients if not getattr(g, "_zero_padding", False)]
    if grads:
        squares = torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32)).square().sum()
    else:
        squares = torch.zeros((), dtype=torch.float32, device=zero.device)
    ds_dist.all_reduce(squares, op=ds_dist.ReduceOp.SUM, group=zero.dp_process_group)
    zero._model_parallel_all_reduce(tensor=squares, op=ds_dist.ReduceOp.SUM)
    norm = squares.sqrt()
    return torch.where(torch.isfinite(norm), norm, torch.full_like(norm, INVALID))
