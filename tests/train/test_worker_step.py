"""The training worker's step (DeepSpeed engine, expert parallelism, ZeRO-1, clipping, schedule,
the balancing bias agreed over ranks) equals the plain single-process step on the same global
batch: two ranks on gloo, with the experts split over them (ep 2) and replicated on both
(ep 1, their gradients reduced over the expert-data-parallel group).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from actors.transport import free_port
from cluster.config import load_config
from model.transformer import Transformer
from train.data import TokenStream, prepare_corpus
from train.plain import train_loop
from train.worker import build_engine, export_state_dict, train_step

STEPS, WORLD = 2, 2


def _config(corpus, ep_size: int):
    return load_config("tiny", [f"train.data_dir={corpus}", f"train.num_workers={WORLD}", f"train.ep_size={ep_size}",
                                "train.batch_size=8", "train.seq_len=32", "train.warmup_steps=1",
                                f"train.max_steps={STEPS}"])


def _worker(rank: int, port: int, corpus, results) -> None:
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(WORLD))  # as Ray Train sets them
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        for ep_size in (WORLD, 1):
            cfg = _config(corpus, ep_size)
            engine, model, _ = build_engine(cfg, rank, WORLD, None, torch.device("cpu"))
            stream = TokenStream(cfg.train.data_dir)
            for step in range(STEPS):
                train_step(engine, model, stream, cfg, step, rank, WORLD, torch.device("cpu"))
            state = export_state_dict(model, "moray")  # a collective: every rank
            if rank == 0:
                results[ep_size] = state
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    prepare_corpus(None, out, vocab_size=2048, progress=False)
    return out


def test_worker_steps_equal_the_plain_single_process_steps(corpus):
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(free_port("127.0.0.1"), corpus, results), nprocs=WORLD, join=True)

    cfg = _config(corpus, WORLD)
    torch.manual_seed(cfg.train.seed)  # the workers' initial weights (train.worker.build_model)
    plain = Transformer(cfg.model)
    initial = {k: v.clone() for k, v in plain.state_dict().items()}
    stream = TokenStream(cfg.train.data_dir)
    batches = (stream.step_batch(step, cfg.train.batch_size, cfg.train.seq_len, cfg.train.seed, 0,
                                 cfg.train.batch_size) for step in range(STEPS))
    train_loop(plain, batches, cfg.train)
    want = plain.state_dict()

    for ep_size in (WORLD, 1):
        got = results[ep_size]
        assert sorted(got) == sorted(want), f"ep {ep_size}: the exported names differ from the model's"
        for name, w in want.items():
            if not w.is_floating_point():
                continue
            # against how far the step moved it: Adam's first steps divide each gradient by its own
            # size, so a rounding difference in a near-zero gradient moves a weight by up to the
            # learning rate (measured: up to 1.1e-4 of the change, embeddings; a wrongly reduced
            # gradient is off by the whole change)
            moved = float((w - initial[name]).norm())
            err = float((got[name] - w).norm()) / max(moved, 1e-12)
            assert err <= 1e-3, f"ep {ep_size}: {name} is {err:.1e} of its change off the plain step's"
