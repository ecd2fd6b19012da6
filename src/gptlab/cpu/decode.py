"""The fused CPU decode step: every block of a decode pass in one kernel call (`decode_blocks`).

`FusedDecode` is what `gptlab.cpu.prepare_inference` installs as the model's `decode_step` hook (see
`gptlab.model.GPT.hidden_states`): for a cached pass of one new token per row over a slice of cache
rows, in inference, it runs `model.Block.forward` of every block in C++, so no Python runs per layer
(~2 ms of a 12-layer GPT-2 124M step); any other pass it leaves to the model (returns None).
The tensors each block hands the kernel are gathered by the names the kernel library's
`block_layout()` lists, in its order: the layout is defined once, next to the C++ that reads it.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from gptlab.cpu import kernels
from gptlab.cpu.layers import CPULinear, Int8Linear
from gptlab.model import GPT, KVCache

_LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


class FusedDecode:
    """The model's decode step through kernel variant `variant`'s decode_blocks."""

    def __init__(self, variant: str, block_tensors: list[torch.Tensor], n_head: int, eps: float) -> None:
        self.variant, self.block_tensors, self.n_head, self.eps = variant, block_tensors, n_head, eps

    @classmethod
    def of(cls, model: GPT) -> FusedDecode | None:
        """The fused step of a prepared model, through the kernel variant of its layers, or None where
        its blocks do not fit the kernel: GPT-2's pre-LayerNorm blocks (no rotary positions, no QK-norm), float32, every linear a
        CPULinear or Int8Linear of one variant (GELU folded into mlp.c_fc), head size a multiple of 16."""
        config = model.config
        variant = getattr(model.transformer.h[0].attn.c_attn, "variant", None)
        if (variant is None or config.norm_position != "pre" or config.pos_encoding == "rotary" or config.qk_norm
                or model.transformer.wte.weight.dtype != torch.float32
                or (config.n_embd // config.n_head) % 16):
            return None
        layout = kernels.load(variant).block_layout()
        empty = torch.empty(0)
        tensors = []
        for block in model.transformer.h:
            named = {}
            for name in ("ln_1", "ln_2"):
                norm = block.get_submodule(name)
                named[f"{name}.weight"], named[f"{name}.bias"] = norm.weight, norm.bias
            for name in _LINEARS:
                linear = block.get_submodule(name)
                if (not isinstance(linear, (CPULinear, Int8Linear)) or linear.variant != variant
                        or linear.gelu != (name == "mlp.c_fc")):
                    return None  # e.g. LoRA layers, a GELU left unfolded
                named[f"{name}.panels"], named[f"{name}.scales"], named[f"{name}.bias"] = linear.panel_tensors()
            if not isinstance(block.mlp.act, nn.Identity):
                return None
            tensors += [empty if named[name] is None else named[name].detach() for name in layout]
        return cls(variant, tensors, config.n_head, config.layer_norm_eps)

    def __call__(self, x: torch.Tensor, cache: KVCache) -> torch.Tensor | None:
        """The last block's output for embeddings x (B, 1, C) of the pass `cache` has planned, or None
        (a pass for the model's own blocks)."""
        if (cache.prefill or x.size(1) != 1 or not isinstance(cache.rows, slice) or torch.is_grad_enabled()
                or cache.k.dtype != torch.float32 or cache.k.device.type != "cpu"):
            return None
        out = kernels.load(self.variant).decode_blocks.default(
            x.view(x.size(0), -1), self.block_tensors, cache.k[:, cache.rows], cache.v[:, cache.rows],
            cache.positions[:, 0], self.n_head, self.eps)
        return out.view_as(x)
