"""The tiny preset learns on the prepared corpus with the plain loop, and bias balancing balances."""

from __future__ import annotations

import statistics

import pytest
import torch

from cluster.config import load_config
from model.transformer import Transformer
from train.data import TokenStream, prepare_corpus
from train.plain import lr_at, train_loop


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return prepare_corpus(None, tmp_path_factory.mktemp("data") / "corpus", vocab_size=2048, progress=False)


def run(corpus, bias_balancing: bool, steps: int = 80):
    cfg = load_config("tiny", [f"train.max_steps={steps}", f"model.moe.bias_balancing={str(bias_balancing).lower()}"])
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    stream = TokenStream(corpus)
    return model, train_loop(model, stream.random_batches(cfg.train.batch_size, cfg.train.seq_len, seed=0), cfg.train)


def window(history, attr, start, stop):
    return statistics.mean(getattr(s, attr) for s in history[start:stop])


def test_tiny_learns_and_bias_balancing_evens_expert_load(corpus):
    model, balanced = run(corpus, bias_balancing=True)
    _, unbalanced = run(corpus, bias_balancing=False)
    # the loss falls clearly from ln(vocab) ~ 7.6 at the start
    assert balanced[0].loss > 7.0
    assert window(balanced, "loss", -10, None) < balanced[0].loss - 1.8
    assert all(s.mtp_loss is not None for s in balanced)
    # bias balancing: max/mean load falls over training, and ends well below the run without it
    assert window(balanced, "imbalance", -20, None) < window(balanced, "imbalance", 5, 25)
    assert window(balanced, "imbalance", -20, None) < 0.7 * window(unbalanced, "imbalance", -20, None)
    # the biases moved, and only selection used them: they stay out of the optimizer
    assert all(moe.expert_bias.abs().sum() > 0 for moe in model.all_moe())
    assert all(not name.endswith("expert_bias") for name, _ in model.named_parameters())
    # held-out loss agrees that it learned
    val_inputs, val_targets = next(TokenStream(corpus, "val").sequential_batches(8, 128))
    with torch.no_grad():
        model.eval()
        assert model.loss(val_inputs, val_targets).main < balanced[0].loss - 1.5


def test_schedule_warms_up_then_decays_to_the_floor():
    cfg = load_config("tiny", ["train.max_steps=100", "train.warmup_steps=10", "train.lr=1.0",
                               "train.min_lr_ratio=0.1"]).train
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(55, cfg) == pytest.approx(0.55)
    assert lr_at(100, cfg) == pytest.approx(0.1)
