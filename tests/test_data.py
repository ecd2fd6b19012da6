import json

import numpy as np
import pytest
import torch

from gptlab.data import (
    SHAKESPEARE_VAL_PLAYS,
    DataError,
    TokenData,
    clean_play,
    prepare,
    shakespeare_documents,
)


def test_clean_play_strips_markdown():
    md = "# Hamlet\n\n## ACT I\n\n_Enter Ghost_\n\n**HORATIO**  \nStay! speak,  \n__\\[Aside]_  \nO\\--no\n"
    text = clean_play(md)
    assert text == "Hamlet\n\nACT I\n\nEnter Ghost\n\nHORATIO:\nStay! speak,\n[Aside]\nO--no\n"


def test_bundled_corpus_has_38_plays_and_fixed_val_split():
    docs = list(shakespeare_documents())
    assert len(docs) == 38
    assert set(SHAKESPEARE_VAL_PLAYS) <= {d.name for d in docs}
    hamlet = next(d for d in docs if d.name == "hamlet")
    assert "HAMLET:\nTo be, or not to be" in hamlet.text
    assert "**" not in hamlet.text and "_" not in hamlet.text


def test_prepare_custom_corpus(data_dir, corpus_dir):
    meta = json.loads((data_dir / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["vocab_size"] <= 512
    assert meta["train_documents"] > meta["val_documents"] > 0
    data = TokenData(data_dir)
    assert len(data.splits["train"]) == meta["train_tokens"]
    # train + val hold every byte of the input exactly once
    total = sum(len(p.read_bytes()) for p in corpus_dir.iterdir())
    assert meta["train_bytes"] + meta["val_bytes"] == total
    decoded = data.tokenizer.decode(np.asarray(data.splits["val"]).tolist())
    assert decoded.count("<|endoftext|>") == meta["val_documents"]


def test_prepare_is_deterministic(tmp_path, corpus_dir, data_dir):
    prepare([str(corpus_dir)], "bpe:512", tmp_path)
    for name in ("train.bin", "val.bin"):
        assert (tmp_path / name).read_bytes() == (data_dir / name).read_bytes()


def test_batches_are_reproducible_and_shifted(data_dir):
    data = TokenData(data_dir)
    x1, y1 = data.sample_batch("train", 4, 16, torch.Generator().manual_seed(3))
    x2, _ = data.sample_batch("train", 4, 16, torch.Generator().manual_seed(3))
    assert torch.equal(x1, x2) and torch.equal(x1[:, 1:], y1[:, :-1])
    windows = list(data.sequential_batches("val", 8, 16))
    assert sum(x.numel() for x, _ in windows) == (len(data.splits["val"]) - 1) // 16 * 16


def test_bad_inputs_leave_nothing_behind(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    out = tmp_path / "out"
    with pytest.raises(DataError, match="document"):
        prepare([str(empty)], "gpt2", out)
    assert not out.exists() or not any(out.iterdir())
    with pytest.raises(DataError, match="not found"):
        prepare([str(tmp_path / "missing.txt")], "gpt2", out)
