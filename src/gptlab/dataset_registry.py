"""The registry behind `gptlab data build NAME`: each source (a reader registered with @source) and `build`,
which writes DIR/train.jsonl, val.jsonl and test.jsonl plus meta.json (source, licence, counts, and how many
raw items were left out and why). The split is fixed: a CRC32 hash of a grouping key puts every item of a
group on the same side. The readers live in gptlab.datasets and gptlab.code_datasets.
"""

from __future__ import annotations

import contextlib
import json
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from gptlab.errors import DataError, require_package
from gptlab.outputs import atomic_directory, check_new_output

SPLITS = ("train", "val", "test")
Record = dict[str, str]


def package_file(module: str, relative: str, install: str, purpose: str) -> Path:
    path = require_package(module, install, purpose) / relative
    if not path.is_file():
        raise DataError(f"{path} is missing from the installed {module} package (reinstall it: {install})")
    return path


@dataclass(frozen=True)
class Source:
    description: str
    licence: str
    origin: str
    # "classify" ({"text","label"}), "sft" ({"instruction","input","output"}), "tag" ({"tokens","tags"}), "code"
    # (sft records that are also HumanEval-format tasks) or "text" (a pretraining corpus for `gptlab prepare`:
    # {"text"} records written as SPLIT.txt, a blank line between them)
    task: str
    percent: tuple[int, int]  # (val, test) share of the hashed groups
    items: Callable[[Counter], Iterator[tuple[str, Record]]]  # yields (group key, record); counts what it skips
    split: Callable[[str], str] | None = None  # group -> split when the source fixes its own (default: hashed)
    files: Callable[[Path], int] | None = None  # writes the files the records name (images) under DIR; -> count


SOURCES: dict[str, Source] = {}  # name -> source, filled by @source below each reader


def source(name: str, description: str, licence: str, origin: str, task: str, percent: tuple[int, int],
           split: Callable[[str], str] | None = None, files: Callable[[Path], int] | None = None):
    """Register the decorated reader as dataset `name`."""
    def register(items: Callable[[Counter], Iterator[tuple[str, Record]]]):
        SOURCES[name] = Source(description, licence, origin, task, percent, items, split, files)
        return items
    return register


def split_of(group: str, percent: tuple[int, int]) -> str:
    bucket = zlib.crc32(group.encode("utf-8")) % 100
    val, test = percent
    return "test" if bucket < test else "val" if bucket < test + val else "train"


def build(name: str, out: str | Path | None = None) -> dict:
    """Write dataset `name` to `out` (default data/NAME); returns its meta.json. Never overwrites."""
    if name not in SOURCES:
        raise DataError(f"unknown dataset {name!r}; choose one of: {', '.join(SOURCES)}")
    source = SOURCES[name]
    out = check_new_output(out or f"data/{name}")
    skipped: Counter = Counter()
    counts = Counter()
    with atomic_directory(out) as tmp:
        with contextlib.ExitStack() as stack:
            handles: dict[str, object] = {}
            corpus = stack.enter_context(open(tmp / "corpus.txt", "w", encoding="utf-8")) \
                if source.task == "tag" else None
            for group, record in source.items(skipped):
                split = source.split(group) if source.split else split_of(group, source.percent)
                if split not in handles:
                    filename = f"{split}.txt" if source.task == "text" else f"{split}.jsonl"
                    handles[split] = stack.enter_context(open(tmp / filename, "w", encoding="utf-8"))
                if source.task == "text":
                    handles[split].write(("\n\n" if counts[split] else "") + record["text"])
                else:
                    handles[split].write(json.dumps(record, ensure_ascii=False) + "\n")
                counts[split] += 1
                if corpus is not None and split != "test":  # text to pretrain on, the test sentences held out
                    corpus.write("".join(record["tokens"]) + "\n")
            for split in SPLITS:  # every split file exists, possibly empty (a text corpus has no val/test)
                if split not in handles and source.task != "text":
                    (tmp / f"{split}.jsonl").touch()
        meta = {"name": name, "task": source.task, "description": source.description, "licence": source.licence,
                "source": source.origin, **{f"{split}_records": counts[split] for split in SPLITS},
                "skipped": dict(skipped), **({"files": source.files(tmp)} if source.files else {})}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False))
    return meta
