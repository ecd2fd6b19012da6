"""The fine-tuning tasks on the shared training loop (train.Task), and how a model is scored on them: the
metrics logged at every evaluation and `gptlab eval-task`."""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptlab import evaluate, loading
from gptlab.config import TrainConfig
from gptlab.data import DataError
from gptlab.device import autocast, resolve_precision, select_device
from gptlab.finetune.data import (
    ClassifyExample,
    EpochSampler,
    SFTExample,
    TagExample,
    VQAExample,
    classify_batch,
    in_batches,
    load_classify,
    load_sft,
    load_tag,
    load_vqa,
    read_jsonl,
    sft_batch,
    sft_messages,
    tag_batch,
    tag_record,
    vqa_batch,
)
from gptlab.finetune.model import FinetuneModel
from gptlab.generate import complete
from gptlab.model import IGNORE_INDEX
from gptlab.prompts import PromptStyle
from gptlab.sampling import SamplingConfig
from gptlab.tokenizer import Tokenizer
from gptlab.train import Task


def _sampler(train: list, cfg: TrainConfig, block_size: int, make_batch: Callable[[list], Any],
             stage1: tuple[int, list[int]] = (0, [])) -> Callable:
    """The training loop's sample_batch(step, micro): that micro-batch of the seeded epoch order, as tensors.
    stage1 (steps, indices): the first `steps` optimizer steps draw from train[indices] alone, in seeded epochs of
    their own; the whole set's epochs start after them."""
    steps, subset = stage1
    first, sampler = EpochSampler(len(subset), cfg, block_size), EpochSampler(len(train), cfg, block_size)

    def sample_batch(step: int, micro: int) -> Any:
        if step < steps:
            return make_batch([train[subset[i]] for i in first.indices(step, micro)])
        return make_batch([train[i] for i in sampler.indices(step - steps, micro)])

    return sample_batch


def sft_task(train: list[SFTExample], val: list[SFTExample], tokenizer: Tokenizer, style: PromptStyle,
             cfg: TrainConfig, block_size: int, max_new_tokens: int) -> Task:
    pad = tokenizer.eot_id
    sample_batch = _sampler(train, cfg, block_size, lambda items: sft_batch(items, pad))

    def evaluate_sft(model: FinetuneModel) -> dict[str, float]:
        return {"val_loss": response_loss(model, val, pad, cfg.batch_size, cfg.precision),
                **generation_scores(model, val, tokenizer, style, max_new_tokens, cfg.batch_size)}

    return Task(sample_batch=sample_batch, evaluate=evaluate_sft,
                metric_names=("val_loss", *evaluate.GENERATION_METRICS))


