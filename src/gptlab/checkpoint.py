"""Checkpoints: one self-contained safetensors file (weights, config, tokenizer, optimizer, RNG) written
atomically. Loading one never runs code from it: tensors are raw bytes, everything else is JSON.

Format (FORMAT): every tensor of the payload is a safetensors tensor under its path in the payload
("model/transformer.wte.weight", "optimizer/state/0/exp_avg", "rng/0/torch"); the rest of the payload is
JSON in the header's metadata, under "gptlab_payload", with tagged single-key objects for what JSON lacks
(see _Tensors.encode). Checkpoints of gptlab before this format (pickles, `ckpt.pt`) still load, through
torch.load(weights_only=True): plain tensors and containers, plus the numpy array of the RNG state.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from gptlab.errors import GptlabError
from gptlab.model import GPT
from gptlab.outputs import UMASK

CKPT_NAME = "ckpt.safetensors"
LEGACY_CKPT_NAME = "ckpt.pt"  # pickled checkpoints of earlier gptlab versions
FORMAT = "gptlab-2"
LEGACY_FORMAT = "gptlab-1"
# What torch.load(weights_only=True) must accept beyond tensors and containers in a legacy checkpoint:
# numpy's RNG state (distributed.rng_state) holds a uint32 array. Rebuilding an array runs no code of the
# file's choosing. The first is numpy's array-rebuilding function, taken from an array's own __reduce__
# since it lives in a private module.
LEGACY_GLOBALS = [np.empty(0).__reduce__()[0], np.ndarray, np.dtype, type(np.dtype(np.uint32))]
# JSON stand-ins for values JSON cannot hold: always an object with exactly one of these keys
TENSOR, NDARRAY, TUPLE, DICT, FLOAT = "__tensor__", "__ndarray__", "__tuple__", "__dict__", "__float__"
TAGS = {TENSOR, NDARRAY, TUPLE, DICT, FLOAT}


class CheckpointError(GptlabError):
    """A checkpoint is missing, unreadable or does not fit the requested model."""


def find(directory: str | Path) -> Path | None:
    """The checkpoint file of a run directory (a legacy ckpt.pt if it has no newer one), or None."""
    directory = Path(directory)
    return next((directory / name for name in (CKPT_NAME, LEGACY_CKPT_NAME) if (directory / name).is_file()), None)


def resolve(path: str | Path) -> Path:
    """A run directory means its checkpoint file (see find); a file is taken as is."""
    path = Path(path)
    if path.is_dir():
        path = find(path) or path / CKPT_NAME
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    return path


def save(path: str | Path, payload: dict[str, Any]) -> None:
    """Write into a temporary directory beside `path`, fsync, then rename: a crash never leaves a
    half-written checkpoint, and a failed write (a full disk) leaves the previous checkpoint as it was and
    no temporary file. safetensors writes through a temporary file of its own, which the directory keeps
    together with ours, so the next save clears what a killed one left."""
    path = Path(path)
    tensors = _Tensors()
    metadata = {"gptlab_format": FORMAT, "gptlab_payload": json.dumps(tensors.encode(payload), allow_nan=False)}
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(tensors.by_key, tmp / path.name, metadata=metadata)
        os.chmod(tmp / path.name, 0o666 & ~UMASK)  # safetensors' temporary file has mode 0600
        fd = os.open(tmp / path.name, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp / path.name, path)
    except (OSError, SafetensorError) as err:
        raise CheckpointError(f"cannot write checkpoint {path}: {os_reason(err)}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def os_reason(err: BaseException) -> str:
    """The operating system's words for a failed read or write (safetensors wraps them in its own)."""
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    found = re.search(r"I/O error: (.*?)(?: \(os error \d+\))?$", str(err))
    return found.group(1) if found else str(err)


