"""Safetensors read and written one tensor (or one row range) at a time, with bounded memory.

`safetensors.safe_open` maps the whole file, and every page it touches stays in the process's
resident set; `save_file` needs every tensor in memory at once. Converting a checkpoint of
hundreds of gigabytes needs neither: `read_tensor` reads exactly one tensor's bytes (or some
rows of it) with `pread`, and `StreamWriter` writes the header first (shapes are known up front)
and then each tensor's bytes as they are produced, so memory stays near the largest tensor.
The files are ordinary safetensors; `safe_open` and `transformers` read them.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from model.checkpoint import CheckpointError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsError(CheckpointError):
    """A safetensors file is malformed or a tensor is not what the writer declared; names the file."""


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes are in a file."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def read_header(file: Path) -> dict[str, TensorEntry]:
    """Every tensor of a safetensors file, from its header only."""
    file = Path(file)
    try:
        with open(file, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise SafetensorsError(f"{file}: too short to be a safetensors file")
            (size,) = struct.unpack("<Q", raw)
            if size > _MAX_HEADER:
                raise SafetensorsError(f"{file}: header of {size} bytes is not plausible")
            header = json.loads(f.read(size))
            file_size = os.fstat(f.fileno()).st_size
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SafetensorsError(f"{file}: cannot read the safetensors header: {exc}") from None
    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = DTYPES[info["dtype"]]
            begin, end = (8 + size + int(o) for o in info["data_offsets"])
            shape = tuple(int(d) for d in info["shape"])
        except (KeyError, TypeError, ValueError):
            raise SafetensorsError(f"{file}: tensor {name}: unsupported or malformed entry {info}") from None
        if end > file_size:
            raise SafetensorsError(f"{file}: tensor {name} ends at byte {end} but the file has {file_size} "
                                   "(truncated?)")
        entries[name] = TensorEntry(file, dtype, shape, begin, end)
    return entries


def read_tensor(entry: TensorEntry, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """The tensor, or rows [start, stop) of its first dimension, read with one pread."""
    shape, begin, end = entry.shape, entry.begin, entry.end
    if rows is not None:
        row_bytes = entry.nbytes // shape[0] if shape and shape[0] else 0
        begin, end = entry.begin + rows[0] * row_bytes, entry.begin + rows[1] * row_bytes
        shape = (rows[1] - rows[0], *shape[1:])
    buf = bytearray(end - begin)
    with open(entry.file, "rb") as f:
        view, done = memoryview(buf), 0
        while done < len(buf):
            n = os.preadv(f.fileno(), [view[done:]], begin + done)
            if n <= 0:
                raise SafetensorsError(f"{entry.file}: unexpected end of file reading bytes {begin}..{end}")
            done += n
    if not buf:
        return torch.empty(shape, dtype=entry.dtype)
    return torch.frombuffer(buf, dtype=entry.dtype).view(shape)


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


class StreamWriter:
    """Writes a safetensors file whose tensors are declared up front and then written in that
    order, each in one piece or in several row ranges (`write` appends; the declared size must be
    met exactly before the next tensor starts)."""

    def __init__(self, file: Path, tensors: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        self.file = Path(file)
        header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
        self._sizes: list[tuple[str, torch.dtype, int]] = []
        offset = 0
        for name, dtype, shape in tensors:
            size = _nbytes(dtype, shape)
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            self._sizes.append((name, dtype, size))
            offset += size
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned, as safetensors writes it
        self._f: BinaryIO = open(self.file, "wb")
        self._f.write(struct.pack("<Q", len(blob)) + blob)
        self._index, self._written = 0, 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append `tensor`'s bytes (the whole tensor `name` or its next rows)."""
        if self._index >= len(self._sizes) or self._sizes[self._index][0] != name:
            expected = self._sizes[self._index][0] if self._index < len(self._sizes) else "nothing"
            raise SafetensorsError(f"{self.file}: wrote {name} but {expected} comes next")
        _, dtype, size = self._sizes[self._index]
        if tensor.dtype != dtype:
            raise SafetensorsError(f"{self.file}: tensor {name} is {tensor.dtype}, declared {dtype}")
        data = tensor.detach().contiguous().view(torch.uint8).reshape(-1).numpy()
        self._written += data.size
        if self._written > size:
            raise SafetensorsError(f"{self.file}: tensor {name} got more bytes than its declared shape holds")
        self._f.write(memoryview(data))
        if self._written == size:
            self._index, self._written = self._index + 1, 0

    def close(self) -> None:
        """Finish the file; an incomplete one is an error (the caller deletes its temp dir)."""
        self._f.close()
        if self._index < len(self._sizes):
            raise SafetensorsError(f"{self.file}: tensor {self._sizes[self._index][0]} was never written")

    def __enter__(self) -> "StreamWriter":
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.close()
        else:
            self._f.close()
