"""Token classification (`gptlab finetune --task tag`), the People's Daily NER builder and `gptlab predict`."""

import json

import pytest
import requests
import torch

from gptlab import cli, datasets, evaluate
from gptlab import tokenizer as tok
from gptlab.data import DataError
from gptlab.finetune.config import FinetuneConfig, configs_from_sources
from gptlab.finetune.data import encode_tagged, load_tag, tag_batch, word_pieces
from gptlab.finetune.model import prepare_model
from gptlab.finetune.predict import entities
from gptlab.finetune.run import finetune
from gptlab.model import GPT, IGNORE_INDEX
from tests.conftest import tiny_model_config
from tests.helpers import ServerProcess

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PEOPLE = [("Anna", "Berg"), ("Omar", "Sahin"), ("Li", "Wei"), ("Maria", "Costa"), ("Jon", "Dale"), ("Eva", "Lund")]
PLACES = ["Paris", "Oslo", "Cairo", "Lima", "Kyoto", "Quito"]
ORGS = ["Siemens", "Nokia", "Oxfam", "Unicef"]
VERBS = ["visited", "left", "loved", "saw"]


def _sentences():
    """'Anna Berg visited Paris with Nokia .' in every combination: val keeps pairs unseen in training."""
    rows = []
    for i, (first, last) in enumerate(PEOPLE):
        for j, place in enumerate(PLACES):
            verb, org = VERBS[(i + j) % len(VERBS)], ORGS[(i * 2 + j) % len(ORGS)]
            rows.append((i + j, {"tokens": [first, last, verb, place, "with", org, "."],
                                 "tags": ["B-PER", "I-PER", "O", "B-LOC", "O", "B-ORG", "O"]}))
    return rows


@pytest.fixture(scope="module")
def ner_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("ner")
    rows = _sentences()
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for k, r in rows if k % 3))
    (root / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for k, r in rows if not k % 3))
    return root


def test_each_word_carries_one_tag_read_at_its_first_token_and_its_last_token_is_known():
    tokenizer = tok.load("gpt2")
    words, tags = ["Anna", "Berglundqvist", "visited", "Paris"], ["B-PER", "I-PER", "O", "B-LOC"]
    index = {t: i for i, t in enumerate(["B-LOC", "B-PER", "I-PER", "O"])}
    pieces = word_pieces(words, tokenizer)
    assert len(pieces[1]) > 1  # a word of several tokens
    assert tokenizer.decode([t for p in pieces for t in p]) == "Anna Berglundqvist visited Paris"
    for context in ("left", "echo"):
        example, cut = encode_tagged(words, tags, index, tokenizer, 64, context)
        offset = sum(map(len, pieces)) + 1 if context == "echo" else 0
        starts = [offset + sum(map(len, pieces[:i])) for i in range(len(words))]
        ends = [start + len(piece) - 1 for start, piece in zip(starts, pieces, strict=True)]
        assert not cut and example.positions == starts and example.ends == ends
        x, positions, labels = tag_batch([example], tokenizer.eot_id)
        assert positions[0].tolist() == [[start, end] for start, end in zip(starts, ends, strict=True)]
        assert [x[0, p].item() for p in starts] == [p[0] for p in pieces]  # read at each word's first token
        assert [x[0, p].item() for p in ends] == [p[-1] for p in pieces]  # and its last (tag_read "span")
        assert labels[0].tolist() == [index[t] for t in tags]
        assert sum(labels[0] != IGNORE_INDEX) == len(words)  # one labelled position per word, no more
    echo, _ = encode_tagged(words, tags, index, tokenizer, 64, "echo")
    n = sum(map(len, pieces))
    assert echo.ids[:n] == echo.ids[n + 1:] and echo.ids[n] == tokenizer.eot_id
    cut_example, cut = encode_tagged(words, tags, index, tokenizer, 2 * len(pieces[0]) + 1, "echo")
    assert cut and cut_example.positions == [len(pieces[0]) + 1]  # only the first word fits twice


@pytest.mark.parametrize("read", ["first", "span"])
def test_the_tag_head_reads_each_words_first_token_or_its_first_and_last_side_by_side(read):
    torch.manual_seed(0)
    model = prepare_model(GPT(tiny_model_config()), FinetuneConfig(task="tag", tag_read=read), ["B-X", "O"], False)
    x = torch.randint(0, model.config.vocab_size, (1, 10))
    positions = torch.tensor([[[2, 4], [5, 5], [6, 9]]])  # three words: tokens 2-4, 5, 6-9
    with torch.no_grad():
        hidden = model.gpt.hidden_states(x)[0]
        states = hidden[[2, 5, 6]] if read == "first" else torch.cat([hidden[[2, 5, 6]], hidden[[4, 5, 9]]], -1)
        assert torch.allclose(model.tag(x, positions)[0], model.head(states), atol=1e-6)


