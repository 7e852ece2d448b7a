"""Config loading: presets, overrides, and one clear line naming the key for every kind of mistake."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from cluster.config import load_config, preset_names
from model.config import ConfigError


def test_every_preset_loads_and_validates():
    names = preset_names()
    assert {"tiny", "small", "deepseek-v3", "deepseek-v2-lite", "mixtral-8x7b"} <= set(names)
    for name in names:
        assert load_config(name).model.name == name


def test_dotlist_overrides_apply_with_types():
    cfg = load_config("tiny", ["train.max_steps=7", "model.moe.top_k=3", "model.moe.score_func=softmax"])
    assert cfg.train.max_steps == 7 and cfg.model.moe.top_k == 3 and cfg.model.moe.score_func == "softmax"


def test_yaml_file_path_loads(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("model:\n  name: mine\n  dim: 64\n")
    cfg = load_config(str(path))
    assert cfg.model.dim == 64 and cfg.model.name == "mine"


@pytest.mark.parametrize("overrides, key", [
    (["model.moe.topk=3"], "moe.topk"),
    (["train.max_step=3"], "max_step"),
    (["model.dim=wide"], "model.dim"),
    (["model.moe.top_k=99"], "model.moe.top_k"),
    (["model.moe.n_group=3"], "model.moe.n_group"),
    (["model.attention=flash"], "model.attention"),
    (["model.attention=gqa", "model.n_kv_heads=3"], "model.n_kv_heads"),
    (["model.n_dense_layers=9"], "model.n_dense_layers"),
    (["model.moe.score_func=relu"], "model.moe.score_func"),
    (["model.moe.expert_chunks=0"], "model.moe.expert_chunks"),
    (["train.cuda_graphs=true"], "train.cuda_graphs"),
])
def test_mistakes_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        load_config("tiny", overrides)
    message = str(err.value)
    assert key in message and "\n" not in message


def test_unknown_preset_and_missing_file_and_bad_override():
    with pytest.raises(ConfigError, match="unknown preset 'tinyy'.*tiny"):
        load_config("tinyy")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("nowhere/cfg.yaml")
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config("tiny", ["model.dim"])


def test_unknown_key_in_a_yaml_file_names_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  moe:\n    n_experts: 4\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*n_experts"):
        load_config(str(path))


def test_cli_config_error_is_one_line_and_exit_code_2():
    proc = subprocess.run([sys.executable, "-m", "cluster.cli", "model", "info", "tiny", "model.moe.top_k=99"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "model.moe.top_k" in proc.stderr


def test_elastic_settings_are_checked_in_either_form():
    """`cluster.elastic` in a full config and as `moray serve` overrides: one schema, same checks."""
    from cluster.config import load_cluster_config

    assert load_config("tiny", ["cluster.elastic.rebalance=true"]).cluster.elastic.rebalance
    elastic = load_cluster_config(["cluster.elastic.threshold=1.2", "cluster.elastic.redundant_experts=4"]).elastic
    assert (elastic.threshold, elastic.redundant_experts, elastic.failover) == (1.2, 4, True)
    for overrides, key in ((["cluster.elastic.threshold=0.9"], "cluster.elastic.threshold"),
                           (["cluster.elastic.treshold=2"], "treshold"),
                           (["cluster.elastic.stuck_step_s=-1"], "cluster.elastic.stuck_step_s"),
                           (["cluster.elastic.standby_shards=-1"], "cluster.elastic.standby_shards"),
                           (["model.dim=3"], "expected cluster.<key>=value")):
        with pytest.raises(ConfigError, match=re.escape(key)):
            load_cluster_config(overrides)
    with pytest.raises(ConfigError, match="cluster.elastic.min_shards"):
        load_config("tiny", ["cluster.elastic.min_shards=9", "cluster.elastic.max_shards=2"])
