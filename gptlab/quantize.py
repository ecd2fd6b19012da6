"""Int8 weights for CPU inference.

Decoding one token reads every weight once, so on a CPU its speed is set by memory bandwidth:
int8 weights are a quarter of float32's bytes. `quantize_int8` swaps every `nn.Linear` (the tied
LM head included, which gets its own int8 copy; the float embedding table stays for lookups) for an
`Int8Linear` that runs fbgemm's dynamically quantized matmul: weights int8 with one scale per
output channel, activations quantized to 8 bits per call, int32 accumulation, float32 output.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn as nn

from gptlab.model import GPT


def _has_vnni() -> bool:
    try:
        return any(flag in Path("/proc/cpuinfo").read_text().split() for flag in ("avx512_vnni", "avx_vnni"))
    except OSError:
        return False


# Without VNNI, x86 int8 kernels add pairs of u8*s8 products in int16, which can saturate: there,
# activations use 7 bits (fbgemm's reduce_range). With VNNI the products go straight to int32 and
# the full 8 bits halve the quantization error.
_REDUCE_RANGE = not _has_vnni()


class Int8Linear(nn.Module):
    """A frozen int8 replacement for `nn.Linear` (inference only, CPU)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach().float().cpu()
        scales = (weight.abs().amax(dim=1) / 127).clamp(min=1e-12).double()
        zero_points = torch.zeros_like(scales, dtype=torch.long)
        with warnings.catch_warnings():
            # quantized tensors are deprecated for a later PyTorch; pyproject pins torch <= 2.13, where
            # fbgemm's prepacked int8 matmul is still the fastest int8 path on x86 CPUs
            warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
            qweight = torch.quantize_per_channel(weight, scales, zero_points, 0, torch.qint8)
        bias = None if linear.bias is None else linear.bias.detach().float().cpu()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._packed = torch.ops.quantized.linear_prepack(qweight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(x.float(), self._packed, _REDUCE_RANGE)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def quantize_int8(model: GPT) -> GPT:
    """Replace the model's linear layers by Int8Linear, in place; returns the model (CPU only)."""
    if model.transformer.wte.weight.device.type != "cpu":
        raise ValueError("int8 quantization runs on CPU only (fbgemm); use bf16 weights on GPU")
    model.eval()
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, Int8Linear(child))
    return model
