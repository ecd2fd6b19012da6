"""Moderation: score texts for content a deployment refuses, with pluggable moderators.

A moderator maps texts to per-category scores in [0, 1] (the `Moderator` protocol). Two kinds ship:

  profanity-check      alt-profanity-check's offline model (a linear SVM on bag-of-words, English
                       offensive language; it ships its trained weights): one category, `offensive`
  a classifier path    any checkpoint of `gptlab finetune --task classify`: every label but the harmless
                       one (`ok` unless told otherwise) is a category, scored by the label's probability;
                       texts longer than its context are scored in overlapping windows (the maximum counts)

`Moderation` turns scores into OpenAI-style verdicts (flagged when any category reaches the threshold).
`StreamScreen` holds generated text back until a moderator has seen it: the server screens output in
windows that overlap the text already released, so a phrase split across chunks is still caught.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from gptlab import loading
from gptlab.errors import GptlabError, require_package
from gptlab.finetune.data import ClassifyExample, classify_batch, classify_record, in_batches, read_jsonl

SAFE_LABEL = "ok"  # a classifier's harmless label, unless the user names another


class ModerationError(GptlabError):
    """A moderator that cannot be built or used as asked."""


class Moderator(Protocol):
    name: str
    categories: tuple[str, ...]

    def scores(self, texts: Sequence[str]) -> list[dict[str, float]]:
        """One {category: score in [0, 1]} per text."""
        ...


class ProfanityCheck:
    """alt-profanity-check: English offensive language, from a model trained on tweets and Wikipedia
    comments that the package ships (no download)."""

    name = "profanity-check"
    categories = ("offensive",)

    def __init__(self) -> None:
        require_package("profanity_check", "pip install alt-profanity-check", "the profanity-check moderator")
        from profanity_check import predict_prob

        self._predict_prob = predict_prob

    def scores(self, texts: Sequence[str]) -> list[dict[str, float]]:
        if not texts:
            return []
        return [{"offensive": float(p)} for p in self._predict_prob(list(texts))]


class ClassifierModerator:
    """A `gptlab finetune --task classify` checkpoint: the user's own policy, its labels the categories."""

    def __init__(self, path: str | Path, safe_label: str = SAFE_LABEL, batch_size: int = 16) -> None:
        loaded = loading.load(path)
        if loaded.task != "classify":
            raise ModerationError(f"{path} is a language model, not a classifier: a moderator checkpoint comes "
                                  "from `gptlab finetune --task classify`")
        labels = list(loaded.finetune["labels"])
        if safe_label not in labels:
            raise ModerationError(f"{path}: no harmless label {safe_label!r} among its labels ({', '.join(labels)}); "
                                  "name the harmless one with --safe-label")
        self.name = Path(path).name
        self.model, self.tokenizer = loaded.model.eval(), loaded.tokenizer
        self.labels, self.batch_size = labels, batch_size
        self.categories = tuple(label for label in labels if label != safe_label)
        self.window = self.model.config.block_size - 1  # room for the closing <|endoftext|>

    def windows(self, ids: list[int]) -> list[list[int]]:
        """The text's tokens, or overlapping windows (half a window apart) when it exceeds the context."""
        if len(ids) <= self.window:
            return [ids]
        stride = max(1, self.window // 2)
        starts = list(range(0, len(ids) - self.window, stride)) + [len(ids) - self.window]
        return [ids[s: s + self.window] for s in starts]

    @torch.no_grad()
    def scores(self, texts: Sequence[str]) -> list[dict[str, float]]:
        pieces: list[tuple[int, list[int]]] = []  # (text index, window ids)
        for t, ids in enumerate(self.tokenizer.encode_batch(list(texts))):
            pieces += [(t, w + [self.tokenizer.eot_id]) for w in self.windows(ids)]
        best = [dict.fromkeys(self.categories, 0.0) for _ in texts]
        for chunk in in_batches(pieces, self.batch_size):
            x, last, _ = classify_batch([ClassifyExample(ids, 0) for _, ids in chunk], self.tokenizer.eot_id)
            device = next(self.model.parameters()).device
            probs = self.model.classify(x.to(device), last.to(device)).float().softmax(-1).cpu()
            for (t, _), row in zip(chunk, probs.tolist(), strict=True):
                for label, p in zip(self.labels, row, strict=True):
                    if label in best[t]:
                        best[t][label] = max(best[t][label], p)
        return best


MODERATORS = {"profanity-check": ProfanityCheck}  # named moderators; any other spec is a classifier path


def load_moderator(spec: str, safe_label: str = SAFE_LABEL) -> Moderator:
    """A named moderator, or the classifier checkpoint at path `spec`."""
    if spec in MODERATORS:
        return MODERATORS[spec]()
    if not Path(spec).exists():
        raise ModerationError(f"unknown moderator {spec!r}: name one of {', '.join(MODERATORS)} or the path of a "
                              "`gptlab finetune --task classify` checkpoint")
    return ClassifierModerator(spec, safe_label)


@dataclass(frozen=True)
class Verdict:
    flagged: bool
    categories: dict[str, bool]
    category_scores: dict[str, float]

    def to_dict(self) -> dict:
        """OpenAI's moderation result shape."""
        return {"flagged": self.flagged, "categories": self.categories, "category_scores": self.category_scores}


class Moderation:
    """A moderator and the score at which a category counts as present."""

    def __init__(self, moderator: Moderator, threshold: float = 0.5) -> None:
        if not 0.0 < threshold <= 1.0:
            raise ModerationError(f"the moderation threshold must be in (0, 1], got {threshold}")
        self.moderator, self.threshold = moderator, threshold

    @property
    def name(self) -> str:
        return self.moderator.name

    def check(self, texts: Sequence[str]) -> list[Verdict]:
        verdicts = []
        for scores in self.moderator.scores(texts):
            categories = {name: score >= self.threshold for name, score in scores.items()}
            verdicts.append(Verdict(any(categories.values()), categories, scores))
        return verdicts


class StreamScreen:
    """Generated text of one sequence, held back until screened. `add` returns the window to screen once
    `every` characters wait (or the sequence ends): the last `overlap` released characters plus the waiting
    text, so a phrase split across chunks is seen whole. When the window is clean, `release` hands out the
    waiting text up to its last space (a word cut in two waits for its end), all of it at the end."""

    def __init__(self, every: int = 48, overlap: int = 256) -> None:
        self.every, self.overlap = every, overlap
        self.tail = ""  # the end of the released text
        self.pending = ""

    def add(self, text: str, final: bool) -> str | None:
        self.pending += text
        if not final and len(self.pending) < self.every:
            return None
        return self.tail + self.pending

    def release(self, final: bool) -> str:
        cut = len(self.pending)
        if not final:
            space = max(self.pending.rfind(" "), self.pending.rfind("\n"))
            if space > 0 and len(self.pending) < 4 * self.every:  # an endless word is released anyway
                cut = space
        out, self.pending = self.pending[:cut], self.pending[cut:]
        self.tail = (self.tail + out)[-self.overlap:]
        return out


def evaluate(moderation: Moderation, path: str | Path, safe_label: str = SAFE_LABEL,
             batch_size: int = 64) -> dict[str, float | int | str]:
    """Precision, recall and F1 of `flagged` on a JSONL file of {"text","label"} records, where every label
    but `safe_label` is harmful (the set `gptlab data build hatespeech-id` writes)."""
    records = [classify_record(record, where) for where, record in read_jsonl(path)]
    if not records:
        raise ModerationError(f"{path}: no records")
    start = time.perf_counter()
    flagged = [v.flagged for chunk in in_batches([t for t, _ in records], batch_size)
               for v in moderation.check(chunk)]
    seconds = time.perf_counter() - start
    harmful = [label != safe_label for _, label in records]
    tp = sum(f and h for f, h in zip(flagged, harmful, strict=True))
    fp, fn = sum(flagged) - tp, sum(harmful) - tp
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    accuracy = sum(f == h for f, h in zip(flagged, harmful, strict=True)) / len(records)
    return {"moderator": moderation.name, "threshold": moderation.threshold, "items": len(records),
            "harmful": sum(harmful), "flagged": sum(flagged), "precision": round(precision, 4),
            "recall": round(recall, 4), "f1": round(f1, 4), "accuracy": round(accuracy, 4),
            "seconds": round(seconds, 2)}
