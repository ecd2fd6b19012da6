"""Moderation: the real alt-profanity-check model and a real gptlab classifier as moderators, the stream
screen's windows, and a real `gptlab serve --moderate both` process driven by the `openai` client."""

from __future__ import annotations

import json

import openai
import pytest

from gptlab import cli
from gptlab.moderation import (
    ClassifierModerator,
    Moderation,
    ModerationError,
    ProfanityCheck,
    StreamScreen,
    load_moderator,
)
from tests.conftest import API_KEY, tiny_train_config
from tests.helpers import ServerProcess

SENTENCE = "the weather is nice today and you are a fucking idiot."
PROMPT = "the weather is nice"


@pytest.fixture(scope="module")
def profanity() -> Moderation:
    return Moderation(ProfanityCheck())


def test_profanity_check_flags_offensive_english_and_passes_plain_text(profanity):
    plain, rude = profanity.check(["have a lovely day, my friend", "shut up you fucking idiot"])
    assert not plain.flagged and plain.categories == {"offensive": False}
    assert rude.flagged and rude.categories == {"offensive": True}
    assert rude.category_scores["offensive"] > 0.9 > plain.category_scores["offensive"]


def test_stream_screen_catches_a_word_split_across_chunks_before_releasing_it(profanity):
    text = "what a lovely morning it is out there, my dear friend, you fucking idiot, goodbye."
    screen, released, flagged_at = StreamScreen(every=16, overlap=64), "", None
    chunks = [text[i: i + 3] for i in range(0, len(text), 3)]  # "fu" and "cking" land in different chunks
    assert not any("fucking" in c for c in chunks)
    for n, chunk in enumerate(chunks):
        window = screen.add(chunk, final=n == len(chunks) - 1)
        if window is None:
            continue
        if profanity.check([window])[0].flagged:
            flagged_at = n
            break
        released += screen.release(final=False)
    assert flagged_at is not None
    assert "fuck" not in released and text.startswith(released) and released  # clean text went out, no more


# --- a classifier checkpoint as the moderator ------------------------------------------------------------
KIND = ["kind", "gentle", "fine", "warm", "brave", "clever"]
RUDE = ["stupid", "ugly", "vile", "rotten", "foul", "wretched"]
WHO = ["the king", "this man", "her son", "my lord", "that knave", "the duke", "our friend", "his wife"]


@pytest.fixture(scope="module")
def classifier(tmp_path_factory, tiny_pretrained, one_torch_thread):
    """A tiny classifier fine-tuned with `gptlab finetune --task classify`: labels ok / insult. In process, on one
    torch thread (a child process took two, which on a busy 2-core machine only spin)."""
    data = tmp_path_factory.mktemp("insults")
    rows = [{"text": f"{who} is {word}.", "label": "insult" if word in RUDE else "ok"}
            for who in WHO for word in KIND + RUDE]
    for split in ("train", "val"):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path_factory.mktemp("moderator") / "insult-moderator"
    cli.main(["finetune", "--task", "classify", "--method", "full", "--init", str(tiny_pretrained),
              "--data", str(data), "--out", str(out), "--max-steps", "60", "--batch-size", "16",
              "--lr", "3e-3", "--eval-interval", "1000", "--ckpt-interval", "1000", "--precision", "fp32"])
    return out


def test_classifier_moderator_maps_its_labels_to_categories(classifier):
    moderation = Moderation(load_moderator(str(classifier)))
    assert moderation.moderator.categories == ("insult",)
    rude, kind = moderation.check(["the duke is vile.", "the duke is kind."])
    assert rude.flagged and rude.categories == {"insult": True}
    assert not kind.flagged and kind.category_scores["insult"] < 0.5


def test_classifier_moderator_scores_a_long_text_in_overlapping_windows(classifier):
    moderator = ClassifierModerator(classifier)
    ids = list(range(3 * moderator.window + 7))  # longer than the model's context
    windows = moderator.windows(ids)
    assert all(len(w) == moderator.window for w in windows)
    assert windows[0][0] == ids[0] and windows[-1][-1] == ids[-1]  # nothing left out at either end
    for before, after in zip(windows, windows[1:], strict=False):
        assert after[0] in before  # consecutive windows overlap: a phrase on a boundary lies whole in one
    assert moderator.windows(ids[:5]) == [ids[:5]]
    (scores,) = moderator.scores([" ".join(["the king is kind."] * 40)])
    assert set(scores) == {"insult"} and 0.0 <= scores["insult"] <= 1.0


