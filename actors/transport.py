"""The process group between a router (rank 0) and its expert shards (ranks 1..N).

Formed inside the actors: the router opens a TCP store on its own node at a free port, every
member joins with its rank. gloo on CPU, NCCL on GPU, from the same code. A group whose member
died is useless (the collective library cannot drop a rank), so replacing a shard destroys the
group everywhere and forms a new one on a new store; collective timeouts make a dead peer an
error instead of a hang.

Per MoE layer the router sends each shard its per-expert row counts, then the rows, and gets
the results back in the same order: three `all_to_all_single` calls with uneven splits in
which only the router<->shard pairs carry data. The last two run asynchronously on the router
(`router_dispatch` starts them, `router_collect` waits), so its shared experts compute while
the shards work. Decode steps use a fixed number of rows per shard instead (padding), so that
neither side reads the counts on the host.
"""

from __future__ import annotations

import datetime
import logging
import os
import random
import socket
import sys
import threading
import traceback
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

# Steps whose token copies number at most this exchange a fixed row count per shard (the copies
# of all tokens: no shard can get more), so no MoE layer reads its counts on the host: decode
# steps of up to 128 sequences at top-8. Larger steps (prefill) send exact counts.
FIXED_EXCHANGE_MAX_ROWS = 1024


def graph_buckets(top_k: int) -> tuple[int, ...]:
    """Batch sizes whose decode steps are replayed as CUDA graphs (batches pad up to one): those
    whose fixed-size exchange fits, as a captured step cannot read counts on the host."""
    return tuple(b for b in (1, 2, 4, 8, 16, 32, 64, 128) if b * top_k <= FIXED_EXCHANGE_MAX_ROWS)


@dataclass(frozen=True)
class GroupSpec:
    host: str
    port: int
    world_size: int
    backend: str  # "gloo" or "nccl"
    timeout_s: float
    generation: int  # bumps on every re-formation, so nothing stale is ever read


RAY_WORKER_PORTS = range(10002, 20000)  # Ray's default min/max_worker_port


def _ephemeral_ports() -> range:
    """Where the OS picks ports for outgoing connections and port-0 binds (Linux's setting)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(v) for v in f.read().split())
        return range(low, high + 1)
    except (OSError, ValueError):
        return range(32768, 61000)


def free_port(host: str) -> int:
    """A port free now that nothing hands out by itself before the caller binds it: above Ray's
    worker ports and below the OS's ephemeral range. A port-0 pick lies in that range, and one
    was taken by a Ray process's own connection between the pick and Serve's bind (a test run's
    "Failed to bind to address")."""
    quiet = range(RAY_WORKER_PORTS.stop, _ephemeral_ports().start)
    for port in random.SystemRandom().sample(quiet, min(len(quiet), 200)):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # nothing free there: any port
        s.bind((host, 0))
        return s.getsockname()[1]


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


class Rendezvous:
    """The router's side of forming a group: owns the TCP store every member connects to."""

    def __init__(self, host: str, world_size: int, backend: str, timeout_s: float, generation: int):
        self.spec = GroupSpec(host, free_port(host), world_size, backend, timeout_s, generation)
        self.store = dist.TCPStore(host, self.spec.port, world_size, is_master=True,
                                   timeout=datetime.timedelta(seconds=timeout_s), wait_for_workers=False)


def join_group(spec: GroupSpec, rank: int, store: dist.Store | None = None) -> None:
    """Join (as `rank`) the group described by spec; leaves any group this process was in first.

    On NCCL a collective with a dead peer does not fail, it waits; at the group's timeout
    PyTorch's watchdog then by default ends the whole process (TORCH_NCCL_ASYNC_ERROR_HANDLING
    3), which would take the router down with its shard. Unless the user chose otherwise, the
    watchdog only aborts the communicator (2): the step fails, the router lives and fails over."""
    leave_group()
    if spec.backend == "nccl":
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")  # read when the group is made
    timeout = datetime.timedelta(seconds=spec.timeout_s)
    if store is None:
        store = dist.TCPStore(spec.host, spec.port, spec.world_size, is_master=False, timeout=timeout)
    store = dist.PrefixStore(f"moray/{spec.generation}", store)
    dist.init_process_group(spec.backend, store=store, rank=rank, world_size=spec.world_size, timeout=timeout)


