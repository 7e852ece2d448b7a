"""Checkpoints as format version 1 wrote them, for the tests that check this moray still reads them."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from model.checkpoint import EXPERTS_FILE, MANIFEST_FILE, WEIGHTS_FILE


def rewrite_as_format_1(path: Path) -> None:
    """Rewrite a checkpoint as format version 1 wrote it: each FFN's gate and up weights apart."""
    for file in (WEIGHTS_FILE, EXPERTS_FILE):
        state = load_file(path / file)
        for name in [n for n in state if ".w_gate_up" in n]:
            gate, up = state.pop(name).chunk(2, dim=-1 if ".experts." in name else 0)
            state[name.replace(".w_gate_up", ".w_gate")] = gate.contiguous()
            state[name.replace(".w_gate_up", ".w_up")] = up.contiguous()
        save_file(state, path / file)
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    (path / MANIFEST_FILE).write_text(json.dumps({**manifest, "version": 1}))
