"""`gptlab finetune`: data formats, prompt masking, the three methods, adapter checkpoints, resume, merge."""

import csv
import json
import math

import openai
import pytest
import torch

from gptlab import checkpoint, cli, loading
from gptlab import tokenizer as tok
from gptlab.config import TrainConfig
from gptlab.data import DataError
from gptlab.finetune import tasks
from gptlab.finetune.config import FinetuneConfig, configs_from_sources
from gptlab.finetune.data import (
    ClassifyExample,
    EpochSampler,
    SFTExample,
    classify_batch,
    load_classify,
    load_sft,
    sft_batch,
    sft_messages,
)
from gptlab.finetune.model import FinetuneModel
from gptlab.finetune.run import finetune
from gptlab.language_model import LanguageModel
from gptlab.metrics import metric_fields
from gptlab.model import GPT, IGNORE_INDEX
from gptlab.prompts import STYLES, Message
from tests.conftest import load_gpt, tiny_model_config
from tests.helpers import ServerProcess

INSTRUCTION = STYLES["instruction"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: a second thread only spins
POSITIVE = ["good", "great", "fine", "lovely", "superb", "charming"]
NEGATIVE = ["bad", "awful", "dull", "poor", "boring", "clumsy"]
SUBJECTS = ["the film", "this play", "the acting", "his speech", "the plot", "her song", "the ending", "the music",
            "that scene", "our dinner", "the show", "my book"]


def _write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def _sentiment(root, record):
    """A small task a tiny model learns in seconds: val holds subject/adjective pairs unseen in training
    (every adjective is seen, with other subjects)."""
    rows = [(i + j, record(f"{subject} was {adjective}.", adjective in POSITIVE))
            for i, subject in enumerate(SUBJECTS) for j, adjective in enumerate(POSITIVE + NEGATIVE)]
    _write_jsonl(root / "train.jsonl", [r for k, r in rows if k % 4])
    _write_jsonl(root / "val.jsonl", [r for k, r in rows if not k % 4])
    return root


@pytest.fixture(scope="module")
def sentiment_dir(tmp_path_factory):
    return _sentiment(tmp_path_factory.mktemp("sentiment"),
                      lambda text, positive: {"text": text, "label": "pos" if positive else "neg"})


@pytest.fixture(scope="module")
def sentiment_sft_dir(tmp_path_factory):
    return _sentiment(tmp_path_factory.mktemp("sentiment-sft"),
                      lambda text, positive: {"instruction": "Is this review positive or negative?", "input": text,
                                              "output": "positive" if positive else "negative"})


@pytest.fixture(scope="module")
def gpt2_tokenizer():
    return tok.load("gpt2")


def _run(tmp_path, init, data, name, log=lambda _: None, **settings):
    train = dict(init=str(init), data=str(data), out=str(tmp_path / name), max_steps=8, batch_size=8,
                 eval_interval=1000, ckpt_interval=1000, warmup_steps=2, precision="fp32", lr=1e-2)
    tune = {k: settings.pop(k) for k in list(settings) if k in FinetuneConfig.__dataclass_fields__}
    cfg, ft = configs_from_sources(None, {**train, **settings}, tune)
    return finetune(cfg, ft, log=log)


def _losses(run_dir):
    with open(run_dir / "metrics.csv") as handle:
        return [row["train_loss"] for row in csv.DictReader(handle)]


# --- data formats and masking ------------------------------------------------------------------------
def test_chat_template_renders_and_trains_only_replies(gpt2_tokenizer):
    tokenizer = gpt2_tokenizer
    messages = [Message("system", "Be brief."), Message("user", "Hi"), Message("assistant", "Hello."),
                Message("user", "2+2?"), Message("assistant", "4")]
    ids, trained = INSTRUCTION.encode(messages, tokenizer, generation_prompt=False)
    assert tokenizer.decode(ids) == INSTRUCTION.render(messages, generation_prompt=False) == (
        "### System:\nBe brief.\n\n### User:\nHi\n\n### Assistant:\nHello.<|endoftext|>"
        "### User:\n2+2?\n\n### Assistant:\n4<|endoftext|>")
    assert tokenizer.decode([i for i, t in zip(ids, trained, strict=True) if t]) == "Hello.<|endoftext|>4<|endoftext|>"
    # an instruction record is the same conversation as its chat form
    alpaca = sft_messages({"instruction": "Add.", "input": "2+2", "output": "4"}, "x")
    assert alpaca == [Message("user", "Add.\n\n2+2"), Message("assistant", "4")]
    prompt, _ = INSTRUCTION.encode(alpaca[:-1], tokenizer)
    full, _ = INSTRUCTION.encode(alpaca, tokenizer, generation_prompt=False)
    assert full[: len(prompt)] == prompt and tokenizer.decode(full[len(prompt):]) == "4<|endoftext|>"


def test_prompt_tokens_contribute_zero_loss_and_zero_gradient(gpt2_tokenizer):
    tokenizer = gpt2_tokenizer
    examples = [SFTExample(*INSTRUCTION.encode(sft_messages(r, "x"), tokenizer, generation_prompt=False), [], "")
                for r in ({"instruction": "Spell out this date.", "input": "2001-02-03", "output": "3 February 2001"},
                          {"instruction": "Say hi.", "output": "hi"})]
    x, y = sft_batch(examples, tokenizer.eot_id)
    torch.manual_seed(0)
    model = GPT(tiny_model_config(vocab_size=tokenizer.vocab_size, block_size=64))
    logits = model(x)[0]
    logits.retain_grad()
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX)
    loss.backward()
    trained = y != IGNORE_INDEX
    # exactly the reply tokens and each row's <|endoftext|> are targets; prompt and padding are not
    assert trained.sum().item() == len(tokenizer.encode("3 February 2001")) + 1 + len(tokenizer.encode("hi")) + 1
    assert logits.grad[~trained].abs().max().item() == 0.0
    assert (logits.grad[trained].abs().sum(-1) > 0).all()
    manual = torch.stack([torch.nn.functional.cross_entropy(logits[b, t][None], y[b, t][None])
                          for b, t in trained.nonzero().tolist()]).mean()
    assert loss.item() == pytest.approx(manual.item(), rel=1e-6)
    assert model(x, y)[1].item() == pytest.approx(loss.item(), rel=1e-6)  # what the SFT task trains on


