"""Checkpoints: safetensors + JSON that load back exactly and never run code; legacy pickles load safely;
atomic writes (checkpoint.save)."""

from __future__ import annotations

import json
import math
import pickle
import random

import numpy as np
import pytest
import torch
from safetensors import safe_open

from gptlab import checkpoint, cli, distributed, loading
from gptlab.checkpoint import CheckpointError
from gptlab.model import GPT
from tests.conftest import load_gpt, run_cli, tiny_model_config


def _same(a, b) -> bool:
    """Equal values of the same types all the way down (tensors: dtype, shape and every element)."""
    if isinstance(a, torch.Tensor):
        return type(b) is torch.Tensor and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return type(b) is np.ndarray and a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return type(a) is type(b) and a == b


def _training_payload() -> dict:
    """What a training run saves: a tied-weight model, AdamW state after a step (int keys, betas tuple),
    RNG states (Python's tuples, numpy's uint32 array, None for CUDA), a tokenizer, progress."""
    torch.manual_seed(0)
    model = GPT(tiny_model_config())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, 512, (2, 8)), torch.randint(0, 512, (2, 8)))[1].backward()
    optimizer.step()
    random.random(), np.random.random()
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "model_config": model.config.to_dict(),
            "rng": [distributed.rng_state(torch.device("cpu"))], "tokenizer": {"name": "bpe", "vocab": {"a": 0, "<|endoftext|>": 1}, "merges": []},
            "step": 3, "tokens": 96, "elapsed_s": 1.25, "best": math.inf, "worst": -math.inf, "undefined": math.nan,
            "odd keys": {1: "int", (2, 3): "tuple", "__tensor__": "a tag's name as a plain key"},
            "view": torch.arange(6.0)[2:].view(2, 2), "empty": torch.empty(0, 3, dtype=torch.bfloat16)}


def test_save_then_load_gives_the_payload_back_exactly(tmp_path):
    payload = _training_payload()
    checkpoint.save(tmp_path / "run" / checkpoint.CKPT_NAME, payload)
    loaded = checkpoint.load(tmp_path / "run")
    assert _same(payload, loaded)
    assert loaded["model"]["lm_head.weight"] is loaded["model"]["transformer.wte.weight"]  # tied, stored once
    with safe_open(tmp_path / "run" / checkpoint.CKPT_NAME, framework="pt") as handle:  # plain safetensors
        keys = set(handle.keys())
        assert {"model/transformer.wte.weight", "optimizer/state/0/exp_avg", "rng/0/numpy/1"} <= keys
        assert "model/lm_head.weight" not in keys
        assert json.loads(handle.metadata()["gptlab_payload"])["step"] == 3
    assert [p.name for p in (tmp_path / "run").iterdir()] == [checkpoint.CKPT_NAME]  # no temporary left


def test_payload_of_other_types_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(TypeError, match="model/extra: cannot store a set"):
        checkpoint.save(tmp_path / "c.safetensors", {"model": {"extra": {1, 2}}})
    assert list(tmp_path.iterdir()) == []


def test_legacy_pickled_checkpoint_still_loads(tmp_path):
    """A run directory of an earlier gptlab: `ckpt.pt` written by torch.save, numpy RNG state included."""
    payload = _training_payload()
    torch.save({"format": checkpoint.LEGACY_FORMAT, **payload}, tmp_path / checkpoint.LEGACY_CKPT_NAME)
    assert checkpoint.resolve(tmp_path) == tmp_path / checkpoint.LEGACY_CKPT_NAME
    assert _same(payload, checkpoint.load(tmp_path))
    model, _ = load_gpt(tmp_path)
    assert torch.equal(model.transformer.wte.weight, payload["model"]["transformer.wte.weight"])
    checkpoint.save(tmp_path / checkpoint.CKPT_NAME, {**payload, "step": 4})  # a resumed run writes the new format
    assert checkpoint.resolve(tmp_path) == tmp_path / checkpoint.CKPT_NAME and checkpoint.load(tmp_path)["step"] == 4


