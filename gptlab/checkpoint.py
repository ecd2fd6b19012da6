"""Checkpoints: one self-contained file (weights, config, tokenizer, optimizer, RNG) written atomically."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from gptlab.config import GPTConfig
from gptlab.errors import GptlabError
from gptlab.model import GPT
from gptlab.tokenizer import Tokenizer

CKPT_NAME = "ckpt.pt"
FORMAT = "gptlab-1"


class CheckpointError(GptlabError):
    """A checkpoint is missing, unreadable or does not fit the requested model."""


def resolve(path: str | Path) -> Path:
    """A run directory means its ckpt.pt; a file is taken as is."""
    path = Path(path)
    if path.is_dir():
        path = path / CKPT_NAME
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    return path


def save(path: str | Path, payload: dict[str, Any]) -> None:
    """Write to a temporary file, fsync, then rename: a crash never leaves a half-written checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        torch.save({"format": FORMAT, **payload}, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_directory(out: Path) -> Iterator[Path]:
    """A temporary directory beside `out` to write into; renamed to `out` when the block succeeds, removed
    if it fails, so no reader sees a half-written directory. `out` may exist only as an empty directory."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load(path: str | Path) -> dict[str, Any]:
    path = resolve(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises many types for corrupt files
        raise CheckpointError(f"cannot read checkpoint {path}: {err}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a gptlab checkpoint")
    return payload


def model_from_payload(payload: dict[str, Any]) -> GPT:
    config = GPTConfig.from_dict(payload["model_config"])
    model = GPT(config)
    load_weights(model, payload["model"])
    return model


def load_weights(model: GPT, state: dict[str, torch.Tensor]) -> None:
    """Load weights, turning shape or key mismatches into one clear error."""
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        raise CheckpointError(f"checkpoint does not fit the model config: {first[1].strip() if len(first) > 1 else first[0]}"
                              ) from None


def load_model(path: str | Path) -> tuple[GPT, Tokenizer]:
    """A gptlab checkpoint (file or run directory) or a Hugging Face GPT-2 directory -> (model, tokenizer)."""
    path = Path(path)
    if path.is_dir() and (path / "config.json").is_file() and not (path / CKPT_NAME).is_file():
        from gptlab import hf
        return hf.load_hf(path)
    payload = load(path)
    if "finetune" in payload:  # a `gptlab finetune` run: rebuilt on its base model, LoRA merged in
        from gptlab import finetune
        return finetune.standalone_gpt(payload)
    return model_from_payload(payload), Tokenizer.from_dict(payload["tokenizer"])
