"""LoRA (Hu et al., 2021): train a low-rank update B·A beside each frozen weight matrix W.

    y = x Wᵀ + b + (alpha / rank) · dropout(x) Aᵀ Bᵀ        A: (rank, in), B: (out, rank), B starts at zero

so the adapted model starts out identical to the base model. The update is applied as two thin matmuls
(never materialising B·A during training), and `merge` folds it into W for inference at no extra cost.
Optionally some rows of the token embedding train as whole vectors (`token_ids`, PEFT's
`trainable_token_indices`): a base that has hardly seen a token (digits, for a model of Shakespeare) gives it
an embedding that low-rank updates of the blocks cannot tell apart from its neighbours'.
Parameter names and initialisation follow PEFT, so adapters export to PEFT's format unchanged
(`save_peft_adapter`) and load with `peft.PeftModel.from_pretrained` on the HF GPT-2 export of the base model.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file
from torch.nn.utils import parametrize

from gptlab.errors import GptlabError
from gptlab.outputs import atomic_directory

# the four linear layers of a GPT-2 block, named as in HF GPT-2 (and so as PEFT's target_modules)
TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


class LoRAError(GptlabError):
    """A LoRA setting is out of range, or a model has no LoRA layers where some were expected."""


@dataclass
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("attn.c_attn", "attn.c_proj")
    token_ids: tuple[int, ...] = ()  # token embedding rows that train whole (and the tied output rows with them)

    def __post_init__(self) -> None:
        self.targets = tuple(self.targets)
        self.token_ids = tuple(sorted(set(self.token_ids)))
        if any(not isinstance(i, int) or i < 0 for i in self.token_ids):
            raise LoRAError(f"lora token ids must be non-negative integers, got {list(self.token_ids)}")
        if not isinstance(self.rank, int) or self.rank < 1:
            raise LoRAError(f"lora rank must be a positive integer, got {self.rank!r}")
        if self.alpha <= 0:
            raise LoRAError(f"lora alpha must be positive, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise LoRAError(f"lora dropout must be in [0, 1), got {self.dropout}")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            raise LoRAError(f"lora targets must be a non-empty subset of {', '.join(TARGETS)}; got {unknown or 'none'}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        return {**asdict(self), "targets": list(self.targets), "token_ids": list(self.token_ids)}


class LoRALinear(nn.Module):
    """An nn.Linear whose weight is frozen and adapted by a trainable low-rank update."""

    def __init__(self, base: nn.Linear, config: LoRAConfig) -> None:
        super().__init__()
        self.base = base
        self.base.requires_grad_(False)
        self.scaling = config.scaling
        factory = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(config.rank, base.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, config.rank, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's (and nn.Linear's) initialisation
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:
            return y
        # (x A^T) B^T costs rank * (in + out) per token, far less than forming B A (out * in)
        return y + (self.dropout(x) @ self.lora_A.t() @ self.lora_B.t()) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.base.weight += self.delta_weight().to(self.base.weight.dtype)
            self.merged = True


class TrainableTokens(nn.Module):
    """A parametrization of an embedding matrix: the rows `token_ids` are trainable vectors, every other row is
    the frozen base weight. Stored as PEFT stores it (`trainable_tokens_delta` holds the rows' values, not a
    difference), so merging is one index_copy."""

    def __init__(self, weight: torch.Tensor, token_ids: tuple[int, ...]) -> None:
        super().__init__()
        if token_ids and max(token_ids) >= weight.size(0):
            raise LoRAError(f"lora token id {max(token_ids)} is outside the vocabulary of {weight.size(0)} tokens")
        self.register_buffer("token_indices", torch.tensor(token_ids, dtype=torch.long, device=weight.device),
                             persistent=False)
        self.trainable_tokens_delta = nn.Parameter(weight.detach()[self.token_indices].clone())

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.index_copy(0, self.token_indices, self.trainable_tokens_delta.to(weight.dtype))


def train_token_rows(model: nn.Module, token_ids: tuple[int, ...]) -> TrainableTokens:
    """Make the embedding rows `token_ids` trainable (in place). One TrainableTokens serves the embedding and,
    when it shares the embedding's matrix (GPT-2's weight tying), the LM head: the two roles keep one matrix and
    a token's new row changes both."""
    wte, head = model.transformer.wte, model.lm_head
    rows = TrainableTokens(wte.weight, token_ids)
    for module in [wte, head] if head.weight is wte.weight else [wte]:
        parametrize.register_parametrization(module, "weight", rows)
    return rows


