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
# beside tokenizer.json, these mark a Hugging Face tokenizer: its special tokens and chat template
HF_TOKENIZER_CONFIG = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
HF_SIDE_FILES = (HF_TOKENIZER_CONFIG, "special_tokens_map.json", "config.json")
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


def _read_json(file: Path) -> dict:
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"cannot read {file}: {e}") from None
    return data if isinstance(data, dict) else {}


def _token_text(value: object) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _hf_tokenizer_config(folder: Path, raw: tokenizers.Tokenizer) -> dict:
    """tokenizer_config.json with its special tokens and chat template filled in from wherever
    this Hugging Face dir keeps them (special_tokens_map.json, token ids in config.json,
    chat_template.jinja, a list of named templates)."""
    meta = _read_json(folder / HF_TOKENIZER_CONFIG)
    special_map = _read_json(folder / "special_tokens_map.json")
    model_config = _read_json(folder / "config.json")
    for role in ("bos", "eos", "pad"):
        key = f"{role}_token"
        text = _token_text(meta.get(key)) or _token_text(special_map.get(key))
        token_id = model_config.get(f"{role}_token_id")
        if isinstance(token_id, list):
            token_id = token_id[0] if token_id else None
        if text is None and isinstance(token_id, int):
            text = raw.id_to_token(token_id)
        meta[key] = text
    template = meta.get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if template is None and (folder / CHAT_TEMPLATE_FILE).is_file():
        template = (folder / CHAT_TEMPLATE_FILE).read_text()
    meta["chat_template"] = template
    return meta


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
        self._hf_config = hf_config
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
        """Load a `tokenizer.json` file, or the one inside directory `path`. Beside it, a
        tokenizer_config.json, special_tokens_map.json or config.json (a Hugging Face model dir)
        makes it a Hugging Face tokenizer."""
        path = Path(path)
        file = path / TOKENIZER_FILE if path.is_dir() else path
        if not file.is_file():
            raise TokenizerError(f"tokenizer file not found: {file}")
        raw = cls.raw(file)
        if not any((file.parent / name).is_file() for name in HF_SIDE_FILES):
            return cls(raw, source=str(file))
        return cls(raw, source=str(file), hf_config=_hf_tokenizer_config(file.parent, raw))

    def save(self, path: str | Path) -> Path:
        """Write the tokenizer to `path` (a file, or a directory that gets a `tokenizer.json`); a
        Hugging Face tokenizer also writes its tokenizer_config.json beside it."""
        path = Path(path)
        file = path / TOKENIZER_FILE if path.is_dir() else path
        file.parent.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(file))
        if self._hf_config is not None:
            (file.parent / HF_TOKENIZER_CONFIG).write_text(json.dumps(self._hf_config, indent=2) + "\n")
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
