"""`gptlab predict`: a fine-tuned checkpoint applied to unlabelled inputs, one JSON result per input.

  classifier  {"text": ...}                          -> {"label", "probs": {label: p}}
  tagger      {"tokens": [...]} or {"text": ...}     -> {"tokens", "tags", "probs" (of each chosen tag), "entities"}
              ("text" is split at whitespace: give Chinese text as "tokens", or with spaces between words)
  LM (sft)    {"instruction", "input"}, {"messages": [... ending with the user's]} or {"text": user message}
                                                     -> {"output", "logprob" (sum over its tokens)}
Inputs may carry other keys (a label, an id): they are ignored, so a labelled file predicts as is. The forward
passes are those of `gptlab eval-task` (the same batching and heads), so predictions reproduce its scores.
The server's /v1/predict calls `Predictor` on one request's inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from gptlab import loading
from gptlab.data import DataError
from gptlab.device import resolve_precision, select_device
from gptlab.finetune.data import (
    ClassifyExample,
    classify_record,
    encode_tagged,
    read_jsonl,
    sft_messages,
    tag_record,
)
from gptlab.finetune.tasks import classify_log_probs, predicted_tags, tag_probabilities
from gptlab.generate import complete
from gptlab.prompts import Message
from gptlab.sampling import SamplingConfig

Record = dict[str, Any]


def entities(words: list[str], tags: list[str]) -> list[dict[str, Any]]:
    """The entities of a BIO sequence as word spans [start, end) (an I- tag without its B- starts one, as
    seqeval reads it)."""
    found: list[dict[str, Any]] = []
    for i, tag in enumerate(tags):
        kind = tag[2:]
        if tag.startswith("B-") or (tag.startswith("I-") and (not found or found[-1]["end"] != i
                                                               or found[-1]["type"] != kind)):
            found.append({"type": kind, "start": i, "end": i + 1})
        elif tag.startswith("I-"):
            found[-1]["end"] = i + 1
    for entity in found:  # Chinese words join directly, others with spaces
        span = words[entity["start"]: entity["end"]]
        entity["text"] = ("" if not any(w.isascii() for w in span) else " ").join(span)
    return found


class Predictor:
    """A loaded fine-tuned (or plain) checkpoint that answers lists of input records."""

    def __init__(self, ckpt: str | Path | loading.Loaded, device: str = "auto", precision: str = "auto",
                 batch_size: int = 32, max_new_tokens: int = 64) -> None:
        self.loaded = ckpt if isinstance(ckpt, loading.Loaded) else loading.load(ckpt)
        self.task = self.loaded.task
        self.device = select_device(device)
        self.precision = resolve_precision(precision, self.device)[0]
        self.model = self.loaded.model.eval().to(self.device)
        self.tokenizer, self.batch_size, self.max_new_tokens = self.loaded.tokenizer, batch_size, max_new_tokens
        self.labels: list[str] = (self.loaded.finetune or {}).get("labels") or []

    def parse(self, items: list[tuple[str, Record]]) -> list[Any]:
        """Each (where, record) as this task's input; a record that does not fit is a DataError naming `where`."""
        if self.task == "classify":
            return [_unlabelled_text(record, where) for where, record in items]
        if self.task == "tag":
            return [tag_record(record, where, labelled=False)[0] for where, record in items]
        block, style = self.model.config.block_size, self.loaded.prompt_style
        prompts = []
        for where, record in items:
            ids = style.prompt_ids(_prompt_messages(record, where), self.tokenizer)
            if len(ids) >= block:
                raise DataError(f"{where}: the prompt has {len(ids)} tokens; the model's context is {block}")
            prompts.append(ids)
        return prompts

    def __call__(self, inputs: list[Any]) -> list[Record]:
        """One result per parsed input (see `parse`)."""
        if not inputs:
            return []
        return {"classify": self._classify, "tag": self._tag}.get(self.task, self._generate)(inputs)

    def _classify(self, texts: list[str]) -> list[Record]:
        block, eot = self.model.config.block_size, self.tokenizer.eot_id
        examples = [ClassifyExample(ids[: block - 1] + [eot], 0) for ids in self.tokenizer.encode_batch(texts)]
        probs = classify_log_probs(self.model, examples, eot, self.batch_size, self.precision).exp()
        return [{"label": self.labels[int(p.argmax())],
                 "probs": {label: float(v) for label, v in zip(self.labels, p.tolist(), strict=True)}}
                for p in probs]

    def _tag(self, sentences: list[list[str]]) -> list[Record]:
        context = self.loaded.finetune["config"]["tag_context"]
        examples = [encode_tagged(words, None, {}, self.tokenizer, self.model.config.block_size, context)[0]
                    for words in sentences]
        results = []
        for probs, example in zip(tag_probabilities(self.model, examples, self.tokenizer.eot_id, self.batch_size,
                                                    self.precision), examples, strict=True):
            tags = predicted_tags(probs, example, self.labels)
            chosen = probs.max(-1).values.tolist()
            results.append({"tokens": example.words, "tags": tags,
                            "probs": chosen + [None] * (len(example.words) - len(chosen)),
                            "entities": entities(example.words, tags)})
        return results

    def _generate(self, prompts: list[list[int]]) -> list[Record]:
        style, block = self.loaded.prompt_style, self.model.config.block_size
        configs = [SamplingConfig(max_new_tokens=min(self.max_new_tokens, block - len(ids)), temperature=0,
                                  stop=list(style.stop), logprobs=0) for ids in prompts]
        completions = complete(self.loaded.gpt(), self.tokenizer, prompts, configs, max_batch=self.batch_size)
        return [{"output": c.text, "logprob": float(sum(c.logprobs or []))} for c in completions]


