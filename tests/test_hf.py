"""Parity with Hugging Face GPT-2 on a randomly initialised transformers model (no download)."""

import json
import os

import pytest
import torch

from gptlab import checkpoint, hf
from gptlab import tokenizer as tok
from gptlab.outputs import OutputExistsError
from tests.conftest import load_gpt


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    import shutil

    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=50257, n_positions=64, n_embd=64, n_layer=3, n_head=4)
    model = GPT2LMHeadModel(config).eval()
    out = tmp_path_factory.mktemp("hf")
    model.save_pretrained(out)
    shutil.copy(tok.gpt2_files_dir() / "encoder.json", out / "vocab.json")
    shutil.copy(tok.gpt2_files_dir() / "vocab.bpe", out / "merges.txt")
    return out


def _hf_logits(directory, tokens):
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(directory).eval()
    with torch.no_grad():
        return model(tokens).logits


def test_from_hf_matches_transformers_logits(hf_dir):
    model, tokenizer = hf.load_hf(hf_dir)
    assert tokenizer.vocab_size == 50257
    tokens = torch.randint(0, 50257, (4, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model.eval()(tokens)[0]
    assert (ours - _hf_logits(hf_dir, tokens)).abs().max().item() <= 1e-4


def test_round_trip_through_gptlab_checkpoint_and_back(hf_dir, tmp_path):
    model, tokenizer = hf.load_hf(hf_dir)
    ckpt = tmp_path / "model.pt"
    checkpoint.save(ckpt, {"model": model.state_dict(), "model_config": model.config.to_dict(),
                           "tokenizer": tokenizer.to_dict(), "step": 0})
    reloaded, reloaded_tok = load_gpt(ckpt)
    hf.save_hf(reloaded, reloaded_tok, tmp_path / "export")
    tokens = torch.randint(0, 50257, (2, 48), generator=torch.Generator().manual_seed(2))
    exported = _hf_logits(tmp_path / "export", tokens)
    with torch.no_grad():
        ours = reloaded.eval()(tokens)[0]
    assert (ours - exported).abs().max().item() <= 1e-4
    assert (exported - _hf_logits(hf_dir, tokens)).abs().max().item() <= 1e-4


def test_export_of_a_gptlab_trained_model_loads_in_transformers(data_dir, tmp_path):
    from transformers import GPT2TokenizerFast

    from gptlab.train import pretrain
    from tests.conftest import tiny_train_config

    pretrain(tiny_train_config(data_dir, tmp_path / "run", max_steps=3), log=lambda _: None)
    model, tokenizer = load_gpt(tmp_path / "run")
    hf.save_hf(model, tokenizer, tmp_path / "export")
    tokens = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = model.eval()(tokens)[0]
    assert (ours - _hf_logits(tmp_path / "export", tokens)).abs().max().item() <= 1e-4
    hf_tok = GPT2TokenizerFast.from_pretrained(str(tmp_path / "export"))
    text = "HAMLET:\nTo be, or not to be"
    assert hf_tok(text)["input_ids"] == tokenizer.encode(text)
    assert json.loads((tmp_path / "export" / "config.json").read_text())["n_layer"] == 2


def test_export_refuses_to_overwrite(hf_dir, tmp_path):
    model, tokenizer = hf.load_hf(hf_dir)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="not empty"):
        hf.save_hf(model, tokenizer, tmp_path / "taken")
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"


def _damaged_copy(hf_dir, tmp_path, damage: str):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(hf_dir, broken)
    if damage == "config lacks n_positions":
        config = json.loads((broken / "config.json").read_text())
        del config["n_positions"]
        (broken / "config.json").write_text(json.dumps(config))
        return broken, f"{broken / 'config.json'}: n_positions is missing; a GPT-2 config needs a positive integer"
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # an interrupted download
    return broken, f"cannot read {weights}: "


@pytest.mark.parametrize("damage", ["config lacks n_positions", "truncated model.safetensors"])
def test_a_damaged_hf_directory_is_one_clear_error(hf_dir, tmp_path, damage):
    from tests.conftest import run_cli

    broken, message = _damaged_copy(hf_dir, tmp_path, damage)
    with pytest.raises(checkpoint.CheckpointError) as info:
        hf.load_hf(broken)
    assert str(info.value).startswith(message)
    for command in (["convert", "--from-hf", str(broken), "--out", str(tmp_path / "out.safetensors")],
                    ["generate", "--ckpt", str(broken), "--prompt", "x"]):
        result = run_cli(*command)
        assert result.returncode == 2 and result.stderr.startswith(f"gptlab: error: {message}"), result.stderr
        assert result.stderr.count("\n") == 1
    assert not (tmp_path / "out.safetensors").exists()


def test_config_values_are_checked(hf_dir):
    config = json.loads((hf_dir / "config.json").read_text())
    with pytest.raises(checkpoint.CheckpointError, match=r"x/config.json: n_layer is '3'; a GPT-2 config needs"):
        hf.config_from_hf({**config, "n_layer": "3"}, "x/config.json")
    with pytest.raises(checkpoint.CheckpointError, match="config.json is not a JSON object"):
        hf.config_from_hf([config])


def test_export_to_a_full_disk_is_one_error_and_leaves_nothing(hf_dir, tmp_path):
    from tests.conftest import run_cli

    model, tokenizer = hf.load_hf(hf_dir)
    checkpoint.save(tmp_path / "model.safetensors", {"model": model.state_dict(), "model_config": model.config.to_dict(),
                                                     "tokenizer": tokenizer.to_dict(), "step": 0})
    out = tmp_path / "export"
    result = run_cli("convert", "--to-hf", str(tmp_path / "model.safetensors"), "--out", str(out),
                     max_file_bytes=(tmp_path / "model.safetensors").stat().st_size // 2)
    assert result.returncode == 2
    assert result.stderr == f"gptlab: error: cannot write {out / 'model.safetensors'}: File too large\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_convert_to_hf_writes_files_with_the_users_umask(hf_dir, tmp_path):
    """The export is readable like any file the user writes: umask 022 gives a 0755 directory and 0644 files
    (not mkdtemp's 0700 and the 0600 of safetensors' temporary file); umask 027 gives 0750 / 0640."""
    import subprocess
    import sys

    model, tokenizer = hf.load_hf(hf_dir)
    checkpoint.save(tmp_path / "model.safetensors", {"model": model.state_dict(), "model_config": model.config.to_dict(),
                                                     "tokenizer": tokenizer.to_dict(), "step": 0})
    for umask, dir_mode, file_mode in ((0o022, 0o755, 0o644), (0o027, 0o750, 0o640)):
        out = tmp_path / f"export-{umask:o}"
        result = subprocess.run([sys.executable, "-m", "gptlab", "convert", "--to-hf", str(tmp_path / "model.safetensors"),
                                 "--out", str(out)], capture_output=True, text=True, timeout=300,
                                preexec_fn=lambda umask=umask: os.umask(umask))
        assert result.returncode == 0, result.stderr
        assert out.stat().st_mode & 0o777 == dir_mode
        files = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
        assert "model.safetensors" in files and set(files.values()) == {file_mode}, files


def test_convert_to_hf_refuses_a_model_past_gpt2_naming_what_differs(hf_dir, tmp_path):
    """The faster-learning switches leave GPT-2's architecture: one clear line, exit 2, nothing written."""
    from gptlab.config import GPTConfig
    from gptlab.model import GPT
    from tests.conftest import run_cli

    _, tokenizer = hf.load_hf(hf_dir)
    config = GPTConfig(vocab_size=50257, block_size=64, n_layer=1, n_head=4, n_embd=64, pos_encoding="rotary",
                       activation="relu2")
    model = GPT(config)
    checkpoint.save(tmp_path / "model.safetensors", {"model": model.state_dict(), "model_config": config.to_dict(),
                                                     "tokenizer": tokenizer.to_dict(), "step": 0})
    result = run_cli("convert", "--to-hf", str(tmp_path / "model.safetensors"), "--out", str(tmp_path / "export"))
    assert result.returncode == 2
    assert result.stderr == ("gptlab: error: only GPT-2's architecture exports to HF GPT-2; this model has "
                             "pos_encoding=rotary, activation=relu2\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
