"""gptlab's CPU fast path for inference, behind one call: `prepare_inference(model, quantize=None)`.

The model (`gptlab.model`) stays plain PyTorch; this package makes a frozen model fast to decode on
CPU, in place:
- every nn.Linear becomes a `layers.CPULinear` (float32, the layout of the fastest matmul kernel) or,
  with quantize="int8", a `layers.Int8Linear` (weight-only int8, one scale per output channel; the
  tied LM head gets its own int8 copy, the float embedding table stays for lookups);
- each MLP's tanh GELU folds into its first matmul (`MLP.act` becomes nn.Identity; the kernel applies
  GELU as it stores the output);
- where a kernel variant runs and the blocks fit it, `model.decode_step` becomes a `decode.FusedDecode`:
  the hook `GPT.hidden_states` offers every cached pass to, which runs all blocks of a decode step in
  one kernel call.
The kernels (`kernels`: C++ built on first use, AVX2 or AVX-512 chosen at run time) are optional:
without them the same layers run PyTorch's kernels, with the same results.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from gptlab.cpu import kernels
from gptlab.cpu.decode import FusedDecode
from gptlab.cpu.layers import CPULinear, Int8Linear
from gptlab.model import GPT, MLP

__all__ = ["prepare_inference"]


def prepare_inference(model: GPT, quantize: str | None = None, kernel: str | None = "auto") -> GPT:
    """Make `model` fast to decode on CPU, in place (see above), and return it in eval mode; a model off
    the CPU is returned as it is. quantize: None (float32) or "int8". kernel: "auto"
    (`kernels.active_variant()`), a variant name ("avx2", "avx512"; refused if the CPU lacks its
    instructions) or None (PyTorch's kernels only). Calling it again on a prepared model changes nothing."""
    if quantize not in (None, "int8"):
        raise ValueError(f"quantize must be None or 'int8', got {quantize!r}")
    model.eval()
    if model.transformer.wte.weight.device.type != "cpu":
        if quantize:
            raise ValueError("int8 quantization runs on CPU only; use bf16 weights on GPU")
        return model
    variant = _variant(kernel)
    if quantize is None and variant is None and not torch.backends.mkldnn.is_available():
        return model  # neither gptlab's kernels nor oneDNN: plain nn.Linear is the fastest path
    if quantize == "int8":
        _replace_linears(model, lambda linear: Int8Linear(linear, variant))
    else:
        _replace_linears(model, lambda linear: CPULinear.from_linear(linear, variant)
                         if type(linear) is nn.Linear else linear)
    for module in model.modules():
        if (isinstance(module, MLP) and isinstance(module.c_fc, (CPULinear, Int8Linear))
                and isinstance(module.act, nn.GELU) and module.act.approximate == "tanh"):
            module.c_fc.gelu, module.act = True, nn.Identity()
    model.decode_step = FusedDecode.of(model)
    return model


def _variant(kernel: str | None) -> str | None:
    if kernel == "auto":
        return kernels.active_variant()
    if kernel is None:
        return None
    if kernel not in kernels.VARIANTS:
        raise ValueError(f"kernel must be 'auto', None or one of {', '.join(kernels.VARIANTS)}, got {kernel!r}")
    if missing := kernels.missing_features(kernel):
        raise ValueError(f"the {kernel} kernels cannot run on this CPU: it lacks {', '.join(missing)}")
    if kernels.load(kernel) is None:
        raise RuntimeError(f"the {kernel} kernels failed to build (see the warning)")
    return kernel


def _replace_linears(model: nn.Module, make) -> None:
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, make(child))
