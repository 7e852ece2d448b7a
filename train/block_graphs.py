"""Training blocks replayed as CUDA graphs: each transformer block's forward one launch, its
backward another.

`small`'s training step on one H100 is host-bound (benchmarks/RESULTS.md): ~3,000 kernels a
step, each a Python call and a launch, and in backward each also an autograd-engine node, while
the GPU idles about a third of the step. A block's step has static shapes in training (the
micro-batch is fixed) and, with its experts on this rank and the grouped products on the native
kernel, reads nothing back on the host, so it can be recorded once and replayed.

How, as `torch.cuda.make_graphed_callables` does it: each block's forward and its backward
(`torch.autograd.grad` over the block's input and parameters) are captured into one memory pool,
the forwards in the order the step runs them and the backwards in reverse, so no replay
overwrites memory a later one still reads. A replay is an autograd function: forward copies the
input into the graph's static input and replays; backward copies the incoming gradient in,
replays, and hands out the static gradients. Unlike `make_graphed_callables`, the parameters'
gradients are handed out as the static tensors themselves, never as fresh aliases: autograd
adopts an unreferenced gradient as `param.grad`, and an adopted alias of graph memory would be
overwritten by the next micro-batch's replay (gradient accumulation, DeepSpeed's ZeRO-1, would
then add a gradient to itself). Held here, they are copied or added instead.

What a graph assumes, and checks on every call (otherwise the block runs eagerly, unchanged):
the same input shape and dtype, no KV cache, every token real, training mode with gradients on.
The parameters must keep their storage: DeepSpeed points them into its flat buffers when the
engine is built, so capture comes after that, and a parameter moved since is an error, not a
silent replay of stale weights. Blocks that cannot be captured (experts on other ranks, whose
exchange reads split sizes on the host; the per-expert loop; expert blocks; capacity drops)
run eagerly beside the graphed ones.
"""

from __future__ import annotations

import torch

from model.attention import StepLayout
from model.config import ConfigError
from model.grouped import native_kernel_serves
from model.moe import MoE, RoutedExperts
from model.transformer import Block, Transformer

WARMUP_STEPS = 2  # eager forward+backward passes before capture: Triton compiles, cuBLAS sets up


def why_not_graphed(block: Block, dtype: torch.dtype, device: torch.device) -> str | None:
    """What keeps this block's training step out of a CUDA graph (a host read inside it), or None."""
    if device.type != "cuda":
        return "not on a GPU"
    if not block.is_moe:
        return None
    moe = block.ffn
    if not isinstance(moe, MoE):
        return "its MoE is not moray's (the stock DeepSpeed layer)"
    experts = moe.experts
    if not isinstance(experts, RoutedExperts) and getattr(experts, "ep_size", None) != 1:
        return "its experts are on other ranks (the exchange reads split sizes on the host)"
    if isinstance(experts, RoutedExperts) and moe.cfg.expert_chunks > 1:
        return "its experts run in blocks (model.moe.expert_chunks > 1 cuts them on the host)"
    if moe.cfg.capacity_factor > 0:
        return "its experts drop tokens over capacity (the drop count is read on the host)"
    if not native_kernel_serves(dtype, device, moe.gate.in_features, moe.cfg.moe_inter_dim):
        return f"the grouped-product kernel does not serve {dtype} here (the per-expert loop reads counts)"
    return None


class BlockGraph:
    """One block's forward and backward graphs and their static tensors."""

    def __init__(self, block: Block, shape: torch.Size, dtype: torch.dtype, device: torch.device):
        self.block, self.shape, self.dtype = block, shape, dtype
        self.params = tuple(p for p in block.parameters() if p.requires_grad)
        self.storage = tuple(p.data_ptr() for p in self.params)
        B, T = shape[0], shape[1]
        self.x = torch.randn(shape, dtype=dtype, device=device, requires_grad=True)
        self.positions = torch.arange(T, device=device).expand(B, T).contiguous()
        self.lengths = torch.full((B,), T, device=device)
        self.slots = torch.arange(B, device=device)
        self.forward_graph, self.backward_graph = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        self.outputs: tuple[torch.Tensor, ...] = ()
        self.grad_outputs: tuple[torch.Tensor, ...] = ()
        self.grad_inputs: tuple[torch.Tensor | None, ...] = ()

    def run(self) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """The block's eager step on the static tensors: its outputs ((out,) or (out, auxiliary
        loss)) and the leaves to differentiate by (the input, then the parameters). The leaves
        are fresh aliases made here: autograd remembers on which stream a leaf was first used
        (DeepSpeed's gradient hooks touch the parameters' at engine set-up, on the default
        stream), and a captured backward may not wait on a stream outside the capture."""
        x = self.x.detach().requires_grad_()
        params = {name: p.detach().requires_grad_() for name, p in self.block.named_parameters() if p.requires_grad}
        layout = StepLayout(positions=self.positions, lengths=self.lengths, slots=self.slots, all_real=True,
                            kv_len=self.shape[1])
        out, aux = torch.func.functional_call(self.block, params, (x, layout))
        return ((out,) if aux is None else (out, aux)), (x, *params.values())

    @staticmethod
    def gradients(outputs: tuple[torch.Tensor, ...], leaves: tuple[torch.Tensor, ...],
                  grad_outputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor | None, ...]:
        return torch.autograd.grad(outputs, leaves, grad_outputs, allow_unused=True)

    def serves(self, x: torch.Tensor, layout: StepLayout, cache, valid) -> bool:
        if not (cache is None and valid is None and layout.all_real is True and self.block.training
                and torch.is_grad_enabled() and x.shape == self.shape and x.dtype == self.dtype
                and layout.positions.shape == self.positions.shape):
            return False
        if tuple(p.data_ptr() for p in self.params) != self.storage:
            raise RuntimeError("a graphed training block's parameters were moved to new storage after its CUDA "
                               "graph was captured (train/block_graphs.py): capture after the engine is built")
        return True


