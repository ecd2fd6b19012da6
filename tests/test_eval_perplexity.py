"""`gptlab eval perplexity` against transformers' sliding-window perplexity and against `gptlab train`'s bpb."""

import json
import math

import numpy as np
import pytest
import torch

from gptlab.eval import perplexity
from gptlab.eval.perplexity import windows
from tests.conftest import run_cli, tiny_train_config

TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
        "want of a wife. However little known the feelings or views of such a man may be on his first entering "
        "a neighbourhood, this truth is so well fixed in the minds of the surrounding families.\n") * 4


def transformers_sliding_nll(model, ids: list[int], context: int, stride: int) -> float:
    """The Hugging Face perplexity guide's loop: windows of `context` tokens every `stride`, the tokens an
    earlier window scored masked with -100, summed negative log-likelihood (nats) of the rest."""
    nll, scored, begin = 0.0, 0, 0
    while scored < len(ids) - 1:
        end = min(begin + context, len(ids) - 1)
        window = torch.tensor([ids[begin: end + 1]])
        labels = window.clone()
        labels[:, : scored + 1 - begin] = -100
        with torch.no_grad():
            logits = model(window[:, :-1]).logits
        nll += torch.nn.functional.cross_entropy(logits[0], labels[0, 1:], ignore_index=-100, reduction="sum").item()
        scored, begin = end, begin + stride
    return nll


def test_windows_score_every_token_once_with_context():
    for n, context, stride in [(100, 16, 16), (100, 16, 5), (17, 16, 16), (2, 16, 1), (50, 8, 1)]:
        scored = []
        for begin, end, first in windows(n, context, stride):
            assert 0 < end - begin <= context and first >= 1
            positions = list(range(begin + first, end + 1))
            scored += positions
            if begin > 0:  # past the first window, every token sees at least context - stride tokens
                assert min(positions) - begin >= context - stride
        assert scored == list(range(1, n)), (n, context, stride)


@pytest.mark.parametrize("stride", [64, 24])
def test_perplexity_equals_transformers_sliding_window(hf_gpt2, stride):
    model, root = hf_gpt2
    from gptlab import tokenizer as tok

    (root / "text.txt").write_text(TEXT)
    gpt2 = tok.load("gpt2")
    ids = [gpt2.eot_id, *gpt2.encode(TEXT)]
    assert len(ids) > 3 * 64 + 1  # several windows
    expected = transformers_sliding_nll(model, ids, 64, stride) / (len(ids) - 1)
    # the converted checkpoint on the command line; the HF directory itself through the Python API
    done = run_cli("eval", "perplexity", "--ckpt", str(root / "converted.pt"), "--input", str(root / "text.txt"),
                   "--stride", str(stride), "--batch-size", "3")
    assert done.returncode == 0, done.stderr
    assert "text.txt" in done.stdout  # the per-input table
    lines = []
    from_hf_dir = perplexity.run(str(root / "hf"), [str(root / "text.txt")], stride, batch_size=2, log=lines.append)
    for result in (json.loads(done.stdout.strip().splitlines()[-1]), from_hf_dir):
        assert result["tokens"] == len(ids) - 1 and result["bytes"] == len(TEXT.encode())
        assert result["nll"] == pytest.approx(expected, rel=1e-4)
        assert result["perplexity"] == pytest.approx(math.exp(expected), rel=1e-4)
        assert result["bits_per_byte"] == pytest.approx(expected * (len(ids) - 1) / math.log(2) / len(TEXT.encode()),
                                                        rel=1e-4)


def test_bits_per_byte_equals_what_train_reports(data_dir, tmp_path):
    """The val split of a prepared corpus at stride = context: the windows `gptlab train` evaluates. Train leaves
    out the last partial window; on a copy of the split cut to whole windows both figures must be equal."""
    from gptlab.data import TokenData
    from gptlab.train import pretrain

    result = pretrain(tiny_train_config(data_dir, tmp_path / "run", max_steps=10, eval_batches=None), log=lambda _: None)
    block = 32
    cut = tmp_path / "cut"
    cut.mkdir()
    meta = json.loads((data_dir / "meta.json").read_text())
    for name in ("tokenizer",):
        import shutil
        shutil.copytree(data_dir / name, cut / name)
    val = np.concatenate([np.asarray(s) for s in TokenData(data_dir).shards["val"]])
    whole = (len(val) - 1) // block * block + 1
    val[:whole].tofile(cut / "val_000.bin")
    np.asarray(TokenData(data_dir).shards["train"][0][:100]).tofile(cut / "train_000.bin")
    (cut / "meta.json").write_text(json.dumps({**meta, "shards": {"train": ["train_000.bin"], "val": ["val_000.bin"]}}))
    done = run_cli("eval", "perplexity", "--ckpt", str(tmp_path / "run"), "--input", str(cut), "--split", "val")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])["bits_per_byte"] == pytest.approx(result["val_bpb"], rel=1e-5)
    # the whole split adds the last partial window (fewer than 32 of its tokens): close, not equal
    whole_split = perplexity.run(str(tmp_path / "run"), [str(data_dir)], log=lambda _: None)
    assert whole_split["bits_per_byte"] == pytest.approx(result["val_bpb"], rel=5e-3)


@pytest.mark.parametrize("content, message", [(b"", "is empty"), (b"caf\xe9 au lait\n", "is not UTF-8")])
def test_bad_input_is_one_line_exit_2(hf_gpt2, tmp_path, capsys, content, message):
    """The command's own error path, in process (the subprocess round trip is covered above)."""
    from gptlab.cli import main

    _, root = hf_gpt2
    bad = tmp_path / "bad.txt"
    bad.write_bytes(content)
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "perplexity", "--ckpt", str(root / "converted.pt"), "--input", str(bad)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.startswith("gptlab: error:") and message in err and "bad.txt" in err
    assert len(err.strip().splitlines()) == 1