def test_the_bilstm_tag_head_sees_the_words_after_a_word_and_ignores_padding():
    torch.manual_seed(0)
    cfg = FinetuneConfig(task="tag", tag_context="left", tag_read="span", tag_head="bilstm")
    model = prepare_model(GPT(tiny_model_config()), cfg, ["B-X", "O"], False)
    x = torch.randint(0, model.config.vocab_size, (2, 10))
    positions = torch.tensor([[[0, 2], [3, 4], [5, 9]], [[0, 2], [3, 4], [0, 0]]])  # row 1: two words, then padding
    with torch.no_grad():
        both = model.tag(x, positions)
        changed = x.clone()
        changed[0, 5:] = (x[0, 5:] + 1) % model.config.vocab_size
        # a causal model's first words cannot see the third word; through the BiLSTM their tags do
        assert not torch.allclose(model.tag(changed, positions)[0, :2], both[0, :2])
        # the padded third word of row 1 changes nothing of its two real words
        assert torch.allclose(both[1, :2], model.tag(x[1:, :5], positions[1:, :2])[0], atol=1e-6)


def test_entity_scores_are_seqevals_on_a_hand_checked_case():
    reference = [["B-PER", "I-PER", "O", "B-LOC", "O"], ["B-ORG", "O", "B-LOC", "I-LOC"]]
    predicted = [["B-PER", "I-PER", "O", "B-ORG", "O"], ["B-ORG", "O", "B-LOC", "O"]]
    scores = evaluate.entity_scores(predicted, reference)
    # 4 reference entities, 4 predicted, 2 exact matches (PER, first ORG)
    assert scores["precision"] == scores["recall"] == scores["f1"] == 0.5
    assert scores["per_type"]["PER"]["f1"] == 1.0 and scores["per_type"]["LOC"]["recall"] == 0.0
    assert scores["per_type"]["ORG"] == {"precision": 0.5, "recall": 1.0, "f1": pytest.approx(2 / 3), "support": 1}


def test_entities_of_a_bio_sequence():
    words = ["江", "泽民", "在", "北京", "会见", "Anna", "Berg"]
    tags = ["B-PER", "I-PER", "O", "B-LOC", "O", "I-PER", "I-PER"]
    assert entities(words, tags) == [{"type": "PER", "start": 0, "end": 2, "text": "江泽民"},
                                     {"type": "LOC", "start": 3, "end": 4, "text": "北京"},
                                     {"type": "PER", "start": 5, "end": 7, "text": "Anna Berg"}]


@pytest.mark.parametrize("line, needle", [
    ('{"tokens": ["a", "b"], "tags": ["O"]}', "2 tokens but 1 tags"),
    ('{"tokens": ["a", "b"], "tags": ["O", "I-PER"]}', "malformed BIO sequence: tag 2 'I-PER' follows 'O'"),
    ('{"tokens": ["a", "b"], "tags": ["B-LOC", "I-PER"]}', "malformed BIO sequence"),
    ('{"tokens": ["a"], "tags": ["PER"]}', "tags are O, B-TYPE or I-TYPE"),
    ('{"text": "a b", "tags": ["O", "O"]}', "expected {\"tokens\", \"tags\"}"),
])
def test_bad_tag_files_name_the_line(tmp_path, line, needle):
    path = tmp_path / "train.jsonl"
    path.write_text('{"tokens": ["x"], "tags": ["B-LOC"]}\n' + line + "\n")
    with pytest.raises(DataError, match="train.jsonl:2: ") as info:
        load_tag(path, tok.load("gpt2"), 64, "echo", log=lambda _: None)
    assert needle in str(info.value)


