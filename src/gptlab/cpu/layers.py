"""Linear layers for fast CPU inference: float layouts that suit the matmul kernels, and int8.

Decoding one token reads every weight once, so on a CPU its speed is set by memory bandwidth and by
how well the matmul kernel streams the weights. `CPULinear` keeps float32 weights but stores them the
way the fastest kernel reads them. int8 weights are a quarter of float32's bytes: `Int8Linear` is
weight-only int8 with one scale per output channel, the same numbers on every CPU: through gptlab's
kernel where a variant runs (`kernels`), else dequantized a block of output channels at a time for
PyTorch's matmul. Each layer remembers the kernel variant (`variant`, None: PyTorch's kernels) whose
panel layout it holds.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptlab.cpu import kernels

# Up to this many rows the panel kernel beats the library GEMMs (decoding, batched or not); more rows
# (prefill) go to MKL, whose GEMM tiles for reuse (benchmarks/linear.py).
PANEL_MAX_ROWS = 256
# int8 weights dequantize for PyTorch's matmul in blocks of output channels of about this many float32
# bytes: a block stays in L2 between being written and being multiplied, so the float copy of the
# weight never goes through memory
DEQUANT_BLOCK_BYTES = 256 * 1024


class CPULinear(nn.Linear):
    """nn.Linear for CPU inference; same parameters and state_dict, faster kernels in inference mode.

    Decoding multiplies a few rows by every weight, so its speed is that of streaming the weights:
    - with a gptlab kernel variant: up to PANEL_MAX_ROWS rows run over a copy of the weight in the
      variant's panels, made on first use, at the speed of a plain read of the weight;
    - without one: one row uses MKL's GEMV on a column-major weight (the (in, out) matrix it streams
      fastest), several rows a oneDNN-packed copy.
    Each copy costs the weight's memory again. Training or autograd falls back to F.linear; the
    copies assume frozen weights.
    """

    gelu = False  # apply GPT-2's tanh GELU to the output (folded in by gptlab.cpu.prepare_inference)
    variant: str | None = None  # the gptlab kernel variant that runs this layer (None: PyTorch's kernels)
    _panels: torch.Tensor | None = None  # the kernel's layout
    _panel_bias: torch.Tensor | None = None
    _packed: torch.Tensor | None = None  # oneDNN's

    @classmethod
    def from_linear(cls, linear: nn.Linear, variant: str | None) -> CPULinear:
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight, new.bias = linear.weight, linear.bias  # shared: a tied head stays tied
        new.variant = variant
        new.train(linear.training)
        if variant is None:
            new.weight.data = new.weight.data.t().contiguous().t()
        return new

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_packed"] = None  # an opaque oneDNN tensor (no storage to copy): rebuilt on first use
        return state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or torch.is_grad_enabled():
            return self._activate(F.linear(x, self.weight, self.bias))
        rows = x.numel() // x.size(-1)
        if self.variant is not None:
            if rows <= PANEL_MAX_ROWS and x.dtype == torch.float32:
                return kernels.load(self.variant).linear.default(x, *self.panel_tensors(), self.out_features,
                                                                 self.gelu)
            return self._activate(F.linear(x, self.weight, self.bias))
        if rows == 1:
            return self._activate(F.linear(x, self.weight, self.bias))
        if self._packed is None:
            self._packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach().contiguous(), 8)
        return self._activate(torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, "none", [], ""))

    def panel_tensors(self) -> tuple[torch.Tensor, None, torch.Tensor | None] | None:
        """The kernel's (panels, scales, padded bias) of this layer, packed on first use; None without
        a kernel variant."""
        if self.variant is None:
            return None
        if self._panels is None:
            self._panels = kernels.load(self.variant).pack(self.weight.detach())
            if self.bias is not None:
                self._panel_bias = _pad_to_panels(self.bias.detach(), self._panels)
        return self._panels, None, self._panel_bias

    def _activate(self, y: torch.Tensor) -> torch.Tensor:
        return F.gelu(y, approximate="tanh") if self.gelu else y

    def extra_repr(self) -> str:
        return super().extra_repr() + (", gelu=tanh" if self.gelu else "") + f", kernel={self.variant or 'none'}"


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight-only int8 of an (out, in) float matrix: (round(W / s) as int8, s) with one scale
    s = max |W[c]| / 127 per output channel c; every weight is within s / 2 of its int8 value."""
    scales = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
    return torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8), scales


