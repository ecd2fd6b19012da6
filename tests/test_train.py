import csv
import math

import pytest
import torch

from gptlab import checkpoint
from gptlab.config import ConfigError
from gptlab.data import TokenData
from gptlab.train import lr_at, pretrain
from tests.conftest import tiny_train_config


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and a shared, loaded CPU makes every extra OpenMP
    thread wait for a time slice at each operation (seconds per step instead of milliseconds)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _losses(run_dir) -> list[float]:
    with open(run_dir / "metrics.csv") as handle:
        return [float(row["train_loss"]) for row in csv.DictReader(handle)]


def test_schedule_warms_up_then_decays(tmp_path):
    cfg = tiny_train_config(tmp_path, tmp_path, max_steps=100, warmup_steps=10, lr=1e-3, min_lr=1e-4)
    assert lr_at(0, cfg) == pytest.approx(1e-4)
    assert lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(55, cfg) == pytest.approx(5.5e-4)
    assert lr_at(100, cfg) == pytest.approx(1e-4)
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(10, 100))


def test_training_learns_and_writes_metrics_and_checkpoint(data_dir, tmp_path):
    result = pretrain(tiny_train_config(data_dir, tmp_path / "run", max_steps=30), log=lambda _: None)
    losses = _losses(tmp_path / "run")
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < losses[0] - 0.5
    assert result["val_bpb"] > 0 and math.isfinite(result["val_loss"])
    assert result["val_bpb"] == pytest.approx(result["val_loss"] / math.log(2) / _bytes_per_token(data_dir),
                                              rel=0.25)
    payload = checkpoint.load(tmp_path / "run")
    assert payload["step"] == 30 and "optimizer" in payload and "tokenizer" in payload


def _bytes_per_token(data_dir) -> float:
    import json
    meta = json.loads((data_dir / "meta.json").read_text())
    return meta["val_bytes"] / meta["val_tokens"]


def test_interrupt_then_resume_reproduces_losses_exactly(data_dir, tmp_path, monkeypatch):
    """20 steps straight == 10 steps, Ctrl-C, --resume, 10 more (dropout on, so RNG state matters too)."""
    settings = dict(max_steps=20, ckpt_interval=10, model={"block_size": 32, "n_layer": 2, "n_head": 2,
                                                           "n_embd": 32, "dropout": 0.1})
    pretrain(tiny_train_config(data_dir, tmp_path / "straight", **settings), log=lambda _: None)

    real_sample = TokenData.sample_batch
    calls = []

    def interrupted_after_ten_steps(self, *args, **kwargs):
        calls.append(1)
        if len(calls) > 10:
            raise KeyboardInterrupt
        return real_sample(self, *args, **kwargs)

    monkeypatch.setattr(TokenData, "sample_batch", interrupted_after_ten_steps)
    with pytest.raises(KeyboardInterrupt):
        pretrain(tiny_train_config(data_dir, tmp_path / "split", **settings), log=lambda _: None)
    assert checkpoint.load(tmp_path / "split")["step"] == 10
    monkeypatch.setattr(TokenData, "sample_batch", real_sample)
    pretrain(tiny_train_config(data_dir, tmp_path / "split", **settings, resume=True), log=lambda _: None)
    assert _losses(tmp_path / "split") == _losses(tmp_path / "straight")


def test_resume_without_checkpoint_is_an_error(data_dir, tmp_path):
    with pytest.raises(ConfigError, match="no checkpoint"):
        pretrain(tiny_train_config(data_dir, tmp_path / "none", resume=True), log=lambda _: None)


def test_init_from_checkpoint_keeps_weights(data_dir, tmp_path):
    pretrain(tiny_train_config(data_dir, tmp_path / "a", max_steps=5), log=lambda _: None)
    first = checkpoint.load(tmp_path / "a")["model"]
    pretrain(tiny_train_config(data_dir, tmp_path / "b", max_steps=1, lr=1e-9, min_lr=0.0, warmup_steps=0,
                               init=str(tmp_path / "a")), log=lambda _: None)
    second = checkpoint.load(tmp_path / "b")["model"]
    assert torch.allclose(first["transformer.h.0.mlp.c_fc.weight"], second["transformer.h.0.mlp.c_fc.weight"],
                          atol=1e-6)