def test_peoples_daily_tags_follow_the_pos_tags():
    sentence = [("中共中央", "nt"), ("总书记", "n"), ("江", "nr"), ("泽民", "nr"), ("在", "p"), ("北京", "ns"),
                ("上海", "ns"), ("。", "w")]
    assert datasets._bio(sentence) == ["B-ORG", "O", "B-PER", "I-PER", "O", "B-LOC", "B-LOC", "O"]
    # a list of people without commas is one person per surname + given name; a three-word name stays one
    people = [("江", "nr"), ("泽民", "nr"), ("李", "nr"), ("鹏", "nr"), ("、", "w"), ("陈", "nr"), ("方", "nr"),
              ("安生", "nr"), ("会见", "v"), ("克林顿", "nr")]
    assert datasets._bio(people) == ["B-PER", "I-PER", "B-PER", "I-PER", "O", "B-PER", "I-PER", "I-PER", "O", "B-PER"]
    long = [("字", "n")] * 60 + [("，", "w")] + [("字", "n")] * 60 + [("。", "w")]
    from collections import Counter
    parts = list(datasets._pd_cut(long, Counter()))
    assert [len(p) for p in parts] == [61, 61]


def _finetune(out, init, data, **settings):
    train = dict(init=str(init), data=str(data), out=str(out), max_steps=80, batch_size=8,
                 eval_interval=1000, ckpt_interval=1000, warmup_steps=5, precision="fp32", lr=3e-3)
    tune = {k: settings.pop(k) for k in ("task", "method", "tag_context", "tag_read", "tag_head", "from_scratch") if k in settings}
    cfg, ft = configs_from_sources(None, {**train, **settings}, tune)
    return finetune(cfg, ft, log=lambda _: None)


@pytest.fixture(scope="module")
def tagger(tmp_path_factory, tiny_pretrained, ner_dir):
    out = tmp_path_factory.mktemp("tagger") / "run"
    # the People's Daily recipe's tagger (left context, span read, BiLSTM head) goes through save, load, predict, serve
    return out, _finetune(out, tiny_pretrained, ner_dir, task="tag", method="full", tag_context="left",
                          tag_read="span", tag_head="bilstm")


def test_tagger_learns_held_out_sentences_and_predict_and_eval_task_agree(tmp_path, tagger, ner_dir, capsys):
    run, result = tagger
    assert result["f1"] >= 0.9, result  # unseen person/place pairs, every word seen in training
    cli.main(["eval-task", "--ckpt", str(run), "--data", str(ner_dir / "val.jsonl")])
    scores = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert scores["f1"] == pytest.approx(result["f1"]) and set(scores["per_type"]) == {"PER", "LOC", "ORG"}
    cli.main(["predict", "--ckpt", str(run), "--input", str(ner_dir / "val.jsonl"), "--out", str(tmp_path / "p.jsonl")])
    predictions = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    references = [json.loads(line) for line in (ner_dir / "val.jsonl").read_text().splitlines()]
    assert [p["tokens"] for p in predictions] == [r["tokens"] for r in references]
    assert evaluate.entity_scores([p["tags"] for p in predictions],
                                  [r["tags"] for r in references])["f1"] == pytest.approx(scores["f1"])
    assert all(0.0 < p <= 1.0 for row in predictions for p in row["probs"])
    capsys.readouterr()
    cli.main(["predict", "--ckpt", str(run), "--text", "Eva Lund saw Lima"])
    row = json.loads(capsys.readouterr().out)
    assert row["tokens"] == ["Eva", "Lund", "saw", "Lima"] and len(row["tags"]) == 4


def test_predict_bad_input_is_one_line(tmp_path, tagger, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"tokens": ["a"]}\n{"words": ["b"]}\n')
    for args, needle in [(["--input", str(bad)], "bad.jsonl:2: expected"),
                         ([], "give either --input FILE.jsonl or --text TEXT"),
                         (["--input", str(bad), "--out", str(bad)], "already exists")]:
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["predict", "--ckpt", str(tagger[0]), *args])
        captured = capsys.readouterr()
        assert exit_info.value.code == 2 and captured.err.startswith("gptlab: error: ") and needle in captured.err
        assert len(captured.err.strip().splitlines()) == 1 and not captured.out
    assert bad.read_text().startswith('{"tokens"')  # not overwritten