# The abort started by `abort_group_soon`, if any: the process group is process-wide, and so is this.
_aborting: threading.Thread | None = None
_aborting_lock = threading.Lock()
ABORT_WAIT_S = 60.0  # an abort returns in under a second once no CUDA graph holds the communicator
ABORT_REPORT_S = 15.0  # one still running by then is stuck: `report_if_still_running` says where


def abort_group_soon() -> None:
    """From any thread: start aborting this process's NCCL group, and return at once.

    NCCL does not fail a collective whose peer died; its kernels wait on the GPU, and so does any
    host read behind them. The abort ends those kernels at once (the read returns, with garbage),
    but the call itself returns only once no CUDA graph that captured the communicator's work
    still exists (`benchmarks/nccl_abort_probe.py`: a graph kept alive, no return in 15 s;
    destroyed, 0.5 s). The graphs belong to the thread waiting on the read, which destroys them
    once it returns; so the abort runs on a thread of its own, and `leave_group` waits for it.
    Nothing on gloo, where a dead peer fails a collective by itself."""
    global _aborting
    with _aborting_lock:
        if _aborting is None and dist.is_initialized() and dist.get_backend() == "nccl":
            _aborting = threading.Thread(target=dist.distributed_c10d._abort_process_group,
                                         name="moray-group-abort", daemon=True)
            _aborting.start()
            report_if_still_running(_aborting, ABORT_REPORT_S, "aborting the NCCL group")


def report_if_still_running(thread: threading.Thread, after_s: float, what: str) -> threading.Timer:
    """After `after_s`, if `thread` has not ended, log every thread of this process with its
    Python stack. An abort that does not return has hung failovers on GPUs (benchmarks/RESULTS.md,
    "Standby shards"): what the step thread and the abort were doing then is the evidence."""
    def report() -> None:
        if not thread.is_alive():
            return
        names = {t.ident: t.name for t in threading.enumerate()}
        stacks = [f"--- thread {names.get(ident, ident)}\n" + "".join(traceback.format_stack(frame))
                  for ident, frame in sys._current_frames().items()]
        log.warning("%s has not ended after %.0f s; the threads of process %d:\n%s", what, after_s, os.getpid(),
                    "\n".join(stacks))

    timer = threading.Timer(after_s, report)
    timer.daemon = True
    timer.start()
    return timer


def leave_group() -> None:
    """Leave this process's group, aborting (not finishing) whatever it still has in flight.
    Destroy the CUDA graphs that captured its collectives first (see `abort_group_soon`).

    A step whose peer died leaves NCCL kernels waiting on the GPU stream. Destroying the group
    would drop the watchdog that ends them at the timeout, and every later kernel (the next
    group's too) would queue behind them forever; aborting the communicator ends them now."""
    global _aborting
    aborting = _aborting
    if aborting is not None:
        aborting.join(timeout=ABORT_WAIT_S)
        if aborting.is_alive():
            raise RuntimeError(f"aborting the NCCL group did not end within {ABORT_WAIT_S:.0f} s; "
                               "a CUDA graph that captured its collectives may still exist")
        with _aborting_lock:
            _aborting = None
        return
    if not dist.is_initialized():
        return
    if dist.get_backend() == "nccl":
        dist.distributed_c10d._abort_process_group()
    else:
        dist.destroy_process_group()


def _exchange(out: torch.Tensor, inp: torch.Tensor, out_splits: list[int], in_splits: list[int]) -> torch.Tensor:
    dist.all_to_all_single(out, inp, out_splits, in_splits)
    return out


@dataclass(frozen=True)
class AtTheShards:
    """One MoE layer's rows sent to the shards (`router_dispatch`); `router_collect` waits for
    their results, so the router computes (the shared experts) while the shards do."""

    works: tuple  # the rows going out, the results coming back (async collectives, in issue order)
    out: torch.Tensor  # where the results land
    places: torch.Tensor | None = None  # fixed-size exchange: each row's place in `out`


