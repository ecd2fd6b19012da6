"""The training loop's optimizers: AdamW, or Muon for the blocks' matrices beside AdamW for the rest
(the faster-learning recipe, docs/TRAINING.md)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch

from gptlab.config import TrainConfig
from gptlab.device import native_bf16

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # Jordan et al.'s quintic: steepest slope at 0 that still converges


def orthogonalize(matrix: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """About U V^T of matrix = U S V^T (singular values pushed to ~1) by `steps` Newton-Schulz iterations,
    computed in `dtype`: only matrix products, no SVD."""
    a, b, c = NS_COEFFICIENTS
    x = matrix.to(dtype)
    tall = x.size(0) > x.size(1)
    if tall:  # iterate on the wide side: the Gram matrix is the smaller one
        x = x.T
    x = x / x.norm().clamp(min=1e-7)  # spectral norm <= Frobenius norm <= 1: inside the iteration's basin
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


class Muon(torch.optim.Optimizer):
    """Muon (Jordan et al. 2024): SGD with Nesterov momentum whose update of each matrix is orthogonalised,
    then scaled to the RMS of an AdamW update (0.2 x sqrt(max(rows, columns)), Liu et al. 2025), so that it
    follows the same learning rate and decoupled weight decay as the AdamW beside it.

    It computes what torch.optim.Muon(adjust_lr_fn="match_rms_adamw") computes, but iterates in `dtype`:
    torch's always iterates in bf16, which a CPU without native bf16 emulates (~18x slower than fp32); there
    it made the whole training step of the micro preset 4x slower."""

    def __init__(self, params, lr: float, weight_decay: float = 0.1, momentum: float = 0.95,
                 ns_steps: int = 5, dtype: torch.dtype = torch.float32) -> None:
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, ns_steps=ns_steps))
        self.dtype = dtype

    @torch.no_grad()
    def step(self, closure=None) -> None:
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if not state:
                    state["momentum_buffer"] = torch.zeros_like(param)
                buffer = state["momentum_buffer"]
                buffer.lerp_(param.grad, 1 - momentum)
                update = orthogonalize(param.grad.lerp(buffer, momentum), group["ns_steps"], self.dtype)
                param.mul_(1 - lr * group["weight_decay"])
                param.add_(update.to(param.dtype), alpha=-lr * 0.2 * math.sqrt(max(param.shape)))


class Optimizers:
    """Several optimizers stepped as one, for parameters split between them (Muon's matrices, AdamW's rest).
    It has what the loop, the loss scaler and torch.distributed.checkpoint's state-dict functions (which take
    an iterable of optimizers) use: param_groups, step, zero_grad, iteration."""

    def __init__(self, *optimizers: torch.optim.Optimizer) -> None:
        self.optimizers = optimizers

    def __iter__(self) -> Iterator[torch.optim.Optimizer]:
        return iter(self.optimizers)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [group for optimizer in self.optimizers for group in optimizer.param_groups]

    def step(self) -> None:
        for optimizer in self.optimizers:
            optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device,
                   ) -> torch.optim.Optimizer | Optimizers:
    """AdamW with weight decay on matrices only (not biases, LayerNorm gains or other vectors). With
    cfg.optimizer "muon", the blocks' matrices go to Muon instead and the embeddings, the head and the
    vectors stay with AdamW (Muon is for hidden matrices); both follow the one learning-rate schedule."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    fused = device.type in ("cuda", "cpu")  # the fused kernel does all parameters in one pass
    to_muon = {id(p) for name, p in named if cfg.optimizer == "muon" and p.dim() == 2 and ".h." in f".{name}"}
    rest = [p for _, p in named if id(p) not in to_muon]
    groups = [{"params": [p for p in rest if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}]
    adamw = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)
    if not to_muon:
        return adamw
    # Newton-Schulz in bf16 where the device multiplies it natively (its result is only a direction)
    muon = Muon([p for _, p in named if id(p) in to_muon], lr=cfg.lr, weight_decay=cfg.weight_decay,
                dtype=torch.bfloat16 if native_bf16(device) else torch.float32)
    return Optimizers(muon, adamw)
