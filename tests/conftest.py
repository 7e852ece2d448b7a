"""Shared fixtures: fresh random seeds (reported on failure) and small model builders."""

from __future__ import annotations

import os
import random
import time

import pytest
import torch

from cluster.config import load_config
from model.config import ModelConfig
from model.transformer import Transformer


def pytest_collection_modifyitems(config, items):
    """GPU tests skip, visibly, where there is no CUDA device; they are never faked."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def seed(request) -> int:
    """A fresh seed per test, printed so a failure can be replayed: MORAY_TEST_SEED=<seed> pytest ..."""
    replay = os.environ.get("MORAY_TEST_SEED")
    value = int(replay) if replay else random.SystemRandom().randrange(2**31)
    torch.manual_seed(value)
    print(f"{request.node.name}: seed {value}")
    return value


def tiny_config(preset: str = "tiny", *overrides: str) -> ModelConfig:
    return load_config(preset, list(overrides)).model


def build_model(cfg: ModelConfig, seed: int) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    # non-zero balancing biases so tests exercise selection-only bias
    for moe in model.all_moe():
        moe.expert_bias.normal_(0, 0.05)
    return model


def poll(read, done, timeout_s: float = 60):
    """read() again every half second until done(value), for at most timeout_s: a bounded loop
    (the controller, a vigil-started failover and standby refills act on threads of their own)."""
    deadline, value = time.monotonic() + timeout_s, read()
    while not done(value) and time.monotonic() < deadline:
        time.sleep(0.5)
        value = read()
    return value


def wait_for_events(sharded, count: int = 1, timeout_s: float = 60) -> list[dict]:
    """The sharded model's elastic events once there are `count` (or after timeout_s)."""
    return poll(lambda: sharded.elastic_status()["events"], lambda events: len(events) >= count, timeout_s)
