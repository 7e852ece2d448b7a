"""A `tiny` checkpoint that serves text: its tokenizer learned from the standard library's json
package (small and always there), saved alongside, so a Serve app can take prompts as strings."""

from __future__ import annotations

import sysconfig
from pathlib import Path

from model.checkpoint import save_checkpoint
from model.transformer import Transformer
from tests.conftest import build_model, tiny_config
from train.data import prepare_corpus


def json_tiny_checkpoint(root: Path, seed: int) -> tuple[Path, Transformer, Path]:
    """(checkpoint directory, the model saved there, its tokenizer file)."""
    json_package = Path(sysconfig.get_paths()["stdlib"]) / "json"
    manifest = prepare_corpus([json_package], root / "corpus", vocab_size=512, progress=False)
    cfg = tiny_config("tiny", "model.vocab_size=512")
    model = build_model(cfg, seed=seed)
    ckpt = save_checkpoint(root / "ckpt", cfg, model.state_dict(), tokenizer_file=manifest.tokenizer_path)
    return ckpt, model, manifest.tokenizer_path
