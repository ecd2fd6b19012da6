"""Shared fixtures: a small prepared corpus and tiny model settings, so tests stay fast on 2 CPU cores."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import settings

from gptlab.config import GPTConfig, TrainConfig
from gptlab.cpu import kernels
from gptlab.data import prepare, shakespeare_documents
from tests.helpers import ServerProcess

# Hypothesis profiles, chosen by HYPOTHESIS_PROFILE: `make test` runs "quick"; "thorough" runs thousands of
# cases (docs/SERVING.md records a run). Property tests that pin their own max_examples keep it in both.
settings.register_profile("quick", max_examples=300)
settings.register_profile("thorough", max_examples=5000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "quick"))


@pytest.fixture(scope="session", autouse=True)
def cpu_kernels_built() -> None:
    """Build (or load) this CPU's decoding kernels once up front, so no test or server it starts
    spends its time budget compiling."""
    kernels.active_variant()


# pytest params of every kernel variant; those this CPU cannot run skip, naming the features it lacks
KERNEL_VARIANTS = [pytest.param(variant, id=variant, marks=pytest.mark.skipif(
    bool(kernels.missing_features(variant)),
    reason=f"this CPU lacks {', '.join(kernels.missing_features(variant))} for the {variant} kernels"))
    for variant in kernels.VARIANTS]

TINY_MODEL = dict(vocab_size=512, block_size=32, n_layer=2, n_head=2, n_embd=32)


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    """A few Shakespeare plays as text files (a real corpus, small enough to tokenize in a second)."""
    root = tmp_path_factory.mktemp("corpus")
    for doc in list(shakespeare_documents())[:6]:
        (root / f"{doc.name}.txt").write_text(doc.text[:40_000])
    return root


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory, corpus_dir) -> Path:
    out = tmp_path_factory.mktemp("data")
    prepare([str(corpus_dir)], "bpe:512", out)
    return out


def tiny_train_config(data_dir: Path, out: Path, **overrides) -> TrainConfig:
    settings = dict(preset="tiny", model={k: v for k, v in TINY_MODEL.items() if k != "vocab_size"}, data=str(data_dir),
                    out=str(out), max_steps=20, batch_size=4, warmup_steps=5, eval_interval=10,
                    ckpt_interval=10, eval_batches=4, precision="fp32", lr=3e-3, min_lr=3e-4)
    return TrainConfig(**{**settings, **overrides})


def tiny_model_config(**overrides) -> GPTConfig:
    return GPTConfig(**{**TINY_MODEL, **overrides})


def load_gpt(path: Path):
    """(model, tokenizer) of any path `gptlab.loading` reads, as `gptlab generate` gets them."""
    from gptlab import loading

    loaded = loading.load(path)
    return loaded.gpt(), loaded.tokenizer


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 300, max_file_bytes: int | None = None,
            ) -> subprocess.CompletedProcess:
    """Run `gptlab` as a user would, in a fresh process; `max_file_bytes` makes every write past that size
    of a file fail (EFBIG), as on a full disk (ENOSPC)."""
    return subprocess.run([sys.executable, "-m", "gptlab", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout, preexec_fn=None if max_file_bytes is None else _limit_file_size(max_file_bytes))


def run_clis(*commands: tuple[str, ...] | list[str], timeout: int = 300) -> list[subprocess.CompletedProcess]:
    """`run_cli` of independent commands at once, in that order: each fresh process spends seconds importing
    torch on one core, so two of them use a 2-core machine's second core."""
    procs = [subprocess.Popen([sys.executable, "-m", "gptlab", *args], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for args in commands]
    results = []
    try:
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=timeout)
            results.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


def _limit_file_size(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the signal would kill the process instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


# --- serving: a tiny GPT-2-tokenizer checkpoint and a real `gptlab serve` process ---------------------------
API_KEY = "test-key"


@pytest.fixture(scope="session")
def chat_ckpt(tmp_path_factory) -> Path:
    """A random-init model with GPT-2's tokenizer (so text is real) and a 1024-token context. Its embedding is
    scaled up so logits are far apart: greedy output then cannot flip on float-rounding differences between
    batched and unbatched decoding."""
    import torch

    from gptlab import checkpoint
    from gptlab.model import GPT
    from gptlab.tokenizer import load

    torch.manual_seed(0)
    model = GPT(tiny_model_config(vocab_size=50257, block_size=1024))
    with torch.no_grad():
        model.transformer.wte.weight.mul_(10)
    path = tmp_path_factory.mktemp("chat-model") / "tiny-chat"
    checkpoint.save(path / checkpoint.CKPT_NAME, {"model": model.state_dict(), "model_config": model.config.to_dict(),
                                       "tokenizer": load("gpt2").to_dict(), "step": 0})
    return path


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models in-process on one torch thread, like the server below."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def server(chat_ckpt, tmp_path_factory):
    """The shared server: batches of up to 8, an API key, one torch thread (a model this small gains nothing
    from more, and on a busy 2-core machine spin-waiting intra-op threads make every step many times slower)."""
    proc = ServerProcess(chat_ckpt, tmp_path_factory.mktemp("server") / "serve.log", "--max-batch-size", "8",
                         "--api-key", API_KEY, "--threads", "1")
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def tiny_pretrained(tmp_path_factory, data_dir) -> Path:
    """A briefly pretrained tiny model with room for short instruction examples: the base to fine-tune. Trained
    on one torch thread: a session fixture is set up before any module's one_torch_thread, and on a busy 2-core
    machine the second thread only spins."""
    import torch

    from gptlab.train import pretrain

    out = tmp_path_factory.mktemp("pretrained")
    layout = dict(block_size=96, n_layer=2, n_head=4, n_embd=64)  # 64 wide: learns the small tasks reliably
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pretrain(tiny_train_config(data_dir, out, max_steps=20, model=layout), log=lambda _: None)
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="session")
def hf_gpt2(tmp_path_factory):
    """A random-init transformers GPT-2 (64-token context) saved with GPT-2's tokenizer files as root/hf, and its
    conversion to a gptlab checkpoint with `gptlab convert` as root/converted.pt: (the transformers model, root)."""
    import shutil

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from gptlab import tokenizer as tok

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_positions=64, n_embd=64, n_layer=2, n_head=4)).eval()
    root = tmp_path_factory.mktemp("hf-gpt2")
    model.save_pretrained(root / "hf")
    shutil.copy(tok.gpt2_files_dir() / "encoder.json", root / "hf" / "vocab.json")
    shutil.copy(tok.gpt2_files_dir() / "vocab.bpe", root / "hf" / "merges.txt")
    done = run_cli("convert", "--from-hf", str(root / "hf"), "--out", str(root / "converted.pt"))
    assert done.returncode == 0, done.stderr
    return model, root