def _unlabelled_text(record: Record, where: str) -> str:
    if "text" not in record:
        raise DataError(f"{where}: expected {{\"text\"}}, got keys {sorted(record)}")
    return classify_record({"label": "", **record}, where)[0]


def _prompt_messages(record: Record, where: str) -> list[Message]:
    """The conversation to answer: the record's messages up to the last user turn, or its instruction."""
    if "messages" in record and isinstance(record["messages"], list) and record["messages"] \
            and isinstance(record["messages"][-1], dict) and record["messages"][-1].get("role") == "user":
        return sft_messages({"messages": [*record["messages"], {"role": "assistant", "content": ""}]}, where)[:-1]
    if "instruction" in record:
        return sft_messages({**record, "output": ""}, where)[:-1]
    if isinstance(record.get("text"), str) and record["text"]:
        return [Message("user", record["text"])]
    return sft_messages(record, where)[:-1]  # a full conversation: answer its last user turn again


def predict_file(ckpt: str | Path, inputs: Path | None, text: list[str] | None, write: Callable[[Record], None],
                 batch_size: int = 32, max_new_tokens: int = 64, device: str = "auto", precision: str = "auto",
                 chunk: int = 256) -> int:
    """`gptlab predict`: write one result per input (from a JSONL file or --text), in input order; returns
    how many. Inputs are read and checked before the model loads, then answered `chunk` at a time."""
    if (inputs is None) == (not text):
        raise DataError("give either --input FILE.jsonl or --text TEXT")
    items = list(read_jsonl(inputs)) if inputs is not None else [
        (f"--text {i + 1}", {"text": t}) for i, t in enumerate(text)]
    if not items:
        raise DataError(f"{inputs}: no inputs")
    predictor = Predictor(ckpt, device, precision, batch_size, max_new_tokens)
    inputs_ = predictor.parse(items)  # every input checked before any result is written
    with torch.no_grad():
        for first in range(0, len(inputs_), chunk):
            for result in predictor(inputs_[first: first + chunk]):
                write(result)
    return len(items)
