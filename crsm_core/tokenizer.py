"""Tokenizers: byte-level by default (no download), a HF `tokenizer.json` when a checkpoint has one,
token ids alone for a model with no vocabulary file (the benchmark's), and incremental decoding for streaming that never emits half a UTF-8 character."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

from .files import read_text

TOKENIZER_CONFIG = "tokenizer_config.json"
HF_TOKENIZER = "tokenizer.json"


class TokenizerError(ValueError):
    pass


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...
    def save(self, directory: str | Path) -> None: ...


class ByteTokenizer:
    """ids 0..255 are the UTF-8 bytes; then the special tokens."""
    SPECIALS = ("<|endoftext|>", "<|bos|>", "<|pad|>", "<|sep|>")
    eos_id, bos_id, pad_id, sep_id = 256, 257, 258, 259
    vocab_size = 256 + len(SPECIALS)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        # Special tokens are control signals, not text.
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def save(self, directory: str | Path) -> None:
        (Path(directory) / TOKENIZER_CONFIG).write_text(json.dumps({"type": "byte"}, indent=2) + "\n")


class HFTokenizer:
    """A `tokenizers` tokenizer.json (e.g. GPT-NeoX's, as state-spaces' Mamba-2 checkpoints use)."""

    def __init__(self, path: str | Path, eos_token: str = "<|endoftext|>"):
        from tokenizers import Tokenizer as _HF  # imported here: only needed for such checkpoints

        self.path = Path(path)
        try:
            self._tok = _HF.from_file(str(self.path))
        except Exception as e:  # tokenizers raises a bare Exception on parse errors
            raise TokenizerError(f"{self.path}: cannot load tokenizer ({e})") from e
        eos = self._tok.token_to_id(eos_token)
        if eos is None:
            raise TokenizerError(f"{self.path}: has no eos token {eos_token!r}")
        self.eos_token, self.eos_id = eos_token, eos
        self.vocab_size = self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        self._tok.save(str(directory / HF_TOKENIZER))
        (directory / TOKENIZER_CONFIG).write_text(
            json.dumps({"type": "hf", "eos_token": self.eos_token}, indent=2) + "\n")


class TokenIdTokenizer:
    """For a model driven by token ids only (the benchmark's 50277-token vocabulary has no vocabulary
    file). Each id decodes to a short text of its own (" t17"), so the streaming path does the same
    string work per token as with a real tokenizer; text prompts are refused."""

    def __init__(self, vocab_size: int, eos_id: int = 0):
        if not 0 <= eos_id < vocab_size:
            raise TokenizerError(f"eos_id {eos_id} is outside the vocabulary [0, {vocab_size})")
        self.vocab_size = vocab_size
        self.eos_id = eos_id  # GPT-NeoX's <|endoftext|>, as mamba2-130m's

    def encode(self, text: str) -> list[int]:
        raise TokenizerError("this model takes token-id prompts only (its tokenizer has no vocabulary)")

    def decode(self, ids: list[int]) -> str:
        return "".join(f" t{i}" for i in ids if 0 <= i < self.vocab_size and i != self.eos_id)

    def save(self, directory: str | Path) -> None:
        (Path(directory) / TOKENIZER_CONFIG).write_text(
            json.dumps({"type": "token_ids", "vocab_size": self.vocab_size, "eos_id": self.eos_id}, indent=2) + "\n")


def load_tokenizer(directory: str | Path, vocab_size: int | None = None) -> Tokenizer:
    """tokenizer.json if present (eos from tokenizer_config.json), else the byte tokenizer.

    vocab_size: the model's vocabulary. A directory with neither file gets the byte tokenizer only for a
    model whose vocabulary is the byte tokenizer's: for any other, bytes would be wrong tokens, silently.
    """
    directory = Path(directory)
    config: dict = {}
    config_path = directory / TOKENIZER_CONFIG
    if config_path.exists():
        try:
            config = json.loads(read_text(config_path, TokenizerError))
        except json.JSONDecodeError as e:
            raise TokenizerError(f"{config_path}: not valid JSON ({e})") from e
    if (directory / HF_TOKENIZER).exists():
        return HFTokenizer(directory / HF_TOKENIZER, config.get("eos_token", "<|endoftext|>"))
    if config.get("type") == "token_ids":
        if config.get("vocab_size") != vocab_size and vocab_size is not None:
            raise TokenizerError(f"{config_path}: vocab_size {config.get('vocab_size')} is not the model's ({vocab_size})")
        return TokenIdTokenizer(int(config["vocab_size"]), int(config.get("eos_id", 0)))
    if config.get("type", "byte") != "byte":
        raise TokenizerError(f"{config_path}: type {config.get('type')!r} but {HF_TOKENIZER} is missing")
    if not config and vocab_size not in (None, ByteTokenizer.vocab_size):
        raise TokenizerError(f"{directory}: neither {TOKENIZER_CONFIG} nor {HF_TOKENIZER} found, and the model's "
                             f"vocabulary ({vocab_size} tokens) is not the byte tokenizer's "
                             f"({ByteTokenizer.vocab_size})")
    return ByteTokenizer()


class IncrementalDecoder:
    """Turns a stream of token ids into text pieces, holding back an incomplete UTF-8 character.

    Decodes a short window of recent ids and emits only the text that is final: text ending in the
    replacement character is held (it may be half a character) until the next id completes it, or until
    `MAX_PENDING` ids have piled up (no UTF-8 character spans more than 4 bytes), when the
    replacement is emitted as it is.
    """
    MAX_PENDING = 4

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._prefix = 0  # start of the window re-decoded for context
        self._read = 0    # ids before this are already emitted

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix_text = self.tokenizer.decode(self.ids[self._prefix:self._read])
        text = self.tokenizer.decode(self.ids[self._prefix:])
        pending = len(self.ids) - self._read
        if text.endswith("\ufffd") and pending < self.MAX_PENDING:
            return ""
        if len(text) <= len(prefix_text) and pending < self.MAX_PENDING:
            return ""
        out = text[len(prefix_text):]
        self._prefix, self._read = self._read, len(self.ids)
        return out

    def flush(self) -> str:
        """Whatever is held back (as replacement characters if it never completed)."""
        prefix_text = self.tokenizer.decode(self.ids[self._prefix:self._read])
        text = self.tokenizer.decode(self.ids[self._prefix:])
        self._prefix = self._read = len(self.ids)
        return text[len(prefix_text):]
