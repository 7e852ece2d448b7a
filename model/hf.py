"""Hugging Face DeepSeek-V2/V3 and Mixtral checkpoints in and out of moray's checkpoint format.

`import_hf` reads a transformers model dir (config.json, sharded safetensors with their index,
tokenizer files) and writes a moray checkpoint; `export_hf` writes one back that
`transformers.AutoModelForCausalLM.from_pretrained` loads. Both stream: every tensor is read
with its own pread and written as soon as it is converted, routed experts one expert at a time
into (out of) moray's stacked [n_experts, in, out] tensors, so peak memory stays near the
largest single tensor whatever the model's size. Names, shapes and the config are checked
before a byte is written, and the output appears under its name only when complete.

FP8 weights with block-wise `*_scale_inv` tensors (DeepSeek-V3's release) are dequantized:
w = fp8 * scale_inv[row // block_rows, col // block_cols].
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from model import checkpoint
from model.config import ModelConfig
from model.hf_config import (ARCHITECTURES, HF_CONFIG_FILE, HFFormatError, HFModel, hf_architecture,
                             hf_config_from_model, hf_model_from_config, is_hf_dir)
from model.safetensors_stream import StreamWriter, TensorEntry, read_header, read_tensor
from model.tokenizer import HF_TOKENIZER_CONFIG, TOKENIZER_FILE, Tokenizer
from model.transformer import Transformer

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
SCALE_SUFFIX = "_scale_inv"
DEFAULT_SHARD_BYTES = 5 * 1024**3


@dataclass(frozen=True)
class Link:
    """One moray tensor and the Hugging Face tensor(s) it is made of.

    `hf` holds one name for a tensor stored alike on both sides, one name per expert for a
    routed-expert stack (HF [out, in] per expert, moray [E, in, out]), or nothing for a
    selection bias that the HF architecture does not have (zeros). `fused` HF tensors in a row
    make one moray tensor (per expert), side by side along the output dim: moray holds an FFN's
    gate and up projections as one (gate_proj, up_proj -> w_gate_up, fused 2). `tied` marks
    moray's head when it is the embedding (HF stores that once)."""

    moray: str
    hf: tuple[str, ...]
    stacked: bool = False
    tied: bool = False
    swap_halves: bool = False  # the two input halves of a [out, 2 * in] weight trade places
    fused: int = 1


_MLA = {"wq": "q_proj", "wq_a": "q_a_proj", "q_norm": "q_a_layernorm", "wq_b": "q_b_proj",
        "wkv_a": "kv_a_proj_with_mqa", "kv_norm": "kv_a_layernorm", "wkv_b": "kv_b_proj", "wo": "o_proj"}
_GQA = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj"}
_FFN = {"w_gate_up": ("gate_proj", "up_proj"), "w_down": ("down_proj",)}
_MIXTRAL_EXPERT = {"w_gate_up": ("w1", "w3"), "w_down": ("w2",)}


