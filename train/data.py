"""Training data: text files -> tokenizer + Parquet token shards + manifest -> token batches.

`prepare_corpus` is run once (`moray data prepare`); training workers only ever read what it
wrote, through `load_manifest` and `TokenStream`. The manifest is the contract between the two:
it names the tokenizer and every shard with its document and token counts, so a reader can
check that it has the whole data set before a run starts instead of failing mid-run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sysconfig
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from model.tokenizer import TOKENIZER_FILE, Tokenizer, TokenizerError, train_tokenizer

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
# stdlib packages added to the top-level modules for the default corpus (~6.8 MB on CPython 3.11)
DEFAULT_CORPUS_PACKAGES = (
    "json", "email", "asyncio", "http", "logging", "unittest", "concurrent", "importlib", "xml",
)
_SKIP_DIRS = {"__pycache__", "site-packages", "test", "tests", "idle_test"}
# documents per encode_batch call: large enough for the thread pool, small enough for progress
_ENCODE_CHUNK = 64


class DataError(ValueError):
    """Input or prepared data is missing or unusable; the message names the path."""


# ---------------------------------------------------------------------------------------------
# manifest


@dataclass(frozen=True)
class ShardInfo:
    file: str  # relative to the data dir
    n_docs: int
    n_tokens: int


@dataclass
class Manifest:
    """What `prepare_corpus` wrote into `data_dir`; `data_dir` itself is not stored."""

    data_dir: Path
    vocab_size: int
    tokenizer_file: str
    splits: dict[str, list[ShardInfo]]
    source_files: list[str]
    source_bytes: int
    format_version: int = FORMAT_VERSION

    @property
    def tokenizer_path(self) -> Path:
        return self.data_dir / self.tokenizer_file

    def shard_paths(self, split: str) -> list[Path]:
        return [self.data_dir / s.file for s in self.shards(split)]

    def n_docs(self, split: str | None = None) -> int:
        """Documents in `split`, or in all splits when None."""
        splits = [split] if split is not None else list(self.splits)
        return sum(s.n_docs for name in splits for s in self.shards(name))

    def n_tokens(self, split: str | None = None) -> int:
        """Tokens (eos included) in `split`, or in all splits when None."""
        splits = [split] if split is not None else list(self.splits)
        return sum(s.n_tokens for name in splits for s in self.shards(name))

    def load_tokenizer(self) -> Tokenizer:
        return Tokenizer.load(self.tokenizer_path)

    def shards(self, split: str) -> list[ShardInfo]:
        """The shards of `split`; an unknown split is a DataError listing the known ones."""
        if split not in self.splits:
            raise DataError(
                f"{self.data_dir}: no split {split!r}, the manifest has {sorted(self.splits)}"
            )
        return self.splits[split]

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "vocab_size": self.vocab_size,
            "tokenizer": self.tokenizer_file,
            "splits": {
                name: {
                    "n_docs": self.n_docs(name),
                    "n_tokens": self.n_tokens(name),
                    "shards": [vars(s) for s in shards],
                }
                for name, shards in self.splits.items()
            },
            "totals": {"n_docs": self.n_docs(), "n_tokens": self.n_tokens()},
            "sources": {
                "n_files": len(self.source_files),
                "total_bytes": self.source_bytes,
                "files": self.source_files,
            },
        }

    @classmethod
    def from_json(cls, d: dict[str, Any], data_dir: Path) -> Manifest:
        where = data_dir / MANIFEST_FILE
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise DataError(
                f"{where}: format_version {version}, this moray reads {FORMAT_VERSION}; "
                f"run `moray data prepare` again"
            )
        try:
            splits = {
                name: [ShardInfo(str(s["file"]), int(s["n_docs"]), int(s["n_tokens"]))
                       for s in split["shards"]]
                for name, split in d["splits"].items()
            }
            return cls(
                data_dir=data_dir,
                vocab_size=int(d["vocab_size"]),
                tokenizer_file=str(d["tokenizer"]),
                splits=splits,
                source_files=[str(f) for f in d["sources"]["files"]],
                source_bytes=int(d["sources"]["total_bytes"]),
                format_version=version,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise DataError(f"{where}: malformed manifest ({type(e).__name__}: {e})") from e


def load_manifest(data_dir: str | Path) -> Manifest:
    """Read and check `data_dir/manifest.json`: every file it names must exist."""
    data_dir = Path(data_dir)
    hint = f"run `moray data prepare --out {data_dir}` first"
    if not data_dir.exists():
        raise DataError(f"data dir not found: {data_dir}; {hint}")
    if not data_dir.is_dir():
        raise DataError(f"data dir is not a directory: {data_dir}")
    path = data_dir / MANIFEST_FILE
    if not path.is_file():
        raise DataError(f"no {MANIFEST_FILE} in {data_dir}; {hint}")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read manifest {path}: {e}") from e
    if not isinstance(d, dict):
        raise DataError(f"{path}: malformed manifest (expected a JSON object)")
    manifest = Manifest.from_json(d, data_dir)
    shard_paths = [p for split in manifest.splits for p in manifest.shard_paths(split)]
    for p in [manifest.tokenizer_path, *shard_paths]:
        if not p.is_file():
            raise DataError(f"{path} names {p.name}, which is missing: {p}; {hint}")
    return manifest


# ---------------------------------------------------------------------------------------------
# inputs


def default_corpus_files() -> list[Path]:
    """The running Python's standard library sources: a corpus every machine already has.

    Top-level `*.py` modules plus a few packages (DEFAULT_CORPUS_PACKAGES), tests left out,
    about 7 MB: enough to train a small model on, small enough to prepare in seconds.
    """
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    if not stdlib.is_dir():
        raise DataError(f"standard library sources not found at {stdlib}; pass input files")
    files = sorted(p for p in stdlib.glob("*.py") if p.is_file())
    for pkg in DEFAULT_CORPUS_PACKAGES:
        if (stdlib / pkg).is_dir():
            files += [p for p in _walk(stdlib / pkg, skip_dirs=_SKIP_DIRS) if p.suffix == ".py"]
    if not files:
        raise DataError(f"no *.py files in the standard library at {stdlib}; pass input files")
    return files


def _walk(root: Path, skip_dirs: set[str] | frozenset[str] = frozenset(),
          exclude: Path | None = None) -> list[Path]:
    """Files under `root`, sorted, hidden entries and `skip_dirs` left out."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        dirnames[:] = sorted(
            n for n in dirnames
            if not n.startswith(".") and n not in skip_dirs
            and (exclude is None or (d / n).resolve() != exclude)
        )
        out += [d / n for n in sorted(filenames) if not n.startswith(".")]
    return out


