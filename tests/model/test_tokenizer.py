"""Tokenizer: special ids, exact byte-level round trips, save/load and its errors."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest
import torch

from model.tokenizer import (
    MIN_VOCAB_SIZE,
    TOKENIZER_FILE,
    Tokenizer,
    TokenizerError,
    train_tokenizer,
)

STDLIB = Path(sysconfig.get_paths()["stdlib"])

SAMPLES = [
    "def f(x):\n\treturn x ** 2  # square\r\n",
    "naïve café — Grüße, Добрый день, こんにちは, 你好, مرحبا, 🙂👩‍👩‍👧 e\u0301",
    "literal special tokens <|bos|><|eos|><|pad|> stay text",
    "  leading spaces, trailing spaces  \n\n\n",
    "control chars \x00\x01\x7f and the last code point \U0010ffff",
    "",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    names = ("textwrap.py", "colorsys.py")
    texts = [(STDLIB / name).read_text(encoding="utf-8") for name in names]
    return Tokenizer(train_tokenizer(texts, vocab_size=400))


def test_special_tokens_have_fixed_ids(tok: Tokenizer) -> None:
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    assert tok.vocab_size == 400


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip_is_exact(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    # literal "<|eos|>" in text is ordinary bytes, never a special id
    assert not set(ids) & {tok.bos_id, tok.eos_id, tok.pad_id}


def test_decode_skips_special_tokens_and_takes_tensors(tok: Tokenizer) -> None:
    text = "x = [1, 2, 3]\n"
    ids = [tok.bos_id] + tok.encode(text) + [tok.eos_id, tok.pad_id]
    assert tok.decode(ids) == text
    assert tok.decode(torch.tensor(ids)) == text


def test_encode_batch_matches_encode(tok: Tokenizer) -> None:
    assert tok.encode_batch(SAMPLES) == [tok.encode(s) for s in SAMPLES]


def test_large_vocab_on_code() -> None:
    texts = [p.read_text(encoding="utf-8") for p in sorted(STDLIB.glob("*.py"))]
    tok = Tokenizer(train_tokenizer(texts, vocab_size=32768))
    assert tok.vocab_size == 32768
    code = texts[0]
    ids = tok.encode(code)
    assert tok.decode(ids) == code
    assert len(ids) < len(code.encode("utf-8")) / 3  # the merges actually compress code


def test_vocab_too_small_is_an_error() -> None:
    with pytest.raises(TokenizerError, match="vocab_size=100"):
        train_tokenizer(["abc"], vocab_size=100)
    assert MIN_VOCAB_SIZE == 259


def test_save_and_load_file_and_dir(tok: Tokenizer, tmp_path: Path) -> None:
    file = tok.save(tmp_path / "sub" / "tok.json")
    assert file == tmp_path / "sub" / "tok.json" and file.is_file()
    (tmp_path / "dir").mkdir()
    assert tok.save(tmp_path / "dir") == tmp_path / "dir" / TOKENIZER_FILE
    for path in (file, tmp_path / "dir"):
        loaded = Tokenizer.load(path)
        assert loaded.vocab_size == tok.vocab_size
        for text in SAMPLES:
            assert loaded.encode(text) == tok.encode(text)
            assert loaded.decode(loaded.encode(text)) == text


def test_load_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="not found.*missing.json"):
        Tokenizer.load(tmp_path / "missing.json")
    with pytest.raises(TokenizerError, match=f"not found.*{TOKENIZER_FILE}"):
        Tokenizer.load(tmp_path)  # a dir without tokenizer.json
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(TokenizerError, match="bad.json"):
        Tokenizer.load(bad)
    assert issubclass(TokenizerError, ValueError)


def test_tokenizer_without_moray_special_tokens_is_rejected(tmp_path: Path) -> None:
    import tokenizers

    foreign = tokenizers.Tokenizer(tokenizers.models.BPE())
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=50, show_progress=False)
    foreign.train_from_iterator(["hello world"], trainer)
    foreign.save(str(tmp_path / "foreign.json"))
    with pytest.raises(TokenizerError, match="foreign.json.*special tokens"):
        Tokenizer.load(tmp_path / "foreign.json")
