"""Byte-level BPE tokenizer: training, saving, loading, and exact round trips.

Byte-level means every string maps to bytes before BPE, so any unicode text (and any code, with
its tabs, CRLFs and emoji) encodes without an unknown token and decodes back byte for byte. The
three special tokens get the first ids so that every tokenizer moray trains agrees on them, and
the model and the data pipeline can rely on `eos_id == 1` without reading the vocabulary.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIAL_TOKENS = (BOS, EOS, PAD)
BOS_ID, EOS_ID, PAD_ID = 0, 1, 2
TOKENIZER_FILE = "tokenizer.json"
# beside tokenizer.json, marks a Hugging Face tokenizer: its special tokens and chat template
HF_TOKENIZER_CONFIG = "tokenizer_config.json"
# 256 byte symbols + the special tokens: a smaller vocabulary cannot even hold the alphabet.
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)


class TokenizerError(ValueError):
    """A tokenizer cannot be built or loaded; the message names the file or the value."""


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, show_progress: bool = False
) -> tokenizers.Tokenizer:
    """Train a byte-level BPE tokenizer with `<|bos|>`, `<|eos|>`, `<|pad|>` at ids 0, 1, 2.

    `vocab_size` counts the special tokens and the 256 byte symbols; a corpus too small to
    learn that many merges gives a smaller vocabulary (read `get_vocab_size()` afterwards).
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise TokenizerError(
            f"vocab_size={vocab_size} is too small: a byte-level tokenizer needs at least "
            f"{MIN_VOCAB_SIZE} (256 bytes + {len(SPECIAL_TOKENS)} special tokens)"
        )
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


class Tokenizer:
    """The tokenizer as moray uses it: plain lists of ids, special tokens at known ids.

    moray's own tokenizers have their special tokens at fixed ids, and text that happens to
    contain `<|eos|>` literally is encoded as ordinary bytes, never as the special token:
    documents cannot inject control tokens, and decode(encode(s)) == s always.

    A Hugging Face tokenizer (`hf_config`: the tokens of its tokenizer_config.json) keeps its own
    special tokens and ids, its chat template, and encodes special tokens written in the text
    as transformers does, since its chat template writes them as text.
    """

    def __init__(self, tok: tokenizers.Tokenizer, source: str = "<in memory>", hf_config: dict | None = None) -> None:
        self._tok = tok
        self.chat_template: str | None = None
        if hf_config is None:
            ids = [tok.token_to_id(t) for t in SPECIAL_TOKENS]
            if ids != [BOS_ID, EOS_ID, PAD_ID]:
                raise TokenizerError(
                    f"{source}: special tokens {list(SPECIAL_TOKENS)} must have ids 0, 1, 2, "
                    f"found {ids}; train it with model.tokenizer.train_tokenizer"
                )
            tok.encode_special_tokens = True
            self.bos_token, self.eos_token = BOS, EOS
            self._ids = (BOS_ID, EOS_ID, PAD_ID)
            return
        self.bos_token, self.eos_token = hf_config.get("bos_token"), hf_config.get("eos_token")
        self.chat_template = hf_config.get("chat_template")
        ids = []
        for role in ("bos", "eos", "pad"):
            text = hf_config.get(f"{role}_token")
            token_id = tok.token_to_id(text) if isinstance(text, str) else None
            if text is not None and token_id is None:
                raise TokenizerError(f"{source}: {role}_token {text!r} is not in the vocabulary")
            ids.append(token_id)
        if ids[1] is None:
            raise TokenizerError(f"{source}: no eos_token; generation could not stop")
        self._ids = (ids[0], ids[1], ids[2] if ids[2] is not None else ids[1])

    @staticmethod
    def raw(file: str | Path) -> tokenizers.Tokenizer:
        """The `tokenizers` object of a tokenizer.json, errors as TokenizerError."""
        try:
            return tokenizers.Tokenizer.from_file(str(file))
        except Exception as e:  # the Rust side raises a bare Exception for every failure
            raise TokenizerError(f"cannot read tokenizer {file}: {e}") from e

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load a `tokenizer.json` file, or the one inside directory `path`; a tokenizer_config.json
        beside it makes it a Hugging Face tokenizer."""
        path = Path(path)
        file = path / TOKENIZER_FILE if path.is_dir() else path
        if not file.is_file():
            raise TokenizerError(f"tokenizer file not found: {file}")
        hf_file = file.parent / HF_TOKENIZER_CONFIG
        hf_config = None
        if hf_file.is_file():
            try:
                hf_config = json.loads(hf_file.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise TokenizerError(f"cannot read {hf_file}: {e}") from None
        return cls(cls.raw(file), source=str(file), hf_config=hf_config)

    def save(self, path: str | Path) -> Path:
        """Write the tokenizer to `path` (a file, or a directory that gets a `tokenizer.json`)."""
        path = Path(path)
        file = path / TOKENIZER_FILE if path.is_dir() else path
        file.parent.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(file))
        return file

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, with no special tokens added."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` for many texts at once, in parallel threads (much faster for a corpus)."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids` (a list, or a 1-D tensor/array), special tokens left out."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        return self._tok.decode(ids, skip_special_tokens=True)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    @property
    def bos_id(self) -> int | None:
        return self._ids[0]

    @property
    def eos_id(self) -> int:
        return self._ids[1]

    @property
    def pad_id(self) -> int:
        return self._ids[2]