class _Payload:
    """Unpickling this object calls open(marker, "w"): the file appearing means code from the checkpoint ran."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _crafted_checkpoints(tmp_path) -> list:
    """A crafted checkpoint as torch.save writes it (zip) and as a bare pickle, each with a code payload."""
    marker = tmp_path / "marker"
    evil = {"format": checkpoint.LEGACY_FORMAT, "model": {}, "model_config": _Payload(marker)}
    zipped, bare = tmp_path / "evil.pt", tmp_path / "evil-pickle.pt"
    torch.save(evil, zipped)
    bare.write_bytes(pickle.dumps(evil))
    return [zipped, bare]


def test_a_checkpoint_that_would_run_code_is_refused_and_the_code_never_runs(tmp_path):
    marker = tmp_path / "marker"
    zipped, bare = _crafted_checkpoints(tmp_path)
    with pytest.raises(CheckpointError, match=f"refusing to load {zipped}: loading it would run io.open; a checkpoint"):
        checkpoint.load(zipped)
    with pytest.raises(CheckpointError, match=f"refusing to load {bare}: it is not a plain pickle"):
        checkpoint.load(bare)
    assert not marker.exists()
    torch.load(zipped, weights_only=False)  # what loading used to do: the payloads are real
    assert marker.exists()
    marker.unlink()
    pickle.loads(bare.read_bytes())
    assert marker.exists()


def test_gptlab_generate_refuses_a_crafted_checkpoint(tmp_path):
    crafted = _crafted_checkpoints(tmp_path)[0]
    result = run_cli("generate", "--ckpt", str(crafted), "--prompt", "x")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith(f"gptlab: error: refusing to load {crafted}") and result.stderr.count("\n") == 1
    assert not (tmp_path / "marker").exists()


@pytest.mark.parametrize("damage", ["truncated", "not a checkpoint", "foreign safetensors", "bad header"])
def test_damaged_or_foreign_files_are_clear_errors(tmp_path, damage):
    path = tmp_path / "ckpt.safetensors"
    checkpoint.save(path, _training_payload())
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        match = "cannot read checkpoint"
    elif damage == "not a checkpoint":
        path.write_text("hello")
        match = "cannot read checkpoint"
    elif damage == "foreign safetensors":
        from safetensors.torch import save_file
        save_file({"wte.weight": torch.zeros(2)}, path)
        match = "not a gptlab checkpoint"
    else:  # a header whose payload names a tensor the file does not hold
        from safetensors.torch import save_file
        save_file({"a": torch.zeros(2)}, path, metadata={"gptlab_format": checkpoint.FORMAT,
                                                         "gptlab_payload": '{"model": {"__tensor__": "b"}}'})
        match = "malformed gptlab payload"
    with pytest.raises(CheckpointError, match=match):
        checkpoint.load(path)


def test_a_failed_write_is_an_error_and_keeps_the_previous_checkpoint(data_dir, tmp_path):
    """The write fails half way (the process may write no more bytes to a file): `gptlab train` says so in one
    line, the previous checkpoint stays whole and loadable, and no temporary file is left."""
    run = tmp_path / "run"
    flags = ["--data", str(data_dir), "--out", str(run), "--block-size", "32", "--n-layer", "2", "--n-head", "2",
             "--n-embd", "32", "--batch-size", "2", "--eval-batches", "1", "--precision", "fp32",
             "--warmup-steps", "1", "--lr", "1e-3", "--min-lr", "1e-4"]
    first = run_cli("train", *flags, "--max-steps", "2")
    assert first.returncode == 0, first.stderr[-2000:]
    path = run / checkpoint.CKPT_NAME
    before = path.read_bytes()
    resumed = run_cli("train", *flags, "--max-steps", "4", "--resume", max_file_bytes=len(before) // 2)
    assert resumed.returncode == 2
    assert resumed.stderr.splitlines()[-1] == f"gptlab: error: cannot write checkpoint {path}: File too large"
    assert "Traceback" not in resumed.stderr
    assert path.read_bytes() == before and checkpoint.load(run)["step"] == 2
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == []


@pytest.mark.parametrize("forgery", ["no model_config", "model_config not a mapping"])
def test_a_forged_checkpoint_without_its_config_is_one_clear_error(tmp_path, capsys, forgery):
    """A well-formed gptlab file whose payload lacks (or garbles) model_config: one line, exit 2, no KeyError."""
    payload = {k: v for k, v in _training_payload().items() if k != "model_config"}
    if forgery == "model_config not a mapping":
        payload["model_config"] = ["n_layer", 2]
    path = tmp_path / "forged" / checkpoint.CKPT_NAME
    checkpoint.save(path, payload)
    with pytest.raises(CheckpointError, match="model_config"):
        loading.load(path)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["generate", "--ckpt", str(path), "--prompt", "x"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("gptlab: error:") and err.count("\n") == 1, err
