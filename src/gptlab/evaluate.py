"""Task metrics: accuracy and macro-F1 for classification; entity-level P/R/F1 for tagging; exact match, chrF, BLEU and ROUGE-L for generation.

Scales follow each metric's reference implementation: accuracy, macro-F1, exact match and ROUGE-L
(`rouge-score`'s F-measure) are fractions in [0, 1]; chrF and BLEU are `sacrebleu`'s corpus scores in [0, 100].
Running a model to get its predictions is the fine-tuning tasks' job (gptlab.finetune.tasks).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from gptlab.errors import require_package

GENERATION_METRICS = ("exact_match", "chrf", "bleu", "rouge_l")
CLASSIFICATION_METRICS = ("accuracy", "macro_f1", "majority_accuracy")  # the last: the baseline to beat
TAGGING_METRICS = ("precision", "recall", "f1")


def require_metric_packages() -> None:
    """Fail before training, not at the first evaluation, when the generation metrics cannot run."""
    for module in ("sacrebleu", "rouge_score"):
        require_package(module, "pip install sacrebleu rouge-score  (or pip install -e '.[finetune]')",
                "the generation metrics")


# --- classification --------------------------------------------------------------------------------
def accuracy(predictions: Sequence[Any], references: Sequence[Any]) -> float:
    _check_lengths(predictions, references)
    return sum(p == r for p, r in zip(predictions, references, strict=True)) / len(references)


def majority_accuracy(references: Sequence[Any]) -> float:
    """The accuracy of always answering the most frequent reference label: what a classifier must beat."""
    if not references:
        raise ValueError("no references")
    return max(Counter(references).values()) / len(references)


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


# --- token classification --------------------------------------------------------------------------
def require_seqeval() -> None:
    require_package("seqeval", "pip install seqeval  (or pip install -e '.[finetune]')", "the tagging metrics")


def entity_scores(predictions: Sequence[Sequence[str]], references: Sequence[Sequence[str]],
                  ) -> dict[str, Any]:
    """Entity-level precision, recall and F1 of BIO tag sequences (seqeval's default, conlleval-compatible
    mode: an entity counts only when its type and both ends match), micro-averaged, and per entity type."""
    from seqeval.metrics import classification_report, f1_score, precision_score, recall_score

    _check_lengths(predictions, references)
    for p, r in zip(predictions, references, strict=True):
        if len(p) != len(r):
            raise ValueError(f"a predicted sequence has {len(p)} tags, its reference {len(r)}")
    pred, ref = [list(p) for p in predictions], [list(r) for r in references]
    report = classification_report(ref, pred, output_dict=True, zero_division=0)
    per_type = {name: {"precision": float(row["precision"]), "recall": float(row["recall"]),
                       "f1": float(row["f1-score"]), "support": int(row["support"])}
                for name, row in report.items() if not name.endswith(" avg")}
    return {"precision": float(precision_score(ref, pred, zero_division=0)),
            "recall": float(recall_score(ref, pred, zero_division=0)),
            "f1": float(f1_score(ref, pred, zero_division=0)), "per_type": per_type}


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
