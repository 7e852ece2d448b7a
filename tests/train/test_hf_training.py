"""Training continues a Hugging Face model: data tokenized with its tokenizer, weights from its
safetensors (converted once), and the trained checkpoint keeps its tokenizer and chat template."""

from __future__ import annotations

import pytest
import ray
import torch

pytest.importorskip("transformers")

from cluster.config import load_config  # noqa: E402
from model.checkpoint import load_state_dict, tokenizer_file  # noqa: E402
from model.hf import as_moray_checkpoint  # noqa: E402
from model.tokenizer import Tokenizer  # noqa: E402
from tests.hf_models import CHAT_TEMPLATE, build_hf_model, hf_tokenizer, save_hf_model  # noqa: E402
from train.data import prepare_corpus  # noqa: E402
from train.job import run_training, start_from  # noqa: E402


@pytest.fixture(scope="module")
def ray_local():
    ray.init(address="local", num_cpus=3, include_dashboard=False)
    yield
    ray.shutdown()


def test_training_starts_from_a_hugging_face_dir(ray_local, seed, tmp_path, monkeypatch):
    monkeypatch.setenv("MORAY_HF_CACHE", str(tmp_path / "cache"))
    hf_dir = save_hf_model(build_hf_model("mixtral-gqa", seed), tmp_path / "hf")
    hf_tok = hf_tokenizer(CHAT_TEMPLATE)
    hf_tok.save_pretrained(hf_dir)
    words = "hello world moray is a fish what ? !".split()
    gen = torch.Generator().manual_seed(seed)
    corpus = tmp_path / "texts"
    corpus.mkdir()
    for i in range(8):
        (corpus / f"{i}.txt").write_text(" ".join(words[j] for j in torch.randint(0, len(words), (400,), generator=gen)))
    manifest = prepare_corpus([corpus], tmp_path / "data", tokenizer=hf_dir, progress=False)
    assert manifest.vocab_size == len(hf_tok)

    cfg = load_config("tiny", [f"train.data_dir={tmp_path / 'data'}", f"train.storage_path={tmp_path / 'runs'}",
                               "train.run_name=hf", "train.num_workers=1", "train.batch_size=2", "train.seq_len=32",
                               "train.max_steps=3", "train.checkpoint_every=3", "train.warmup_steps=1",
                               "train.lr=1e-3"])
    cfg, ckpt = start_from(cfg, str(hf_dir))
    assert cfg.model.attention == "gqa" and ckpt == str(as_moray_checkpoint(hf_dir))
    result = run_training(cfg, init_from=ckpt)
    assert result.error is None, result.error

    before, after = load_state_dict(ckpt), load_state_dict(result.model_checkpoint)
    assert before.keys() == after.keys()
    moved = max(float((after[k] - before[k]).abs().max()) for k in before)
    assert 0 < moved < 0.05, f"weights moved by {moved}: not a few small steps from the imported model"
    tok = Tokenizer.load(tokenizer_file(result.model_checkpoint))
    assert tok.eos_id == hf_tok.eos_token_id and tok.chat_template == CHAT_TEMPLATE
