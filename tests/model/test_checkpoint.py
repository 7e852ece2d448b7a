"""Checkpoint format: exact round trip, expert slices without the dense file, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from model.checkpoint import (
    EXPERTS_FILE,
    MANIFEST_FILE,
    TOKENIZER_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    load_config,
    load_expert_slice,
    load_into,
    load_non_expert_state_dict,
    load_state_dict,
    save_checkpoint,
    tokenizer_file,
)
from model.config import MoEConfig, ModelConfig
from tests.format_1 import rewrite_as_format_1

N_EXPERTS = 8
DIM = 16
INTER = 12
VOCAB = 64

EXPERT_NAMES = [
    "layers.1.ffn.experts.w_gate_up",
    "layers.1.ffn.experts.w_down",
    "mtp.0.block.ffn.experts.w_gate_up",
]


def small_config() -> ModelConfig:
    return ModelConfig(name="tiny", vocab_size=VOCAB, dim=DIM, n_layers=2, n_dense_layers=1, inter_dim=32,
                       n_heads=2, moe=MoEConfig(n_routed_experts=N_EXPERTS, top_k=2, moe_inter_dim=INTER),
                       mtp_depth=1)


def small_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(VOCAB, DIM, generator=g),
        "layers.0.attn.wq.weight": torch.randn(DIM, DIM, generator=g),
        "layers.0.attn_norm.weight": torch.ones(DIM),
        "layers.1.ffn.gate.weight": torch.randn(N_EXPERTS, DIM, generator=g),
        "layers.1.ffn.gate.bias": torch.zeros(N_EXPERTS),
        "layers.1.ffn.shared_experts.w1.weight": torch.randn(INTER, DIM, generator=g).to(torch.bfloat16),
        "layers.1.ffn.tokens_per_expert": torch.arange(N_EXPERTS, dtype=torch.int64),
        "layers.1.ffn.experts.w_gate_up": torch.randn(N_EXPERTS, DIM, 2 * INTER, generator=g),
        "layers.1.ffn.experts.w_down": torch.randn(N_EXPERTS, INTER, DIM, generator=g),
        "mtp.0.block.ffn.experts.w_gate_up": torch.randn(N_EXPERTS, DIM, 2 * INTER, generator=g),
        "head.weight": torch.randn(VOCAB, DIM, generator=g),
    }


class TinyWithExperts(nn.Module):
    """A module whose names follow the model's: `experts.w_gate_up` is a stacked routed-expert tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.experts = nn.Module()
        self.experts.w_gate_up = nn.Parameter(torch.zeros(N_EXPERTS, DIM, 2 * INTER))


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, ModelConfig, dict[str, torch.Tensor]]:
    cfg, state = small_config(), small_state_dict()
    return save_checkpoint(tmp_path / "ckpt", cfg, state), cfg, state


def test_round_trip_is_exact(saved, tmp_path: Path) -> None:
    path, cfg, state = saved
    assert sorted(p.name for p in path.iterdir()) == sorted(
        ["config.yaml", MANIFEST_FILE, WEIGHTS_FILE, EXPERTS_FILE])
    assert load_config(path) == cfg
    loaded = load_state_dict(path)
    assert loaded.keys() == state.keys()
    for name, tensor in state.items():
        assert loaded[name].dtype == tensor.dtype, name
        assert torch.equal(loaded[name], tensor), name
    assert tokenizer_file(path) is None
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temp dirs left behind"


def test_dense_file_holds_no_experts(saved) -> None:
    path, _, state = saved
    dense = load_non_expert_state_dict(path)
    assert set(dense) == {name for name in state if ".experts." not in name}
    assert "layers.1.ffn.shared_experts.w1.weight" in dense


def test_load_casts_floating_tensors_only(saved) -> None:
    path, _, _ = saved
    loaded = load_state_dict(path, dtype=torch.float16)
    assert loaded["embed.weight"].dtype == torch.float16
    assert loaded["layers.1.ffn.tokens_per_expert"].dtype == torch.int64


@pytest.mark.parametrize("ids", [[2, 3, 4], [5, 1, 6], [7], []])
def test_expert_slice_without_dense_file(saved, ids: list[int]) -> None:
    path, _, state = saved
    (path / WEIGHTS_FILE).unlink()  # the slice loader must not need it
    part = load_expert_slice(path, ids)
    assert sorted(part) == sorted(EXPERT_NAMES)
    for name, tensor in part.items():
        assert tensor.shape == (len(ids), *state[name].shape[1:]), name
        assert torch.equal(tensor, state[name][ids]), name