class _Replay(torch.autograd.Function):
    @staticmethod
    def forward(ctx, graph: BlockGraph, x: torch.Tensor, positions: torch.Tensor, *params: torch.Tensor):
        graph.x.copy_(x)
        graph.positions.copy_(positions)
        graph.forward_graph.replay()
        ctx.graph = graph
        return tuple(o.detach() for o in graph.outputs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads: torch.Tensor):
        graph = ctx.graph
        for static, grad in zip(graph.grad_outputs, grads):
            static.copy_(grad)
        graph.backward_graph.replay()
        # the static tensors themselves (see the module docstring): autograd copies or adds them
        return (None, graph.grad_inputs[0], None, *graph.grad_inputs[1:])


def _install(graph: BlockGraph) -> None:
    """The block's forward replays its graph where the graph serves, and is itself elsewhere."""
    block = graph.block

    def forward(x: torch.Tensor, layout: StepLayout, cache=None, valid=None):
        if not graph.serves(x, layout, cache, valid):
            return Block.forward(block, x, layout, cache, valid)
        outputs = _Replay.apply(graph, x, layout.positions, *graph.params)
        return outputs[0], (outputs[1] if len(outputs) > 1 else None)

    block.forward = forward


def training_blocks(model: Transformer, batch: int, seq_len: int) -> list[tuple[Block, torch.Size]]:
    """Every block of a training step with the shape of its input, in the order the step runs
    them: the main stack, then each multi-token-prediction depth (on the sequence less k)."""
    dim = model.cfg.dim
    blocks = [(block, torch.Size((batch, seq_len, dim))) for block in model.layers]
    blocks += [(mtp.block, torch.Size((batch, seq_len - k, dim))) for k, mtp in enumerate(model.mtp, start=1)
               if seq_len - k > 0]
    return blocks


def capture_block_graphs(model: Transformer, batch: int, seq_len: int, strict: bool = False) -> dict[str, str]:
    """Capture the training step of every block that allows it, for micro-batches of
    [batch, seq_len] tokens; returns the blocks left eager, each with the reason. strict: any
    block that cannot be captured is a ConfigError instead (nothing is captured then).

    Call once, after the DeepSpeed engine is built (and any checkpoint loaded into it)."""
    param = next(model.parameters())
    dtype, device = param.dtype, param.device
    names = {id(m): n for n, m in model.named_modules()}
    graphs, eager = [], {}
    for block, shape in training_blocks(model, batch, seq_len):
        reason = why_not_graphed(block, dtype, device)
        if reason is None:
            graphs.append(BlockGraph(block, shape, dtype, device))
        else:
            eager[names[id(block)]] = reason
    if strict and eager:
        raise ConfigError("train.cuda_graphs: true, but these blocks cannot be captured: "
                          + "; ".join(f"{name}: {why}" for name, why in eager.items()))
    if not graphs:
        return eager
    # the warm-up and the captures run the blocks' MoE load counters: put them back after
    counters = [c for g in graphs for m in g.block.modules() if isinstance(m, MoE)
                for c in (m.last_load, m.pending_load)]
    saved = [c.clone() for c in counters]
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for graph in graphs:
            for _ in range(WARMUP_STEPS):
                outputs, leaves = graph.run()
                graph.gradients(outputs, leaves, tuple(torch.zeros_like(o) for o in outputs))
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)
    pool = torch.cuda.graph_pool_handle()
    leaves = {}
    for graph in graphs:  # forwards in step order, backwards in reverse: one pool, no overwrites
        with torch.cuda.graph(graph.forward_graph, pool=pool, capture_error_mode="thread_local"):
            graph.outputs, leaves[graph] = graph.run()
    for graph in reversed(graphs):
        graph.grad_outputs = tuple(torch.empty_like(o) for o in graph.outputs)
        with torch.cuda.graph(graph.backward_graph, pool=pool, capture_error_mode="thread_local"):
            graph.grad_inputs = graph.gradients(graph.outputs, leaves.pop(graph), graph.grad_outputs)
    for buffer, value in zip(counters, saved):
        buffer.copy_(value)
    for graph in graphs:
        _install(graph)
    return eager
