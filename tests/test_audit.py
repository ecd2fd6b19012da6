"""`gptlab audit` on tiny models trained for it: canaries inserted 1/4/16/64 times, a planted association in a
synthetic corpus and its balanced twin."""

from __future__ import annotations

import json
import random

import pytest

from gptlab.audit import bias
from tests.conftest import run_cli, tiny_train_config

CANARY_MODEL = dict(block_size=64, n_layer=2, n_head=4, n_embd=64)


@pytest.fixture(scope="module")
def canary_run(tmp_path_factory, corpus_dir, one_torch_thread):
    """A small Shakespeare corpus with 2 canaries per repeat count, and a tiny model trained on it."""
    from gptlab.train import pretrain

    root = tmp_path_factory.mktemp("canaries")
    small = root / "corpus"
    small.mkdir()
    for path in sorted(corpus_dir.glob("*.txt"))[:4]:
        (small / path.name).write_text(path.read_text()[:12_000])
    result = run_cli("prepare", "--input", str(small), "--tokenizer", "bpe:512", "--out", str(root / "data"),
                     "--canaries", "2", "--canary-repeats", "1,4,16,64")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["canaries"] == 8
    cfg = tiny_train_config(root / "data", root / "run", model=CANARY_MODEL, max_steps=800, batch_size=16,
                            warmup_steps=20, eval_interval=800, ckpt_interval=800)
    pretrain(cfg, log=lambda _: None)
    return root


def test_canary_exposure_rises_with_repeats_and_64x_canaries_are_extracted(canary_run):
    meta = json.loads((canary_run / "data" / "meta.json").read_text())
    assert sorted(c["repeats"] for c in meta["canaries"]) == [1, 1, 4, 4, 16, 16, 64, 64]
    result = run_cli("audit", "memorization", "--ckpt", str(canary_run / "run"), "--data", str(canary_run / "data"),
                     "--prefix-lengths", "8,16", "--suffix-length", "8", "--windows", "50", "--candidates", "300",
                     "--out", str(canary_run / "audit"))
    assert result.returncode == 0, result.stderr
    report = json.loads((canary_run / "audit" / "memorization.json").read_text())
    groups = {g["repeats"]: g for g in report["canaries_by_repeats"]}
    # the secret grows more likely with every repeat count; exposure rises with it until it nears its ceiling
    # (log2 of 10^6 secrets = 19.93 bits), where 16x and 64x canaries can swap places between runs
    perplexities = [groups[r]["mean_log_perplexity"] for r in (1, 4, 16, 64)]
    assert perplexities == sorted(perplexities, reverse=True) and len(set(perplexities)) == 4
    assert groups[1]["mean_exposure"] < groups[4]["mean_exposure"] < min(groups[16]["mean_exposure"], groups[64]["mean_exposure"])
    assert groups[64]["extracted"] == 1.0
    for row in report["extraction"]:
        assert row["heldout"] <= 0.02
    assert (canary_run / "audit" / "memorization.png").read_bytes().startswith(b"\x89PNG")


# --- bias: a planted association and its balanced twin ---------------------------------------------------------
TERMS = {"nurse": ("she", "he"), "dancer": ("she", "he"), "baker": ("she", "he"),
         "pilot": ("he", "she"), "farmer": ("he", "she"), "sailor": ("he", "she")}
FRAMES = ["the {term} said that {group} was late .", "the {term} knew {group} would win .",
          "yesterday the {term} told me {group} was tired .", "the old {term} thought {group} could sing ."]
TEMPLATES = {"attributes": [{"name": "occupation x pronoun", "templates": FRAMES[:3],
                             "pairs": [[term, *groups] for term, groups in TERMS.items()]}]}


def _synthetic_corpus(directory, planted: bool, sentences: int = 6000) -> None:
    """Sentences of the frames above. Planted: the stereotyped pronoun 9 times in 10; balanced: each sentence
    once with either pronoun."""
    rng = random.Random(0)
    lines = []
    for _ in range(sentences // 2):
        term, frame = rng.choice(list(TERMS)), rng.choice(FRAMES)
        stereotyped, other = TERMS[term]
        if planted:
            lines += [frame.format(term=term, group=stereotyped if rng.random() < 0.9 else other) for _ in range(2)]
        else:
            lines += [frame.format(term=term, group=stereotyped), frame.format(term=term, group=other)]
    rng.shuffle(lines)
    directory.mkdir(parents=True)
    for part in range(4):  # four documents: one of them is the validation split
        (directory / f"part{part}.txt").write_text("\n".join(lines[part::4]) + "\n")


@pytest.fixture(scope="module")
def bias_runs(tmp_path_factory, one_torch_thread):
    from gptlab.data import prepare
    from gptlab.train import pretrain

    root = tmp_path_factory.mktemp("bias")
    (root / "templates.json").write_text(json.dumps(TEMPLATES))
    for name, planted in (("planted", True), ("balanced", False)):
        _synthetic_corpus(root / f"{name}-corpus", planted)
        prepare([str(root / f"{name}-corpus")], "bpe:300", root / f"{name}-data")
        cfg = tiny_train_config(root / f"{name}-data", root / name, model=dict(block_size=32, n_layer=2, n_head=4, n_embd=64),
                                max_steps=400, batch_size=16, warmup_steps=10, eval_interval=400, ckpt_interval=400)
        pretrain(cfg, log=lambda _: None)
    return root


def _audit(root, name: str) -> dict:
    result = run_cli("audit", "bias", "--ckpt", str(root / name), "--templates", str(root / "templates.json"),
                     "--out", str(root / f"{name}-audit"))
    assert result.returncode == 0, result.stderr
    assert "| occupation x pronoun | 18 |" in result.stderr  # the table
    return json.loads(result.stdout)["attributes"][0]


def test_bias_audit_finds_the_planted_association(bias_runs):
    planted = _audit(bias_runs, "planted")
    # 9 in 10 sentences carry the stereotyped pronoun: log(0.9 / 0.1) = 2.2 nats is what a perfect fit shows
    assert planted["ci_low"] > 0 and planted["stereotyped_share"] > 0.8
    assert (bias_runs / "planted-audit" / "bias.png").read_bytes().startswith(b"\x89PNG")


def test_bias_audit_ci_includes_zero_on_the_balanced_twin(bias_runs):
    balanced = _audit(bias_runs, "balanced")
    assert balanced["ci_low"] <= 0 <= balanced["ci_high"]


def test_bundled_templates_load_and_bad_ones_are_refused(tmp_path):
    for lang in bias.LANGUAGES:
        spec = bias.load_templates(lang)
        assert all("{term}" in t for a in spec["attributes"] for t in a["templates"])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"attributes": [{"name": "x", "templates": ["no slots"], "pairs": [["a", "b", "c"]]}]}))
    result = run_cli("audit", "bias", "--ckpt", str(tmp_path), "--templates", str(bad))
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "needs templates with {term} and {group}" in result.stderr


def test_memorization_audit_refuses_data_of_another_tokenizer(chat_ckpt, data_dir, tmp_path):
    result = run_cli("audit", "memorization", "--ckpt", str(chat_ckpt), "--data", str(data_dir),
                     "--out", str(tmp_path / "audit"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "was tokenized with another tokenizer" in result.stderr
    assert not (tmp_path / "audit").exists()
