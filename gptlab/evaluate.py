"""Task metrics: accuracy and macro-F1 for classification; exact match, chrF, BLEU and ROUGE-L for generation.

Scales follow each metric's reference implementation: accuracy, macro-F1, exact match and ROUGE-L
(`rouge-score`'s F-measure) are fractions in [0, 1]; chrF and BLEU are `sacrebleu`'s corpus scores in [0, 100].
`eval_task` is `gptlab eval-task`: the metrics of any checkpoint on a JSONL file.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from gptlab.datasets import require
from gptlab.device import autocast, resolve_precision, select_device

GENERATION_METRICS = ("exact_match", "chrf", "bleu", "rouge_l")
CLASSIFICATION_METRICS = ("accuracy", "macro_f1")


def require_metric_packages() -> None:
    """Fail before training, not at the first evaluation, when the generation metrics cannot run."""
    for module in ("sacrebleu", "rouge_score"):
        require(module, "pip install sacrebleu rouge-score  (or pip install -e '.[finetune]')",
                "the generation metrics")


# --- classification --------------------------------------------------------------------------------
def accuracy(predictions: Sequence[Any], references: Sequence[Any]) -> float:
    _check_lengths(predictions, references)
    return sum(p == r for p, r in zip(predictions, references, strict=True)) / len(references)


def macro_f1(predictions: Sequence[Any], references: Sequence[Any]) -> float:
    """Unweighted mean of per-label F1 over every label seen in references or predictions (as sklearn)."""
    _check_lengths(predictions, references)
    scores = []
    for label in set(references) | set(predictions):
        tp = sum(p == label and r == label for p, r in zip(predictions, references, strict=True))
        fp = sum(p == label and r != label for p, r in zip(predictions, references, strict=True))
        fn = sum(p != label and r == label for p, r in zip(predictions, references, strict=True))
        scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores)


# --- generation -------------------------------------------------------------------------------------
def exact_match(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of outputs equal to the reference, ignoring surrounding whitespace."""
    _check_lengths(hypotheses, references)
    return sum(h.strip() == r.strip() for h, r in zip(hypotheses, references, strict=True)) / len(references)


def chrf(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    import sacrebleu

    _check_lengths(hypotheses, references)
    return sacrebleu.corpus_chrf(list(hypotheses), [list(references)]).score


def bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU; n-gram orders that no reference reaches are left out (sacrebleu's effective order), so
    outputs shorter than four words (dates, labels, short translations) still score, up to 100 when exact."""
    from sacrebleu.metrics import BLEU

    _check_lengths(hypotheses, references)
    return BLEU(effective_order=True).corpus_score(list(hypotheses), [list(references)]).score


def rouge_l(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F-measure (rouge-score's default tokenizer: lower-cased ASCII words and numbers)."""
    from rouge_score import rouge_scorer

    _check_lengths(hypotheses, references)
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    scores = [scorer.score(r, h)["rougeL"].fmeasure for h, r in zip(hypotheses, references, strict=True)]
    return sum(scores) / len(scores)


def generation_metrics(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    return {"exact_match": exact_match(hypotheses, references), "chrf": chrf(hypotheses, references),
            "bleu": bleu(hypotheses, references), "rouge_l": rouge_l(hypotheses, references)}


def _check_lengths(hypotheses: Sequence, references: Sequence) -> None:
    if len(hypotheses) != len(references) or not references:
        raise ValueError(f"need equally many predictions and references (at least one), got "
                         f"{len(hypotheses)} and {len(references)}")


# --- running a model --------------------------------------------------------------------------------
@torch.no_grad()
def greedy_generate(model: torch.nn.Module, prompts: Sequence[list[int]], stop_id: int, max_new_tokens: int,
                    batch_size: int = 64, precision: str = "fp32") -> list[list[int]]:
    """Greedy continuations of token prompts, each cut before its first `stop_id`.

    The model has no attention mask, so prompts are batched by exact length instead of padded: equal
    lengths need no padding, and a task's prompts come in few distinct lengths.
    """
    device = next(model.parameters()).device
    block = model.config.block_size
    was_training = model.training
    model.eval()
    outputs: list[list[int]] = [[] for _ in prompts]
    by_length: dict[int, list[int]] = defaultdict(list)
    for index, prompt in enumerate(prompts):
        by_length[len(prompt)].append(index)
    for length, indices in sorted(by_length.items()):
        if length >= block:
            raise ValueError(f"a prompt has {length} tokens; the context holds {block}")
        for first in range(0, len(indices), batch_size):
            chunk = indices[first: first + batch_size]
            ids = torch.tensor([prompts[i] for i in chunk], device=device)
            done = torch.zeros(len(chunk), dtype=torch.bool, device=device)
            for _ in range(min(max_new_tokens, block - length)):
                with autocast(device, precision):
                    logits = model(ids)[0][:, -1]
                next_ids = torch.where(done, stop_id, logits.float().argmax(-1))
                ids = torch.cat([ids, next_ids[:, None]], dim=1)
                done |= next_ids == stop_id
                if done.all():
                    break
            for row, index in zip(ids[:, length:].tolist(), chunk, strict=True):
                outputs[index] = row[: row.index(stop_id)] if stop_id in row else row
    model.train(was_training)
    return outputs


@torch.no_grad()
def classify(model: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
             precision: str = "fp32") -> tuple[list[int], list[int], float]:
    """(predicted label ids, true label ids, mean cross-entropy) of a classifier over (x, last, label) batches."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    predictions, references, loss_sum = [], [], 0.0
    for x, last, labels in batches:
        with autocast(device, precision):
            logits = model.classify(x.to(device), last.to(device)).float()
        loss_sum += F.cross_entropy(logits, labels.to(device), reduction="sum").item()
        predictions += logits.argmax(-1).tolist()
        references += labels.tolist()
    model.train(was_training)
    return predictions, references, loss_sum / max(1, len(references))


def eval_task(ckpt: str | Path, data: str | Path, max_items: int | None = None, max_new_tokens: int = 64,
              batch_size: int = 32, device: str = "auto", precision: str = "auto", log=print) -> dict[str, Any]:
    """`gptlab eval-task`: a checkpoint's task metrics on a JSONL file.

    A classifier checkpoint is scored on {"text","label"} records; any language model (fine-tuned or not,
    gptlab or HF GPT-2) on instruction or chat records, greedy-decoded through the chat template.
    """
    from gptlab import finetune  # finetune builds on this module, so it is imported here, not at the top

    model, tokenizer, info = finetune.load_finetuned(ckpt)
    device = select_device(device)
    model.to(device)
    precision, why = resolve_precision(precision, device)
    log(f"precision: {precision} ({why})")
    block, pad = model.config.block_size, tokenizer.eot_id
    if info["config"]["task"] == "classify":
        examples, _ = finetune.load_classify(data, tokenizer, block, info["labels"], log)
        examples = examples[:max_items] if max_items else examples
        scores = finetune.classification_scores(model, examples, pad, batch_size, precision)
    else:
        require_metric_packages()
        examples = finetune.load_sft(data, tokenizer, block, log)
        examples = examples[:max_items] if max_items else examples
        scores = {"loss": finetune.response_loss(model, examples, pad, batch_size, precision),
                  **finetune.generation_scores(model, examples, tokenizer, max_new_tokens, precision)}
    return {"items": len(examples), **scores}