class Int8Linear(nn.Module):
    """A frozen int8 replacement for `nn.Linear` (inference only, CPU): weight-only int8, one scale per
    output channel (`quantize_weight`); activations and accumulation stay float32.

    With a kernel variant, the int8 weights live in its panels and up to PANEL_MAX_ROWS rows go through
    its matmul, which widens them to float32 in registers as it streams them (a quarter of float32's
    bytes). More rows, or no kernel variant: the weight is dequantized one block of output channels
    at a time (DEQUANT_BLOCK_BYTES) and multiplied by PyTorch's matmul. Both compute x (q s)^T + b.
    """

    def __init__(self, linear: nn.Linear, variant: str | None) -> None:
        super().__init__()
        weight = linear.weight.detach().float().cpu().contiguous()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.gelu = getattr(linear, "gelu", False)  # a CPULinear with its MLP's GELU folded in keeps it
        self.bias = None if linear.bias is None else linear.bias.detach().float().cpu()
        self.variant = variant
        qweight, scales = quantize_weight(weight)
        if variant is None:  # (out, in) int8 and (out,) scales
            self._qweight, self._scales, self._panel_bias = qweight, scales, None
        else:  # the variant's panels, scales and bias zero-padded like them
            self._qweight = kernels.load(variant).pack(qweight)
            self._scales = _pad_to_panels(scales, self._qweight)
            self._panel_bias = None if self.bias is None else _pad_to_panels(self.bias, self._qweight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if self.variant is not None and x.numel() // x.size(-1) <= PANEL_MAX_ROWS:
            return kernels.load(self.variant).linear.default(x, *self.panel_tensors(), self.out_features, self.gelu)
        y = torch.cat([F.linear(x, block) for block in self._dequantized_blocks()], dim=-1)[..., : self.out_features]
        if self.bias is not None:
            y += self.bias
        return F.gelu(y, approximate="tanh") if self.gelu else y

    def _dequantized_blocks(self) -> Iterator[torch.Tensor]:
        """The float32 weight (q s) as consecutive (channels, in) blocks of about DEQUANT_BLOCK_BYTES;
        from panels, the last block keeps their zero padding."""
        k = self.in_features
        if self.variant is None:
            step = max(1, DEQUANT_BLOCK_BYTES // (4 * k))
            for start in range(0, self.out_features, step):
                yield self._qweight[start: start + step].float() * self._scales[start: start + step, None]
            return
        width = self._qweight.size(2)
        step = max(1, DEQUANT_BLOCK_BYTES // (4 * k * width))
        for start in range(0, self._qweight.size(0), step):
            panels = self._qweight[start: start + step]  # (panels, in, width)
            scales = self._scales[start * width: (start + step) * width].view(-1, 1, width)
            yield (panels.float() * scales).transpose(1, 2).reshape(-1, k)

    def panel_tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
        """The kernel's (int8 panels, scales, padded bias) of this layer; None without a kernel variant."""
        return None if self.variant is None else (self._qweight, self._scales, self._panel_bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, weight-only int8, "
                f"kernel={self.variant or 'none'}")


def _pad_to_panels(vector: torch.Tensor, panels: torch.Tensor) -> torch.Tensor:
    """A per-output-channel vector zero-padded to the panels' column count."""
    return F.pad(vector, (0, panels.size(0) * panels.size(2) - vector.numel()))
