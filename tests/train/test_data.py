"""Data pipeline: prepare -> manifest + Parquet shards -> token batches, on real files."""

from __future__ import annotations

import json
import sysconfig
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from model.tokenizer import Tokenizer
from train.data import (
    MANIFEST_FILE,
    DataError,
    Manifest,
    TokenStream,
    default_corpus_files,
    load_manifest,
    prepare_corpus,
)

STDLIB = Path(sysconfig.get_paths()["stdlib"])
SMALL_FILES = [
    STDLIB / name
    for name in (
        "json/__init__.py", "json/decoder.py", "json/encoder.py", "json/scanner.py",
        "json/tool.py", "textwrap.py", "colorsys.py", "bisect.py", "keyword.py", "this.py",
    )
]


def _prepare(inputs: list[Path] | None, out: Path, **kw) -> Manifest:
    kw = {"vocab_size": 512, "shard_tokens": 4000, "val_fraction": 0.2, "progress": False} | kw
    return prepare_corpus(inputs, out, **kw)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("prepared") / "data"
    _prepare(SMALL_FILES, out)
    return out


def _docs(manifest: Manifest, split: str) -> list[list[int]]:
    rows = []
    for path in manifest.shard_paths(split):
        table = pq.read_table(path)
        assert table.schema.field("tokens").type == pa.list_(pa.int32())
        rows += table.column("tokens").to_pylist()
    return rows


def _docs_of(manifest: Manifest, file: str) -> list[list[int]]:
    return pq.read_table(manifest.data_dir / file).column("tokens").to_pylist()


def test_prepare_writes_shards_that_decode_to_the_sources(prepared: Path) -> None:
    manifest = load_manifest(prepared)
    tok = Tokenizer.load(manifest.tokenizer_path)
    assert manifest.vocab_size == tok.vocab_size == 512
    assert manifest.n_docs() == len(SMALL_FILES) and manifest.n_docs("val") == 2
    assert len(manifest.shards("train")) > 1  # shard_tokens=4000 splits the train docs
    assert manifest.source_files == [str(p) for p in SMALL_FILES]
    assert manifest.source_bytes == sum(p.stat().st_size for p in SMALL_FILES)

    decoded = []
    for split in ("train", "val"):
        rows = _docs(manifest, split)
        for info in manifest.shards(split):
            assert info.n_tokens == sum(len(r) for r in _docs_of(manifest, info.file))
        assert sum(len(r) for r in rows) == manifest.n_tokens(split)
        for row in rows:
            assert row[-1] == tok.eos_id and tok.eos_id not in row[:-1]
            decoded.append(tok.decode(row))
    assert sorted(decoded) == sorted(p.read_text(encoding="utf-8") for p in SMALL_FILES)

    raw = json.loads((prepared / MANIFEST_FILE).read_text())
    assert raw["format_version"] == 1 and raw["tokenizer"] == "tokenizer.json"
    assert raw["totals"] == {"n_docs": manifest.n_docs(), "n_tokens": manifest.n_tokens()}
    assert raw["splits"]["train"]["shards"][0]["file"] == "train-00000.parquet"
    assert raw["splits"]["val"]["shards"][0]["file"] == "val-00000.parquet"


def test_split_does_not_depend_on_input_order(prepared: Path, tmp_path: Path) -> None:
    again = _prepare(list(reversed(SMALL_FILES)), tmp_path / "data")
    first = load_manifest(prepared)
    tok = Tokenizer.load(prepared)
    assert sorted(tok.decode(r) for r in _docs(again, "val")) == sorted(
        tok.decode(r) for r in _docs(first, "val")
    )


def test_directory_inputs_are_walked_and_binary_files_skipped(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "pkg" / "sub").mkdir(parents=True)
    (src / "pkg" / "sub" / "b.txt").write_text("second <|eos|> file\n")
    (src / "pkg" / "a.txt").write_text("first file: naïve ✓\r\n")
    (src / "c.py").write_text("print('third')\n")
    (src / "empty.txt").write_text("   \n")
    (src / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    (src / ".hidden").write_text("not a document")
    m = _prepare([src], tmp_path / "data", vocab_size=300, val_fraction=0.0)
    assert [Path(f).relative_to(src).as_posix() for f in m.source_files] == [
        "c.py", "pkg/a.txt", "pkg/sub/b.txt"
    ]
    assert m.shards("val") == [] and m.n_docs("train") == 3
    tok = m.load_tokenizer()
    rows = _docs(m, "train")
    assert [tok.decode(r) for r in rows] == [
        "print('third')\n", "first file: naïve ✓\r\n", "second <|eos|> file\n"
    ]
    assert all(r.count(tok.eos_id) == 1 for r in rows)


def test_overwrite_prepared_dir_and_leave_no_temp_dirs(tmp_path: Path) -> None:
    out = tmp_path / "data"
    _prepare(SMALL_FILES[:3], out)
    m = _prepare(SMALL_FILES[3:6], out, vocab_size=400)
    assert load_manifest(out).vocab_size == m.vocab_size == 400
    assert len(load_manifest(out).source_files) == 3
    assert [p.name for p in tmp_path.iterdir()] == ["data"]


def test_refuses_to_overwrite_a_dir_that_is_not_prepared_data(tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="refusing to overwrite.*mine"):
        _prepare(SMALL_FILES[:2], out)
    assert (out / "notes.txt").read_text() == "keep me"


def test_input_errors_name_the_path(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=f"no text found in {empty}"):
        _prepare([empty], tmp_path / "out")

    blank = tmp_path / "blank.txt"
    blank.write_text("")
    with pytest.raises(DataError, match="no text found in .*blank.txt"):
        _prepare([blank], tmp_path / "out")

    nul = tmp_path / "nul.bin"
    nul.write_bytes(b"abc\x00def")
    with pytest.raises(DataError, match="binary.*nul.bin"):
        _prepare([SMALL_FILES[0], nul], tmp_path / "out")

    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café".encode("latin-1"))
    with pytest.raises(DataError, match="binary.*latin1.txt"):
        _prepare([latin1], tmp_path / "out")

    with pytest.raises(DataError, match="input not found: .*nowhere.txt"):
        _prepare([SMALL_FILES[0], tmp_path / "nowhere.txt"], tmp_path / "out")

    # nothing half-written was left behind by any of the failures
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "blank.txt", "empty", "latin1.txt", "nul.bin"
    ]