def _read_text(path: Path) -> str | None:
    """The file's text, or None when it is binary (NUL bytes or not UTF-8)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read input {path}: {e.strerror or e}") from e
    if b"\x00" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


@dataclass
class _Doc:
    key: str  # path relative to its input: hashed for the train/val split, so moving or
    # reordering the inputs does not move documents between splits
    path: Path
    text: str


def _collect(inputs: Sequence[Path], exclude: Path, progress: bool) -> tuple[list[_Doc], int]:
    """Documents of `inputs` and their total size in bytes.

    A file named explicitly must be text. Binary files found while walking a directory are
    skipped with a warning: a source tree usually holds a few images or caches.
    """
    entries: list[tuple[Path, str, bool]] = []  # path, key, named explicitly
    for inp in inputs:
        inp = Path(inp)
        if not inp.exists():
            raise DataError(f"input not found: {inp}")
        if inp.is_dir():
            entries += [(p, f"{inp.name}/{p.relative_to(inp).as_posix()}", False)
                        for p in _walk(inp, exclude=exclude)]
        else:
            entries.append((inp, inp.name, True))
    docs, n_bytes, skipped = [], 0, []
    for path, key, explicit in tqdm(entries, desc="reading", unit="file", disable=not progress):
        text = _read_text(path)
        if text is None:
            if explicit:
                raise DataError(f"input is binary, not UTF-8 text: {path}")
            skipped.append(path)
            continue
        if text.strip():
            docs.append(_Doc(key, path, text))
            n_bytes += len(text.encode("utf-8"))
    if skipped:
        log.warning("skipped %d binary file(s), e.g. %s", len(skipped), skipped[0])
    if not docs:
        names = ", ".join(str(p) for p in inputs[:3]) + (" ..." if len(inputs) > 3 else "")
        why = f" ({len(skipped)} binary file(s) skipped)" if skipped else ""
        raise DataError(f"no text found in {names}{why}")
    return docs, n_bytes


def _split_docs(docs: list[_Doc], val_fraction: float) -> dict[str, list[_Doc]]:
    """Deterministic split: the docs whose path hashes lowest go to val (at least one of them
    when there are two docs or more), so the split does not change with input order."""
    n_val = 0
    if val_fraction > 0 and len(docs) >= 2:
        n_val = min(len(docs) - 1, max(1, round(len(docs) * val_fraction)))
    digests = [hashlib.sha256(d.key.encode()).digest() for d in docs]
    ranked = sorted(range(len(docs)), key=lambda i: (digests[i], i))
    val = set(ranked[:n_val])
    return {
        "train": [d for i, d in enumerate(docs) if i not in val],
        "val": [d for i, d in enumerate(docs) if i in val],
    }


# ---------------------------------------------------------------------------------------------
# prepare


def prepare_corpus(
    inputs: list[Path] | None,
    out_dir: Path,
    vocab_size: int = 2048,
    shard_tokens: int = 1_000_000,
    val_fraction: float = 0.02,
    progress: bool = True,
    tokenizer: Path | None = None,
) -> Manifest:
    """Train a tokenizer on `inputs` (or take `tokenizer`: a tokenizer.json or a dir holding one,
    such as a Hugging Face model's) and write token shards + manifest into `out_dir`.

    `inputs` are files and directories (walked recursively, sorted); None means the standard
    library corpus (`default_corpus_files`). Each file is one document, followed by eos. All is
    written into a temporary directory beside `out_dir` and renamed at the end, so a failure
    leaves no half-written data set; an existing prepared `out_dir` is replaced.
    """
    if shard_tokens <= 0:
        raise DataError(f"shard_tokens must be positive, got {shard_tokens}")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    out_dir = Path(out_dir).absolute()
    _check_replaceable(out_dir)
    if inputs is None:
        inputs = default_corpus_files()
    if not inputs:
        raise DataError("no inputs given")
    docs, n_bytes = _collect([Path(p) for p in inputs], out_dir.resolve(), progress)
    try:
        if tokenizer is not None:
            log.info("%d documents, %.1f MB; tokenizer %s", len(docs), n_bytes / 1e6, tokenizer)
            tok = Tokenizer.load(tokenizer)
        else:
            log.info("%d documents, %.1f MB; training a %d-token tokenizer", len(docs), n_bytes / 1e6, vocab_size)
            tok = Tokenizer(train_tokenizer((d.text for d in docs), vocab_size, show_progress=progress))
    except TokenizerError as e:
        raise DataError(str(e)) from e

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        tok.save(tmp / TOKENIZER_FILE)
        splits = {}
        with tqdm(total=n_bytes, desc="tokenizing", unit="B", unit_scale=True,
                  disable=not progress) as bar:
            for name, split_docs in _split_docs(docs, val_fraction).items():
                splits[name] = _write_split(tok, split_docs, tmp, name, shard_tokens, bar)
        manifest = Manifest(
            data_dir=out_dir,
            vocab_size=tok.vocab_size,
            tokenizer_file=TOKENIZER_FILE,
            splits=splits,
            source_files=[str(d.path.absolute()) for d in docs],
            source_bytes=n_bytes,
        )
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest.to_json(), indent=2) + "\n")
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote %s: %d train / %d val tokens", out_dir, manifest.n_tokens("train"),
             manifest.n_tokens("val"))
    return manifest


def _write_split(tok: Tokenizer, docs: list[_Doc], out: Path, split: str, shard_tokens: int,
                 bar: tqdm) -> list[ShardInfo]:
    """Tokenize `docs` (each + eos) and write them as shards of about `shard_tokens` tokens."""
    shards: list[ShardInfo] = []
    pending: list[list[int]] = []
    pending_tokens = 0

    def flush() -> None:
        nonlocal pending, pending_tokens
        file = f"{split}-{len(shards):05d}.parquet"
        _write_shard(out / file, pending)
        shards.append(ShardInfo(file, len(pending), pending_tokens))
        pending, pending_tokens = [], 0

    for start in range(0, len(docs), _ENCODE_CHUNK):
        chunk = docs[start:start + _ENCODE_CHUNK]
        for ids in tok.encode_batch([d.text for d in chunk]):
            ids.append(tok.eos_id)
            pending.append(ids)
            pending_tokens += len(ids)
            if pending_tokens >= shard_tokens:
                flush()
        bar.update(sum(len(d.text.encode("utf-8")) for d in chunk))
    if pending:
        flush()
    return shards


def _write_shard(path: Path, docs: list[list[int]]) -> None:
    lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
    offsets = np.zeros(len(docs) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = np.fromiter((t for d in docs for t in d), dtype=np.int32, count=int(lengths.sum()))
    column = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))
    pq.write_table(pa.table({"tokens": column}), path)


def _check_replaceable(out_dir: Path) -> None:
    """Only an empty dir or an earlier prepared one may be replaced, never arbitrary files."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise DataError(f"output path exists and is not a directory: {out_dir}")
    if any(out_dir.iterdir()) and not (out_dir / MANIFEST_FILE).is_file():
        raise DataError(
            f"refusing to overwrite {out_dir}: it is not empty and holds no {MANIFEST_FILE}"
        )


def _replace_dir(new: Path, out_dir: Path) -> None:
    """Move `new` to `out_dir`, moving a previous `out_dir` aside first and deleting it last."""
    old = None
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        out_dir.rename(old / out_dir.name)
    try:
        new.rename(out_dir)
    except BaseException:
        if old is not None:
            (old / out_dir.name).rename(out_dir)
            old.rmdir()
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# reading


class TokenStream:
    """All tokens of one split as one flat int64 tensor, documents in manifest order.

    Loading the whole split is fine at our corpus sizes (a few million tokens: tens of MB) and
    makes random windows a single gather.
    """

    def __init__(self, data: str | Path | Manifest, split: str = "train") -> None:
        manifest = data if isinstance(data, Manifest) else load_manifest(data)
        self.manifest, self.split = manifest, split
        parts = []
        for info, path in zip(manifest.shards(split), manifest.shard_paths(split)):
            try:
                col = pq.read_table(path, columns=["tokens"]).column("tokens")
            except (OSError, pa.ArrowException, KeyError) as e:
                raise DataError(f"cannot read shard {path}: {e}") from e
            flat = col.combine_chunks().flatten()
            if len(flat) != info.n_tokens:
                raise DataError(
                    f"shard {path} holds {len(flat)} tokens, the manifest says {info.n_tokens}; "
                    f"run `moray data prepare` again"
                )
            parts.append(torch.from_numpy(flat.to_numpy(zero_copy_only=False).astype(np.int64)))
        self.tokens = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)
        if len(self.tokens) and int(self.tokens.max()) >= manifest.vocab_size:
            raise DataError(
                f"{manifest.data_dir}: split {split!r} holds token id {int(self.tokens.max())}, "
                f"beyond vocab_size {manifest.vocab_size}"
            )

    def __len__(self) -> int:
        return len(self.tokens)

    def _check(self, batch_size: int, seq_len: int) -> None:
        if batch_size <= 0 or seq_len <= 0:
            raise ValueError(
                f"batch_size and seq_len must be positive, got {batch_size} and {seq_len}"
            )
        if len(self.tokens) < seq_len + 1:
            raise DataError(
                f"{self.manifest.data_dir}: split {self.split!r} has {len(self.tokens)} tokens, "
                f"fewer than seq_len + 1 = {seq_len + 1}; use more data or a shorter seq_len"
            )

    def random_batches(self, batch_size: int, seq_len: int, seed: int
                       ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Endless (inputs [B, T], targets [B, T]) from random windows; same seed, same batches.

        targets[:, t] == inputs[:, t + 1] within a window: the next token of every position.
        """
        self._check(batch_size, seq_len)
        return self._random_batches(batch_size, seq_len, seed)

    def _random_batches(self, batch_size: int, seq_len: int, seed: int
                        ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        gen = torch.Generator().manual_seed(seed)
        n_starts = len(self.tokens) - seq_len  # last start leaves room for the shifted target
        while True:
            yield self._windows(torch.randint(0, n_starts, (batch_size,), generator=gen), seq_len)

    def _windows(self, starts: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        windows_BT1 = self.tokens[starts[:, None] + torch.arange(seq_len + 1)]
        return windows_BT1[:, :-1].contiguous(), windows_BT1[:, 1:].contiguous()

    def step_batch(self, step: int, batch_size: int, seq_len: int, seed: int, first: int, count: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows [first, first + count) of the global batch of optimizer step `step`.

        The global batch is a pure function of (seed, step), so a run resumed at any step, with
        any number of workers, sees exactly the data an uninterrupted run would.
        """
        self._check(batch_size, seq_len)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        starts = torch.randint(0, len(self.tokens) - seq_len, (batch_size,), generator=gen)
        return self._windows(starts[first:first + count], seq_len)

    def sequential_batches(self, batch_size: int, seq_len: int
                           ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The stream in order as non-overlapping windows, once (for validation loss).

        The last batch may have fewer than `batch_size` rows; a tail shorter than one window is
        left out.
        """
        self._check(batch_size, seq_len)
        return self._sequential_batches(batch_size, seq_len)

    def _sequential_batches(self, batch_size: int, seq_len: int
                            ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n_windows = (len(self.tokens) - 1) // seq_len
        inputs_NT = self.tokens[: n_windows * seq_len].view(n_windows, seq_len)
        targets_NT = self.tokens[1: n_windows * seq_len + 1].view(n_windows, seq_len)
        for i in range(0, n_windows, batch_size):
            yield inputs_NT[i:i + batch_size], targets_NT[i:i + batch_size]
