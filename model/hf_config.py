"""Hugging Face `config.json` of DeepSeek-V2, DeepSeek-V3 and Mixtral <-> moray's ModelConfig.

The mapping follows what `transformers`' own modeling code computes, field by field, so an
imported model gives transformers' logits:

- DeepSeek-V2: softmax scores; `topk_method` greedy (one group) or group_limited_greedy (groups
  scored by their best expert); transformers' V2 router never renormalizes the top-k weights,
  whatever `norm_topk_prob` says; rope pairs are interleaved.
- DeepSeek-V3: sigmoid scores plus `e_score_correction_bias` for selection only (moray's
  `expert_bias`), groups scored by their two best experts, `norm_topk_prob`, interleaved rope
  unless `rope_interleave` is false.
- Mixtral: softmax over all experts, top-k, renormalized; GQA with half-split rope pairs.
- YaRN: frequencies interpolated past `original_max_position_embeddings`, softmax scale times
  mscale(factor, mscale_all_dim)^2; supported where the cos/sin attention factor is 1
  (mscale == mscale_all_dim, as DeepSeek's releases ship).

Anything else a config asks for (another architecture, activation, bias, sliding window, rope
type) is refused with one line naming the field, rather than imported into a different model.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model.checkpoint import CheckpointError
from model.config import ConfigError, ModelConfig, MoEConfig, check_model_config

log = logging.getLogger(__name__)

ARCHITECTURES = {"deepseek_v2": "DeepseekV2ForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM",
                 "mixtral": "MixtralForCausalLM"}
HF_CONFIG_FILE = "config.json"


class HFFormatError(CheckpointError):
    """A Hugging Face model dir cannot be converted; the message names the file and field or tensor."""


@dataclass(frozen=True)
class HFModel:
    """What the weight mapping needs to know beyond the ModelConfig."""

    arch: str  # a key of ARCHITECTURES
    cfg: ModelConfig  # mtp_depth 0: the MTP layers become moray's MTP modules only if their weights are there
    fp8_block: tuple[int, int] | None  # block size of FP8 weights with *_scale_inv tensors
    mtp_layers: int  # DeepSeek-V3's num_nextn_predict_layers


def read_hf_config(hf_dir: Path) -> dict[str, Any]:
    file = Path(hf_dir) / HF_CONFIG_FILE
    if not Path(hf_dir).is_dir():
        raise HFFormatError(f"{hf_dir}: no such directory")
    if not file.is_file():
        raise HFFormatError(f"{hf_dir}: no {HF_CONFIG_FILE}; not a Hugging Face model directory")
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HFFormatError(f"{file}: cannot parse: {exc}") from None
    if not isinstance(data, dict):
        raise HFFormatError(f"{file}: expected a JSON object")
    return data


def is_hf_dir(path: str | Path) -> bool:
    """A directory with a transformers config.json (and no moray manifest)."""
    p = Path(path)
    return (p / HF_CONFIG_FILE).is_file() and not (p / "moray.json").is_file()


class _Fields:
    """Reads config.json fields, naming the file and field in every complaint."""

    def __init__(self, data: dict[str, Any], file: Path):
        self.data, self.file = data, file

    def get(self, key: str, default: Any = None) -> Any:
        value = self.data.get(key)
        return default if value is None else value

    def require(self, key: str, default: Any = None) -> Any:
        value = self.get(key, default)
        if value is None:
            raise HFFormatError(f"{self.file}: field {key!r} is missing")
        return value

    def refuse(self, key: str, value: Any, why: str) -> None:
        raise HFFormatError(f"{self.file}: field {key!r} = {value!r} is not supported ({why})")

    def only(self, key: str, allowed: tuple, default: Any = None) -> Any:
        value = self.get(key, default)
        if value not in allowed:
            self.refuse(key, value, f"moray supports {', '.join(map(repr, allowed))}")
        return value


def _rope_fields(f: _Fields, default_theta: float) -> dict[str, Any]:
    """rope_theta and YaRN settings, from transformers 5's `rope_parameters` or the older
    top-level `rope_theta` + `rope_scaling` that released checkpoints carry."""
    params = f.get("rope_parameters") or f.get("rope_scaling") or {}
    if not isinstance(params, dict):
        f.refuse("rope_parameters", params, "expected one set of rope parameters")
    theta = float(params.get("rope_theta") or f.get("rope_theta", default_theta))
    kind = params.get("rope_type", params.get("type", "default"))
    out: dict[str, Any] = {"rope_theta": theta}
    if kind == "default":
        return out
    if kind != "yarn":
        f.refuse("rope_scaling.type", kind, "moray implements default rope and yarn")
    factor = float(params["factor"])
    original = int(params.get("original_max_position_embeddings") or f.require("max_position_embeddings"))
    mscale, mscale_all = params.get("mscale"), params.get("mscale_all_dim")
    if params.get("attention_factor") not in (None, 1, 1.0) or not (mscale and mscale_all and mscale == mscale_all):
        f.refuse("rope_scaling.mscale", mscale,
                 "yarn's cos/sin attention factor must be 1: give mscale equal to mscale_all_dim")
    if params.get("truncate", True) is not True:
        f.refuse("rope_scaling.truncate", params["truncate"], "moray truncates the yarn correction range")
    if int(f.require("max_position_embeddings")) <= original:
        f.refuse("max_position_embeddings", f.get("max_position_embeddings"),
                 f"yarn needs it above original_max_position_embeddings ({original})")
    out.update(rope_factor=factor, original_seq_len=original, beta_fast=int(params.get("beta_fast") or 32),
               beta_slow=int(params.get("beta_slow") or 1), mscale=float(mscale_all))
    return out


def _common(f: _Fields) -> None:
    f.only("hidden_act", ("silu",), "silu")
    if f.get("attention_bias", False):
        f.refuse("attention_bias", True, "moray's attention projections have no bias")
    if f.get("mlp_bias", False):
        f.refuse("mlp_bias", True, "moray's FFNs have no bias")


def _deepseek(f: _Fields, arch: str, name: str) -> ModelConfig:
    _common(f)
    v3 = arch == "deepseek_v3"
    f.only("moe_layer_freq", (1,), 1)
    if v3:
        f.only("scoring_func", ("sigmoid",), "sigmoid")
        f.only("topk_method", ("noaux_tc",), "noaux_tc")
        n_group, topk_group = int(f.get("n_group", 1)), int(f.get("topk_group", 1))
        norm_topk = bool(f.get("norm_topk_prob", True))
    else:
        f.only("scoring_func", ("softmax",), "softmax")
        method = f.only("topk_method", ("greedy", "group_limited_greedy"), "greedy")
        grouped = method == "group_limited_greedy"
        n_group = int(f.require("n_group")) if grouped else 1
        topk_group = int(f.require("topk_group")) if grouped else 1
        if f.get("norm_topk_prob", False):
            log.warning("%s: norm_topk_prob is true, but transformers' DeepseekV2 router never renormalizes; "
                        "imported as transformers computes it", f.file)
        norm_topk = False
    top_k = int(f.require("num_experts_per_tok"))
    if norm_topk and top_k == 1:
        f.refuse("num_experts_per_tok", 1, "a single renormalized expert weight is not supported")
    moe = MoEConfig(
        n_routed_experts=int(f.require("n_routed_experts")), n_shared_experts=int(f.get("n_shared_experts", 0)),
        top_k=top_k, moe_inter_dim=int(f.require("moe_intermediate_size")),
        score_func="sigmoid" if v3 else "softmax", n_group=n_group, topk_group=topk_group,
        group_score="top2_sum" if v3 else "max", norm_topk_prob=norm_topk,
        routed_scaling_factor=float(f.get("routed_scaling_factor", 1.0)), bias_balancing=v3,
        aux_loss_alpha=float(f.get("aux_loss_alpha", 0.0)))
    q_lora = f.get("q_lora_rank", 0)
    return ModelConfig(
        name=name, vocab_size=int(f.require("vocab_size")), dim=int(f.require("hidden_size")),
        n_layers=int(f.require("num_hidden_layers")), n_dense_layers=int(f.get("first_k_dense_replace", 0)),
        inter_dim=int(f.require("intermediate_size")), n_heads=int(f.require("num_attention_heads")),
        max_seq_len=int(f.require("max_position_embeddings")), norm_eps=float(f.get("rms_norm_eps", 1e-6)),
        attention="mla", q_lora_rank=int(q_lora), kv_lora_rank=int(f.require("kv_lora_rank")),
        qk_nope_head_dim=int(f.require("qk_nope_head_dim")), qk_rope_head_dim=int(f.require("qk_rope_head_dim")),
        v_head_dim=int(f.require("v_head_dim")),
        rope_interleaved=bool(f.get("rope_interleave", True)) if v3 else True,
        moe=moe, tie_embeddings=bool(f.get("tie_word_embeddings", False)), **_rope_fields(f, 10000.0))


def _mixtral(f: _Fields, name: str) -> ModelConfig:
    _common(f)
    window = f.get("sliding_window")
    if window is not None and int(window) < int(f.require("max_position_embeddings")):
        f.refuse("sliding_window", window, "moray's attention is full causal")
    rope = _rope_fields(f, 1e6)
    if "rope_factor" in rope:
        f.refuse("rope_scaling", "yarn", "moray's GQA takes default rope only from Mixtral configs")
    top_k = int(f.require("num_experts_per_tok"))
    if top_k == 1:
        f.refuse("num_experts_per_tok", 1, "a single renormalized expert weight is not supported")
    dim, heads = int(f.require("hidden_size")), int(f.require("num_attention_heads"))
    inter = int(f.require("intermediate_size"))
    moe = MoEConfig(n_routed_experts=int(f.require("num_local_experts")), n_shared_experts=0, top_k=top_k,
                    moe_inter_dim=inter, score_func="softmax", norm_topk_prob=True, bias_balancing=False)
    return ModelConfig(
        name=name, vocab_size=int(f.require("vocab_size")), dim=dim, n_layers=int(f.require("num_hidden_layers")),
        n_dense_layers=0, inter_dim=inter, n_heads=heads, max_seq_len=int(f.require("max_position_embeddings")),
        norm_eps=float(f.get("rms_norm_eps", 1e-5)), attention="gqa",
        n_kv_heads=int(f.get("num_key_value_heads", heads)), head_dim=int(f.get("head_dim", dim // heads)),
        rope_interleaved=False, moe=moe, tie_embeddings=bool(f.get("tie_word_embeddings", False)), **rope)


def _fp8_block(f: _Fields) -> tuple[int, int] | None:
    quant = f.get("quantization_config")
    if quant is None:
        return None
    if not isinstance(quant, dict) or quant.get("quant_method") != "fp8":
        f.refuse("quantization_config.quant_method", quant.get("quant_method") if isinstance(quant, dict) else quant,
                 "only DeepSeek's block-wise fp8 is dequantized")
    if quant.get("fmt", "e4m3") != "e4m3":
        f.refuse("quantization_config.fmt", quant.get("fmt"), "only e4m3 is dequantized")
    block = quant.get("weight_block_size")
    if not (isinstance(block, list) and len(block) == 2):
        f.refuse("quantization_config.weight_block_size", block, "expected [rows, cols]")
    return int(block[0]), int(block[1])


def hf_model_from_config(hf_dir: Path, data: dict[str, Any] | None = None) -> HFModel:
    """The moray view of `hf_dir/config.json`, checked like a preset."""
    file = Path(hf_dir) / HF_CONFIG_FILE
    f = _Fields(read_hf_config(hf_dir) if data is None else data, file)
    arch = f.get("model_type")
    if arch not in ARCHITECTURES:
        f.refuse("model_type", arch, f"moray imports {', '.join(ARCHITECTURES)}")
    name = Path(hf_dir).resolve().name
    cfg = _mixtral(f, name) if arch == "mixtral" else _deepseek(f, arch, name)
    try:
        check_model_config(cfg)
    except ConfigError as exc:
        raise HFFormatError(f"{file}: the model it describes is not valid for moray: {exc}") from None
    mtp = int(f.get("num_nextn_predict_layers", 0)) if arch == "deepseek_v3" else 0
    return HFModel(arch=arch, cfg=cfg, fp8_block=_fp8_block(f), mtp_layers=mtp)


# ---------------------------------------------------------------------------------------------
# moray -> Hugging Face


def _refuse_export(cfg: ModelConfig, arch: str, key: str, why: str) -> None:
    raise HFFormatError(f"cannot export {cfg.name} as {ARCHITECTURES[arch]}: model.{key} = "
                        f"{_lookup(cfg, key)!r} {why}")


def _lookup(cfg: ModelConfig, key: str) -> Any:
    obj: Any = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def hf_architecture(cfg: ModelConfig) -> str:
    """The transformers architecture that computes what this moray model computes, or an error."""
    moe = cfg.moe
    if cfg.attention == "gqa":
        arch = "mixtral"
        checks = [("n_dense_layers", cfg.n_dense_layers == 0, "(Mixtral has no dense layers)"),
                  ("moe.n_shared_experts", moe.n_shared_experts == 0, "(Mixtral has no shared experts)"),
                  ("moe.score_func", moe.score_func == "softmax", "(Mixtral scores with softmax)"),
                  ("moe.norm_topk_prob", moe.norm_topk_prob and moe.top_k > 1, "(Mixtral renormalizes top-k > 1)"),
                  ("moe.n_group", moe.n_group == 1, "(Mixtral has no expert groups)"),
                  ("moe.bias_balancing", not moe.bias_balancing, "(Mixtral has no selection bias)"),
                  ("moe.routed_scaling_factor", moe.routed_scaling_factor == 1.0, "(Mixtral does not scale)"),
                  ("moe.moe_inter_dim", moe.moe_inter_dim == cfg.inter_dim, "(Mixtral has one intermediate size)"),
                  ("rope_interleaved", not cfg.rope_interleaved, "(Mixtral pairs rope dims half-split)"),
                  ("rope_factor", not _uses_yarn(cfg), "(moray exports Mixtral with default rope)")]
    elif moe.score_func == "sigmoid":
        arch = "deepseek_v3"
        checks = [("moe.group_score", moe.group_score == "top2_sum" or moe.n_group == 1,
                   "(DeepseekV3 scores groups by their two best experts)"),
                  ("moe.norm_topk_prob", moe.top_k > 1 or not moe.norm_topk_prob,
                   "(a single renormalized expert is not supported)")]
    else:
        arch = "deepseek_v2"
        checks = [("moe.group_score", moe.group_score == "max" or moe.n_group == 1,
                   "(DeepseekV2 scores groups by their best expert)"),
                  ("moe.norm_topk_prob", not moe.norm_topk_prob or moe.top_k == 1,
                   "(transformers' DeepseekV2 never renormalizes top-k weights)"),
                  ("moe.bias_balancing", not moe.bias_balancing, "(DeepseekV2 has no selection bias)"),
                  ("rope_interleaved", cfg.rope_interleaved, "(DeepseekV2 pairs rope dims interleaved)")]
    for key, ok, why in checks:
        if not ok:
            _refuse_export(cfg, arch, key, f"has no equivalent {why}")
    return arch


def _uses_yarn(cfg: ModelConfig) -> bool:
    return cfg.rope_factor > 1.0 and cfg.max_seq_len > cfg.original_seq_len


def hf_config_from_model(cfg: ModelConfig, arch: str, special_ids: dict[str, int | None]) -> dict[str, Any]:
    """config.json for `arch` (from `hf_architecture`), in the field names released checkpoints use."""
    moe = cfg.moe
    out: dict[str, Any] = {
        "architectures": [ARCHITECTURES[arch]], "model_type": arch, "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim, "intermediate_size": cfg.inter_dim, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps, "hidden_act": "silu", "tie_word_embeddings": cfg.tie_embeddings,
        "rope_theta": cfg.rope_theta, "num_experts_per_tok": moe.top_k, "torch_dtype": "float32",
        "bos_token_id": special_ids.get("bos"), "eos_token_id": special_ids.get("eos"),
        "pad_token_id": special_ids.get("pad"),
    }
    if arch == "mixtral":
        out.update(num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, num_local_experts=moe.n_routed_experts,
                   sliding_window=None)
        return out
    out.update(
        num_key_value_heads=cfg.n_heads, first_k_dense_replace=cfg.n_dense_layers, moe_layer_freq=1,
        n_routed_experts=moe.n_routed_experts, n_shared_experts=moe.n_shared_experts,
        moe_intermediate_size=moe.moe_inter_dim, routed_scaling_factor=moe.routed_scaling_factor,
        n_group=moe.n_group, topk_group=moe.topk_group, norm_topk_prob=moe.norm_topk_prob,
        q_lora_rank=cfg.q_lora_rank or None, kv_lora_rank=cfg.kv_lora_rank,
        qk_nope_head_dim=cfg.qk_nope_head_dim, qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim,
        aux_loss_alpha=moe.aux_loss_alpha, attention_bias=False)
    if arch == "deepseek_v3":
        out.update(scoring_func="sigmoid", topk_method="noaux_tc", rope_interleave=cfg.rope_interleaved,
                   num_nextn_predict_layers=cfg.mtp_depth)
    else:
        out.update(scoring_func="softmax", topk_method="group_limited_greedy" if moe.n_group > 1 else "greedy")
    if _uses_yarn(cfg):
        out["rope_scaling"] = {"type": "yarn", "factor": cfg.rope_factor,
                               "original_max_position_embeddings": cfg.original_seq_len,
                               "beta_fast": cfg.beta_fast, "beta_slow": cfg.beta_slow,
                               "mscale": cfg.mscale, "mscale_all_dim": cfg.mscale}
    return out