def moray_tensors(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of a moray model's state dict, computed on the meta device."""
    with torch.device("meta"):
        model = Transformer(cfg, init=False)
    return {name: (tuple(t.shape), t.dtype) for name, t in model.state_dict().items()}


def tensor_links(cfg: ModelConfig, arch: str) -> list[Link]:
    """Every moray tensor, in state-dict order, with its HF source. MTP module k is DeepSeek-V3's
    layer num_hidden_layers + k, as its release stores it (transformers itself skips it)."""
    return [_link(name, cfg, arch) for name in moray_tensors(cfg)]


_MTP = {"hidden_norm": "hnorm", "embed_norm": "enorm", "proj": "eh_proj", "norm": "shared_head.norm"}


def mtp_shared_copies(cfg: ModelConfig, depth: int) -> list[str]:
    """DeepSeek-V3's MTP layers carry their own copies of the embedding and the output head,
    which moray's MTP modules share with the main model."""
    return [f"model.layers.{cfg.n_layers + k}.{part}.weight" for k in range(depth)
            for part in ("embed_tokens", "shared_head.head")]


def _link(name: str, cfg: ModelConfig, arch: str) -> Link:
    top = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    if name in top:
        return Link(name, (top[name],))
    if name == "head.weight":
        return Link(name, ("model.embed_tokens.weight",), tied=True) if cfg.tie_embeddings \
            else Link(name, ("lm_head.weight",))
    kind, index, *rest = name.split(".")
    if kind == "layers":
        return _block_link(name, f"model.layers.{index}", rest, cfg, arch)
    layer = f"model.layers.{cfg.n_layers + int(index)}"
    if rest[0] == "block":
        return _block_link(name, layer, rest[1:], cfg, arch)
    # DeepSeek feeds eh_proj [embedding, hidden]; moray's proj takes [hidden, embedding]
    return Link(name, (f"{layer}.{_MTP[rest[0]]}.weight",), swap_halves=rest[0] == "proj")


def _block_link(name: str, layer: str, rest: list[str], cfg: ModelConfig, arch: str) -> Link:
    part = rest[0]
    if part == "attn_norm":
        return Link(name, (f"{layer}.input_layernorm.weight",))
    if part == "ffn_norm":
        return Link(name, (f"{layer}.post_attention_layernorm.weight",))
    if part == "attn":
        table = _GQA if cfg.attention == "gqa" else _MLA
        return Link(name, (f"{layer}.self_attn.{table[rest[1]]}.weight",))
    mlp = f"{layer}.block_sparse_moe" if arch == "mixtral" else f"{layer}.mlp"
    kind = rest[1]
    if kind in _FFN:  # a dense layer's SwiGLU
        return Link(name, tuple(f"{mlp}.{hf}.weight" for hf in _FFN[kind]), fused=len(_FFN[kind]))
    if kind == "gate":
        return Link(name, (f"{mlp}.gate.weight",))
    if kind == "expert_bias":
        return Link(name, (f"{mlp}.gate.e_score_correction_bias",) if arch == "deepseek_v3" else ())
    if kind == "shared":
        return Link(name, tuple(f"{mlp}.shared_experts.{hf}.weight" for hf in _FFN[rest[2]]), fused=len(_FFN[rest[2]]))
    parts = (_MIXTRAL_EXPERT if arch == "mixtral" else _FFN)[rest[2]]
    return Link(name, tuple(f"{mlp}.experts.{j}.{hf}.weight" for j in range(cfg.moe.n_routed_experts) for hf in parts),
                stacked=True, fused=len(parts))


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    half = t.shape[1] // 2
    return torch.cat([t[:, half:], t[:, :half]], dim=1)


def _hf_shape(moray_shape: tuple[int, ...], link: Link) -> tuple[int, ...]:
    """The shape of each HF tensor of the link (one expert's, one part of a fused tensor)."""
    out, rest = (moray_shape[2], (moray_shape[1],)) if link.stacked else (moray_shape[0], moray_shape[1:])
    return (out // link.fused, *rest)



def _progress(total: int, desc: str, enabled: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, disable=not enabled, mininterval=1.0)


# ---------------------------------------------------------------------------------------------
# reading a Hugging Face dir


class HFSource:
    """The tensors of a Hugging Face model dir, by name, from the safetensors headers."""

    def __init__(self, hf_dir: Path, fp8_block: tuple[int, int] | None):
        self.dir, self.fp8_block = Path(hf_dir), fp8_block
        self.entries: dict[str, TensorEntry] = {}
        index = self.dir / INDEX_FILE
        if index.is_file():
            try:
                weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise HFFormatError(f"{index}: cannot read the weight map: {exc}") from None
            by_file: dict[str, list[str]] = {}
            for tensor, file in weight_map.items():
                by_file.setdefault(file, []).append(tensor)
            for file, tensors in sorted(by_file.items()):
                path = self.dir / file
                if not path.is_file():
                    raise HFFormatError(f"{self.dir}: shard {file} is missing (the index puts {tensors[0]} "
                                        f"and {len(tensors) - 1} more tensors in it)")
                header = read_header(path)
                absent = [t for t in tensors if t not in header]
                if absent:
                    raise HFFormatError(f"{path}: tensor {absent[0]} is not in this file, though {INDEX_FILE} "
                                        "says it is")
                self.entries.update(header)
        elif (self.dir / SINGLE_FILE).is_file():
            self.entries = read_header(self.dir / SINGLE_FILE)
        else:
            raise HFFormatError(f"{self.dir}: no {INDEX_FILE} and no {SINGLE_FILE}")

    def where(self, name: str) -> str:
        return str(self.entries[name].file) if name in self.entries else str(self.dir)

    def check(self, name: str, shape: tuple[int, ...]) -> None:
        if name not in self.entries:
            raise HFFormatError(f"{self.dir}: tensor {name} is missing")
        entry = self.entries[name]
        if entry.shape != shape:
            raise HFFormatError(f"{entry.file}: tensor {name} has shape {list(entry.shape)}, expected {list(shape)}")
        if self.is_fp8(name):
            scale = name + SCALE_SUFFIX
            if scale not in self.entries:
                raise HFFormatError(f"{entry.file}: fp8 tensor {name} has no {scale}")
            want = tuple(-(-d // b) for d, b in zip(shape, self.fp8_block or (1, 1)))
            if self.entries[scale].shape != want:
                raise HFFormatError(f"{self.where(scale)}: tensor {scale} has shape "
                                    f"{list(self.entries[scale].shape)}, expected {list(want)}")

    def is_fp8(self, name: str) -> bool:
        return self.entries[name].dtype in (torch.float8_e4m3fn, torch.float8_e5m2)

    def read(self, name: str) -> torch.Tensor:
        tensor = read_tensor(self.entries[name])
        if not self.is_fp8(name):
            return tensor
        if self.fp8_block is None:
            raise HFFormatError(f"{self.where(name)}: tensor {name} is fp8 but config.json has no "
                                "quantization_config with weight_block_size")
        return dequantize_fp8(tensor, read_tensor(self.entries[name + SCALE_SUFFIX]), self.fp8_block)


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """fp32 weight of a block-quantized fp8 one: every [block] tile times its scale."""
    rows, cols = weight.shape
    scale = scale_inv.float().repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return weight.float() * scale


# ---------------------------------------------------------------------------------------------
# import


@dataclass(frozen=True)
class _Out:
    """One tensor to write: its name, dtype and shape, and how to produce its bytes in order."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    pieces: Callable[[], Iterator[torch.Tensor]]

    @property
    def nbytes(self) -> int:
        return torch.Size(self.shape).numel() * torch.empty((), dtype=self.dtype).element_size()


def _import_plan(source: HFSource, hf: HFModel, dtype: torch.dtype | None) -> list[_Out]:
    """What to write, after checking every HF tensor it reads and that none is left over."""
    expected = moray_tensors(hf.cfg)
    used: set[str] = set()
    plan = []
    for link in tensor_links(hf.cfg, hf.arch):
        shape, buffer_dtype = expected[link.moray]
        for name in link.hf:
            source.check(name, _hf_shape(shape, link))
            used.update((name, name + SCALE_SUFFIX))
        if not link.hf:
            plan.append(_Out(link.moray, buffer_dtype, shape, lambda shape=shape: iter([torch.zeros(shape)])))
            continue
        first = source.entries[link.hf[0]]
        out_dtype = dtype or (torch.bfloat16 if source.is_fp8(link.hf[0]) else first.dtype)
        if not out_dtype.is_floating_point or not first.dtype.is_floating_point:
            out_dtype = first.dtype

        def pieces(link: Link = link, out_dtype: torch.dtype = out_dtype) -> Iterator[torch.Tensor]:
            for i in range(0, len(link.hf), link.fused):
                tensor = torch.cat([source.read(name) for name in link.hf[i:i + link.fused]])
                if link.swap_halves:
                    tensor = _swap_halves(tensor)
                yield (tensor.t() if link.stacked else tensor).to(out_dtype)

        plan.append(_Out(link.moray, out_dtype, shape, pieces))
    for name in mtp_shared_copies(hf.cfg, hf.cfg.mtp_depth):
        source.check(name, expected["embed.weight"][0])
        used.add(name)
    _check_leftovers(source, hf.cfg, used)
    return plan


def _check_leftovers(source: HFSource, cfg: ModelConfig, used: set[str]) -> None:
    """Tensors the import did not consume: DeepSeek-V3's MTP layers (past num_hidden_layers) and
    rotary caches are skipped with a note; anything else means a model moray would not match."""
    skipped = 0
    for name in source.entries:
        if name in used or name.endswith("rotary_emb.inv_freq"):
            continue
        parts = name.split(".")
        if name.startswith("model.layers.") and parts[2].isdigit() and int(parts[2]) >= cfg.n_layers:
            skipped += 1
            continue
        raise HFFormatError(f"{source.where(name)}: unexpected tensor {name} (not part of the model "
                            "config.json describes, as moray imports it)")
    if skipped:
        log.warning("skipped %d tensors of layers past num_hidden_layers (multi-token prediction)", skipped)


def _write_safetensors(file: Path, outs: list[_Out], bar: tqdm) -> None:
    with StreamWriter(file, [(o.name, o.dtype, o.shape) for o in outs],
                      metadata={"format": checkpoint.FORMAT_NAME}) as writer:
        for out in outs:
            for piece in out.pieces():
                writer.write(out.name, piece)
                bar.update(piece.numel() * piece.element_size())


def import_hf(hf_dir: str | Path, out_dir: str | Path, dtype: torch.dtype | None = None,
              progress: bool = True) -> Path:
    """Convert a Hugging Face DeepSeek-V2/V3 or Mixtral dir into a moray checkpoint at `out_dir`.

    `dtype` casts floating-point weights (default: keep the source's; fp8 becomes bf16).
    """
    hf_dir, target = Path(hf_dir), Path(out_dir)
    hf = hf_model_from_config(hf_dir)
    source = HFSource(hf_dir, hf.fp8_block)
    if hf.mtp_layers and f"model.layers.{hf.cfg.n_layers}.eh_proj.weight" in source.entries:
        hf = dataclasses.replace(hf, cfg=dataclasses.replace(hf.cfg, mtp_depth=hf.mtp_layers))
    plan = _import_plan(source, hf, dtype)
    checkpoint.check_replaceable(target)
    tmp = checkpoint.temp_dir_next_to(target)
    try:
        experts = [o for o in plan if checkpoint.is_expert_tensor(o.name)]
        dense = [o for o in plan if not checkpoint.is_expert_tensor(o.name)]
        with _progress(sum(o.nbytes for o in plan), f"import {hf_dir.name}", progress) as bar:
            _write_safetensors(tmp / checkpoint.WEIGHTS_FILE, dense, bar)
            _write_safetensors(tmp / checkpoint.EXPERTS_FILE, experts, bar)
        files = [checkpoint.WEIGHTS_FILE, checkpoint.EXPERTS_FILE, *_import_tokenizer(hf_dir, tmp)]
        checkpoint.finish_checkpoint_dir(tmp, hf.cfg, files)
        checkpoint.replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _import_tokenizer(hf_dir: Path, tmp: Path) -> list[str]:
    """tokenizer.json plus a tokenizer_config.json holding the special tokens and the chat
    template, however the HF dir spread them."""
    if not (hf_dir / TOKENIZER_FILE).is_file():
        log.warning("%s has no %s: the checkpoint will have no tokenizer", hf_dir, TOKENIZER_FILE)
        return []
    Tokenizer.load(hf_dir / TOKENIZER_FILE).save(tmp)
    return [TOKENIZER_FILE, HF_TOKENIZER_CONFIG]


# ---------------------------------------------------------------------------------------------
# export


def _export_plan(ckpt: Path, cfg: ModelConfig, arch: str) -> list[_Out]:
    entries = {**read_header(checkpoint.checkpoint_file(ckpt, checkpoint.WEIGHTS_FILE)),
               **read_header(checkpoint.checkpoint_file(ckpt, checkpoint.EXPERTS_FILE))}
    expected = moray_tensors(cfg)
    checkpoint.check_tensors({k: v[0] for k, v in expected.items()}, {k: e.shape for k, e in entries.items()},
                             str(ckpt))
    if cfg.mtp_depth and arch != "deepseek_v3":
        log.warning("%s: its %d MTP modules are not exported (%s releases have none)", ckpt, cfg.mtp_depth,
                    ARCHITECTURES[arch])
        cfg = dataclasses.replace(cfg, mtp_depth=0)
    plan = []
    for link in tensor_links(cfg, arch):
        entry = entries[link.moray]
        if link.tied or not link.hf:
            continue
        for j, name in enumerate(link.hf):
            plan.append(_Out(name, entry.dtype, _hf_shape(entry.shape, link),
                             lambda entry=entry, link=link, j=j: iter([_export_piece(entry, link, j, cfg)])))
    for name in mtp_shared_copies(cfg, cfg.mtp_depth):
        entry = entries["embed.weight" if name.endswith("embed_tokens.weight") else "head.weight"]
        plan.append(_Out(name, entry.dtype, entry.shape, lambda entry=entry: iter([read_tensor(entry)])))
    return plan


def _export_piece(entry: TensorEntry, link: Link, j: int, cfg: ModelConfig) -> torch.Tensor:
    """HF tensor j of the link ([out, in]): of a stack, expert j // fused's; of a fused tensor, its part."""
    if link.stacked:
        expert = j // link.fused
        tensor = read_tensor(entry, rows=(expert, expert + 1))[0].t()
    else:
        tensor = _export_tensor(entry, link, cfg)
    return tensor.chunk(link.fused, dim=0)[j % link.fused]


def _export_tensor(entry: TensorEntry, link: Link, cfg: ModelConfig) -> torch.Tensor:
    if link.moray.endswith("expert_bias") and not cfg.moe.bias_balancing:  # moray ignores it, so must HF
        return torch.zeros(entry.shape, dtype=entry.dtype)
    tensor = read_tensor(entry)
    return _swap_halves(tensor) if link.swap_halves else tensor


def _shards(plan: list[_Out], max_bytes: int) -> list[list[_Out]]:
    shards: list[list[_Out]] = [[]]
    size = 0
    for out in plan:
        if shards[-1] and size + out.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(out)
        size += out.nbytes
    return shards


def export_hf(ckpt: str | Path, out_dir: str | Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
              progress: bool = True) -> Path:
    """Write a moray checkpoint as a transformers model dir (sharded safetensors + index, config,
    tokenizer files). `out_dir` must not exist or be empty."""
    ckpt, target = Path(ckpt), Path(out_dir)
    if checkpoint.format_version(ckpt) != checkpoint.FORMAT_VERSION:  # export streams tensors as this version names them
        raise checkpoint.CheckpointError(
            f"checkpoint {ckpt} is format version {checkpoint.format_version(ckpt)}: export needs version "
            f"{checkpoint.FORMAT_VERSION}; write it again with this moray (model.checkpoint.save_checkpoint of "
            f"load_config and load_state_dict, which read version 1) and export that")
    cfg = checkpoint.load_config(ckpt)
    arch = hf_architecture(cfg)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise HFFormatError(f"refusing to write into {target}: it exists and is not an empty directory")
    plan = _export_plan(ckpt, cfg, arch)
    shards = _shards(plan, max_shard_bytes)
    tmp = checkpoint.temp_dir_next_to(target)
    try:
        weight_map = {}
        with _progress(sum(o.nbytes for o in plan), f"export {ckpt.name}", progress) as bar:
            for i, shard in enumerate(shards, start=1):
                file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                with StreamWriter(tmp / file, [(o.name, o.dtype, o.shape) for o in shard],
                                  metadata={"format": "pt"}) as writer:
                    for out in shard:
                        for piece in out.pieces():
                            writer.write(out.name, piece.contiguous())
                            bar.update(out.nbytes)
                        weight_map[out.name] = file
        index = {"metadata": {"total_size": sum(o.nbytes for o in plan)}, "weight_map": weight_map}
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        special = _export_tokenizer(ckpt, tmp)
        config = hf_config_from_model(cfg, arch, special)
        config["torch_dtype"] = str(plan[0].dtype).removeprefix("torch.")
        (tmp / HF_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        if target.exists():
            target.rmdir()
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _export_tokenizer(ckpt: Path, tmp: Path) -> dict[str, int | None]:
    """Copy the tokenizer files; the special token ids for config.json."""
    file = checkpoint.tokenizer_file(ckpt)
    if file is None:
        return {}
    tok = Tokenizer.load(file)
    tok.save(tmp)
    return {"bos": tok.bos_id, "eos": tok.eos_id, "pad": tok.pad_id}


# ---------------------------------------------------------------------------------------------
# Hugging Face dirs wherever a checkpoint is taken


def cache_root() -> Path:
    """Where HF dirs given to serve/train/generate are converted: $MORAY_HF_CACHE or ~/.cache/moray/hf."""
    return Path(os.environ.get("MORAY_HF_CACHE") or Path.home() / ".cache" / "moray" / "hf")


def _fingerprint(hf_dir: Path) -> str:
    """Changes when the dir's path or any of its files (name, size, mtime) changes."""
    h = hashlib.sha256(str(hf_dir.resolve()).encode())
    for file in sorted(p for p in hf_dir.iterdir() if p.is_file()):
        stat = file.stat()
        h.update(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def as_moray_checkpoint(path: str | Path, progress: bool = True) -> Path:
    """`path` itself when it is a moray checkpoint; for a Hugging Face dir, its conversion in the
    cache (made on first use, reused while the dir is unchanged)."""
    path = Path(path)
    if not is_hf_dir(path):
        return path
    cached = cache_root() / f"{path.resolve().name}-{_fingerprint(path)}"
    if not (cached / checkpoint.MANIFEST_FILE).is_file():
        log.warning("converting Hugging Face model %s into %s", path, cached)
        import_hf(path, cached, progress=progress)
    return cached
