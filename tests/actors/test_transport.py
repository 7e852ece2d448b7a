"""The router/shard exchange over real gloo processes: `router_dispatch` returns while the shards
are still computing (the router's shared experts run in that time), and `router_collect` gives
each row's result in order, over consecutive layers, with a shard that gets no rows, and with
the fixed-size exchange of decode steps (every shard gets the same padded row count)."""

from __future__ import annotations

import datetime
import logging
import socket
import threading

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from actors.transport import (RAY_WORKER_PORTS, _ephemeral_ports, free_port, report_if_still_running, router_collect,
                              router_dispatch, shard_serve_layer)

DIM, LAYERS = 8, 3
EXPERTS_PER_SHARD = [2, 3]  # shard 2 (the second) receives no rows in this test


def _fixed_rows(layer: int) -> int | None:
    """The middle layer exchanges a fixed 9 rows per shard (the shards' 7 and 3 rows, padded)."""
    return 9 if layer == 1 else None


def _counts(layer: int) -> list[int]:
    return [3, 4, 1, 0, 2] if layer == 1 else [3, 4, 0, 0, 0]


def _shard_output(rows: torch.Tensor, layer: int) -> torch.Tensor:
    return rows * 2 + layer


def _router(router_free) -> None:
    torch.manual_seed(0)
    for layer in range(LAYERS):
        counts = torch.tensor(_counts(layer))
        rows = torch.randn(int(counts.sum()), DIM)
        sent = router_dispatch(rows, counts, EXPERTS_PER_SHARD, _fixed_rows(layer))
        router_free.set()  # the shards compute only once the router got here: it must not wait for them
        out = router_collect(sent)
        assert torch.equal(out, _shard_output(rows, layer)), f"layer {layer}: wrong results"
        router_free.clear()


def _shard(rank: int, router_free) -> None:
    for layer in range(LAYERS):
        def compute(rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
            assert router_free.wait(timeout=60), "router_dispatch waited for the shards' results"
            assert rows.shape[0] == (_fixed_rows(layer) or int(counts.sum())), rows.shape
            return _shard_output(rows, layer)
        counts = shard_serve_layer(EXPERTS_PER_SHARD[rank - 1], DIM, torch.float32, torch.device("cpu"), compute,
                                   _fixed_rows(layer))
        assert counts.tolist() == (_counts(layer)[:2] if rank == 1 else _counts(layer)[2:])


def _member(rank: int, port: int, router_free) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=3,
                            timeout=datetime.timedelta(seconds=120))
    try:
        _router(router_free) if rank == 0 else _shard(rank, router_free)
    finally:
        dist.destroy_process_group()


def test_router_computes_while_the_shards_do():
    router_free = mp.get_context("spawn").Event()
    mp.spawn(_member, args=(free_port("127.0.0.1"), router_free), nprocs=3, join=True)


def _waits_for_its_peer(release: threading.Event) -> None:
    release.wait(timeout=30)


def test_a_stuck_thread_is_reported_with_every_threads_stack(caplog):
    """What a hung abort leaves in the log: the stuck work named, and where each thread was (the
    blocked function in the stuck thread's stack); a thread that ended in time leaves nothing."""
    release = threading.Event()
    stuck = threading.Thread(target=_waits_for_its_peer, args=(release,), name="moray-probe-stuck", daemon=True)
    done = threading.Thread(target=lambda: None, name="moray-probe-done")
    stuck.start(), done.start()
    done.join()
    with caplog.at_level(logging.WARNING, logger="actors.transport"):
        report_if_still_running(done, 0.05, "the finished work").join()
        report_if_still_running(stuck, 0.05, "the stuck work").join()
    release.set()
    (record,) = caplog.records
    message = record.getMessage()
    assert message.startswith("the stuck work has not ended after 0 s")
    section = message.split("--- thread moray-probe-stuck\n")[1].split("--- thread")[0]
    assert "_waits_for_its_peer" in section and "release.wait" in section
    assert "--- thread MainThread" in message


def test_free_ports_come_from_where_nothing_hands_ports_out():
    """Ports for the servers the tests and the rendezvous start lie outside the OS's ephemeral
    range and Ray's worker ports (either may take a port between the pick and the bind), differ
    from call to call, and can be bound."""
    ports = {free_port("127.0.0.1") for _ in range(20)}
    assert len(ports) > 10
    for port in ports:
        assert port not in _ephemeral_ports() and port not in RAY_WORKER_PORTS and port > 1024
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", port))
