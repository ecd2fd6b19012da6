"""The command line as a user drives it: real processes, real files, exit codes and messages."""

import argparse
import inspect
import json
import subprocess
import sys

import pytest

from gptlab import cli, metrics
from gptlab.cli.common import default_text, has_default
from gptlab.errors import GptlabError
from tests.conftest import run_cli, run_clis


def _assert_user_error(result, needle):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("gptlab: error:") and needle in lines[0], lines[0]


TINY_FLAGS = ["--block-size", "32", "--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--batch-size", "4",
              "--eval-batches", "2", "--precision", "fp32", "--warmup-steps", "2"]


def test_train_generate_convert_end_to_end(data_dir, tmp_path):
    run = tmp_path / "run"
    result = run_cli("train", "--data", str(data_dir), "--out", str(run), "--max-steps", "6", *TINY_FLAGS)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(summary) == {"step", "val_loss", "val_bpb", "tokens_per_s", "checkpoint"} and summary["step"] == 6
    assert (run / "metrics.csv").is_file()

    # independent processes run two at a time (each spends seconds importing torch): those that only read the run
    # first, then those that need the export or write the run
    gen = ["generate", "--ckpt", str(run), "--prompt", "KING:", "--max-new-tokens", "10", "--seed", "1"]
    first, second, to_hf, refused = run_clis(gen, gen, ["convert", "--to-hf", str(run), "--out", str(tmp_path / "hf")],
                                             ["train", "--data", str(data_dir), "--out", str(run), *TINY_FLAGS])
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout and first.stdout.startswith("KING:")

    assert to_hf.returncode == 0
    back = run_cli("convert", "--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back.pt"))
    assert back.returncode == 0, back.stderr
    again, resumed = run_clis(["generate", "--ckpt", str(tmp_path / "back.pt"), "--prompt", "KING:",
                               "--max-new-tokens", "10", "--seed", "1"],
                              ["train", "--data", str(data_dir), "--out", str(run), "--max-steps", "8", "--resume",
                               *TINY_FLAGS])
    assert again.stdout == first.stdout

    # an existing run is never overwritten without --resume
    _assert_user_error(refused, "--resume")
    assert resumed.returncode == 0 and json.loads(resumed.stdout.strip().splitlines()[-1])["step"] == 8


@pytest.mark.parametrize("args,needle", [
    (["train", "--preset", "gpt5"], "unknown preset"),
    (["train", "--lr", "-1"], "lr must be"),
    (["train", "--max-steps", "0"], "max_steps"),
    (["train", "--config", "/no/such.yaml"], "config file not found"),
    (["train", "--data", "/no/such/data"], "no prepared dataset"),
    (["prepare", "--input", "/no/such/file.txt", "--out", "OUT"], "input not found"),
    (["generate", "--ckpt", "/no/ckpt", "--prompt", "hi"], "checkpoint not found"),
    (["convert", "--from-hf", "/no/hf", "--out", "x.pt"], "config.json"),
    (["tokenizer", "train", "--input", "/nope", "--vocab-size", "300", "--out", "t"], "input not found"),
    (["train", "--max-steps", "abc"], "invalid int value"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, args, needle):
    args = [str(tmp_path / "OUT") if a == "OUT" else a for a in args]
    _assert_user_error(run_cli(*args, cwd=tmp_path), needle)


def test_empty_corpus_and_long_prompt(tmp_path, data_dir):
    (tmp_path / "empty.txt").write_text("")
    run = tmp_path / "run"
    empty, trained = run_clis(["prepare", "--input", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "d"),
                               "--tokenizer", "gpt2"],
                              ["train", "--data", str(data_dir), "--out", str(run), "--max-steps", "1", *TINY_FLAGS])
    _assert_user_error(empty, "document")
    assert trained.returncode == 0
    _assert_user_error(run_cli("generate", "--ckpt", str(run), "--prompt", "word " * 200), "context")


def test_checkpoint_from_another_config_is_rejected(tmp_path, data_dir):
    run = tmp_path / "run"
    assert run_cli("train", "--data", str(data_dir), "--out", str(run), "--max-steps", "1", *TINY_FLAGS).returncode == 0
    flags = [f if f != "32" else "48" for f in TINY_FLAGS]
    _assert_user_error(run_cli("train", "--data", str(data_dir), "--out", str(run), "--resume", "--max-steps", "2",
                               *flags), "does not fit")


def test_tokenizer_train_cli(tmp_path, corpus_dir):
    result = run_cli("tokenizer", "train", "--input", str(corpus_dir), "--vocab-size", "400", "--out",
                     str(tmp_path / "tok"))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1])["vocab_size"] == 400
    assert (tmp_path / "tok" / "merges.txt").is_file()


@pytest.mark.parametrize("error,one_line", [(GptlabError("bad input"), True), (ValueError("a bug"), False),
                                            (KeyError("a bug"), False)])
def test_only_gptlab_errors_are_one_line_a_bug_keeps_its_traceback(monkeypatch, capsys, error, one_line):
    def plot(_):
        raise error

    monkeypatch.setattr(metrics, "plot", plot)  # `gptlab plot` imports it when it runs
    if one_line:
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["plot", "RUN"])
        assert exit_info.value.code == 2 and capsys.readouterr().err == "gptlab: error: bad input\n"
    else:
        with pytest.raises(type(error), match="a bug"):  # propagates: Python prints its traceback
            cli.main(["plot", "RUN"])


def _commands(parser, path=()):
    """Every (sub-)command's parser with its words: gptlab, gptlab train, ..., gptlab eval perplexity."""
    yield list(path), parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, (*path, name))


HELP_OF_EVERY_COMMAND = f"""
import argparse, contextlib, io, sys
from gptlab import cli
{inspect.getsource(_commands)}
words = [w for w, _ in _commands(cli.build_parser())]
for command in words:
    out = io.StringIO()
    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(out):
        cli.main([*command, "--help"])
    assert out.getvalue().startswith("usage: gptlab"), command
print(len(words), "torch" in sys.modules)
"""


def test_help_imports_no_torch():
    """`gptlab --help` and every sub-command's --help print without importing torch (it took seconds)."""
    result = subprocess.run([sys.executable, "-c", HELP_OF_EVERY_COMMAND], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    count, torch_loaded = result.stdout.split()
    assert int(count) > 20 and torch_loaded == "False"


def test_every_flag_with_a_default_shows_it_in_help():
    """One help format everywhere: each option with a default (not None, off or empty) shows it in --help;
    finetune's help has no pretraining-only flag or default."""
    for words, parser in _commands(cli.build_parser()):
        text = " ".join(parser.format_help().split())
        for action in parser._actions:
            if action.option_strings and has_default(action.default):
                assert default_text(action.default).replace("%%", "%") in text, (words, action.option_strings)
    finetune = " ".join(dict((" ".join(w), p) for w, p in _commands(cli.build_parser()))["finetune"].format_help().split())
    assert "--preset" not in finetune and "shakespeare" not in finetune and "--data DATA required" in finetune