def test_manifest_errors(prepared: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data dir not found.*moray data prepare"):
        load_manifest(tmp_path / "nope")
    with pytest.raises(DataError, match=f"no manifest.json in {tmp_path}.*moray data prepare"):
        load_manifest(tmp_path)
    with pytest.raises(DataError, match="no manifest.json"):
        TokenStream(tmp_path)

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / MANIFEST_FILE).write_text("{oops")
    with pytest.raises(DataError, match="cannot read manifest .*broken"):
        load_manifest(broken)
    (broken / MANIFEST_FILE).write_text('{"format_version": 1}')
    with pytest.raises(DataError, match="malformed manifest"):
        load_manifest(broken)

    copy = tmp_path / "copy"
    copy.mkdir()
    for f in prepared.iterdir():
        if f.name != "train-00001.parquet":
            (copy / f.name).write_bytes(f.read_bytes())
    with pytest.raises(DataError, match="train-00001.parquet.*missing"):
        load_manifest(copy)


def test_random_batches_are_deterministic_and_shifted(prepared: Path) -> None:
    stream = TokenStream(prepared, "train")
    assert len(stream) == load_manifest(prepared).n_tokens("train")
    assert stream.tokens.dtype == torch.int64

    def take(seed: int, n: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
        it = stream.random_batches(batch_size=4, seq_len=32, seed=seed)
        return [next(it) for _ in range(n)]

    a, b, c = take(0), take(0), take(1)
    assert all(torch.equal(x, y) for (x, _), (y, _) in zip(a, b))
    assert not all(torch.equal(x, y) for (x, _), (y, _) in zip(a, c))

    windows = stream.tokens.unfold(0, 33, 1)  # every window of seq_len + 1 tokens
    for inputs, targets in a:
        assert inputs.shape == targets.shape == (4, 32)
        assert torch.equal(inputs[:, 1:], targets[:, :-1])
        for row in torch.cat([inputs, targets[:, -1:]], dim=1):
            assert (windows == row).all(dim=1).any()


def test_sequential_batches_walk_the_stream_in_order(prepared: Path) -> None:
    stream = TokenStream(prepared, "val")
    batches = list(stream.sequential_batches(batch_size=3, seq_len=16))
    n = (len(stream) - 1) // 16
    inputs = torch.cat([x for x, _ in batches]).flatten()
    targets = torch.cat([y for _, y in batches]).flatten()
    assert torch.equal(inputs, stream.tokens[: n * 16])
    assert torch.equal(targets, stream.tokens[1 : n * 16 + 1])
    assert all(len(x) == 3 for x, _ in batches[:-1])


def test_too_few_tokens_is_an_error(prepared: Path, tmp_path: Path) -> None:
    stream = TokenStream(prepared, "val")
    with pytest.raises(DataError, match="'val' has .* tokens, fewer than seq_len"):
        stream.random_batches(batch_size=1, seq_len=len(stream), seed=0)
    next(stream.random_batches(batch_size=1, seq_len=len(stream) - 1, seed=0))
    m = _prepare(SMALL_FILES[:2], tmp_path / "noval", val_fraction=0.0)
    with pytest.raises(DataError, match="'val' has 0 tokens"):
        TokenStream(m, "val").sequential_batches(batch_size=1, seq_len=8)
    with pytest.raises(DataError, match="no split 'test'"):
        TokenStream(m, "test")


def test_default_stdlib_corpus(tmp_path: Path) -> None:
    files = default_corpus_files()
    assert all(f.suffix == ".py" and "site-packages" not in f.parts for f in files)
    assert not any(part in ("test", "tests") for f in files for part in f.parts)
    start = time.perf_counter()
    m = prepare_corpus(None, tmp_path / "data", progress=False)
    seconds = time.perf_counter() - start
    print(f"default corpus: {len(files)} files, {m.source_bytes / 1e6:.1f} MB, "
          f"{m.n_tokens()} tokens, prepared in {seconds:.1f}s")
    assert 3e6 < m.source_bytes < 20e6
    assert m.vocab_size == 2048
    assert m.n_tokens("val") > 0 and m.n_tokens("train") > 1_000_000
    stream = TokenStream(tmp_path / "data", "train")
    inputs, targets = next(stream.random_batches(batch_size=2, seq_len=64, seed=0))
    assert inputs.shape == (2, 64)
