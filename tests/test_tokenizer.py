import shutil

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gptlab import tokenizer as tok

MIXED = [
    "Hello, world! It's 2026 and we're testing.",
    "中文分词测试：你好，世界。机器学习很有趣！",
    "Emoji 🎉🚀 and flags 🇫🇷 mixed with text 👩‍👩‍👧.",
    "def f(x):\n    return x ** 2  # code\n\ttabs\r\nand CRLF",
    "   leading spaces, trailing   \n\n\n",
    "Ünïcödé àccents, Ελληνικά, русский, العربية, हिन्दी",
    "<|endoftext|> special in the middle <|endoftext|>",
    "",
]


GPT2 = tok.load("gpt2")


@pytest.fixture(scope="module")
def gpt2():
    return GPT2


@pytest.fixture(scope="module")
def trained():
    texts = [t * 20 for t in MIXED[:-1]]
    return tok.train(texts, 600, show_progress=False)


def test_gpt2_ids_match_transformers(gpt2, tmp_path):
    from transformers import GPT2TokenizerFast

    shutil.copy(tok.gpt2_files_dir() / "encoder.json", tmp_path / "vocab.json")
    shutil.copy(tok.gpt2_files_dir() / "vocab.bpe", tmp_path / "merges.txt")
    reference = GPT2TokenizerFast.from_pretrained(str(tmp_path))
    assert len(reference) == 50257
    for text in MIXED:
        assert gpt2.encode(text) == reference(text)["input_ids"], text
    assert gpt2.encode_batch(MIXED) == [reference(t)["input_ids"] for t in MIXED]


def test_known_gpt2_ids(gpt2):
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.eot_id == 50256 and gpt2.vocab_size == 50257


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_round_trip_any_unicode(text):
    assert GPT2.decode(GPT2.encode(text)) == text


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF)) | st.text())
def test_trained_round_trip_chinese_and_any(trained, text):
    assert trained.decode(trained.encode(text)) == text


def test_trained_tokenizer_saves_and_loads_in_gpt2_format(trained, tmp_path):
    trained.save(tmp_path)
    assert (tmp_path / "vocab.json").is_file() and (tmp_path / "merges.txt").is_file()
    again = tok.load(tmp_path)
    for text in MIXED:
        assert again.encode(text) == trained.encode(text)
    assert trained.vocab_size <= 600
    assert trained.encode("<|endoftext|>") == [trained.eot_id]


def test_trained_tokenizer_matches_hf_tokenizers_on_its_training_style_text(trained, tmp_path):
    from transformers import GPT2TokenizerFast

    trained.save(tmp_path)
    reference = GPT2TokenizerFast.from_pretrained(str(tmp_path))
    for text in MIXED:
        assert trained.encode(text) == reference(text)["input_ids"]


def test_bad_tokenizer_sources():
    with pytest.raises(tok.TokenizerError, match="not found"):
        tok.load("/no/such/dir")
    with pytest.raises(tok.TokenizerError, match="at least"):
        tok.train(["abc"], 100)


def test_han_chars_bpe_makes_each_chinese_character_one_token_and_gpt2_pretokenisation_reproduces_it(trained):
    from tokenizers import Regex, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    chinese = MIXED[1]
    han = tok.train([t * 20 for t in MIXED[:-1]], 600, show_progress=False, han_chars=True)
    # the plain BPE joins characters of the repeated sentence into longer tokens; han_chars keeps them apart
    assert max(len(trained.decode([i])) for i in trained.encode(chinese)) > 1
    assert [han.decode([i]) for i in han.encode(chinese)] == list(chinese)
    # encoded with GPT-2's regex, the tokens are the ones the training-time pre-tokenisation gives
    reference = HFTokenizer(models.BPE(han.vocab, [tuple(m.split(" ")) for m in han.merges]))
    reference.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r"\p{Han}"), "isolated"),
                                                       pre_tokenizers.ByteLevel(add_prefix_space=False)])
    for text in MIXED[:-2]:
        assert han.encode(text) == reference.encode(text).ids, text
