"""Weight formats for fast CPU inference: float layouts that suit the matmul kernels, and int8.

Decoding one token reads every weight once, so on a CPU its speed is set by memory bandwidth and by
how well the matmul kernel streams the weights. `prepare_cpu_inference` keeps float32 weights but
stores them the way the fastest kernel reads them (see CPULinear). int8 weights are a quarter of
float32's bytes: `quantize_int8` swaps every `nn.Linear` (the tied LM head included, which gets its
own int8 copy; the float embedding table stays for lookups) for an `Int8Linear` with one scale per
output channel: weight-only int8 through gptlab's kernel where it runs, fbgemm's dynamic int8
matmul elsewhere.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptlab import kernels
from gptlab.model import GPT, MLP

# Up to this many rows the panel kernel beats the library GEMMs (decoding, batched or not); more rows
# (prefill) go to MKL, whose GEMM tiles for reuse (benchmarks/linear.py).
PANEL_MAX_ROWS = 256


class CPULinear(nn.Linear):
    """nn.Linear for CPU inference; same parameters and state_dict, faster kernels in inference mode.

    Decoding multiplies a few rows by every weight, so its speed is that of streaming the weights:
    - with gptlab's kernel (`kernels.cpu_kernels`): up to PANEL_MAX_ROWS rows run over a copy of the weight
      in 48-column panels, made on first use, at the speed of a plain read of the weight;
    - without it: one row uses MKL's GEMV on a column-major weight (the (in, out) matrix it streams
      fastest), several rows a oneDNN-packed copy.
    Each copy costs the weight's memory again. Training or autograd falls back to F.linear; the
    copies assume frozen weights.
    """

    gelu = False  # apply GPT-2's tanh GELU to the output (folded in by prepare_cpu_inference)
    _panels: torch.Tensor | None = None  # the kernel's layout
    _panel_bias: torch.Tensor | None = None
    _packed: torch.Tensor | None = None  # oneDNN's

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> CPULinear:
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight, new.bias = linear.weight, linear.bias  # shared: a tied head stays tied
        new.train(linear.training)
        if kernels.cpu_kernels() is None:
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
        kernel = kernels.cpu_kernels()
        if kernel is not None:
            if rows <= PANEL_MAX_ROWS and x.dtype == torch.float32:
                return kernel.linear.default(x, *self.panel_tensors(), self.out_features, self.gelu)
            return self._activate(F.linear(x, self.weight, self.bias))
        if rows == 1:
            return self._activate(F.linear(x, self.weight, self.bias))
        if self._packed is None:
            self._packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach().contiguous(), 8)
        return self._activate(torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, "none", [], ""))

    def panel_tensors(self) -> tuple[torch.Tensor, None, torch.Tensor | None]:
        """The kernel's (panels, scales, padded bias) of this layer, packed on first use."""
        if self._panels is None:
            self._panels = kernels.cpu_kernels().pack(self.weight.detach())
            if self.bias is not None:
                padding = self._panels.size(0) * self._panels.size(2) - self.out_features
                self._panel_bias = F.pad(self.bias.detach(), (0, padding))
        return self._panels, None, self._panel_bias

    def _activate(self, y: torch.Tensor) -> torch.Tensor:
        return F.gelu(y, approximate="tanh") if self.gelu else y

    def extra_repr(self) -> str:
        return super().extra_repr() + (", gelu=tanh" if self.gelu else "")


def prepare_cpu_inference(model: GPT) -> GPT:
    """Make a frozen model fast to decode on CPU, in place (a no-op off the CPU): float linear layers
    become CPULinear; each MLP's GELU folds into its first matmul (the kernel applies it as it stores
    the output); and where gptlab's kernels run and every block fits them (GPT-2's pre-LayerNorm
    blocks, float32 or int8 linears), `model.block_tensors` lets a decode step run all blocks in one
    kernel call instead of a Python loop (~2 ms less per GPT-2 124M step)."""
    if model.transformer.wte.weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return model
    _replace_linears(model, lambda linear: CPULinear.from_linear(linear) if type(linear) is nn.Linear else linear)
    for module in model.modules():
        if (isinstance(module, MLP) and isinstance(module.c_fc, (CPULinear, Int8Linear))
                and isinstance(module.act, nn.GELU) and module.act.approximate == "tanh"):
            module.c_fc.gelu, module.act = True, nn.Identity()
    model.block_tensors = _block_tensors(model)
    return model


