"""Fine-tuning data: JSONL records validated line by line, encoded into examples (through the run's prompt
style for SFT), padded into batches, and drawn in seeded epochs."""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gptlab import distributed, prompts
from gptlab.config import TrainConfig
from gptlab.data import DataError
from gptlab.errors import GptlabError
from gptlab.model import IGNORE_INDEX
from gptlab.prompts import Message, PromptStyle
from gptlab.tokenizer import Tokenizer
from gptlab.train import draw_generator, grad_accum_steps
from gptlab.vision import VisionConfig, encode_prompt, load_image
from gptlab.vision.images import ImageError


def read_jsonl(path: str | Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(`file:line`, object) for each non-blank line (of a gzip file too: `.gz`); anything else is an error
    naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{where}: not valid UTF-8") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
            yield where, record


def _text(record: dict[str, Any], key: str, where: str, required: bool = True) -> str:
    value = record.get(key, None if required else "")
    if not isinstance(value, str):
        raise DataError(f"{where}: {key!r} must be a string, got {type(value).__name__ if key in record else 'nothing'}")
    return value


def sft_messages(record: dict[str, Any], where: str) -> list[Message]:
    """An instruction record or a chat record as a list of messages ending with the assistant's reply."""
    if "messages" in record:
        if not isinstance(record["messages"], list) or not record["messages"]:
            raise DataError(f"{where}: 'messages' must be a non-empty list")
        try:
            result = prompts.messages_from(record["messages"], where)
        except prompts.PromptError as err:
            raise DataError(str(err)) from None
        if any(m.role == "system" for m in result[1:]):
            raise DataError(f"{where}: only the first message may be a system message")
        if result[-1].role != "assistant":
            raise DataError(f"{where}: the last message must be the assistant's (the response to learn)")
        return result
    if "instruction" in record and "output" in record:
        instruction, extra = _text(record, "instruction", where), _text(record, "input", where, required=False)
        user = f"{instruction}\n\n{extra}" if extra else instruction
        return [Message("user", user), Message("assistant", _text(record, "output", where))]
    raise DataError(f"{where}: expected {{\"instruction\", \"input\", \"output\"}} or {{\"messages\"}}, "
                    f"got keys {sorted(record)}")


def classify_record(record: dict[str, Any], where: str) -> tuple[str, str]:
    if "text" not in record or "label" not in record:
        raise DataError(f"{where}: expected {{\"text\", \"label\"}}, got keys {sorted(record)}")
    text, label = _text(record, "text", where), record["label"]
    if not text:
        raise DataError(f"{where}: 'text' is empty")
    if not isinstance(label, (str, int)) or isinstance(label, bool):
        raise DataError(f"{where}: 'label' must be a string or an integer")
    return text, str(label)


def tag_record(record: dict[str, Any], where: str, labelled: bool = True) -> tuple[list[str], list[str] | None]:
    """(words, BIO tags) of a {"tokens": [...], "tags": [...]} record; unlabelled records (prediction) may give
    "text" instead of "tokens" (split at whitespace). Tags are IOB2: O, B-TYPE, I-TYPE continuing its type."""
    if "tokens" in record:
        words = record["tokens"]
        if not isinstance(words, list) or not words or not all(isinstance(w, str) and w.strip() for w in words):
            raise DataError(f"{where}: 'tokens' must be a non-empty list of non-empty strings")
    elif not labelled and isinstance(record.get("text"), str) and record["text"].split():
        words = record["text"].split()
    else:
        raise DataError(f"{where}: expected {{\"tokens\", \"tags\"}}, got keys {sorted(record)}")
    if not labelled:
        return words, None
    tags = record.get("tags")
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise DataError(f"{where}: 'tags' must be a list of strings (one BIO tag per token)")
    if len(tags) != len(words):
        raise DataError(f"{where}: {len(words)} tokens but {len(tags)} tags (one tag per token)")
    previous = "O"
    for number, tag in enumerate(tags, start=1):
        if tag != "O" and not (tag[:2] in ("B-", "I-") and len(tag) > 2):
            raise DataError(f"{where}: tag {number} is {tag!r}; tags are O, B-TYPE or I-TYPE")
        if tag.startswith("I-") and previous[2:] != tag[2:]:
            raise DataError(f"{where}: malformed BIO sequence: tag {number} {tag!r} follows {previous!r} "
                            f"(an I- tag continues an entity of its type)")
        previous = tag
    return words, tags


# --- examples and batches --------------------------------------------------------------------------
@dataclass
class SFTExample:
    ids: list[int]  # the whole conversation: prompt, reply, <|endoftext|>
    trained: list[bool]  # per token of ids: is it a target the loss covers
    prompt: list[int]  # everything before the final reply (what generation starts from)
    reference: str  # the final reply


@dataclass
class VQAExample(SFTExample):
    images: list[int]  # rows of the split's pixel table, one per <image> placeholder of the prompt
    image_starts: list[int]  # where each image's slots begin in ids (and prompt)
    kind: str  # the record's question type ("type"), for accuracy by type


@dataclass
class ClassifyExample:
    ids: list[int]
    label: int


@dataclass
class TagExample:
    ids: list[int]  # the words' tokens (twice, around <|endoftext|>, with the echo context)
    positions: list[int]  # per word that fits the context: the position of its first token (where its tag is read)
    ends: list[int]  # per word that fits: the position of its last token (read too with tag_read "span")
    labels: list[int]  # per word that fits: its tag's index (IGNORE_INDEX when unlabelled)
    words: list[str]  # every word; those past the context get "O"
    reference: list[str] | None  # every word's tag, when the record has them


def word_pieces(words: list[str], tokenizer: Tokenizer) -> list[list[int]]:
    """Each word's tokens, encoded as it reads in the running text: a word that starts with an ASCII letter
    or digit gets the space that precedes it in English; other words (Chinese, punctuation) join directly."""
    texts = [(" " + w if i and w[0].isascii() and w[0].isalnum() else w) for i, w in enumerate(words)]
    return tokenizer.encode_batch(texts)


def encode_tagged(words: list[str], tags: list[str] | None, index: dict[str, int], tokenizer: Tokenizer,
                  block_size: int, context: str) -> tuple[TagExample, bool]:
    """The example of one sentence and whether words had to be left out to fit the context. The tag of a word
    is read at its first token (the others carry no label); with the echo context, in the second copy."""
    pieces = word_pieces(words, tokenizer)
    fit, length = 0, 0
    for piece in pieces:
        needed = 2 * (length + len(piece)) + 1 if context == "echo" else length + len(piece)
        if needed > block_size:
            break
        fit, length = fit + 1, length + len(piece)
    first = [sum(len(p) for p in pieces[:i]) for i in range(fit)]
    ids = [t for piece in pieces[:fit] for t in piece]
    if context == "echo":
        first = [length + 1 + position for position in first]
        ids = ids + [tokenizer.eot_id] + ids
    last = [position + len(piece) - 1 for position, piece in zip(first, pieces[:fit], strict=True)]
    labels = [index[t] for t in tags[:fit]] if tags is not None else [IGNORE_INDEX] * fit
    return TagExample(ids, first, last, labels, words, tags), fit < len(words)


def load_tag(path: str | Path, tokenizer: Tokenizer, block_size: int, context: str, labels: list[str] | None = None,
             log: Callable[[str], None] = print) -> tuple[list[TagExample], list[str]]:
    """Encode a file of {"tokens","tags"} records; the tag set defaults to the sorted tags found (training).
    Words past the context are left out of training and predicted "O" (counted)."""
    rows = [(where, *tag_record(record, where)) for where, record in read_jsonl(path)]
    if labels is None:
        labels = sorted({tag for _, _, tags in rows for tag in tags} | {"O"})
        if len(labels) < 2:
            raise DataError(f"{path}: tagging needs at least one entity tag besides O")
    index = {label: i for i, label in enumerate(labels)}
    examples, cut = [], 0
    for where, words, tags in rows:
        unknown = sorted(set(tags) - set(index))
        if unknown:
            raise DataError(f"{where}: tag {unknown[0]!r} is not one the model was trained on ({', '.join(labels)})")
        example, was_cut = encode_tagged(words, tags, index, tokenizer, block_size, context)
        if not example.positions:
            raise DataError(f"{where}: the first token does not fit the {block_size}-token context")
        examples.append(example)
        cut += was_cut
    _report(path, len(examples), {f"cut to the {block_size}-token context": cut}, log)
    return examples, labels


def load_sft(path: str | Path, tokenizer: Tokenizer, block_size: int, style: PromptStyle,
             log: Callable[[str], None] = print) -> list[SFTExample]:
    """Encode a file of instruction/chat records in `style`; conversations longer than the context are left
    out (counted)."""
    examples, too_long = [], 0
    for where, record in read_jsonl(path):
        messages = sft_messages(record, where)
        ids, trained = style.encode(messages, tokenizer, generation_prompt=False)
        if len(ids) > block_size + 1:  # inputs are ids[:-1], targets ids[1:]
            too_long += 1
            continue
        prompt = style.prompt_ids(messages[:-1], tokenizer)
        examples.append(SFTExample(ids, trained, prompt, messages[-1].content))
    _report(path, len(examples), {f"longer than the {block_size}-token context (left out)": too_long}, log)
    return examples


def load_vqa(path: str | Path, tokenizer: Tokenizer, block_size: int, style: PromptStyle, vision: VisionConfig,
             log: Callable[[str], None] = print) -> tuple[list[VQAExample], torch.Tensor, list[dict[str, str]]]:
    """Encode records with images ({"instruction" with <image> placeholders, "output", "images": [paths
    relative to the file], "type"?, "image_labels"?: {attribute: value} of a one-image record's image}) and read
    every image once; returns the examples, the pixel table (images, 3, S, S) as uint8 that their `images`
    index, and each image's labels (gptlab.vision.pretrain; what all its records say)."""
    path = Path(path)
    table: dict[Path, int] = {}
    pixels: list[torch.Tensor] = []
    labels: list[dict[str, str]] = []
    examples, too_long = [], 0
    for where, record in read_jsonl(path):
        messages = sft_messages(record, where)
        files = record.get("images")
        if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
            raise DataError(f"{where}: 'images' must be a list of image paths (relative to the file)")
        rows = []
        for name in files:
            file = (path.parent / name).resolve()
            if file not in table:
                try:
                    pixels.append((load_image(file, vision.image_size) * 255).round().to(torch.uint8))
                except ImageError as err:
                    raise DataError(f"{where}: {err}") from None
                table[file] = len(table)
                labels.append({})
            rows.append(table[file])
        _add_image_labels(record, rows, labels, where)
        try:
            prompt = encode_prompt(style.render(messages[:-1]), tokenizer, vision.image_tokens, len(files))
        except GptlabError as err:
            raise DataError(f"{where}: {err}") from None
        # the reply is encoded on its own, as PromptStyle.encode does: the prompt's tokens are what generation gets
        reply = tokenizer.encode(messages[-1].content + style.reply_end) + ([tokenizer.eot_id] if style.reply_eot else [])
        if len(prompt.ids) + len(reply) > block_size + 1:
            too_long += 1
            continue
        examples.append(VQAExample(prompt.ids + reply, [False] * len(prompt.ids) + [True] * len(reply), prompt.ids,
                                   messages[-1].content, rows, prompt.image_starts, str(record.get("type", "all"))))
    _report(path, len(examples), {f"longer than the {block_size}-token context (left out)": too_long}, log)
    return examples, torch.stack(pixels), labels


def _add_image_labels(record: dict[str, Any], rows: list[int], labels: list[dict[str, str]], where: str) -> None:
    """Merge a record's `image_labels` into its image's; two records may not give an image different values."""
    given = record.get("image_labels")
    if given is None:
        return
    if not isinstance(given, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in given.items()):
        raise DataError(f"{where}: 'image_labels' must be an object of strings ({{\"color\": \"blue\"}})")
    if len(rows) != 1:
        raise DataError(f"{where}: 'image_labels' describe one image, the record has {len(rows)}")
    known = labels[rows[0]]
    for key, value in given.items():
        if known.setdefault(key, value) != value:
            raise DataError(f"{where}: image_labels {key!r} is {value!r}, another record of this image says "
                            f"{known[key]!r}")


def vqa_batch(examples: list[VQAExample], pixels: torch.Tensor, pad_id: int,
              ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None]:
    """(inputs, targets, (pixels in [0, 1], row, first slot of each image)): what FinetuneModel takes."""
    x, y = sft_batch(examples, pad_id)
    index = [(row, image, start) for row, e in enumerate(examples) for image, start in zip(e.images, e.image_starts,
                                                                                            strict=True)]
    if not index:  # no images in this batch: the text alone
        return x, y, None
    rows, images, starts = (torch.tensor(column, dtype=torch.long) for column in zip(*index, strict=True))
    return x, y, (pixels[images].float() / 255, rows, starts)


def load_classify(path: str | Path, tokenizer: Tokenizer, block_size: int, labels: list[str] | None = None,
                  log: Callable[[str], None] = print) -> tuple[list[ClassifyExample], list[str]]:
    """Encode a file of {"text","label"} records; labels default to the sorted labels found (the training set).
    Texts longer than the context are cut to fit (counted)."""
    rows = [(where, *classify_record(record, where)) for where, record in read_jsonl(path)]
    if labels is None:
        labels = sorted({label for _, _, label in rows})
        if len(labels) < 2:
            raise DataError(f"{path}: a classifier needs at least two labels, found {labels}")
    index = {label: i for i, label in enumerate(labels)}
    examples, cut = [], 0
    for (where, _, label), ids in zip(rows, tokenizer.encode_batch([text for _, text, _ in rows]), strict=True):
        if label not in index:
            raise DataError(f"{where}: label {label!r} is not one the model was trained on ({', '.join(labels)})")
        if len(ids) > block_size - 1:
            ids, cut = ids[: block_size - 1], cut + 1
        examples.append(ClassifyExample(ids + [tokenizer.eot_id], index[label]))
    _report(path, len(examples), {f"cut to the {block_size}-token context": cut}, log)
    return examples, labels


def _report(path: str | Path, kept: int, notes: dict[str, int], log: Callable[[str], None]) -> None:
    if kept == 0:
        raise DataError(f"{path}: no usable examples")
    extra = "".join(f", {count} {what}" for what, count in notes.items() if count)
    log(f"{path}: {kept} examples{extra}")


def sft_batch(examples: list[SFTExample], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets), right-padded to the longest example; untrained and padded targets are IGNORE_INDEX."""
    width = max(len(e.ids) for e in examples) - 1
    x = torch.full((len(examples), width), pad_id, dtype=torch.long)
    y = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(examples):
        ids, trained = torch.tensor(example.ids), torch.tensor(example.trained)
        x[row, : len(ids) - 1] = ids[:-1]
        y[row, : len(ids) - 1] = torch.where(trained[1:], ids[1:], IGNORE_INDEX)
    return x, y


def classify_batch(examples: list[ClassifyExample], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(inputs, index of each row's last real token, label ids)."""
    width = max(len(e.ids) for e in examples)
    x = torch.full((len(examples), width), pad_id, dtype=torch.long)
    for row, example in enumerate(examples):
        x[row, : len(example.ids)] = torch.tensor(example.ids)
    last = torch.tensor([len(e.ids) - 1 for e in examples])
    return x, last, torch.tensor([e.label for e in examples])


def tag_batch(examples: list[TagExample], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(inputs, positions (B, words, 2) of each word's first and last tokens, tag ids); padded words point at 0
    with IGNORE_INDEX."""
    width, words = max(len(e.ids) for e in examples), max(len(e.positions) for e in examples)
    x = torch.full((len(examples), width), pad_id, dtype=torch.long)
    positions = torch.zeros((len(examples), words, 2), dtype=torch.long)
    labels = torch.full((len(examples), words), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(examples):
        x[row, : len(example.ids)] = torch.tensor(example.ids)
        positions[row, : len(example.positions)] = torch.tensor([example.positions, example.ends]).T
        labels[row, : len(example.labels)] = torch.tensor(example.labels, dtype=torch.long)
    return x, positions, labels


def in_batches(items: list, size: int) -> Iterator[list]:
    for first in range(0, len(items), size):
        yield items[first: first + size]


class EpochSampler:
    """Which examples make up micro-batch `micro` of optimizer step `step`: shuffled epochs drawn from the
    seed alone, so a resumed run sees exactly the batches an uninterrupted one would. `micro` numbers the
    micro-batches of the whole global batch (all processes, all accumulation steps; see train.Task)."""

    def __init__(self, n_examples: int, cfg: TrainConfig, block_size: int) -> None:
        self.n, self.cfg, self.block_size = n_examples, cfg, block_size
        self._orders: dict[int, list[int]] = {}

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            self._orders[epoch] = torch.randperm(self.n, generator=draw_generator(self.cfg.seed, epoch)).tolist()
        return self._orders[epoch]

    def indices(self, step: int, micro: int) -> list[int]:
        processes = distributed.world().size  # asked inside fit, once the process group exists
        per_step = grad_accum_steps(self.cfg, self.block_size, processes) * processes
        size = self.cfg.batch_size
        start = (step * per_step + micro) * size
        return [self._order(p // self.n)[p % self.n] for p in range(start, start + size)]