@pytest.mark.parametrize("line,needle", [
    ("{not json", "not valid JSON"),
    ('["a list"]', "expected a JSON object"),
    ('{"instruction": "x"}', 'expected {"instruction", "input", "output"} or {"messages"}'),
    ('{"instruction": 3, "output": "y"}', "'instruction' must be a string"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "last message must be the assistant"),
    ('{"messages": [{"role": "bot", "content": "hi"}]}', "needs a role"),
])
def test_malformed_lines_name_the_file_and_line(tmp_path, gpt2_tokenizer, line, needle):
    path = tmp_path / "train.jsonl"
    path.write_text('{"instruction": "ok", "output": "fine"}\n\n' + line + "\n")
    with pytest.raises(DataError) as err:
        load_sft(path, gpt2_tokenizer, 64, INSTRUCTION, log=lambda _: None)
    assert str(err.value).startswith(f"{path}:3: ") and needle in str(err.value)


def test_classifier_reads_the_last_real_token_whatever_the_padding(tiny_pretrained):
    gpt, tokenizer = load_gpt(tiny_pretrained)
    model = FinetuneModel(gpt.eval(), num_labels=3)
    short, long = ([*tokenizer.encode(t), tokenizer.eot_id] for t in ("a short one", "a much longer text to pad"))
    x, last, _ = classify_batch([ClassifyExample(short, 0), ClassifyExample(long, 1)],
                                         tokenizer.eot_id)
    with torch.no_grad():
        batched = model.classify(x, last)
        alone = model.classify(torch.tensor([short]), torch.tensor([len(short) - 1]))
    assert x.shape[1] == len(long) > len(short)
    assert torch.allclose(batched[0], alone[0], atol=1e-5)


