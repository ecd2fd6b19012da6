"""Task metrics against hand-worked examples, and batched greedy decoding against the one-by-one generator."""

import pytest

from gptlab import evaluate


def test_accuracy_and_macro_f1_by_hand():
    refs = ["pos", "pos", "pos", "neg", "neg", "neu"]
    preds = ["pos", "neg", "pos", "neg", "pos", "neg"]
    assert evaluate.accuracy(preds, refs) == pytest.approx(3 / 6)
    # pos: tp 2 fp 1 fn 1 -> 4/6; neg: tp 1 fp 2 fn 1 -> 2/5; neu: tp 0 fp 0 fn 1 -> 0
    assert evaluate.macro_f1(preds, refs) == pytest.approx((4 / 6 + 2 / 5 + 0) / 3)
    assert evaluate.macro_f1(refs, refs) == 1.0
    assert evaluate.majority_accuracy(["a", "b", "a", "c"]) == 0.5
    with pytest.raises(ValueError, match="equally many"):
        evaluate.accuracy(["a"], ["a", "b"])


def test_exact_match_ignores_surrounding_whitespace_only():
    assert evaluate.exact_match([" 5 April 2023\n", "5 april 2023"], ["5 April 2023", "5 April 2023"]) == 0.5


def test_generation_metrics_from_sacrebleu_and_rouge_score():
    refs = ["the cat sat on the mat", "a dog barked"]
    perfect = evaluate.generation_metrics(refs, refs)
    assert perfect == {"exact_match": 1.0, "chrf": pytest.approx(100.0), "bleu": pytest.approx(100.0),
                       "rouge_l": pytest.approx(1.0)}
    # ROUGE-L: the LCS of "the cat on the mat" with the first reference is 5 words: P = 5/5, R = 5/6
    assert evaluate.rouge_l(["the cat on the mat"], refs[:1]) == pytest.approx(2 * (5 / 6) / (1 + 5 / 6))
    unrelated = evaluate.generation_metrics(["xyz qqq", "zzz"], refs)
    assert unrelated["bleu"] == 0.0 and unrelated["rouge_l"] == 0.0 and unrelated["chrf"] < 5
    dates = ["5 April 2023", "29 February 2024"]  # three words: no 4-grams, yet exact outputs score 100
    assert evaluate.bleu(dates, dates) == pytest.approx(100.0)
    assert 0 < evaluate.bleu(["5 April 2023", "28 February 2024"], dates) < 100
    partial = evaluate.generation_metrics(["the cat sat on a mat", "a dog"], refs)
    assert 0 < partial["bleu"] < 100 and 0 < partial["chrf"] < 100 and partial["exact_match"] == 0.0