def test_expert_slice_out_of_range_names_tensor_and_range(saved) -> None:
    path, _, _ = saved
    with pytest.raises(CheckpointError, match=r"expert id 8 .*layers\.1\.ffn\.experts\.\w+.*0\.\.7"):
        load_expert_slice(path, [0, 8])
    with pytest.raises(CheckpointError, match=r"expert id -1"):
        load_expert_slice(path, [-1])


def test_tokenizer_is_copied(tmp_path: Path) -> None:
    source = tmp_path / "tok.json"
    source.write_text('{"model": {"type": "BPE"}}')
    path = save_checkpoint(tmp_path / "ckpt", small_config(), small_state_dict(), tokenizer_file=source)
    assert tokenizer_file(path) == path / TOKENIZER_FILE
    assert (path / TOKENIZER_FILE).read_text() == source.read_text()
    assert TOKENIZER_FILE in json.loads((path / MANIFEST_FILE).read_text())["files"]


def test_save_replaces_existing_checkpoint(tmp_path: Path) -> None:
    source = tmp_path / "tok.json"
    source.write_text("{}")
    path = save_checkpoint(tmp_path / "ckpt", small_config(), small_state_dict(0), tokenizer_file=source)
    new_state = small_state_dict(1)
    del new_state["head.weight"]
    save_checkpoint(path, small_config(), new_state)
    loaded = load_state_dict(path)
    assert loaded.keys() == new_state.keys()
    assert all(torch.equal(loaded[n], t) for n, t in new_state.items())
    assert tokenizer_file(path) is None and not (path / TOKENIZER_FILE).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "tok.json"]


def test_save_refuses_to_overwrite_unrelated_dir(tmp_path: Path) -> None:
    target = tmp_path / "notes"
    target.mkdir()
    (target / "keep.txt").write_text("precious")
    with pytest.raises(CheckpointError, match="refusing to overwrite"):
        save_checkpoint(target, small_config(), small_state_dict())
    assert (target / "keep.txt").read_text() == "precious"


def test_save_rejects_expert_tensor_of_wrong_expert_count(tmp_path: Path) -> None:
    state = small_state_dict()
    state["layers.1.ffn.experts.w_down"] = torch.zeros(N_EXPERTS - 1, INTER, DIM)
    with pytest.raises(CheckpointError, match=r"layers\.1\.ffn\.experts\.w_down.*\[7, 12, 16\]"):
        save_checkpoint(tmp_path / "ckpt", small_config(), state)
    assert not (tmp_path / "ckpt").exists()


def test_save_unties_shared_storage(tmp_path: Path) -> None:
    state = small_state_dict()
    state["head.weight"] = state["embed.weight"]  # tied embeddings alias one tensor
    path = save_checkpoint(tmp_path / "ckpt", small_config(), state)
    loaded = load_state_dict(path)
    assert torch.equal(loaded["head.weight"], loaded["embed.weight"])


def test_wrong_dir_is_not_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_config(tmp_path / "nowhere")
    (tmp_path / "random").mkdir()
    with pytest.raises(CheckpointError, match=r"random is not a moray checkpoint.*moray\.json"):
        load_state_dict(tmp_path / "random")


def test_missing_file_is_named(saved) -> None:
    path, _, _ = saved
    (path / EXPERTS_FILE).unlink()
    with pytest.raises(CheckpointError, match=r"lacks file experts\.safetensors"):
        load_expert_slice(path, [0])


def test_bad_config_key_is_named(saved) -> None:
    path, _, _ = saved
    config = path / "config.yaml"
    config.write_text(config.read_text().replace("top_k:", "topk:"))
    with pytest.raises(CheckpointError, match=r"config\.yaml.*moe\.topk"):
        load_config(path)


def test_invalid_config_value_is_named(saved) -> None:
    path, _, _ = saved
    config = path / "config.yaml"
    config.write_text(config.read_text().replace("attention: mla", "attention: rnn"))
    with pytest.raises(CheckpointError, match=r"config\.yaml.*model\.attention"):
        load_config(path)


def test_truncated_file_is_named(saved) -> None:
    path, _, _ = saved
    weights = path / WEIGHTS_FILE
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        load_state_dict(path)
    experts = path / EXPERTS_FILE
    experts.write_bytes(experts.read_bytes()[:5])
    with pytest.raises(CheckpointError, match=r"experts\.safetensors"):
        load_expert_slice(path, [0])