def test_bad_moderators_are_one_line_errors(classifier, tiny_pretrained, capsys):
    with pytest.raises(ModerationError, match="no harmless label 'safe'"):
        ClassifierModerator(classifier, safe_label="safe")
    with pytest.raises(ModerationError, match="not a classifier"):
        load_moderator(str(tiny_pretrained))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["moderate", "--text", "hello", "--moderator", "no-such-moderator"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("gptlab: error: unknown moderator 'no-such-moderator'")


def test_moderate_eval_reports_precision_and_recall(classifier, tmp_path, capsys):
    records = [{"text": "my lord is wretched.", "label": "insult"}, {"text": "my lord is brave.", "label": "ok"},
               {"text": "her son is ugly.", "label": "insult"}, {"text": "her son is warm.", "label": "ok"}]
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    cli.main(["moderate", "--moderator", str(classifier), "--eval", str(tmp_path / "test.jsonl")])
    scores = json.loads(capsys.readouterr().out)
    assert scores["items"] == 4 and scores["harmful"] == 2
    assert scores["precision"] == scores["recall"] == 1.0


# --- a real server ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rude_model(tmp_path_factory, one_torch_thread):
    """A tiny model that has learnt one sentence by heart: greedy decoding after PROMPT swears."""
    from gptlab.data import prepare
    from gptlab.train import pretrain

    corpus = tmp_path_factory.mktemp("rude-corpus")
    for name in ("a", "b"):
        (corpus / f"{name}.txt").write_text(" ".join([SENTENCE] * 300))
    data = tmp_path_factory.mktemp("rude-data")
    prepare([str(corpus)], "bpe:300", data)
    out = tmp_path_factory.mktemp("rude") / "rude-model"
    pretrain(tiny_train_config(data, out, max_steps=60, eval_interval=1000, ckpt_interval=60, lr=1e-2),
             log=lambda _: None)
    return out


@pytest.fixture(scope="module")
def moderated(rude_model, tmp_path_factory):
    with ServerProcess(rude_model, tmp_path_factory.mktemp("moderated") / "serve.log", "--moderate", "both",
                       "--api-key", API_KEY, "--threads", "1") as proc:
        yield openai.OpenAI(base_url=proc.url + "/v1", api_key=API_KEY, max_retries=0)


def test_the_model_swears_when_nothing_screens_it(rude_model, one_torch_thread):
    from gptlab.language_model import LanguageModel

    (text,) = LanguageModel.load(rude_model).generate([PROMPT], max_new_tokens=24, temperature=0)
    assert "fucking" in text


def test_flagged_input_is_refused_with_content_policy_violation(moderated):
    with pytest.raises(openai.BadRequestError) as err:
        moderated.completions.create(model="rude-model", prompt="fuck you, you stupid asshole", max_tokens=4)
    assert err.value.status_code == 400
    assert err.value.body["code"] == "content_policy_violation" and err.value.body["param"] == "prompt"
    with pytest.raises(openai.BadRequestError) as err:
        moderated.chat.completions.create(model="rude-model", max_tokens=4,
                                          messages=[{"role": "user", "content": "you fucking idiot"}])
    assert err.value.body["code"] == "content_policy_violation" and err.value.body["param"] == "messages"
    ok = moderated.completions.create(model="rude-model", prompt="the weather", max_tokens=2, temperature=0)
    assert ok.choices[0].finish_reason == "length"  # the server still serves clean requests


def test_flagged_stream_ends_with_content_filter(moderated):
    stream = moderated.completions.create(model="rude-model", prompt=PROMPT, max_tokens=24, temperature=0,
                                          stream=True)
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == "content_filter"
    assert "fuck" not in text
    whole = moderated.completions.create(model="rude-model", prompt=PROMPT, max_tokens=24, temperature=0)
    assert whole.choices[0].finish_reason == "content_filter" and "fuck" not in whole.choices[0].text


def test_moderations_endpoint_answers_in_openai_shape(moderated):
    result = moderated.moderations.create(input=["have a lovely day", "shut up you fucking idiot"])
    assert result.model == "profanity-check" and result.id.startswith("modr-")
    plain, rude = result.results
    assert plain.flagged is False and rude.flagged is True
    assert rude.categories.model_dump(exclude_none=True) == {"offensive": True}  # only its own categories
    assert 0.9 < rude.category_scores.model_dump(exclude_none=True)["offensive"] <= 1.0
    with pytest.raises(openai.NotFoundError):
        moderated.moderations.create(input="hello", model="omni-moderation-latest")
