import json
import shutil

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
from tests.conftest import run_cli


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
    assert data.num_tokens("train") == meta["train_tokens"]
    # train + val hold every byte of the input exactly once
    total = sum(len(p.read_bytes()) for p in corpus_dir.iterdir())
    assert meta["train_bytes"] + meta["val_bytes"] == total
    decoded = data.tokenizer.decode(np.concatenate(data.shards["val"]).tolist())
    assert decoded.count("<|endoftext|>") == meta["val_documents"]


def test_prepare_is_deterministic(tmp_path, corpus_dir, data_dir):
    prepare([str(corpus_dir)], "bpe:512", tmp_path)
    for name in ("train_000.bin", "val_000.bin"):
        assert (tmp_path / name).read_bytes() == (data_dir / name).read_bytes()


def test_batches_are_reproducible_and_shifted(data_dir):
    data = TokenData(data_dir)
    x1, y1 = data.sample_batch("train", 4, 16, torch.Generator().manual_seed(3))
    x2, _ = data.sample_batch("train", 4, 16, torch.Generator().manual_seed(3))
    assert torch.equal(x1, x2) and torch.equal(x1[:, 1:], y1[:, :-1])
    windows = list(data.sequential_batches("val", 8, 16))
    assert sum(x.numel() for x, _ in windows) == (data.num_tokens("val") - 1) // 16 * 16


def test_bad_inputs_leave_nothing_behind(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    out = tmp_path / "out"
    with pytest.raises(DataError, match="document"):
        prepare([str(empty)], "gpt2", out)
    assert not out.exists() or not any(out.iterdir())
    with pytest.raises(DataError, match="not found"):
        prepare([str(tmp_path / "missing.txt")], "gpt2", out)


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory, corpus_dir):
    """The test corpus in shards of ~5k tokens, encoded by 2 spawned worker processes."""
    out = tmp_path_factory.mktemp("sharded")
    prepare([str(corpus_dir)], "bpe:512", out, shard_tokens=5_000, workers=2)
    return out


def test_sharded_prepare_in_worker_processes(sharded_dir, data_dir, corpus_dir, tmp_path):
    """Shards written by worker processes hold exactly the tokens of the single-shard, in-process run."""
    meta = json.loads((sharded_dir / "meta.json").read_text())
    single, sharded = TokenData(data_dir), TokenData(sharded_dir)
    assert len(meta["shards"]["train"]) > 3 and meta["shards"]["train"][1] == "train_001.bin"
    for split in ("train", "val"):
        assert np.array_equal(np.concatenate(sharded.shards[split]), np.concatenate(single.shards[split]))
    sizes = [len(s) for s in sharded.shards["train"]]  # every shard but the last reaches the size
    assert all(size >= 5_000 for size in sizes[:-1]) and sum(sizes) == meta["train_tokens"]
    # preparing again with fewer shards leaves no stale shard behind
    shutil.copytree(sharded_dir, tmp_path / "again")
    prepare([str(corpus_dir)], "bpe:512", tmp_path / "again", shard_tokens=10**9, workers=1)
    assert sorted(p.name for p in (tmp_path / "again").glob("*.bin")) == ["train_000.bin", "val_000.bin"]


def test_sampling_spans_all_shards_without_crossing_them(sharded_dir):
    data = TokenData(sharded_dir)
    shards = [np.asarray(s) for s in data.shards["train"]]
    x, y = data.sample_batch("train", 256, 16, torch.Generator().manual_seed(0))
    assert torch.equal(x[:, 1:], y[:, :-1])
    hits = set()
    for row, target in zip(x.numpy(), y.numpy(), strict=True):
        window = np.append(row, target[-1])
        found = [i for i, s in enumerate(shards)
                 if any(np.array_equal(s[j: j + 17], window) for j in np.flatnonzero(s[: len(s) - 16] == row[0]))]
        assert found, "a window is not a contiguous slice of one shard"
        hits.update(found)
    assert hits == set(range(len(shards)))


def test_datasets_prepared_before_sharding_still_load(tmp_path, data_dir):
    """Old layout: one train.bin / val.bin and no shard list in meta.json."""
    meta = json.loads((data_dir / "meta.json").read_text())
    del meta["shards"]
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    (tmp_path / "train.bin").write_bytes((data_dir / "train_000.bin").read_bytes())
    (tmp_path / "val.bin").write_bytes((data_dir / "val_000.bin").read_bytes())
    (tmp_path / "tokenizer").symlink_to(data_dir / "tokenizer")
    old, new = TokenData(tmp_path), TokenData(data_dir)
    generator = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    assert torch.equal(old.sample_batch("train", 4, 16, generator())[0], new.sample_batch("train", 4, 16, generator())[0])


def test_prepare_refuses_a_binary_file(tmp_path, corpus_dir):
    """A NUL byte: an image or archive given as input is refused by name, not trained on."""
    picture = tmp_path / "photo.png"
    picture.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 4)
    out = tmp_path / "out"
    with pytest.raises(DataError, match=f"{picture} is not a text file"):
        prepare([str(corpus_dir), str(picture)], "bpe:512", out)
    assert not out.exists()
    result = run_cli("prepare", "--input", str(corpus_dir), str(picture), "--out", str(out))
    assert result.returncode == 2 and result.stderr == (
        f"gptlab: error: {picture} is not a text file (it holds NUL bytes): leave it out of the input\n")
    assert not out.exists()


def test_prepare_reports_or_refuses_bytes_that_are_not_utf8(tmp_path, corpus_dir, capsys):
    """Latin-1 text: each byte that is not UTF-8 becomes U+FFFD and is counted per file; --strict-utf8 refuses."""
    inputs = tmp_path / "inputs"
    shutil.copytree(corpus_dir, inputs)
    latin = inputs / "latin1.txt"
    latin.write_bytes("Café, naïve façade.\n".encode("latin-1") * 10)  # é, ï, ç: 3 bytes a line
    with pytest.raises(DataError, match=f"{latin}: 30 byte\\(s\\) are not valid UTF-8 \\(--strict-utf8\\)"):
        prepare([str(inputs)], "bpe:512", tmp_path / "strict", strict_utf8=True)
    assert not (tmp_path / "strict").exists()
    capsys.readouterr()
    prepare([str(inputs)], "bpe:512", tmp_path / "out")
    assert capsys.readouterr().err.splitlines()[0] == (
        f"gptlab: warning: {latin}: 30 byte(s) are not valid UTF-8, replaced by U+FFFD "
        "(--strict-utf8 refuses such files)")
    data = TokenData(tmp_path / "out")
    text = data.tokenizer.decode(np.concatenate(data.shards["train"] + data.shards["val"]).tolist())
    assert "Caf\ufffd, na\ufffdve fa\ufffdade." in text
    utf8 = inputs / "latin1.txt"
    utf8.write_text("Café, naïve façade, “quoted” \ufffd.\n")  # valid UTF-8, even its own U+FFFD: no warning
    capsys.readouterr()
    prepare([str(inputs)], "bpe:512", tmp_path / "clean")
    assert "warning" not in capsys.readouterr().err
