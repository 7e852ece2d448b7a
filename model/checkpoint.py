"""moray's checkpoint of model weights: one directory that training writes and serving reads.

Layout of a checkpoint directory:

    moray.json           format name, version and the files below; marks the dir as ours
    config.yaml          the ModelConfig, as `model_config_to_dict` writes it
    model.safetensors    every tensor that is not a routed expert (what a router needs)
    experts.safetensors  the routed-expert tensors, stacked [n_routed_experts, ...]
    tokenizer.json       optional
    tokenizer_config.json  optional, with tokenizer.json: a Hugging Face tokenizer's special tokens and
                         chat template

Routed experts live in their own file, stacked along dim 0 exactly as the model holds them, so an
expert shard reads the rows of its own experts (safetensors slices are lazy) and never touches the
dense weights, and a router reads the dense weights and never touches the experts.

A save writes into a hidden temp dir next to the target and renames it into place, so a crash
leaves either the old checkpoint or the new one, never a half-written one under the target name.

Format version 2 holds each FFN's gate and up weights side by side in one tensor (`w_gate_up`:
[E, D, 2F] for routed experts, [2F, D] for a dense FFN or the shared experts); version 1 kept
them apart (`w_gate`, `w_up`). Version 1 checkpoints are read as version 2: the loaders join the
two on reading (`_join_gate_up`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import torch
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from model.config import ConfigError, ModelConfig, check_model_config, model_config_from_dict, model_config_to_dict
from model.tokenizer import HF_TOKENIZER_CONFIG

PathLike = str | os.PathLike[str]

FORMAT_NAME = "moray-checkpoint"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST_FILE = "moray.json"
CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "model.safetensors"
EXPERTS_FILE = "experts.safetensors"
TOKENIZER_FILE = "tokenizer.json"

# state-dict names of routed-expert tensors contain this; shared experts are named otherwise
EXPERT_MARKER = ".experts."


class CheckpointError(ValueError):
    """A checkpoint is missing, malformed or does not fit; the message names the file/tensor/key."""


def is_expert_tensor(name: str) -> bool:
    """Whether a state-dict name is a stacked routed-expert tensor (stored in experts.safetensors)."""
    return EXPERT_MARKER in name


# ---------------------------------------------------------------------------------------------
# saving


def save_checkpoint(
    path: PathLike,
    cfg: ModelConfig,
    state_dict: Mapping[str, torch.Tensor],
    tokenizer_file: Path | None = None,
) -> Path:
    """Write a checkpoint directory at `path` (replacing a checkpoint already there); returns it.

    Tensors are moved to CPU and made contiguous; tensors sharing storage (tied embeddings) are
    copied, since safetensors refuses aliased tensors. An existing `path` is replaced only if it is
    a moray checkpoint or an empty dir, so a typo cannot wipe an unrelated directory.
    """
    target = Path(path)
    check_replaceable(target)
    try:
        check_model_config(cfg)
    except ConfigError as exc:
        raise CheckpointError(f"cannot save checkpoint {target}: bad model config: {exc}") from None
    if tokenizer_file is not None and not Path(tokenizer_file).is_file():
        raise CheckpointError(f"cannot save checkpoint {target}: tokenizer file {tokenizer_file} does not exist")
    dense, experts = _split_for_saving(target, cfg, state_dict)

    tmp = temp_dir_next_to(target)
    try:
        save_file(dense, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT_NAME})
        save_file(experts, str(tmp / EXPERTS_FILE), metadata={"format": FORMAT_NAME})
        files = [WEIGHTS_FILE, EXPERTS_FILE]
        if tokenizer_file is not None:
            shutil.copyfile(tokenizer_file, tmp / TOKENIZER_FILE)
            files.append(TOKENIZER_FILE)
            hf_tokenizer_config = Path(tokenizer_file).parent / HF_TOKENIZER_CONFIG
            if hf_tokenizer_config.is_file():  # a Hugging Face tokenizer's special tokens + chat template
                shutil.copyfile(hf_tokenizer_config, tmp / HF_TOKENIZER_CONFIG)
                files.append(HF_TOKENIZER_CONFIG)
        finish_checkpoint_dir(tmp, cfg, files)
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def finish_checkpoint_dir(tmp: Path, cfg: ModelConfig, files: list[str]) -> None:
    """Write config.yaml and, last, the manifest naming `files` (already in `tmp`) and config.yaml:
    a dir with a manifest has every file the manifest names."""
    OmegaConf.save(OmegaConf.create(model_config_to_dict(cfg)), tmp / CONFIG_FILE)
    manifest = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "files": [CONFIG_FILE, *files]}
    (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")


def temp_dir_next_to(target: Path) -> Path:
    """A hidden, world-readable temp dir beside `target`, to be renamed into place when complete."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it 0700; a checkpoint should read like any other dir
    return tmp