def _block_tensors(model: GPT) -> list[torch.Tensor] | None:
    """The 16 tensors per block that kernels' decode_blocks takes (see csrc/cpu_decode.cpp), or None."""
    if (kernels.cpu_kernels() is None or model.config.norm_position != "pre"
            or model.transformer.wte.weight.dtype != torch.float32):
        return None
    empty = torch.empty(0)
    tensors = []
    for block in model.transformer.h:
        linears = (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj)
        if not all(isinstance(linear, (CPULinear, Int8Linear)) and linear.gelu == (linear is block.mlp.c_fc)
                   for linear in linears) or not isinstance(block.mlp.act, nn.Identity) or block.attn.head_dim % 16:
            return None  # e.g. LoRA layers, a GELU left unfolded
        per_linear = [linear.panel_tensors() for linear in linears]
        if None in per_linear:
            return None  # int8 through fbgemm: no panels
        panels = [[empty if t is None else t for t in group] for group in per_linear]
        norms = [[empty if t is None else t.detach() for t in (ln.weight, ln.bias)] for ln in (block.ln_1, block.ln_2)]
        tensors += [*norms[0], *panels[0], *panels[1], *norms[1], *panels[2], *panels[3]]
    return tensors


def _replace_linears(model: nn.Module, make) -> None:
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, make(child))


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
    """A frozen int8 replacement for `nn.Linear` (inference only, CPU), one scale per output channel.

    With gptlab's kernels (`kernels.cpu_kernels`): weight-only int8, activations stay float32; up to
    PANEL_MAX_ROWS rows the panel kernel widens the int8 weights in registers as it streams them (a
    quarter of float32's bytes), more rows multiply by the dequantized weight. Without: fbgemm's dynamic
    int8 matmul (activations quantized to 8 bits per call, int32 accumulation).
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach().float().cpu().contiguous()
        bias = None if linear.bias is None else linear.bias.detach().float().cpu()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.gelu = getattr(linear, "gelu", False)  # a CPULinear with its MLP's GELU folded in keeps it
        self.bias = bias
        kernel = kernels.cpu_kernels()
        if kernel is not None:
            self._panels, self._scales = kernel.pack_int8(weight)
            self._panel_bias = None if bias is None else F.pad(bias, (0, self._scales.numel() - self.out_features))
            return
        self._panels = None
        scales = (weight.abs().amax(dim=1) / 127).clamp(min=1e-12).double()
        zero_points = torch.zeros_like(scales, dtype=torch.long)
        with warnings.catch_warnings():
            # quantized tensors are deprecated for a later PyTorch; pyproject pins torch <= 2.13, where
            # fbgemm's prepacked int8 matmul is still the fastest library int8 path on x86 CPUs
            warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
            qweight = torch.quantize_per_channel(weight, scales, zero_points, 0, torch.qint8)
        self._packed = torch.ops.quantized.linear_prepack(qweight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if self._panels is None:
            # .default: the overload packet would first search the arguments for script objects, every call
            y = torch.ops.quantized.linear_dynamic.default(x, self._packed, _REDUCE_RANGE)
        elif x.numel() // x.size(-1) <= PANEL_MAX_ROWS:
            return kernels.cpu_kernels().linear.default(x, *self.panel_tensors(), self.out_features, self.gelu)
        else:
            y = F.linear(x, self.dequantized_weight(), self.bias)
        return F.gelu(y, approximate="tanh") if self.gelu else y

    def panel_tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
        """The kernel's (int8 panels, scales, padded bias) of this layer; None on the fbgemm path."""
        return None if self._panels is None else (self._panels, self._scales, self._panel_bias)

    def dequantized_weight(self) -> torch.Tensor:
        """The (out, in) float32 matrix the int8 panels stand for (made on each call, not kept)."""
        panels, k = self._panels.size(0), self.in_features
        weight = self._panels.float() * self._scales.view(panels, 1, -1)  # (panels, in, 48)
        return weight.transpose(1, 2).reshape(-1, k)[: self.out_features]

    def extra_repr(self) -> str:
        kind = "weight-only int8" if self._panels is not None else "int8 (fbgemm)"
        return f"in_features={self.in_features}, out_features={self.out_features}, {kind}"


def quantize_int8(model: GPT) -> GPT:
    """Replace the model's linear layers by Int8Linear, in place; returns the model (CPU only)."""
    if model.transformer.wte.weight.device.type != "cpu":
        raise ValueError("int8 quantization runs on CPU only (fbgemm); use bf16 weights on GPU")
    model.eval()
    _replace_linears(model, Int8Linear)
    return model