def test_auxiliary_lm_loss_covers_each_rows_real_tokens_only(tiny_pretrained):
    gpt, tokenizer = load_gpt(tiny_pretrained)
    model = FinetuneModel(gpt.eval(), num_labels=2)
    texts = [[*tokenizer.encode(t), tokenizer.eot_id] for t in ("a short one", "a much longer text to pad")]
    x, last, _ = classify_batch([ClassifyExample(ids, 0) for ids in texts], tokenizer.eot_id)
    with torch.no_grad():
        logits, lm_loss = model.classify_and_lm_loss(x, last)
        # the reference: plain cross-entropy of the full logits of each text alone, summed over all predicted tokens
        nats = sum(torch.nn.functional.cross_entropy(gpt(torch.tensor([ids]))[0][0, :-1], torch.tensor(ids[1:]),
                                                     reduction="sum") for ids in texts)
    assert torch.allclose(logits, model.classify(x, last))
    assert lm_loss.item() == pytest.approx(nats.item() / sum(len(ids) - 1 for ids in texts), rel=1e-5)


def test_dropped_and_cut_examples_are_counted(tmp_path, tiny_pretrained):
    _, tokenizer = load_gpt(tiny_pretrained)
    _write_jsonl(tmp_path / "sft.jsonl", [{"instruction": "long " * 200, "output": "x"},
                                          {"instruction": "short", "output": "y"}])
    messages = []
    kept = load_sft(tmp_path / "sft.jsonl", tokenizer, 96, INSTRUCTION, log=messages.append)
    assert len(kept) == 1 and messages == [f"{tmp_path / 'sft.jsonl'}: 1 examples, 1 longer than the 96-token "
                                           f"context (left out)"]
    _write_jsonl(tmp_path / "cls.jsonl", [{"text": "word " * 300, "label": "a"}, {"text": "fine", "label": "b"}])
    examples, labels = load_classify(tmp_path / "cls.jsonl", tokenizer, 96, log=messages.append)
    assert labels == ["a", "b"] and len(examples[0].ids) == 96 and examples[0].ids[-1] == tokenizer.eot_id
    assert messages[-1].endswith("2 examples, 1 cut to the 96-token context")


# --- training --------------------------------------------------------------------------------------
def test_sft_answers_held_out_items_from_the_command_line(tmp_path, tiny_pretrained, sentiment_sft_dir, capsys):
    """The CI-sized form of the SFT acceptance run (docs/FINETUNING.md has the full-size one on dates): 500
    steps at lr 3e-3 answer at least 90% of the held-out items exactly (1.0 in the runs we measured, from
    bases pretrained on one thread or two: float sums on two threads vary the base run to run); 250 at
    1e-2 sometimes stayed at the majority answer, 0.5 here."""
    cli.main(["finetune", "--init", str(tiny_pretrained), "--data", str(sentiment_sft_dir), "--out",
              str(tmp_path / "sft"), "--task", "sft", "--method", "full", "--max-steps", "500",
              "--batch-size", "16", "--lr", "3e-3", "--warmup-steps", "5", "--eval-interval", "500",
              "--eval-items", "0", "--precision", "fp32"])
    stdout = capsys.readouterr().out
    summary = json.loads(stdout.strip().splitlines()[-1])
    answers = [json.loads(line)["output"] for line in (sentiment_sft_dir / "val.jsonl").read_text().splitlines()]
    always_the_majority = max(answers.count(a) for a in set(answers)) / len(answers)  # 0.5: nothing learned
    assert always_the_majority == 0.5 and summary["exact_match"] >= 0.9, summary
    assert "sft / full: training" in stdout and "(100.000%)" in stdout
    header = (tmp_path / "sft" / "metrics.csv").read_text().splitlines()[0]
    assert header == ",".join(metric_fields(("val_loss", "exact_match", "chrf", "bleu", "rouge_l")))