def test_load_into_module(tmp_path: Path) -> None:
    source = TinyWithExperts()
    nn.init.normal_(source.experts.w_gate_up)
    path = save_checkpoint(tmp_path / "ckpt", small_config(), source.state_dict())
    target = TinyWithExperts().to(torch.bfloat16)
    load_into(target, path)
    assert target.experts.w_gate_up.dtype == torch.bfloat16
    assert torch.equal(target.experts.w_gate_up, source.experts.w_gate_up.detach().to(torch.bfloat16))
    assert torch.equal(target.embed.weight, source.embed.weight.detach().to(torch.bfloat16))


def test_load_into_missing_tensor(tmp_path: Path) -> None:
    state = TinyWithExperts().state_dict()
    del state["embed.weight"]
    path = save_checkpoint(tmp_path / "ckpt", small_config(), state)
    with pytest.raises(CheckpointError, match=rf"checkpoint {path} lacks tensor embed\.weight"):
        load_into(TinyWithExperts(), path)


def test_load_into_unexpected_tensor(tmp_path: Path) -> None:
    state = TinyWithExperts().state_dict()
    state["extra.weight"] = torch.zeros(3)
    path = save_checkpoint(tmp_path / "ckpt", small_config(), state)
    with pytest.raises(CheckpointError, match=r"unexpected tensor extra\.weight"):
        load_into(TinyWithExperts(), path)
    model = TinyWithExperts()
    load_into(model, path, strict=False)
    assert torch.equal(model.embed.weight, state["embed.weight"])


def test_load_into_shape_mismatch(tmp_path: Path) -> None:
    state = TinyWithExperts().state_dict()
    state["embed.weight"] = torch.zeros(VOCAB + 1, DIM)
    path = save_checkpoint(tmp_path / "ckpt", small_config(), state)
    with pytest.raises(CheckpointError, match=r"embed\.weight has shape \[65, 16\], expected \[64, 16\]"):
        load_into(TinyWithExperts(), path)


@pytest.mark.parametrize("tie_embeddings", [False, True])
def test_transformer_round_trip(tmp_path: Path, tie_embeddings: bool) -> None:
    from model.transformer import Transformer  # imported here: one model bug fails one test

    cfg = ModelConfig(mtp_depth=1, tie_embeddings=tie_embeddings)
    torch.manual_seed(0)
    source = Transformer(cfg)
    with torch.no_grad():  # make buffers (expert bias) differ from a fresh model's too
        for tensor in source.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(torch.randn_like(tensor))
    path = save_checkpoint(tmp_path / "ckpt", cfg, source.state_dict())
    assert load_config(path) == cfg
    torch.manual_seed(1)
    target = Transformer(load_config(path))
    load_into(target, path)
    expected = source.state_dict()
    loaded = target.state_dict()
    assert loaded.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(loaded[name], tensor), name
    assert load_expert_slice(path, [3]).keys() == {n for n in expected if ".experts." in n}


def test_version_1_checkpoint_reads_as_this_version(tmp_path: Path) -> None:
    """Checkpoints written before the gate and up weights were joined still load, every way a
    consumer reads them (the whole model, the router's dense part, a shard's expert slice), to
    a model that computes what the saved one did; exporting one fails with a clear message."""
    from model.hf import export_hf
    from model.transformer import Transformer

    cfg = ModelConfig(mtp_depth=1)
    torch.manual_seed(0)
    source = Transformer(cfg)
    path = save_checkpoint(tmp_path / "ckpt", cfg, source.state_dict())
    rewrite_as_format_1(path)
    assert "layers.1.ffn.experts.w_up" in load_file(path / EXPERTS_FILE)
    target = Transformer(cfg, init=False)
    load_into(target, path)
    for name, tensor in source.state_dict().items():
        assert torch.equal(target.state_dict()[name], tensor), name
    tokens = torch.randint(0, cfg.vocab_size, (2, 9))
    assert torch.equal(target(tokens)[0], source(tokens)[0])
    dense = load_non_expert_state_dict(path)
    assert torch.equal(dense["layers.0.ffn.w_gate_up.weight"], source.layers[0].ffn.w_gate_up.weight)
    experts = load_expert_slice(path, [5, 2], prefix="layers.1.")
    assert torch.equal(experts["layers.1.ffn.experts.w_gate_up"], source.layers[1].ffn.experts.w_gate_up[[5, 2]])
    with pytest.raises(CheckpointError, match=r"format version 1: export needs version 2"):
        export_hf(path, tmp_path / "hf", progress=False)


def test_unknown_format_version_is_named(saved) -> None:
    path = saved[0]
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    (path / MANIFEST_FILE).write_text(json.dumps({**manifest, "version": 7}))
    with pytest.raises(CheckpointError, match=r"format version 7 is not supported \(this moray reads versions 1, 2\)"):
        load_state_dict(path)
