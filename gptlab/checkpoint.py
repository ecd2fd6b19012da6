"""Checkpoints: one self-contained file (weights, config, tokenizer, optimizer, RNG) written atomically.
Loading a model from one (or from any other path a command takes) is gptlab.loading's job."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from gptlab.errors import GptlabError
from gptlab.model import GPT

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


def load(path: str | Path) -> dict[str, Any]:
    path = resolve(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises many types for corrupt files
        raise CheckpointError(f"cannot read checkpoint {path}: {err}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a gptlab checkpoint")
    return payload


def load_weights(model: GPT, state: dict[str, torch.Tensor]) -> None:
    """Load weights, turning shape or key mismatches into one clear error."""
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        raise CheckpointError(f"checkpoint does not fit the model config: {first[1].strip() if len(first) > 1 else first[0]}"
                              ) from None

