"""`model info`: the published sizes of the large presets, computed from the real module tree."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cluster.config import load_config
from model.info import model_info

# (total, activated per token) as published: DeepSeek-V3 and -V2 papers, Mixtral paper
PUBLISHED = {
    "deepseek-v3": (671e9, 37e9),
    "deepseek-v2-lite": (15.7e9, 2.4e9),
    "mixtral-8x7b": (46.7e9, 12.9e9),
}


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_large_presets_match_published_counts(preset):
    info = model_info(load_config(preset).model)
    total, activated = PUBLISHED[preset]
    assert abs(info.total_params - total) / total < 0.005
    # papers round activated counts and differ on whether embeddings count; 3% covers both
    assert abs(info.activated_params - activated) / activated < 0.03


def test_deepseek_v3_mtp_and_kv_cache():
    info = model_info(load_config("deepseek-v3").model)
    # the paper's 14B MTP module includes the embedding and head it shares with the main model
    assert 13e9 < info.mtp_params + info.embedding_params < 14.5e9
    # MLA caches 512 latent + 64 rotary-key numbers per layer per token
    assert info.kv_cache_bytes_per_token == 61 * (512 + 64) * 2
    assert sum(layer.kind == "dense" for layer in info.layers) == 3


def test_mixtral_kv_cache_is_gqa():
    info = model_info(load_config("mixtral-8x7b").model)
    assert info.kv_cache_bytes_per_token == 32 * 2 * 8 * 128 * 2


def test_cli_model_info_json_and_table():
    out = subprocess.run([sys.executable, "-m", "cluster.cli", "model", "info", "deepseek-v2-lite", "--json"],
                         capture_output=True, text=True, check=True).stdout
    data = json.loads(out)
    assert data["name"] == "deepseek-v2-lite" and len(data["layers"]) == 27
    table = subprocess.run([sys.executable, "-m", "cluster.cli", "model", "info", "tiny"],
                           capture_output=True, text=True, check=True).stdout
    assert "activated per token" in table and "KV cache per token" in table