def test_lora_classifier_saves_only_adapters_and_eval_task_reproduces_it(tmp_path, tiny_pretrained,
                                                                        sentiment_dir, capsys):
    result = _run(tmp_path, tiny_pretrained, sentiment_dir, "lora", task="classify", method="lora",
                  max_steps=120, lora_rank=4, lora_targets="attn.c_attn,attn.c_proj,mlp.c_fc,mlp.c_proj")
    assert result["val_loss"] < math.log(2), result  # below the untrained head's chance level
    payload = checkpoint.load(tmp_path / "lora")
    assert {k.rsplit(".", 1)[-1] for k in payload["model"]} == {"lora_A", "lora_B", "weight", "bias"}
    assert all("lora_" in k or k.startswith("head.") for k in payload["model"])
    full_size = (tiny_pretrained / checkpoint.CKPT_NAME).stat().st_size
    assert (tmp_path / "lora" / checkpoint.CKPT_NAME).stat().st_size < full_size / 4
    cli.main(["eval-task", "--ckpt", str(tmp_path / "lora"), "--data", str(sentiment_dir / "val.jsonl")])
    scores = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert scores["accuracy"] == pytest.approx(result["accuracy"])
    assert scores["loss"] == pytest.approx(result["val_loss"], rel=1e-4)
    labels = [json.loads(line)["label"] for line in (sentiment_dir / "val.jsonl").read_text().splitlines()]
    majority = max(labels.count(label) for label in set(labels)) / len(labels)  # the baseline, logged beside accuracy
    assert scores["majority_accuracy"] == pytest.approx(majority) == pytest.approx(result["majority_accuracy"])
    with pytest.raises(checkpoint.CheckpointError, match="classifier"):
        load_gpt(tmp_path / "lora")


def test_freeze_trains_only_the_top_blocks_and_the_head(tmp_path, tiny_pretrained, sentiment_dir):
    _run(tmp_path, tiny_pretrained, sentiment_dir, "freeze", task="classify", method="freeze", train_layers=1)
    base, _ = load_gpt(tiny_pretrained)
    tuned = loading.load(tmp_path / "freeze")
    assert tuned.finetune["labels"] == ["neg", "pos"]
    tuned_state = tuned.model.gpt.state_dict()
    for name, before in base.state_dict().items():
        changed = not torch.equal(before, tuned_state[name])
        assert changed == name.startswith(("transformer.h.1.", "transformer.ln_f.")), name
    saved = checkpoint.load(tmp_path / "freeze")["model"]
    assert all(k.startswith(("gpt.transformer.h.1.", "gpt.transformer.ln_f.", "head.")) for k in saved)


def test_lora_run_resumes_exactly(tmp_path, tiny_pretrained, sentiment_sft_dir, monkeypatch):
    settings = dict(task="sft", method="lora", lora_dropout=0.1, max_steps=6, ckpt_interval=3, eval_items=4,
                    max_new_tokens=4)
    _run(tmp_path, tiny_pretrained, sentiment_sft_dir, "straight", **settings)
    real_batch, calls = tasks.sft_batch, []

    def interrupted_after_three_steps(*args):
        calls.append(1)
        if len(calls) > 3:
            raise KeyboardInterrupt
        return real_batch(*args)

    monkeypatch.setattr(tasks, "sft_batch", interrupted_after_three_steps)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, tiny_pretrained, sentiment_sft_dir, "split", **settings)
    monkeypatch.setattr(tasks, "sft_batch", real_batch)
    _run(tmp_path, tiny_pretrained, sentiment_sft_dir, "split", resume=True, **settings)
    assert _losses(tmp_path / "split") == _losses(tmp_path / "straight")


def test_merge_lora_gives_a_standalone_checkpoint(tmp_path, tiny_pretrained, sentiment_sft_dir, capsys):
    _run(tmp_path, tiny_pretrained, sentiment_sft_dir, "run", task="sft", method="lora", eval_items=4,
         max_new_tokens=4)
    capsys.readouterr()
    cli.main(["merge-lora", "--ckpt", str(tmp_path / "run"), "--out", str(tmp_path / "merged.pt")])
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["out"] == str(tmp_path / "merged.pt")
    merged = checkpoint.load(tmp_path / "merged.pt")
    assert "finetune" not in merged and not any("lora" in k for k in merged["model"])
    prompt = INSTRUCTION.render([Message("user", "Spell out this date.\n\n1999-12-31")])
    run = loading.load(tmp_path / "run")
    unmerged, tokenizer = run.model, run.tokenizer
    ids = tokenizer.encode(prompt)
    with torch.no_grad():
        assert (unmerged(torch.tensor([ids]))[0] - LanguageModel.load(tmp_path / "merged.pt").model(
            torch.tensor([ids]))[0]).abs().max().item() <= 1e-5
    # `gptlab generate` takes the run directory itself (rebuilt on its base) or the merged file alike
    texts = {LanguageModel.load(p).generate(prompt, max_new_tokens=8, temperature=0)[0]
             for p in (tmp_path / "run", tmp_path / "merged.pt")}
    assert len(texts) == 1