def router_dispatch(rows_MD: torch.Tensor, send_counts: torch.Tensor, experts_per_shard: list[int],
                    rows_per_shard: int | None = None, shard_of_copy: torch.Tensor | None = None) -> AtTheShards:
    """Router side of one MoE layer. rows_MD is grouped by shard, then by local expert;
    send_counts [sum(experts_per_shard)] gives rows per expert in that order. Shard s gets its
    experts' counts (this exchange completes here) and rows; the rows' send and the results'
    receive are left running.

    With `rows_per_shard` (at least the most rows any shard can get) every shard gets exactly
    that many rows, its own first and then padding, so every split size is known without
    reading the counts: no device-to-host read per layer on either side, which lets the host
    run ahead of the device (and is what a captured CUDA graph needs). For decode steps, whose
    few rows make the padding cheap; `shard_serve_layer` must be given the same number.
    `shard_of_copy` (the shard of each entry of send_counts, on the rows' device) may be given
    where the caller keeps it, instead of being made from experts_per_shard each time."""
    world = len(experts_per_shard) + 1
    counts = send_counts.to(torch.long)
    _exchange(counts.new_empty(0), counts, [0] * world, [0] + list(experts_per_shard))
    if rows_per_shard is None:
        host = counts.tolist()  # the one device sync: split sizes must be known on the host
        bounds = [0]
        for n in experts_per_shard:
            bounds.append(bounds[-1] + n)
        splits = [0] + [sum(host[bounds[s]:bounds[s + 1]]) for s in range(len(experts_per_shard))]
        rows, places = rows_MD.contiguous(), None
    else:
        splits = [0] + [rows_per_shard] * len(experts_per_shard)
        if shard_of_copy is None:
            shard_of_copy = shard_of_each_copy(experts_per_shard, counts.device)
        places = _padded_places(counts, shard_of_copy, len(experts_per_shard), rows_per_shard, rows_MD.shape[0])
        rows = rows_MD.new_zeros(rows_per_shard * len(experts_per_shard), rows_MD.shape[1])
        rows[places] = rows_MD
    empty = rows_MD.new_empty(0, rows_MD.shape[1])
    out = rows.new_empty(sum(splits), rows_MD.shape[1])
    sending = dist.all_to_all_single(empty, rows, [0] * world, splits, async_op=True)
    receiving = dist.all_to_all_single(out, empty, splits, [0] * world, async_op=True)
    return AtTheShards((sending, receiving), out, places)


def shard_of_each_copy(experts_per_shard: list[int], device: torch.device) -> torch.Tensor:
    """The shard of each expert copy in send order (shard s holds the next experts_per_shard[s])."""
    return torch.repeat_interleave(torch.arange(len(experts_per_shard)), torch.tensor(experts_per_shard)).to(device)


def _padded_places(counts: torch.Tensor, shard_of_copy: torch.Tensor, n_shards: int, rows_per_shard: int,
                   n_rows: int) -> torch.Tensor:
    """Where each row (grouped by shard) goes in the padded buffer: shard s's rows start at
    s * rows_per_shard. All on the device: n_rows, the total, is known on the host."""
    per_shard = torch.zeros(n_shards, dtype=torch.long, device=counts.device)
    per_shard.index_add_(0, shard_of_copy, counts)
    shard_of_row = torch.repeat_interleave(shard_of_copy, counts, output_size=n_rows)
    first_row = torch.cumsum(per_shard, 0) - per_shard
    return torch.arange(n_rows, device=counts.device) + shard_of_row * rows_per_shard - first_row[shard_of_row]


def router_collect(sent: AtTheShards) -> torch.Tensor:
    """The shards' outputs for the rows `router_dispatch` sent, in the same order."""
    for work in sent.works:
        work.wait()
    return sent.out if sent.places is None else sent.out[sent.places]


def shard_serve_layer(n_local: int, dim: int, dtype: torch.dtype, device: torch.device, compute,
                      rows_per_shard: int | None = None) -> torch.Tensor:
    """Shard side of one MoE layer: receive counts and rows, return compute(rows, counts).
    Returns the counts received (per local expert) for load statistics. With `rows_per_shard`
    (the router's fixed-size exchange) that many rows arrive, this shard's first; compute gets
    them all, and what it makes of the padding goes back unread."""
    world = dist.get_world_size()
    zeros = [0] * world
    counts = _exchange(torch.empty(n_local, dtype=torch.long, device=device), torch.empty(0, dtype=torch.long,
                       device=device), [n_local] + zeros[1:], zeros)
    # without a fixed size: one device->host copy, no extra reduction kernel
    n_rows = rows_per_shard if rows_per_shard is not None else sum(counts.tolist())
    rows = _exchange(torch.empty(n_rows, dim, dtype=dtype, device=device), torch.empty(0, dim, dtype=dtype,
                     device=device), [n_rows] + zeros[1:], zeros)
    out = compute(rows, counts)
    _exchange(out.new_empty(0, dim), out.contiguous(), zeros, [n_rows] + zeros[1:])
    return counts