class _Tensors:
    """The tensors of a payload being encoded, by safetensors key."""

    def __init__(self) -> None:
        self.by_key: dict[str, torch.Tensor] = {}
        self.views: dict[tuple, str] = {}  # (storage, offset, shape, stride, dtype) -> key
        self.storages: set[tuple] = set()

    def encode(self, value: Any, key: str = "") -> Any:
        """`value` as JSON, its tensors stored under path-like keys."""
        if isinstance(value, torch.Tensor):
            return {TENSOR: self.add(value, key)}
        if isinstance(value, np.ndarray):
            return {NDARRAY: self.add(torch.from_numpy(value), key)}
        if isinstance(value, dict):
            if all(isinstance(k, str) for k in value) and TAGS.isdisjoint(value):
                return {k: self.encode(v, f"{key}/{k}") for k, v in value.items()}
            return {DICT: [[self.encode(k, key), self.encode(v, f"{key}/{k}")] for k, v in value.items()]}
        if isinstance(value, (list, tuple)):
            items = [self.encode(v, f"{key}/{i}") for i, v in enumerate(value)]
            return {TUPLE: items} if isinstance(value, tuple) else items
        if isinstance(value, float) and not math.isfinite(value):
            return {FLOAT: repr(value)}  # "inf", "-inf" or "nan": float() reads them back
        if value is None or isinstance(value, (str, int, float)):
            return value
        raise TypeError(f"checkpoint payload {key or '/'}: cannot store a {type(value).__name__}")

    def add(self, tensor: torch.Tensor, key: str) -> str:
        """The key `tensor` is stored under. The same view of the same memory (tied weights) is stored
        once and loads as one tensor; other tensors sharing memory are copied, as safetensors holds no
        aliasing."""
        storage = (tensor.device, tensor.untyped_storage().data_ptr())
        view = (*storage, tensor.storage_offset(), tuple(tensor.shape), tensor.stride(), tensor.dtype)
        if view in self.views:
            return self.views[view]
        key = key.lstrip("/")
        while key in self.by_key:  # two payload paths that read the same: "a/b" as one key and nested
            key += "'"
        stored = tensor.detach().cpu().contiguous()
        if tensor.numel():  # empty tensors own no memory to share
            if storage in self.storages:
                stored = stored.clone()
            self.storages.add(storage)
            self.views[view] = key
        self.by_key[key] = stored
        return key


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1 and not TAGS.isdisjoint(value):
        (tag, inner), = value.items()
        if tag == TENSOR:
            return tensors[inner]
        if tag == NDARRAY:
            return tensors[inner].numpy()
        if tag == TUPLE:
            return tuple(_decode(v, tensors) for v in inner)
        if tag == DICT:
            return {_decode(k, tensors): _decode(v, tensors) for k, v in inner}
        return float(inner)
    return {k: _decode(v, tensors) for k, v in value.items()}


def load(path: str | Path) -> dict[str, Any]:
    """The payload `save` wrote, or that of a legacy pickled checkpoint; never runs code from the file."""
    path = resolve(path)
    try:
        with open(path, "rb") as handle:
            head = handle.read(9)
    except OSError as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {err.strerror}") from None
    # safetensors: an 8-byte header length, then the JSON header
    return _load_safetensors(path) if head[8:] == b"{" else _load_legacy(path)


def _load_safetensors(path: Path) -> dict[str, Any]:
    try:
        with safe_open(path, framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {os_reason(err)}") from None
    if metadata.get("gptlab_format") != FORMAT:
        raise CheckpointError(f"{path} is a safetensors file but not a gptlab checkpoint"
                              " (a Hugging Face model? pass its directory)")
    try:
        payload = _decode(json.loads(metadata["gptlab_payload"]), tensors)
    except (KeyError, TypeError, ValueError, RecursionError) as err:  # a damaged or hand-made header
        raise CheckpointError(f"{path}: malformed gptlab payload ({type(err).__name__}: {err})") from None
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path} is not a gptlab checkpoint")
    return payload


def _load_legacy(path: Path) -> dict[str, Any]:
    try:
        with torch.serialization.safe_globals(LEGACY_GLOBALS), warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Detected pickle protocol")  # the error below says it all
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # the file asks for something beyond tensors and plain data
        wanted = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        what = f"loading it would run {wanted.group(1)}" if wanted else "it is not a plain pickle of tensors and data"
        raise CheckpointError(f"refusing to load {path}: {what}; a checkpoint may hold only tensors and plain data"
                              ) from None
    except Exception as err:  # torch raises many types for corrupt files
        first = str(err).strip().splitlines() or [type(err).__name__]
        raise CheckpointError(f"cannot read checkpoint {path}: {first[0]}") from None
    if not isinstance(payload, dict) or payload.pop("format", None) != LEGACY_FORMAT:
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