def token_rows(model: nn.Module) -> TrainableTokens | None:
    """The model's trainable embedding rows, if `train_token_rows` gave it some."""
    wte = model.transformer.wte if hasattr(model, "transformer") else None
    return wte.parametrizations.weight[0] if wte is not None and parametrize.is_parametrized(wte) else None


def remove_token_rows(model: nn.Module, merge: bool) -> None:
    """Put the plain embedding matrix back, with the trained rows written into it (merge) or not (the base)."""
    rows = token_rows(model)
    if rows is None:
        return
    modules = [m for m in (model.transformer.wte, model.lm_head) if parametrize.is_parametrized(m)]
    with torch.no_grad():
        if merge:  # in the shared matrix itself, so a tied LM head gets the rows too and stays tied
            original = modules[0].parametrizations.weight.original
            original.index_copy_(0, rows.token_indices, rows.trainable_tokens_delta.to(original.dtype))
    for module in modules:
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, LoRALinear)}


def apply_lora(model: nn.Module, config: LoRAConfig) -> nn.Module:
    """Freeze every parameter of `model`, then wrap each target linear layer in a LoRALinear (in place)."""
    model.requires_grad_(False)
    targets = [(name, module) for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and name.endswith(config.targets)]
    if not targets:
        raise LoRAError(f"no linear layer of the model matches the lora targets {', '.join(config.targets)}")
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, LoRALinear(linear, config))
    if config.token_ids:
        train_token_rows(model, config.token_ids)
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its base weight and put the plain nn.Linear back (in place)."""
    return remove_lora(model, merge=True)


def remove_lora(model: nn.Module, merge: bool) -> nn.Module:
    """Put each wrapped nn.Linear back, with its LoRA update folded in (merge) or dropped (the base model)."""
    layers = lora_layers(model)
    if not layers:
        raise LoRAError("the model has no LoRA layers")
    for name, layer in layers.items():
        if merge:
            layer.merge()
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer.base)
    remove_token_rows(model, merge)
    return model


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What trains besides the base, keyed as in PEFT less its `base_model.model.` prefix:
    `<layer>.lora_A.weight`, `<layer>.lora_B.weight`, and `transformer.wte.token_adapter.trainable_tokens_delta`."""
    state = {f"{name}.{part}.weight": getattr(layer, part).detach()
             for name, layer in lora_layers(model).items() for part in ("lora_A", "lora_B")}
    if (rows := token_rows(model)) is not None:
        state["transformer.wte.token_adapter.trainable_tokens_delta"] = rows.trainable_tokens_delta.detach()
    return state


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, each shared tensor counted once."""
    params = list(model.parameters())  # nn.Module.parameters() already skips repeats (tied weights)
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def save_peft_adapter(model: nn.Module, config: LoRAConfig, out: str | Path, base_model_path: str | Path) -> None:
    """Write the adapter as PEFT does: adapter_config.json + adapter_model.safetensors.

    Keys are `base_model.model.<HF module name>.lora_A.weight`; our module names already are HF GPT-2's,
    and PEFT's LoRA on GPT-2's Conv1D keeps A as (rank, in) and B as (out, rank) just like ours, with
    `fan_in_fan_out` telling PEFT about Conv1D's transposed base weight.
    """
    tensors = {f"base_model.model.{key}": value.float().contiguous().clone() for key, value in adapter_state(model).items()}
    if not lora_layers(model):
        raise LoRAError("the model has no LoRA layers to export")
    peft_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base_model_path),
        "r": config.rank, "lora_alpha": config.alpha, "lora_dropout": config.dropout,
        "target_modules": list(config.targets), "fan_in_fan_out": True, "bias": "none",
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
        "trainable_token_indices": list(config.token_ids) or None,
    }
    with atomic_directory(out) as tmp:
        save_file(tensors, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(peft_config, indent=2))
