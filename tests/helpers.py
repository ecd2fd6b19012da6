"""Helpers shared by the tests and the benchmarks (which put the repository root on sys.path to import them)."""

from __future__ import annotations

import json
import select
import subprocess
import sys
from pathlib import Path

import torch


class ServerProcess:
    """`gptlab serve --port 0` in a child process (for tests, benchmarks, notebooks); `url` is where it listens.
    Its log goes to a file, not a pipe, so a chatty server can never block on a full pipe."""

    def __init__(self, ckpt: str | Path, log: str | Path, *flags: str, start_timeout: float = 300) -> None:
        self.log = Path(log)
        with open(self.log, "w") as stderr:
            self.proc = subprocess.Popen([sys.executable, "-m", "gptlab", "serve", "--ckpt", str(ckpt), "--port", "0",
                                          "--log-level", "warning", *flags],
                                         stdout=subprocess.PIPE, stderr=stderr, text=True)
        ready, _, _ = select.select([self.proc.stdout], [], [], start_timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.stop()
            raise RuntimeError(f"gptlab serve did not start: {self.log.read_text()}")
        self.url: str = json.loads(line)["url"]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def hf_generate(model, prompts: list[list[int]], new_tokens: int, **kwargs) -> list[list[int]]:
    """transformers' batched greedy generate: left padding plus an attention mask (its batching recipe)."""
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                             eos_token_id=None, pad_token_id=0, **kwargs)
    return out[:, width:].tolist()