def check_replaceable(target: Path) -> None:
    if not target.exists():
        return
    if not target.is_dir():
        raise CheckpointError(f"cannot save checkpoint {target}: it exists and is not a directory")
    if not (target / MANIFEST_FILE).is_file() and any(target.iterdir()):
        raise CheckpointError(
            f"refusing to overwrite {target}: it exists, is not empty and is not a moray checkpoint "
            f"(no {MANIFEST_FILE})")


def _split_for_saving(
    target: Path, cfg: ModelConfig, state_dict: Mapping[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """CPU, contiguous, unaliased copies of the tensors, split into (non-expert, routed-expert)."""
    dense: dict[str, torch.Tensor] = {}
    experts: dict[str, torch.Tensor] = {}
    seen_storage: set[int] = set()
    for name, tensor in state_dict.items():
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(
                f"cannot save checkpoint {target}: state dict entry {name} is a {type(tensor).__name__}, "
                "not a tensor")
        t = tensor.detach().to("cpu").contiguous()
        storage = t.untyped_storage().data_ptr()
        if t.numel() > 0 and storage in seen_storage:
            t = t.clone()
        seen_storage.add(t.untyped_storage().data_ptr())
        if is_expert_tensor(name):
            n_experts = cfg.moe.n_routed_experts
            if t.dim() == 0 or t.shape[0] != n_experts:
                raise CheckpointError(
                    f"cannot save checkpoint {target}: expert tensor {name} has shape {list(t.shape)}, "
                    f"expected [{n_experts}, ...] (moe.n_routed_experts = {n_experts})")
            experts[name] = t
        else:
            dense[name] = t
    return dense, experts


def replace_dir(new: Path, target: Path) -> None:
    """Rename `new` to `target`, moving an existing `target` aside first and deleting it after."""
    if not target.exists():
        new.rename(target)
        return
    check_replaceable(target)
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    target.rename(old)
    try:
        new.rename(target)
    except BaseException:
        old.rename(target)
        raise
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# reading


def _manifest_files(path: PathLike) -> tuple[Path, list[str]]:
    """The checkpoint dir and the files its manifest lists, after checking it is a moray checkpoint."""
    root, files, _ = _manifest(path)
    return root, files


def format_version(path: PathLike) -> int:
    """The checkpoint's format version (one of READABLE_VERSIONS)."""
    return _manifest(path)[2]


def _manifest(path: PathLike) -> tuple[Path, list[str], int]:
    root = Path(path)
    if not root.exists():
        raise CheckpointError(f"checkpoint {root} does not exist")
    if not root.is_dir():
        raise CheckpointError(f"checkpoint {root} is not a directory")
    manifest_path = root / MANIFEST_FILE
    if not manifest_path.is_file():
        raise CheckpointError(f"{root} is not a moray checkpoint: it has no {MANIFEST_FILE}")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{manifest_path}: cannot read the manifest: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{manifest_path}: not a moray checkpoint manifest (format must be {FORMAT_NAME!r})")
    version = manifest.get("version")
    if version not in READABLE_VERSIONS:
        raise CheckpointError(
            f"{manifest_path}: checkpoint format version {version!r} is not supported "
            f"(this moray reads versions {', '.join(map(str, READABLE_VERSIONS))})")
    files = manifest.get("files")
    if not isinstance(files, list):
        raise CheckpointError(f"{manifest_path}: 'files' must be a list of file names")
    return root, files, version


V = TypeVar("V")


def _join_gate_up(found: dict[str, V], join: Callable[[V, V, int], V]) -> dict[str, V]:
    """A version 1 checkpoint's tensors (or shapes) named as version 2: each `w_gate` and its
    `w_up` joined into one `w_gate_up`, along the output dim (a routed-expert stack's last dim,
    a linear layer's first). A `w_gate` without its `w_up` keeps its name, for the name checks
    to report."""
    out = dict(found)
    for name in found:
        stem, gate, rest = name.rpartition(".w_gate")
        up = f"{stem}.w_up{rest}"
        if gate and rest in ("", ".weight") and up in found:
            out[f"{stem}.w_gate_up{rest}"] = join(out.pop(name), out.pop(up), -1 if is_expert_tensor(name) else 0)
    return out


def _join_tensors(a: torch.Tensor, b: torch.Tensor, dim: int) -> torch.Tensor:
    return torch.cat([a, b], dim)


def _join_shapes(a: tuple[int, ...], b: tuple[int, ...], dim: int) -> tuple[int, ...]:
    joined = list(a)
    joined[dim] += b[dim]
    return tuple(joined)


def checkpoint_file(path: PathLike, filename: str) -> Path:
    """The path of one file of a checkpoint, which must be listed and present."""
    root, files = _manifest_files(path)
    file = root / filename
    if filename not in files or not file.is_file():
        raise CheckpointError(f"checkpoint {root} lacks file {filename}")
    return file


@contextmanager
def _open_safetensors(file: Path) -> Iterator[Any]:
    """safe_open whose errors (truncated, corrupt, unreadable file) become a CheckpointError."""
    try:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            yield handle
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"cannot read {file}: {exc}") from None


def _convert(tensor: torch.Tensor, device: str | torch.device, dtype: torch.dtype | None) -> torch.Tensor:
    """Move to `device`; cast floating-point tensors to `dtype` (integer buffers keep theirs)."""
    cast = dtype if dtype is not None and tensor.is_floating_point() else None
    return tensor.to(device=device, dtype=cast)


def _read_file(path: PathLike, filename: str, device: str | torch.device, dtype: torch.dtype | None
               ) -> dict[str, torch.Tensor]:
    """One file's tensors, named as this format version names them."""
    with _open_safetensors(checkpoint_file(path, filename)) as handle:
        state = {name: _convert(handle.get_tensor(name), device, dtype) for name in handle.keys()}
    return _join_gate_up(state, _join_tensors) if format_version(path) == 1 else state


def _read_shapes(path: PathLike, filename: str) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from a safetensors header, without reading the data."""
    with _open_safetensors(checkpoint_file(path, filename)) as handle:
        shapes = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
    return _join_gate_up(shapes, _join_shapes) if format_version(path) == 1 else shapes


def load_config(path: PathLike) -> ModelConfig:
    """The checkpoint's ModelConfig; reads config.yaml only, validated like a preset."""
    config_path = checkpoint_file(path, CONFIG_FILE)
    try:
        data = OmegaConf.to_container(OmegaConf.load(config_path), resolve=True)
    except (OSError, yaml.YAMLError, OmegaConfBaseException) as exc:
        raise CheckpointError(f"{config_path}: cannot parse: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{config_path}: expected a mapping of config keys, got {type(data).__name__}")
    try:
        return model_config_from_dict(data, "model config")
    except ConfigError as exc:
        raise CheckpointError(f"{config_path}: {exc}") from None


def tokenizer_file(path: PathLike) -> Path | None:
    """The checkpoint's tokenizer.json, or None when it was saved without one."""
    root, files = _manifest_files(path)
    file = root / TOKENIZER_FILE
    return file if TOKENIZER_FILE in files and file.is_file() else None


def load_non_expert_state_dict(
    path: PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """Every tensor but the routed experts: embeddings, attention, norms, gates, shared experts."""
    return _read_file(path, WEIGHTS_FILE, device, dtype)


def load_state_dict(
    path: PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """The full state dict (non-expert and routed-expert tensors); `dtype` casts floating tensors."""
    state = load_non_expert_state_dict(path, device, dtype)
    state.update(_read_file(path, EXPERTS_FILE, device, dtype))
    return state


def load_expert_slice(
    path: PathLike,
    expert_ids: Sequence[int],
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    prefix: str = "",
) -> dict[str, torch.Tensor]:
    """The routed-expert tensors (those whose name starts with `prefix`, e.g. one layer's), each
    cut to rows `expert_ids` in that order: [len(ids), ...].

    Reads only those rows from experts.safetensors (one range read when the ids are ascending and
    contiguous, one per id otherwise); model.safetensors is not opened.
    """
    ids = [int(i) for i in expert_ids]
    file = checkpoint_file(path, EXPERTS_FILE)
    out: dict[str, torch.Tensor] = {}
    with _open_safetensors(file) as handle:
        for name in handle.keys():
            if not name.startswith(prefix):
                continue
            rows = handle.get_slice(name)
            n_experts = rows.get_shape()[0]
            bad = [i for i in ids if not 0 <= i < n_experts]
            if bad:
                raise CheckpointError(
                    f"checkpoint {path}: expert id {bad[0]} out of range for tensor {name}, "
                    f"which has {n_experts} experts (valid ids 0..{n_experts - 1})")
            start = ids[0] if ids else 0
            if ids == list(range(start, start + len(ids))):
                tensor = rows[start:start + len(ids)]
            else:
                tensor = torch.cat([rows[i:i + 1] for i in ids])
            out[name] = _convert(tensor, device, dtype)
    return _join_gate_up(out, _join_tensors) if format_version(path) == 1 else out


# ---------------------------------------------------------------------------------------------
# checking and loading into a module


def check_tensors(
    expected: Mapping[str, Sequence[int]],
    found: Mapping[str, Sequence[int]],
    source: str,
    strict: bool = True,
) -> None:
    """Compare the tensors a consumer expects with those a checkpoint has, by name and shape.

    `expected` and `found` map names to shapes. Missing and unexpected names are errors only when
    `strict`; a shape mismatch of a name both sides have is always an error. `source` names the
    checkpoint in messages ("checkpoint /runs/x lacks tensor layers.0.attn.wq.weight").
    """
    if strict:
        missing = [name for name in expected if name not in found]
        if missing:
            more = f" (and {len(missing) - 1} more: {', '.join(missing[1:6])}...)" if len(missing) > 1 else ""
            raise CheckpointError(f"checkpoint {source} lacks tensor {missing[0]}{more}")
        unexpected = [name for name in found if name not in expected]
        if unexpected:
            more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
            raise CheckpointError(f"checkpoint {source} has unexpected tensor {unexpected[0]}{more}")
    for name, shape in expected.items():
        if name in found and tuple(found[name]) != tuple(shape):
            raise CheckpointError(
                f"checkpoint {source}: tensor {name} has shape {list(found[name])}, "
                f"expected {list(shape)}")


def load_into(model: torch.nn.Module, path: PathLike, strict: bool = True) -> None:
    """Load a full checkpoint into `model`, after checking names and shapes against its state dict.

    Shapes are checked from the safetensors headers before any data is read; values are copied
    into the module's own tensors, so they take its dtype and device.
    """
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    found = {**_read_shapes(path, WEIGHTS_FILE), **_read_shapes(path, EXPERTS_FILE)}
    check_tensors(expected, found, str(path), strict=strict)
    state = load_state_dict(path)
    model.load_state_dict(state, strict=strict)
