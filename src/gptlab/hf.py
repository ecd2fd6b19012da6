"""Hugging Face GPT-2 checkpoints in and out (config.json + safetensors / pytorch_model.bin).

HF's GPT-2 stores its linear layers as `Conv1D` with weights shaped (in, out); ours are
`nn.Linear`, (out, in): the only real work of the conversion is that transpose.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gptlab import checkpoint
from gptlab import tokenizer as tok
from gptlab.checkpoint import CheckpointError, load_weights, os_reason
from gptlab.config import GPTConfig
from gptlab.model import GPT
from gptlab.outputs import atomic_directory, check_new_output
from gptlab.tokenizer import Tokenizer

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
GELU_TANH = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
REQUIRED = ("vocab_size", "n_positions", "n_layer", "n_head", "n_embd")  # config.json keys with no default


def config_from_hf(hf: dict, source: Path | str = "config.json") -> GPTConfig:
    """Our config from an HF GPT-2 config.json (`source` names it in errors)."""
    if not isinstance(hf, dict):
        raise CheckpointError(f"{source} is not a JSON object")
    if hf.get("model_type") != "gpt2":
        raise CheckpointError(f"only GPT-2 checkpoints are supported, got model_type={hf.get('model_type')!r}")
    for key in REQUIRED:
        if not (isinstance(hf.get(key), int) and not isinstance(hf[key], bool) and hf[key] > 0):
            found = "is missing" if key not in hf else f"is {hf[key]!r}"
            raise CheckpointError(f"{source}: {key} {found}; a GPT-2 config needs a positive integer there")
    if not isinstance(hf.get("layer_norm_epsilon", 1e-5), (int, float)):
        raise CheckpointError(f"{source}: layer_norm_epsilon is {hf['layer_norm_epsilon']!r}, not a number")
    if hf.get("activation_function", "gelu_new") not in GELU_TANH:
        raise CheckpointError(f"unsupported activation {hf['activation_function']!r} (GPT-2 uses gelu_new)")
    if hf.get("n_inner") not in (None, 4 * hf["n_embd"]):
        raise CheckpointError("only n_inner = 4 * n_embd is supported")
    return GPTConfig(vocab_size=hf["vocab_size"], block_size=hf["n_positions"], n_layer=hf["n_layer"],
                     n_head=hf["n_head"], n_embd=hf["n_embd"], layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5))


def _read_hf_weights(directory: Path) -> dict[str, torch.Tensor]:
    """The weights file's tensors; a damaged file (truncated download) or a pickle that is more than
    tensors is a CheckpointError, never a traceback or code run."""
    path = next((directory / name for name in ("model.safetensors", "pytorch_model.bin")
                 if (directory / name).is_file()), None)
    if path is None:
        raise CheckpointError(f"{directory} has neither model.safetensors nor pytorch_model.bin")
    try:
        if path.suffix == ".safetensors":
            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, pickle.UnpicklingError, RuntimeError) as err:
        first = str(err).strip().splitlines() or [type(err).__name__]
        raise CheckpointError(f"cannot read {path}: {first[0]} (damaged or incomplete file?)") from None


def state_from_hf(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF GPT-2 names -> ours: add the `transformer.` prefix, transpose Conv1D, drop mask buffers."""
    if not any(name.endswith("wte.weight") for name in weights):
        raise CheckpointError("the weights have no token embedding (wte.weight): not a GPT-2 model")
    state = {}
    for name, tensor in weights.items():
        if name.endswith((".attn.bias", ".attn.masked_bias")) or name == "lm_head.weight":
            continue  # causal-mask buffers; the head is tied to wte
        key = name if name.startswith("transformer.") else f"transformer.{name}"
        state[key] = tensor.t().contiguous() if key.endswith(CONV1D) else tensor
    state["lm_head.weight"] = state["transformer.wte.weight"]
    return state


def is_hf_dir(path: str | Path) -> bool:
    """A Hugging Face model directory rather than a gptlab run directory (which holds ckpt.pt)."""
    path = Path(path)
    return path.is_dir() and (path / "config.json").is_file() and checkpoint.find(path) is None


def load_hf(directory: str | Path) -> tuple[GPT, Tokenizer]:
    directory = Path(directory)
    try:
        hf_config = json.loads((directory / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read {directory / 'config.json'}: {err}") from None
    model = GPT(config_from_hf(hf_config, directory / "config.json"))
    load_weights(model, state_from_hf(_read_hf_weights(directory)))
    if any((directory / n).is_file() for n in tok.VOCAB_NAMES):
        tokenizer = tok.load(directory)
    elif model.config.vocab_size == 50257:
        tokenizer = tok.load("gpt2")
    else:
        raise CheckpointError(f"{directory} has no tokenizer files (vocab.json + merges.txt)")
    return model, tokenizer


def hf_config(config: GPTConfig, eot_id: int) -> dict:
    return {
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": config.vocab_size,
        "n_positions": config.block_size, "n_ctx": config.block_size, "n_embd": config.n_embd,
        "n_layer": config.n_layer, "n_head": config.n_head, "n_inner": None, "activation_function": "gelu_new",
        "resid_pdrop": config.dropout, "embd_pdrop": config.dropout, "attn_pdrop": config.dropout,
        "layer_norm_epsilon": config.layer_norm_eps, "initializer_range": 0.02,
        "bos_token_id": eot_id, "eos_token_id": eot_id, "tie_word_embeddings": True,
        "scale_attn_weights": True, "use_cache": True, "torch_dtype": "float32",
    }


def save_hf(model: GPT, tokenizer: Tokenizer, out: str | Path) -> None:
    """Write an HF GPT-2 directory; it appears complete or not at all, and never over existing files."""
    config = model.config
    if departures := config.departures_from_gpt2():
        raise CheckpointError("only GPT-2's architecture exports to HF GPT-2; this model has "
                              + ", ".join(f"{name}={value}" for name, value in departures.items()))
    check_new_output(out)
    weights = {}
    for key, tensor in model.state_dict().items():
        if key == "lm_head.weight":
            continue  # tied to wte; safetensors forbids shared storage and HF re-ties on load
        weights[key] = (tensor.t() if key.endswith(CONV1D) else tensor).detach().float().contiguous().clone()
    with atomic_directory(out) as tmp:
        try:
            save_file(weights, tmp / "model.safetensors", metadata={"format": "pt"})
        except SafetensorError as err:  # a full disk: the directory is removed, the error names where it went
            raise CheckpointError(f"cannot write {out / 'model.safetensors'}: {os_reason(err)}") from None
        (tmp / "config.json").write_text(json.dumps(hf_config(config, tokenizer.eot_id), indent=2))
        tokenizer.save(tmp)
        special = {"bos_token": tok.EOT, "eos_token": tok.EOT, "unk_token": tok.EOT}
        (tmp / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "GPT2Tokenizer", "model_max_length": config.block_size, **special}, indent=2))
        (tmp / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
