"""The GPT model: one readable file of plain PyTorch.

Parameter names follow Hugging Face's GPT-2 (`transformer.h.0.attn.c_attn.weight`, ...) so that
checkpoints convert with nothing more than a transpose of the Conv1D weights (see `gptlab.hf`).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptlab.config import GPTConfig


class KVCache:
    """Preallocated keys and values of every layer for `batch_size` rows of up to `max_len` tokens.

    Row r holds one sequence from position 0. A cached forward pass writes the new tokens' keys and
    values at their positions (no per-step concatenation) and attends to the row's positions
    0..current. Two kinds of pass cover generation (see `GPT.forward_cached`):
    - prefill: the rows start empty, so the new tokens attend only to each other (causal);
      right padding is harmless because padded tokens come after the real ones;
    - decode: one token per row for the contiguous rows 0..n-1, each at its own position, attending to
      the cached prefix through a length mask (rows at different positions batch together).
    """

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> None:
        self.max_len = max_len or config.block_size
        head_dim = config.n_embd // config.n_head
        shape = (config.n_layer, batch_size, config.n_head, self.max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self._rows: torch.Tensor | slice = slice(0, 0)
        self._row_index = torch.zeros(0, 1, dtype=torch.long)
        self._positions = torch.zeros(0, 1, dtype=torch.long)
        self._prefill = True
        self._length = 0
        self._mask: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.k.size(1)

    def plan(self, rows: torch.Tensor | slice, positions: torch.Tensor, prefill: bool) -> None:
        """Set up the index tensors and mask shared by all layers for one forward pass.

        rows: the cache rows of the batch (a slice for decode, any rows for prefill);
        positions: (B, T) position of every new token.
        """
        self._rows, self._positions, self._prefill = rows, positions, prefill
        if isinstance(rows, slice):
            rows = torch.arange(rows.start, rows.stop, device=positions.device)
        self._row_index = rows[:, None]  # broadcasts against positions (B, T)
        self._length = int(positions.max()) + 1
        if self._length > self.max_len:
            raise ValueError(f"position {self._length - 1} is beyond the cache length {self.max_len}")
        self._mask = None
        # decode with rows at different positions (or several new tokens): mask each token's future
        if not prefill and (positions.size(1) > 1 or bool((positions[:, -1] != self._length - 1).any())):
            keys = torch.arange(self._length, device=positions.device)
            self._mask = (keys <= positions[:, :, None])[:, None]  # (B, 1, T, L)

    def reorder(self, rows: torch.Tensor, length: int) -> None:
        """Row i takes the first `length` cached positions of row rows[i] (beam search)."""
        self.k[:, :, :, :length] = self.k[:, rows, :, :length]
        self.v[:, :, :, :length] = self.v[:, rows, :, :length]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store the new keys/values (B, H, T, D) of `layer`, then attend from q over the rows' cache."""
        k_cache, v_cache = self.k[layer], self.v[layer]
        k_cache[self._row_index, :, self._positions] = k.transpose(1, 2)
        v_cache[self._row_index, :, self._positions] = v.transpose(1, 2)
        if self._prefill:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        keys, values = k_cache[self._rows, :, : self._length], v_cache[self._rows, :, : self._length]
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=self._mask)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.layer_idx = layer_idx  # which layer of a KVCache this attention reads and writes
        self.n_head = config.n_head
        self.head_dim = config.n_embd // config.n_head
        self.dropout = config.dropout
        # one matmul for queries, keys and values: fewer kernel launches, better cache use
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in (q, k, v))
        if cache is not None:
            y = cache.attend(self.layer_idx, q, k, v)
        else:
            # SDPA picks the fastest kernel for the device (flash / memory-efficient / fused CPU)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                               dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # GPT-2 uses the tanh approximation of GELU; matching it keeps HF parity exact
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.pre_norm = config.norm_position == "pre"
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        if self.pre_norm:  # GPT-2: normalise the input of each sub-layer
            x = x + self.attn(self.ln_1(x), cache)
            return x + self.mlp(self.ln_2(x))
        x = self.ln_1(x + self.attn(x, cache))  # GPT-1: normalise after each residual sum
        return self.ln_2(x + self.mlp(x))


def sinusoidal_positions(block_size: int, n_embd: int) -> torch.Tensor:
    """The fixed position encoding of 'Attention Is All You Need'."""
    position = torch.arange(block_size, dtype=torch.float32).unsqueeze(1)
    freq = torch.exp(torch.arange(0, n_embd, 2, dtype=torch.float32) * (-math.log(10000.0) / n_embd))
    table = torch.zeros(block_size, n_embd)
    table[:, 0::2] = torch.sin(position * freq)
    table[:, 1::2] = torch.cos(position * freq[: n_embd // 2])
    return table


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList(Block(config, i) for i in range(config.n_layer)),
            # post-LN blocks already end normalised, so GPT-1 has no final LayerNorm
            ln_f=(nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
                  if config.norm_position == "pre" else nn.Identity()),
        ))
        if config.pos_encoding == "learned":
            self.transformer["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        else:
            self.register_buffer("sinusoid", sinusoidal_positions(config.block_size, config.n_embd),
                                 persistent=False)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying (GPT-2): one matrix, two roles
        self.apply(self._init_weights)
        # GPT-2: scale the residual projections so the residual stream's variance stays put with depth
        for name, param in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self) -> int:
        """Parameters counted once (the tied head shares the token embedding)."""
        return sum(p.numel() for p in self.parameters())

    def position_embedding(self, positions: torch.Tensor) -> torch.Tensor:
        if self.config.pos_encoding == "learned":
            return self.transformer.wpe(positions)
        return self.sinusoid[positions]

    def hidden_states(self, idx: torch.Tensor, positions: torch.Tensor | None = None,
                      cache: KVCache | None = None) -> torch.Tensor:
        """Final-layer hidden states (B, T, C) for token ids (B, T) at `positions` (default 0..T-1)."""
        T = idx.size(1)
        if self.config.block_size < T:
            raise ValueError(f"sequence of {T} tokens exceeds the context length {self.config.block_size}")
        if positions is None:
            positions = torch.arange(T, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.position_embedding(positions))
        for block in self.transformer.h:
            x = block(x, cache)
        return self.transformer.ln_f(x)

    def forward_cached(self, idx: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                       rows: torch.Tensor | slice, prefill: bool, last: torch.Tensor | None = None,
                       ) -> torch.Tensor:
        """Logits (B, vocab) of one token per row, reading and extending `cache` (see KVCache).

        idx, positions: (B, T) new tokens and their positions; rows: their cache rows; prefill: the
        rows start empty; last: (B,) index in 0..T-1 of the token whose logits are wanted (default:
        the last one). Only those B positions go through the LM head, the largest matmul of a step.
        """
        cache.plan(rows, positions, prefill)
        x = self.hidden_states(idx, positions, cache)
        x = x[:, -1] if last is None else x[torch.arange(x.size(0), device=x.device), last]
        return self.lm_head(x)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, vocab) and, given targets (-100 = ignore), the mean cross-entropy."""
        logits = self.lm_head(self.hidden_states(idx))
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        return logits, loss
