"""`manifests/serve/*.yaml` are valid Serve deploy configs whose import paths and args build."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from serve.app import AppArgs

MANIFESTS = sorted((Path(__file__).resolve().parents[2] / "manifests" / "serve").glob("*.yaml"))


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_serve_config_validates_and_names_real_code(path):
    config = ServeDeploySchema.parse_obj(yaml.safe_load(path.read_text()))
    for app in config.applications:
        module, attr = app.import_path.split(":")
        assert callable(getattr(importlib.import_module(module), attr))
        AppArgs(**app.args)  # every arg is one build_app knows


def test_broken_configs_are_rejected():
    data = yaml.safe_load(MANIFESTS[0].read_text())
    del data["applications"][0]["import_path"]
    with pytest.raises(Exception, match="import_path"):
        ServeDeploySchema.parse_obj(data)
    with pytest.raises(TypeError, match="num_shard"):
        AppArgs(checkpoint="/x", num_shard=2)  # a misspelled build_app arg
    with pytest.raises(ValueError, match="cuda_graphs must be one of all, router, none, got 'off'"):
        AppArgs(checkpoint="/x", cuda_graphs="off")
