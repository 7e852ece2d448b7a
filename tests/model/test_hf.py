"""Hugging Face DeepSeek-V2/V3 and Mixtral checkpoints in and out: moray computes what
`transformers` computes, exports round-trip exactly, and bad dirs fail with one clear line."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file  # noqa: E402

from cluster.cli import main  # noqa: E402
from model.checkpoint import load_config, load_state_dict, tokenizer_file  # noqa: E402
from model.hf import as_moray_checkpoint, export_hf, import_hf  # noqa: E402
from model.hf_config import HFFormatError  # noqa: E402
from model.tokenizer import Tokenizer  # noqa: E402
from model.transformer import Transformer  # noqa: E402
from serve.openai_api import ChatMessage, chat_prompt  # noqa: E402
from tests.hf_models import (CHAT_TEMPLATE, CONFIGS, build_hf_model, hf_greedy, hf_logits, hf_tokenizer,  # noqa: E402
                             moray_model, relative_error, save_hf_model, untied_inputs)

REL_TOL = 1e-4


@pytest.mark.parametrize("name", list(CONFIGS))
def test_import_and_export_equal_transformers(name, seed, tmp_path):
    from transformers import AutoModelForCausalLM

    hf = build_hf_model(name, seed)
    hf_dir = save_hf_model(hf, tmp_path / "hf")
    ckpt = import_hf(hf_dir, tmp_path / "moray", progress=False)
    tokens, ragged, logits, ours = untied_inputs(moray_model(ckpt), seed, (3, 13), cuts=(5, 9, 13), greedy_tokens=6)
    expected = hf_logits(hf, tokens)
    assert relative_error(logits, expected) <= REL_TOL, "imported logits differ from transformers'"
    assert ours == hf_greedy(hf, ragged, 6), "greedy generation differs from transformers'"

    exported = export_hf(ckpt, tmp_path / "export", max_shard_bytes=30_000, progress=False)
    assert len(list(exported.glob("*.safetensors"))) > 1
    reloaded = AutoModelForCausalLM.from_pretrained(exported).eval()
    assert type(reloaded) is type(hf)
    assert relative_error(hf_logits(reloaded, tokens), expected) <= REL_TOL, "transformers' load of the export differs"

    again = import_hf(exported, tmp_path / "again", progress=False)
    assert replace(load_config(again), name="hf") == load_config(ckpt)
    first, second = load_state_dict(ckpt), load_state_dict(again)
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), f"{key} changed in export + re-import"


def quantize_fp8(weight: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise e4m3 quantization the way DeepSeek-V3 ships weights: per tile max-abs / 448."""
    rows, cols = weight.shape
    n_r, n_c = -(-rows // block[0]), -(-cols // block[1])
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    scale_inv = torch.empty(n_r, n_c)
    for i in range(n_r):
        for j in range(n_c):
            tile = weight[i * block[0]:(i + 1) * block[0], j * block[1]:(j + 1) * block[1]]
            s = tile.abs().max().clamp(min=1e-12) / 448.0
            scale_inv[i, j] = s
            q[i * block[0]:(i + 1) * block[0], j * block[1]:(j + 1) * block[1]] = (tile / s).to(torch.float8_e4m3fn)
    return q, scale_inv


def test_fp8_block_weights_are_dequantized(seed, tmp_path):
    hf_dir = save_hf_model(build_hf_model("v3-grouped", seed), tmp_path / "hf", max_shard_size="10GB")
    block = (16, 12)  # 48x32, 12x32, ... weights end in partial tiles
    plain = load_file(hf_dir / "model.safetensors")
    quantized, dequantized = dict(plain), dict(plain)
    for name, weight in plain.items():
        if name.endswith("proj.weight") or name.endswith("proj_with_mqa.weight"):
            q, scale_inv = quantize_fp8(weight, block)
            quantized[name], quantized[name + "_scale_inv"] = q, scale_inv
            rows = torch.arange(q.shape[0])[:, None] // block[0]
            cols = torch.arange(q.shape[1])[None, :] // block[1]
            dequantized[name] = q.float() * scale_inv[rows, cols]
    name = "model.layers.2.mlp.experts.1.up_proj.weight"
    assert not torch.equal(dequantized[name], plain[name])  # fp8 rounding shows: the check below can fail
    shutil.copytree(hf_dir, tmp_path / "reference")
    save_file(dequantized, tmp_path / "reference" / "model.safetensors", metadata={"format": "pt"})
    save_file(quantized, hf_dir / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((hf_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": list(block)}
    (hf_dir / "config.json").write_text(json.dumps(config))

    exact = load_state_dict(import_hf(hf_dir, tmp_path / "fp32", dtype=torch.float32, progress=False))
    reference = load_state_dict(import_hf(tmp_path / "reference", tmp_path / "ref", progress=False))
    assert exact.keys() == reference.keys()
    for key in exact:
        assert torch.equal(exact[key], reference[key]), f"{key} is not the dequantized weight"
    default = load_state_dict(import_hf(hf_dir, tmp_path / "bf16", progress=False))
    assert default["layers.2.ffn.experts.w_gate_up"].dtype == torch.bfloat16
    assert torch.equal(default["layers.2.ffn.experts.w_gate_up"], reference["layers.2.ffn.experts.w_gate_up"].bfloat16())
    assert default["norm.weight"].dtype == torch.float32  # only fp8 tensors change dtype


def test_tokenizer_and_chat_template_travel_with_the_checkpoint(seed, tmp_path):
    from transformers import AutoTokenizer

    hf_tok = hf_tokenizer(CHAT_TEMPLATE)
    hf_dir = save_hf_model(build_hf_model("mixtral-gqa", seed), tmp_path / "hf")
    hf_tok.save_pretrained(hf_dir)
    ckpt = import_hf(hf_dir, tmp_path / "moray", progress=False)
    tok = Tokenizer.load(tokenizer_file(ckpt))
    assert (tok.bos_id, tok.eos_id) == (hf_tok.bos_token_id, hf_tok.eos_token_id)

    messages = [{"role": "system", "content": "moray is a fish"}, {"role": "user", "content": "hello world !"}]
    text = chat_prompt([ChatMessage(**m) for m in messages], tok)
    assert text == hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tok.encode(text) == hf_tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(tok.encode("what is a fish ?")) == hf_tok.decode(hf_tok.encode("what is a fish ?"),
                                                                       skip_special_tokens=True)

    exported = export_hf(ckpt, tmp_path / "export", progress=False)
    again = AutoTokenizer.from_pretrained(exported)
    assert again.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == text
    assert again(text, add_special_tokens=False)["input_ids"] == tok.encode(text)


def test_hf_dir_is_converted_once_into_the_cache(seed, tmp_path, monkeypatch):
    monkeypatch.setenv("MORAY_HF_CACHE", str(tmp_path / "cache"))
    hf_dir = save_hf_model(build_hf_model("v2-grouped", seed), tmp_path / "hf")
    first = as_moray_checkpoint(hf_dir, progress=False)
    assert first.parent == tmp_path / "cache" and load_config(first).moe.n_group == 4
    stamp = (first / "moray.json").stat().st_mtime_ns
    assert as_moray_checkpoint(hf_dir, progress=False) == first
    assert (first / "moray.json").stat().st_mtime_ns == stamp, "converted again though nothing changed"
    assert as_moray_checkpoint(first) == first  # a moray checkpoint is taken as it is


def broken(hf_dir: Path, how: str) -> str:
    """Break a saved HF dir one way; returns what the error must mention."""
    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())
    if how == "architecture":
        config = json.loads((hf_dir / "config.json").read_text())
        config["model_type"] = "llama"
        (hf_dir / "config.json").write_text(json.dumps(config))
        return "config.json: field 'model_type' = 'llama' is not supported"
    if how == "field":
        config = json.loads((hf_dir / "config.json").read_text())
        config["hidden_act"] = "gelu"
        (hf_dir / "config.json").write_text(json.dumps(config))
        return "config.json: field 'hidden_act' = 'gelu'"
    name = "model.layers.1.mlp.experts.3.up_proj.weight"
    shard = index["weight_map"][name]
    if how == "missing shard":
        (hf_dir / shard).unlink()
        return f"shard {shard} is missing"
    tensors = load_file(hf_dir / shard)
    tensors[name] = tensors[name][:, :-1].contiguous()
    save_file(tensors, hf_dir / shard, metadata={"format": "pt"})
    return f"{shard}: tensor {name} has shape [16, 31], expected [16, 32]"


@pytest.mark.parametrize("how", ["architecture", "field", "missing shard", "shape"])
def test_bad_hf_dirs_fail_with_one_line_and_write_nothing(how, seed, tmp_path, capsys):
    hf_dir = save_hf_model(build_hf_model("v3-grouped", seed), tmp_path / "hf")
    message = broken(hf_dir, how)
    with pytest.raises(HFFormatError, match=message.replace("[", r"\[").replace("]", r"\]")):
        import_hf(hf_dir, tmp_path / "out", progress=False)
    capsys.readouterr()
    assert main(["checkpoint", "import-hf", str(hf_dir), str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"], "something was left behind"


def test_export_refuses_a_model_transformers_cannot_express(tmp_path, capsys):
    from tests.conftest import tiny_config
    from model.checkpoint import save_checkpoint

    # softmax scores with a selection bias: no transformers class does that
    cfg = tiny_config("tiny", "model.moe.score_func=softmax", "model.moe.group_score=max")
    ckpt = save_checkpoint(tmp_path / "ckpt", cfg, Transformer(cfg).state_dict())
    assert main(["checkpoint", "export-hf", str(ckpt), str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot export tiny as DeepseekV2ForCausalLM: model.moe.norm_topk_prob" in err
    assert not (tmp_path / "out").exists()
    shutil.rmtree(ckpt)


def test_deepseek_v3_mtp_layers_become_moray_mtp_modules(seed, tmp_path):
    hf = build_hf_model("v3-grouped", seed)
    hf_dir = save_hf_model(hf, tmp_path / "hf", max_shard_size="10GB")
    tensors = load_file(hf_dir / "model.safetensors")
    gen = torch.Generator().manual_seed(seed)
    n = hf.config.num_hidden_layers
    # DeepSeek-V3's release: the MTP module is layer n, a decoder layer plus its own norms and projection
    for name in [k for k in tensors if k.startswith(f"model.layers.{n - 1}.")]:
        tensors[name.replace(f"layers.{n - 1}.", f"layers.{n}.")] = torch.randn(tensors[name].shape, generator=gen)
    dim = hf.config.hidden_size
    extra = {"enorm.weight": (dim,), "hnorm.weight": (dim,), "eh_proj.weight": (dim, 2 * dim),
             "shared_head.norm.weight": (dim,)}
    for part, shape in extra.items():
        tensors[f"model.layers.{n}.{part}"] = torch.randn(shape, generator=gen)
    tensors[f"model.layers.{n}.embed_tokens.weight"] = tensors["model.embed_tokens.weight"].clone()
    tensors[f"model.layers.{n}.shared_head.head.weight"] = tensors["lm_head.weight"].clone()
    save_file(tensors, hf_dir / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((hf_dir / "config.json").read_text())
    config["num_nextn_predict_layers"] = 1
    (hf_dir / "config.json").write_text(json.dumps(config))

    ckpt = import_hf(hf_dir, tmp_path / "moray", progress=False)
    assert load_config(ckpt).mtp_depth == 1
    state = load_state_dict(ckpt)
    eh_proj = tensors[f"model.layers.{n}.eh_proj.weight"]
    # DeepSeek projects [embedding, hidden]; moray [hidden, embedding]
    assert torch.equal(state["mtp.0.proj.weight"], torch.cat([eh_proj[:, dim:], eh_proj[:, :dim]], dim=1))
    assert torch.equal(state["mtp.0.hidden_norm.weight"], tensors[f"model.layers.{n}.hnorm.weight"])
    assert torch.equal(state["mtp.0.block.ffn.experts.w_down"][5],
                       tensors[f"model.layers.{n}.mlp.experts.5.down_proj.weight"].t())
    tokens, _, logits, _ = untied_inputs(moray_model(ckpt), seed, (3, 13))
    assert relative_error(logits, hf_logits(hf, tokens)) <= REL_TOL
    with torch.no_grad():
        assert moray_model(ckpt).loss(tokens[:, :-1], tokens[:, 1:]).mtp is not None

    exported = export_hf(ckpt, tmp_path / "export", progress=False)
    out = {}
    for file in exported.glob("*.safetensors"):
        out.update(load_file(file))
    assert out.keys() == tensors.keys()
    for key in tensors:
        assert torch.equal(out[key], tensors[key]), f"{key} differs after import + export"