def classify_task(train: list[ClassifyExample], val: list[ClassifyExample], tokenizer: Tokenizer,
                  cfg: TrainConfig, block_size: int, lm_weight: float = 0.0) -> Task:
    pad = tokenizer.eot_id
    sample_batch = _sampler(train, cfg, block_size, lambda items: classify_batch(items, pad))

    def loss(model: FinetuneModel, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        x, last, labels = batch
        logits, lm_loss = model.classify_and_lm_loss(x, last, with_lm_loss=lm_weight > 0)
        loss = F.cross_entropy(logits.float(), labels)
        return loss if lm_loss is None else loss + lm_weight * lm_loss

    def evaluate_classifier(model: FinetuneModel) -> dict[str, float]:
        scores = classification_scores(model, val, pad, cfg.batch_size, cfg.precision)
        return {"val_loss": scores.pop("loss"), **scores}

    return Task(sample_batch=sample_batch, evaluate=evaluate_classifier, loss=loss,
                metric_names=("val_loss", *evaluate.CLASSIFICATION_METRICS))


def tag_task(train: list[TagExample], val: list[TagExample], tokenizer: Tokenizer, labels: list[str],
             cfg: TrainConfig, block_size: int) -> Task:
    pad = tokenizer.eot_id
    sample_batch = _sampler(train, cfg, block_size, lambda items: tag_batch(items, pad))

    def loss(model: FinetuneModel, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        x, positions, tags = batch
        return F.cross_entropy(model.tag(x, positions).float().flatten(0, 1), tags.flatten(),
                               ignore_index=IGNORE_INDEX)

    def evaluate_tagger(model: FinetuneModel) -> dict[str, float]:
        scores = tagging_scores(model, val, labels, pad, cfg.batch_size, cfg.precision)
        return {"val_loss": scores["loss"], **{k: scores[k] for k in evaluate.TAGGING_METRICS}}

    return Task(sample_batch=sample_batch, evaluate=evaluate_tagger, loss=loss,
                metric_names=("val_loss", *evaluate.TAGGING_METRICS))


def vqa_task(train: list[VQAExample], train_pixels: torch.Tensor, val: list[VQAExample], val_pixels: torch.Tensor,
             tokenizer: Tokenizer, style: PromptStyle, cfg: TrainConfig, block_size: int, max_new_tokens: int,
             stage1_steps: int = 0, stage1_kinds: set[str] | frozenset[str] = frozenset()) -> Task:
    """Visual question answering: the SFT loss on the answers of prompts with images, scored by exact match
    (overall and per question type). The first stage1_steps steps train on the questions of stage1_kinds alone."""
    pad = tokenizer.eot_id
    subset = [i for i, e in enumerate(train) if e.kind in stage1_kinds] if stage1_steps else []
    if stage1_steps and not subset:
        raise DataError(f"no training question has a type in stage1_types ({', '.join(sorted(stage1_kinds))}); "
                        f"the types are: {', '.join(sorted({e.kind for e in train}))}")
    sample_batch = _sampler(train, cfg, block_size, lambda items: vqa_batch(items, train_pixels, pad),
                            (stage1_steps, subset))
    kinds = [f"accuracy_{kind}" for kind in sorted({e.kind for e in val})]

    def loss(model: FinetuneModel, batch) -> torch.Tensor:
        x, y, images = batch
        return model(x, y, images)[1]

    def evaluate_vqa(model: FinetuneModel) -> dict[str, float]:
        scores = vqa_scores(model, val, val_pixels, tokenizer, style, max_new_tokens, cfg.batch_size)
        return {"val_loss": response_loss(model, val, pad, cfg.batch_size, cfg.precision, val_pixels), **scores}

    return Task(sample_batch=sample_batch, evaluate=evaluate_vqa, loss=loss,
                metric_names=("val_loss", "accuracy", *kinds))


# --- scoring ---------------------------------------------------------------------------------------
@torch.no_grad()
def response_loss(model: nn.Module, examples: list[SFTExample] | list[VQAExample], pad_id: int, batch_size: int,
                  precision: str = "fp32", pixels: torch.Tensor | None = None) -> float:
    """Mean cross-entropy per response token (the quantity SFT minimises); with `pixels`, of VQA examples
    (answers to prompts with images)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nats, tokens = 0.0, 0
    for chunk in in_batches(examples, batch_size):
        if pixels is None:
            x, y = (t.to(device) for t in sft_batch(chunk, pad_id))
            inputs = (x, y)
        else:
            x, y, images = vqa_batch(chunk, pixels, pad_id)
            x, y = x.to(device), y.to(device)
            inputs = (x, y, None if images is None else tuple(t.to(device) for t in images))
        counted = int((y != IGNORE_INDEX).sum())
        if counted:  # the model's own loss: the LM head runs on the response tokens only
            with autocast(device, precision):
                nats += model(*inputs)[1].item() * counted
            tokens += counted
    model.train(was_training)
    return nats / max(1, tokens)


def generation_scores(model: FinetuneModel, examples: list[SFTExample], tokenizer: Tokenizer, style: PromptStyle,
                      max_new_tokens: int, batch_size: int) -> dict[str, float]:
    """Greedy replies to each example's prompt (KV-cached, continuously batched), scored against the
    reference reply. A reply gets what the context leaves after its prompt, at most max_new_tokens."""
    was_training = model.training
    block = model.config.block_size
    configs = [SamplingConfig(max_new_tokens=min(max_new_tokens, block - len(e.prompt)), temperature=0,
                              stop=list(style.stop)) if len(e.prompt) < block else None for e in examples]
    answerable = [i for i, c in enumerate(configs) if c is not None]  # a prompt that fills the context gets ""
    replies = [""] * len(examples)
    completions = complete(model.gpt, tokenizer, [examples[i].prompt for i in answerable],
                           [configs[i] for i in answerable], max_batch=batch_size)
    for i, completion in zip(answerable, completions, strict=True):
        replies[i] = completion.text
    model.train(was_training)
    return evaluate.generation_metrics(replies, [e.reference for e in examples])


@torch.no_grad()
def vqa_scores(model: FinetuneModel, examples: list[VQAExample], pixels: torch.Tensor, tokenizer: Tokenizer,
               style: PromptStyle, max_new_tokens: int, batch_size: int, blank_images: bool = False,
               ) -> dict[str, float]:
    """Exact-match accuracy of greedy answers (KV-cached, continuously batched, images spliced in as
    embeddings), overall and per question type (`accuracy_<type>`). blank_images: every image replaced by
    zeros, which measures what the question alone gives away."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    block = model.config.block_size
    configs = [SamplingConfig(max_new_tokens=max(1, min(max_new_tokens, block - len(e.prompt))), temperature=0,
                              stop=list(style.stop)) for e in examples]
    embeds = []
    for chunk in in_batches(examples, batch_size):  # the vision tower runs on a batch of images at a time
        x, _, images = vqa_batch(chunk, pixels, tokenizer.eot_id)
        x = x.to(device)
        if images is None:
            spliced = model.gpt.transformer.wte(x)
        else:
            pixels_in, rows, starts = (t.to(device) for t in images)
            spliced = model.embed(x, torch.zeros_like(pixels_in) if blank_images else pixels_in, rows, starts)
        embeds += [row[: len(e.prompt)] for row, e in zip(spliced, chunk, strict=True)]
    completions = complete(model.gpt, tokenizer, [e.prompt for e in examples], configs, batch_size, embeds=embeds)
    correct = [c.text.strip() == e.reference.strip() for c, e in zip(completions, examples, strict=True)]
    scores = {"accuracy": sum(correct) / max(1, len(correct))}
    for kind in sorted({e.kind for e in examples}):
        hits = [ok for ok, e in zip(correct, examples, strict=True) if e.kind == kind]
        scores[f"accuracy_{kind}"] = sum(hits) / len(hits)
    model.train(was_training)
    return scores


@torch.no_grad()
def classify_log_probs(model: FinetuneModel, examples: list[ClassifyExample], pad_id: int, batch_size: int,
                       precision: str = "fp32") -> torch.Tensor:
    """(examples, labels) label log-probabilities of a classifier."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    logits = []
    for x, last, _ in (classify_batch(chunk, pad_id) for chunk in in_batches(examples, batch_size)):
        with autocast(device, precision):
            logits.append(model.classify(x.to(device), last.to(device)).float().cpu())
    model.train(was_training)
    return torch.cat(logits).log_softmax(-1)


def classification_scores(model: FinetuneModel, examples: list[ClassifyExample], pad_id: int, batch_size: int,
                          precision: str = "fp32") -> dict[str, float]:
    """Accuracy, macro-F1 and mean cross-entropy of a classifier, beside the accuracy of always answering the
    most frequent label (the baseline a classifier must beat)."""
    log_probs = classify_log_probs(model, examples, pad_id, batch_size, precision)
    predictions, references = log_probs.argmax(-1).tolist(), [e.label for e in examples]
    loss = -log_probs[torch.arange(len(examples)), torch.tensor(references)].mean().item()
    return {"loss": loss, "accuracy": evaluate.accuracy(predictions, references),
            "macro_f1": evaluate.macro_f1(predictions, references),
            "majority_accuracy": evaluate.majority_accuracy(references)}


@torch.no_grad()
def tag_probabilities(model: FinetuneModel, examples: list[TagExample], pad_id: int, batch_size: int,
                      precision: str = "fp32") -> list[torch.Tensor]:
    """Per example, the (words that fit, labels) tag probabilities."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    result = []
    for chunk in in_batches(examples, batch_size):
        x, positions, _ = tag_batch(chunk, pad_id)
        with autocast(device, precision):
            probs = model.tag(x.to(device), positions.to(device)).float().softmax(-1).cpu()
        result += [p[: len(e.positions)] for p, e in zip(probs, chunk, strict=True)]
    model.train(was_training)
    return result


def predicted_tags(probs: torch.Tensor, example: TagExample, labels: list[str]) -> list[str]:
    """The most likely tag of each word; words past the context are "O"."""
    tags = [labels[i] for i in probs.argmax(-1).tolist()]
    return tags + ["O"] * (len(example.words) - len(tags))


def tagging_scores(model: FinetuneModel, examples: list[TagExample], labels: list[str], pad_id: int,
                   batch_size: int, precision: str = "fp32") -> dict[str, Any]:
    """Entity-level precision / recall / F1 (seqeval; per type too) and the mean cross-entropy per tagged word.
    References are the examples' own tags over every word, so words cut by the context count as "O" guesses."""
    probs = tag_probabilities(model, examples, pad_id, batch_size, precision)
    predictions, references, nats, words = [], [], 0.0, 0
    for p, example in zip(probs, examples, strict=True):
        predictions.append(predicted_tags(p, example, labels))
        references.append(example.reference)
        gold = torch.tensor(example.labels, dtype=torch.long)
        nats -= p.clamp_min(1e-12).log().gather(1, gold[:, None]).sum().item()
        words += len(gold)
    return {"loss": nats / max(1, words), **evaluate.entity_scores(predictions, references)}


BASELINES = ("lead", "name", "lexicon")


def lexicon_scores(data: str | Path, max_items: int | None = None) -> dict[str, Any]:
    """Entity scores of a model-free tagger: each word gets the tag it carries most often in the train.jsonl
    beside `data` (O when unseen), an I- tag that continues no entity of its type becoming B-. What a tagger
    must beat to have learnt more than a word list."""
    evaluate.require_seqeval()
    train = Path(data).parent / "train.jsonl"
    if not train.is_file():
        raise DataError(f"the lexicon baseline counts tags in {train}, which does not exist")
    counts: dict[str, Counter] = defaultdict(Counter)
    for where, record in read_jsonl(train):
        words, tags = tag_record(record, where)
        for word, tag in zip(words, tags, strict=True):
            counts[word][tag] += 1
    rows = [tag_record(record, where) for where, record in read_jsonl(data)]
    rows = rows[:max_items] if max_items else rows
    predictions = []
    for words, _ in rows:
        tags = []
        for word in words:
            tag = counts[word].most_common(1)[0][0] if word in counts else "O"
            previous = tags[-1] if tags else "O"
            tags.append("B-" + tag[2:] if tag.startswith("I-") and previous[2:] != tag[2:] else tag)
        predictions.append(tags)
    return {"items": len(rows), "baseline": "lexicon",
            **evaluate.entity_scores(predictions, [tags for _, tags in rows])}


def baseline_scores(data: str | Path, kind: str, max_items: int | None = None) -> dict[str, Any]:
    """Generation metrics of a model-free answer to each instruction record: `lead` the first line of its
    input (summarization's lead baseline), `name` the words of the identifier that line defines (code);
    `lexicon` scores tag records instead (lexicon_scores)."""
    if kind == "lexicon":
        return lexicon_scores(data, max_items)
    evaluate.require_metric_packages()
    records = [sft_messages(record, where) for where, record in read_jsonl(data)]
    records = records[:max_items] if max_items else records
    hypotheses = []
    for messages in records:
        lines = [line for line in messages[-2].content.split("\n\n", 1)[-1].splitlines() if line.strip()]
        lead = lines[0].strip() if lines else ""
        if kind == "name":
            match = re.search(r"(?:def|class)\s+(\w+)", lead)
            lead = " ".join(re.findall(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])|\d+", match.group(1))) if match else lead
        hypotheses.append(lead)
    return {"items": len(records), "baseline": kind,
            **evaluate.generation_metrics(hypotheses, [m[-1].content for m in records])}


def eval_task(ckpt: str | Path, data: str | Path, max_items: int | None = None, max_new_tokens: int = 64,
              batch_size: int = 32, device: str = "auto", precision: str = "auto", log=print,
              blank_images: bool = False) -> dict[str, Any]:
    """`gptlab eval-task`: a checkpoint's task metrics on a JSONL file.

    A classifier checkpoint is scored on {"text","label"} records, a tagger on {"tokens","tags"} records
    (entity-level P/R/F1, per type too); any language model (fine-tuned or not,
    gptlab or HF GPT-2) on instruction or chat records, greedy-decoded in the checkpoint's prompt style.
    """
    loaded = loading.load(ckpt)
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    device = select_device(device)
    model.to(device)
    precision, why = resolve_precision(precision, device)
    log(f"precision: {precision} ({why})")
    block, pad = model.config.block_size, tokenizer.eot_id
    if loaded.task == "tag":
        evaluate.require_seqeval()
        labels = loaded.finetune["labels"]
        examples, _ = load_tag(data, tokenizer, block, loaded.finetune["config"]["tag_context"], labels, log)
        examples = examples[:max_items] if max_items else examples
        scores = tagging_scores(model, examples, labels, pad, batch_size, precision)
    elif loaded.task == "classify":
        examples, _ = load_classify(data, tokenizer, block, loaded.finetune["labels"], log)
        examples = examples[:max_items] if max_items else examples
        scores = classification_scores(model, examples, pad, batch_size, precision)
    elif loaded.task == "vqa":
        vision = loaded.vision.config
        examples, pixels, _ = load_vqa(data, tokenizer, block, loaded.prompt_style, vision, log)
        examples = examples[:max_items] if max_items else examples
        # --blank-images blanks the loss's images too: it is the model's loss on the questions alone
        scores = {"loss": response_loss(model, examples, pad, batch_size, precision,
                                        torch.zeros_like(pixels) if blank_images else pixels),
                  **vqa_scores(model, examples, pixels, tokenizer, loaded.prompt_style, max_new_tokens, batch_size,
                               blank_images)}
    else:
        evaluate.require_metric_packages()
        examples = load_sft(data, tokenizer, block, loaded.prompt_style, log)
        examples = examples[:max_items] if max_items else examples
        scores = {"loss": response_loss(model, examples, pad, batch_size, precision),
                  **generation_scores(model, examples, tokenizer, loaded.prompt_style, max_new_tokens, batch_size)}
    return {"items": len(examples), **scores}
