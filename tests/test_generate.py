import pytest
import torch

from gptlab.generate import LanguageModel, SamplingConfig, _TextReleaser, filter_logits
from gptlab.model import GPT
from gptlab.tokenizer import load
from tests.conftest import tiny_model_config


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    return LanguageModel(GPT(tiny_model_config(vocab_size=50257, block_size=64)), load("gpt2"))


def test_same_seed_same_text(lm):
    a = lm.generate(["Hello", "The"], max_new_tokens=12, temperature=1.0, seed=7)
    b = lm.generate(["Hello", "The"], max_new_tokens=12, temperature=1.0, seed=7)
    c = lm.generate(["Hello", "The"], max_new_tokens=12, temperature=1.0, seed=8)
    assert a == b and a != c and len(a) == 2


def test_greedy_matches_argmax_of_full_forward(lm):
    ids = lm.tokenizer.encode("Once upon a time")
    text = lm.generate("Once upon a time", max_new_tokens=5, temperature=0)[0]
    expected = list(ids)
    with torch.no_grad():
        for _ in range(5):
            expected.append(int(lm.model(torch.tensor([expected]))[0][0, -1].argmax()))
    assert lm.tokenizer.encode("Once upon a time" + text) == expected or text == lm.tokenizer.decode(expected[len(ids):])


def test_stream_yields_the_same_text(lm):
    pieces = list(lm.stream("你好", max_new_tokens=20, temperature=1.0, seed=3))
    assert "".join(pieces) == lm.generate("你好", max_new_tokens=20, temperature=1.0, seed=3)[0]


def test_top_k_and_top_p_filter():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    kept = filter_logits(logits, SamplingConfig(temperature=1.0, top_k=2)).isfinite()
    assert kept.tolist() == [[True, True, False, False]]
    probs = logits.softmax(-1)[0]  # ~0.64, 0.24, 0.09, 0.03
    kept = filter_logits(logits, SamplingConfig(temperature=1.0, top_p=0.7)).isfinite()
    assert kept.tolist() == [[True, True, False, False]] and probs[0] < 0.7
    kept = filter_logits(logits, SamplingConfig(temperature=1.0, top_p=0.5)).isfinite()
    assert kept.tolist() == [[True, False, False, False]]


@pytest.mark.parametrize("bad", [dict(top_p=0.0), dict(top_p=1.5), dict(temperature=-1.0),
                                 dict(max_new_tokens=0), dict(top_k=0)])
def test_bad_sampling_parameters_raise(lm, bad):
    with pytest.raises(ValueError):
        lm.generate("hi", **{"max_new_tokens": 3, **bad})


def test_prompt_longer_than_context_raises(lm):
    with pytest.raises(ValueError, match="context"):
        lm.generate("word " * 100, max_new_tokens=2)
    with pytest.raises(ValueError, match="no prompts"):
        lm.generate([], max_new_tokens=2)


def test_utf8_split_holds_back_partial_characters():
    data = "好".encode()
    releaser = _TextReleaser([])
    assert releaser.push(b"ab" + data[:2]) == ("ab", False)
    assert releaser.push(data[2:]) == ("好", False)