def test_the_server_tags_through_v1_predict_and_answers_bad_input_with_400(tmp_path, tagger):
    with ServerProcess(tagger[0], tmp_path / "serve.log", "--threads", "1") as server:
        assert requests.get(f"{server.url}/v1/models", timeout=30).json()["data"][0]["task"] == "tag"
        answer = requests.post(f"{server.url}/v1/predict", json={"input": [
            "Anna Berg visited Paris with Nokia .", {"tokens": ["Li", "Wei", "saw", "Oslo"]}]}, timeout=60)
        assert answer.status_code == 200, answer.text
        data = answer.json()["data"]
        assert data[0]["tokens"][:2] == ["Anna", "Berg"] and data[0]["tags"][:2] == ["B-PER", "I-PER"]
        assert data[1]["tokens"] == ["Li", "Wei", "saw", "Oslo"] and len(data[1]["tags"]) == 4
        for body in ({"input": [{"words": ["x"]}]}, {"input": []}, {"input": 3}):
            bad = requests.post(f"{server.url}/v1/predict", json=body, timeout=30)
            assert bad.status_code == 400 and bad.json()["error"]["param"].startswith("input"), (body, bad.text)
        assert requests.get(f"{server.url}/health", timeout=30).json()["status"] == "ok"  # still serving


def test_predict_reproduces_eval_task_accuracy_of_a_classifier(tmp_path, tiny_pretrained, ner_dir, capsys):
    """The acceptance check of `gptlab predict` in small: a classifier's predicted labels on a labelled file
    give exactly the accuracy `gptlab eval-task` reports for it."""
    rows = [json.loads(line) for line in (ner_dir / "train.jsonl").read_text().splitlines()]
    data = tmp_path / "data"
    data.mkdir()
    records = [{"text": " ".join(r["tokens"]), "label": r["tokens"][5]} for r in rows]  # the organisation
    for split in ("train", "val"):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    _finetune(tmp_path / "clf", tiny_pretrained, data, task="classify", method="full", max_steps=30)
    capsys.readouterr()
    cli.main(["eval-task", "--ckpt", str(tmp_path / "clf"), "--data", str(data / "val.jsonl")])
    accuracy = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["accuracy"]
    cli.main(["predict", "--ckpt", str(tmp_path / "clf"), "--input", str(data / "val.jsonl")])
    predicted = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert sum(p["label"] == r["label"] for p, r in zip(predicted, records, strict=True)) / len(records) == accuracy
    assert all(sum(p["probs"].values()) == pytest.approx(1.0) and p["label"] == max(p["probs"], key=p["probs"].get)
               for p in predicted)


def test_predict_answers_as_the_model_generates_greedily(tiny_pretrained, capsys):
    """A language model: the answer is greedy decoding of the prompt in the checkpoint's style, with its
    tokens' summed log-probability."""
    from gptlab import loading
    from gptlab.language_model import LanguageModel
    from gptlab.prompts import Message
    from gptlab.sampling import SamplingConfig

    cli.main(["predict", "--ckpt", str(tiny_pretrained), "--text", "To be", "--max-new-tokens", "8"])
    row = json.loads(capsys.readouterr().out)
    loaded = loading.load(tiny_pretrained)
    prompt = loaded.prompt_style.prompt_ids([Message("user", "To be")], loaded.tokenizer)
    expected = LanguageModel.from_loaded(loaded).complete(
        [prompt], SamplingConfig(max_new_tokens=8, temperature=0, stop=list(loaded.prompt_style.stop), logprobs=0))[0]
    assert row["output"] == expected.text and row["logprob"] == pytest.approx(sum(expected.logprobs), abs=1e-4)
    assert row["logprob"] < 0


def test_lexicon_baseline_tags_each_word_as_training_tagged_it_most(tmp_path, capsys):
    rows = [(["Berg", "in", "Paris"], ["B-PER", "O", "B-LOC"]), (["Anna", "Berg"], ["B-PER", "I-PER"]),
            (["Anna", "Berg"], ["B-PER", "I-PER"]), (["Paris", "Hilton"], ["B-PER", "I-PER"])]
    def write(name, items):
        (tmp_path / name).write_text("".join(json.dumps({"tokens": w, "tags": t}) + "\n" for w, t in items))

    write("train.jsonl", rows)
    # Berg: I-PER twice, B-PER once -> I-PER, which starts an entity here (B-PER); Paris: a tie kept in
    # first-seen order (B-LOC); Zed unseen -> O, so the reference's ORG is missed
    write("test.jsonl", [(["Berg", "left", "Paris", "Zed"], ["B-PER", "O", "B-LOC", "B-ORG"])])
    cli.main(["eval-task", "--baseline", "lexicon", "--data", str(tmp_path / "test.jsonl")])
    scores = json.loads(capsys.readouterr().out)
    assert scores["precision"] == 1.0 and scores["recall"] == pytest.approx(2 / 3)
    assert scores["per_type"]["ORG"]["recall"] == 0.0