def test_finetune_cli_errors_are_one_line(tmp_path, tiny_pretrained, sentiment_dir, capsys):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "train.jsonl").write_text('{"text": "fine", "label": "a"}\n{"text": "oops"}\n')
    (tmp_path / "bad" / "val.jsonl").write_text('{"text": "fine", "label": "a"}\n')
    for args, needle in [
        (["--data", str(tmp_path / "bad"), "--task", "classify"], f"{tmp_path / 'bad' / 'train.jsonl'}:2: expected"),
        (["--data", str(tmp_path)], "no train.jsonl"),
        (["--data", str(sentiment_dir), "--task", "classify", "--method", "freeze", "--train-layers", "5"],
         "train_layers is 5"),
        (["--data", str(sentiment_dir), "--lora-targets", "q_proj"], "lora targets"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["finetune", "--init", str(tiny_pretrained), "--out", str(tmp_path / "out"), *args])
        stderr = capsys.readouterr().err
        assert exit_info.value.code == 2 and stderr.startswith("gptlab: error: ") and needle in stderr, stderr
        assert len(stderr.strip().splitlines()) == 1
    assert checkpoint.find(tmp_path / "out") is None


def test_sampler_draws_each_example_once_per_epoch_across_micro_batches():
    """global_batch_tokens = 3 micro-batches of 4 x 32 tokens: steps must not reuse each other's examples."""
    sampler = EpochSampler(24, TrainConfig(batch_size=4, global_batch_tokens=3 * 4 * 32), block_size=32)
    epoch = [i for step in range(2) for micro in range(3) for i in sampler.indices(step, micro)]
    assert sorted(epoch) == list(range(24))
    assert sampler.indices(2, 0) != sampler.indices(0, 0)  # the next epoch is shuffled afresh


CHAT_REPLIES = {"What is the capital of France?": "Paris.", "Who wrote Hamlet?": "Shakespeare did.",
                "Say hello.": "Hello there!", "How many legs has a cat?": "Four legs.",
                "What colour is the sky?": "Blue, mostly.", "Name a fruit.": "An apple."}


@pytest.mark.parametrize("style", ["chat", "instruction"])
def test_a_fine_tuned_chat_model_gives_its_trained_reply_through_the_api(tmp_path, tiny_pretrained, style, capsys):
    """`gptlab finetune` on chat records, then `gptlab serve` on the run: the server renders requests in
    the style the checkpoint was trained in, and stops where the trained reply ends. The fine-tuning runs in
    process, on the module's one torch thread (a child process took two: 162 s instead of 20 s under load)."""
    records = [{"messages": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": q},
                             {"role": "assistant", "content": a}]} for q, a in CHAT_REPLIES.items()]
    _write_jsonl(tmp_path / "data" / "train.jsonl", records)
    _write_jsonl(tmp_path / "data" / "val.jsonl", records)
    run = tmp_path / "run"
    cli.main(["finetune", "--init", str(tiny_pretrained), "--data", str(tmp_path / "data"), "--out", str(run),
              "--task", "sft", "--method", "full", "--prompt-style", style, "--max-steps", "150",
              "--batch-size", "6", "--lr", "3e-3", "--warmup-steps", "5", "--eval-interval", "150",
              "--precision", "fp32"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["exact_match"] == 1.0  # memorised
    assert checkpoint.load(run)["prompt_style"] == style
    with ServerProcess(run, tmp_path / "serve.log", "--threads", "1") as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
        for question, answer in list(CHAT_REPLIES.items())[:3]:
            out = client.chat.completions.create(model="run", temperature=0, max_tokens=20, messages=[
                {"role": "system", "content": "Answer briefly."}, {"role": "user", "content": question}])
            assert out.choices[0].message.content == answer and out.choices[0].finish_reason == "stop"
