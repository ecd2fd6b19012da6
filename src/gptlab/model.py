"""The GPT model: one readable file of plain PyTorch.

Parameter names follow Hugging Face's GPT-2 (`transformer.h.0.attn.c_attn.weight`, ...) so that
checkpoints convert with nothing more than a transpose of the Conv1D weights (see `gptlab.hf`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from gptlab.config import GPTConfig

IGNORE_INDEX = -100  # target value that contributes no loss (padding, masked prompt tokens)
CE_CHUNK_ELEMENTS = 1 << 24  # logits computed at once by the loss: 64 MB in fp32, whatever the batch
# ... and at most this many rows: with a small vocabulary a chunk's logits then stay in cache between the
# passes over them (tiny preset, 4096 x 4096 bf16 logits: 37 ms per step in 512-row chunks, 67 ms in one)
CE_CHUNK_ROWS = 512


class KVCache:
    """Preallocated keys and values of every layer for `batch_size` rows of up to `max_len` tokens.

    Row r holds one sequence from position 0. A cached forward pass writes the new tokens' keys and
    values at their positions (no per-step concatenation) and attends to the row's positions
    0..current. Two kinds of pass cover generation (see `GPT.forward_cached`):
    - prefill: the rows start empty, so the new tokens attend only to each other (causal);
      right padding is harmless because padded tokens come after the real ones;
    - decode: new tokens of contiguous rows (a slice), each row at its own position, attending to the
      cached prefix through a length mask (rows at different positions batch together).
    """

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> None:
        self.max_len = max_len or config.block_size
        if self.max_len > config.block_size:
            raise ValueError(f"cache length {self.max_len} exceeds the context length {config.block_size}")
        head_dim = config.n_embd // config.n_head
        shape = (config.n_layer, batch_size, config.n_head, self.max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.plan(slice(0, 0), [], 1, prefill=True)

    @property
    def batch_size(self) -> int:
        return self.k.size(1)

    def plan(self, rows: torch.Tensor | slice, starts: list[int], new_tokens: int, prefill: bool) -> torch.Tensor:
        """Prepare one forward pass over `rows` (any rows for prefill, a slice for decode) whose row i
        gets `new_tokens` tokens from position starts[i]; returns their (B, T) positions.
        Index tensors and the mask are built here once and shared by all layers; `rows`, `prefill` and
        `positions` describe the pass to whoever runs it (the blocks, or the model's decode_step)."""
        device = self.k.device
        self.rows, self.prefill = rows, prefill
        self._length = max(starts, default=0) + new_tokens
        if self._length > self.max_len:
            raise ValueError(f"position {self._length - 1} is beyond the cache length {self.max_len}")
        start_tensor = torch.tensor(starts, device=device)[:, None]
        self.positions = positions = start_tensor + torch.arange(new_tokens, device=device)
        # all rows at the same position (batch 1, prefill, beams): plain slice writes, no mask
        self._start = starts[0] if starts and min(starts) == max(starts) else None
        self._write_rows = rows
        if self._start is None or not isinstance(rows, slice):
            row_index = torch.arange(rows.start, rows.stop, device=device) if isinstance(rows, slice) else rows
            self._write_rows = row_index[:, None]
            self._positions = positions
        self._mask = None
        if not prefill and (new_tokens > 1 or self._start is None):  # mask each token's future
            keys = torch.arange(self._length, device=device)
            self._mask = (keys <= positions[:, :, None])[:, None]  # (B, 1, T, L)
        return positions

    def reorder(self, rows: torch.Tensor, length: int) -> None:
        """Row i takes the first `length` cached positions of row rows[i] (beam search)."""
        self.k[:, :, :, :length] = self.k[:, rows, :, :length]
        self.v[:, :, :, :length] = self.v[:, rows, :, :length]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store the new keys/values (B, H, T, D) of `layer`, then attend from q over the rows' cache."""
        k_cache, v_cache = self.k[layer], self.v[layer]
        if isinstance(self._write_rows, slice):
            end = self._start + k.size(2)
            k_cache[self._write_rows, :, self._start: end] = k
            v_cache[self._write_rows, :, self._start: end] = v
        else:
            k_cache[self._write_rows, :, self._positions] = k.transpose(1, 2)
            v_cache[self._write_rows, :, self._positions] = v.transpose(1, 2)
        if self.prefill:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        keys, values = k_cache[self.rows, :, : self._length], v_cache[self.rows, :, : self._length]
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=self._mask)


def rotary_tables(block_size: int, head_dim: int, base: float = 10000.0) -> torch.Tensor:
    """cos and sin (2, block_size, head_dim / 2) of rotary position embeddings (RoFormer, Su et al. 2021):
    pair i of a head's channels turns by position x base^(-2i / head_dim)."""
    freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.arange(block_size, dtype=torch.float32)[:, None] * freq
    return torch.stack([angles.cos(), angles.sin()])


def rotate(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Queries or keys (B, H, T, D) turned by their positions' rope (2, T, D/2), or (2, B, T, D/2) when each
    row has its own positions (a cached decode step): relative positions then show in q . k."""
    cos, sin = (rope[:, :, None] if rope.dim() == 4 else rope).unbind(0)
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention written out (what SDPA computes without dropout): (output, weights (B, H, T, T))."""
    T = q.size(-2)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))
    future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
    weights = scores.masked_fill(future, float("-inf")).softmax(dim=-1)
    return weights @ v, weights


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.layer_idx = layer_idx  # which layer of a KVCache this attention reads and writes
        self.n_head = config.n_head
        self.head_dim = config.n_embd // config.n_head
        self.dropout = config.dropout
        self.qk_norm = config.qk_norm
        # one matmul for queries, keys and values: fewer kernel launches, better cache use
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        # interpretability (gptlab.interpret): attend through explicit_attention and keep its weights in
        # self.weights (B, n_head, T, T). Off by default: the fast path below never materialises them
        self.keep_weights = False
        self.weights: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, rope: torch.Tensor | None = None,
                ) -> torch.Tensor:
        B, T, C = x.shape
        # (B, T, 3C) -> three (B, n_head, T, head_dim) views
        q, k, v = self.c_attn(x).view(B, T, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if self.qk_norm:  # unit-RMS queries and keys bound the attention logits: higher learning rates stay stable
            q, k = F.rms_norm(q, (self.head_dim,)), F.rms_norm(k, (self.head_dim,))
        if rope is not None:
            q, k = rotate(q, rope), rotate(k, rope)
        if cache is not None:
            y = cache.attend(self.layer_idx, q, k, v)
        elif self.keep_weights:
            y, self.weights = explicit_attention(q, k, v)
        else:
            # SDPA picks the fastest kernel for the device (flash / memory-efficient / fused CPU)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                               dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class ReLUSquared(nn.Module):
    """relu(x)^2 (So et al. 2021, "Primer"): as cheap as ReLU, learns faster than GELU in small GPTs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x).square()


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        # GPT-2 uses the tanh approximation of GELU; matching it keeps HF parity exact. A module, so that
        # CPU inference can fold it into c_fc's matmul (gptlab.cpu.prepare_inference)
        self.act = nn.GELU(approximate="tanh") if config.activation == "gelu" else ReLUSquared()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.pre_norm = config.norm_position == "pre"
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, rope: torch.Tensor | None = None,
                ) -> torch.Tensor:
        if self.pre_norm:  # GPT-2: normalise the input of each sub-layer
            x = x + self.attn(self.ln_1(x), cache, rope)
            return x + self.mlp(self.ln_2(x))
        x = self.ln_1(x + self.attn(x, cache, rope))  # GPT-1: normalise after each residual sum
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
        elif config.pos_encoding == "sinusoidal":
            self.register_buffer("sinusoid", sinusoidal_positions(config.block_size, config.n_embd),
                                 persistent=False)
        else:  # rotary: positions enter each attention's queries and keys, not the residual stream
            self.register_buffer("rope", rotary_tables(config.block_size, config.n_embd // config.n_head),
                                 persistent=False)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight  # weight tying (GPT-2): one matrix, two roles
        # recompute each block's activations in backward instead of keeping them (--activation-checkpointing)
        self.activation_checkpointing = False
        # optional replacement of the blocks in a cached pass, e.g. gptlab.cpu's fused CPU decode step:
        # decode_step(x, cache) gets the embeddings (B, T, C) of the pass cache.plan has described and
        # returns the last block's output, or None to leave the pass to the blocks
        self.decode_step: Callable[[torch.Tensor, KVCache], torch.Tensor | None] | None = None
        self.apply(self._init_weights)
        # GPT-2: scale the residual projections so the residual stream's variance stays put with depth
        for name, param in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        if not config.tie_embeddings:  # an untied head starts at zero: every token equally likely (modded-nanoGPT)
            nn.init.zeros_(self.lm_head.weight)

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

    def position_embedding(self, positions: torch.Tensor) -> torch.Tensor | float:
        """What the residual stream adds for `positions`: nothing with rotary positions (see `rope`)."""
        if self.config.pos_encoding == "learned":
            return self.transformer.wpe(positions)
        if self.config.pos_encoding == "sinusoidal":
            return self.sinusoid[positions]
        return 0.0

    def hidden_states(self, idx: torch.Tensor, positions: torch.Tensor | None = None,
                      cache: KVCache | None = None, embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Final-layer hidden states (B, T, C) for token ids (B, T) at `positions` (default 0..T-1).

        embeds: (B, T, C) input embeddings used instead of looking up idx, the one seam for inputs that are
        not tokens: gptlab.vision splices image features in at an image placeholder (LLaVA's design)."""
        T = idx.size(1)
        if self.config.block_size < T:
            raise ValueError(f"sequence of {T} tokens exceeds the context length {self.config.block_size}")
        if positions is None:
            positions = torch.arange(T, device=idx.device)
        tokens = self.transformer.wte(idx) if embeds is None else embeds
        x = self.transformer.drop(tokens + self.position_embedding(positions))
        if cache is not None and self.decode_step is not None and (y := self.decode_step(x, cache)) is not None:
            return self.transformer.ln_f(y)
        # rotary: (2, T, D/2) tables for shared positions, (2, B, T, D/2) for per-row ones
        rope = self.rope[:, positions] if self.config.pos_encoding == "rotary" else None
        for block in self.transformer.h:
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, cache, rope, use_reentrant=False)  # keeps only the block's input
            else:
                x = block(x, cache, rope)
        return self.transformer.ln_f(x)

    def forward_cached(self, idx: torch.Tensor, cache: KVCache, rows: torch.Tensor | slice, starts: list[int],
                       prefill: bool, last: torch.Tensor | None = None, every: bool = False,
                       embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, vocab) of one token per row, reading and extending `cache` (see KVCache).

        idx: (B, T) new tokens; rows: their cache rows; starts: each row's first new position;
        prefill: the rows start empty; last: (B,) index in 0..T-1 of the token whose logits are
        wanted (default: the last); embeds: input embeddings instead of idx's (see hidden_states).
        Only those B positions go through the LM head, the largest matmul.
        every: the logits (B, T, vocab) of every new token instead (speculative decoding checks them all).
        """
        positions = cache.plan(rows, starts, idx.size(1), prefill)
        x = self.hidden_states(idx, positions, cache, embeds)
        if every:
            return self.lm_head(x)
        x = x[:, -1] if last is None else x[torch.arange(x.size(0), device=x.device), last]
        return self.lm_head(x)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, embeds: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Without targets: (logits (B, T, vocab), None). With targets (-100 = ignore): (None, mean
        cross-entropy), computed chunk by chunk so the (B*T, vocab) logits never exist at once.
        embeds: input embeddings instead of idx's (see hidden_states)."""
        x = self.hidden_states(idx, embeds=embeds)
        if targets is None:
            return self.lm_head(x), None
        if not isinstance(self.lm_head, nn.Linear):  # int8 weights (gptlab.cpu): no matrix to chunk over
            logits = self.lm_head(x).flatten(0, 1).float()
            return None, F.cross_entropy(logits, targets.flatten(), ignore_index=IGNORE_INDEX)
        hidden, targets = x.flatten(0, 1), targets.flatten()
        # only positions with a target go through the LM head, the largest matmul of a small model: fine-tuning
        # masks its prompts (a VQA example's ~40 positions train 2-5 answer tokens), pretraining masks none
        counted = targets != IGNORE_INDEX
        if not counted.all():
            hidden, targets = hidden[counted], targets[counted]
        return None, linear_cross_entropy(hidden, self.lm_head.weight, targets)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk_size: int | None = None) -> torch.Tensor:
    """`F.cross_entropy(hidden @ weight.T, targets, ignore_index=-100)` for hidden (N, C), weight (V, C),
    without the (N, V) logits: at most `chunk_size` rows of logits (CE_CHUNK_ELEMENTS, CE_CHUNK_ROWS by default) exist
    at a time, and their gradients are computed on the spot. This is what keeps a 50k-token vocabulary
    cheap: the full fp32 logits, their softmax and its gradient would be the largest tensors of a step."""
    chunk_size = chunk_size or max(1, min(CE_CHUNK_ROWS, CE_CHUNK_ELEMENTS // weight.size(0)))
    if torch.is_autocast_enabled(hidden.device.type):  # do what autocast does for the matmuls, explicitly
        dtype = torch.get_autocast_dtype(hidden.device.type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    with torch.autocast(hidden.device.type, enabled=False):
        if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
            return _LinearCrossEntropy.apply(hidden, weight, targets, chunk_size)
        return _chunked_cross_entropy(hidden, weight, targets, chunk_size, False, False)[0]


class _LinearCrossEntropy(torch.autograd.Function):
    """Forward computes the loss and both gradients chunk by chunk; backward only scales them."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int,
                ) -> torch.Tensor:
        loss, grad_hidden, grad_weight = _chunked_cross_entropy(hidden, weight, targets, chunk_size,
                                                                *ctx.needs_input_grad[:2])
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_hidden, grad_weight = ctx.saved_tensors
        return (None if grad_hidden is None else grad_hidden * grad_loss.to(grad_hidden.dtype),
                None if grad_weight is None else grad_weight * grad_loss.to(grad_weight.dtype), None, None)


def _chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int,
                           want_grad_hidden: bool, want_grad_weight: bool,
                           ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    valid = targets != IGNORE_INDEX
    scale = valid.sum().reciprocal()  # mean over the counted tokens (nan if none), like F.cross_entropy
    safe_targets = targets.masked_fill(~valid, 0)
    loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if want_grad_hidden else None
    # the weight gradient sums over all chunks: accumulate in fp32 even when the matmuls run in bf16
    grad_weight = torch.zeros_like(weight, dtype=torch.float32) if want_grad_weight else None
    # two (chunk, vocab) buffers serve every chunk: fresh multi-MB allocations would page-fault each time
    rows_per_chunk = min(chunk_size, hidden.size(0))
    logits_buffer = hidden.new_empty(rows_per_chunk, weight.size(0))
    log_probs_buffer = hidden.new_empty(rows_per_chunk, weight.size(0), dtype=torch.float32)
    for start in range(0, hidden.size(0), chunk_size):
        rows = slice(start, start + chunk_size)
        h, t, v = hidden[rows], safe_targets[rows], valid[rows]
        logits = torch.mm(h, weight.t(), out=logits_buffer[: len(h)])
        log_probs = torch.log_softmax(logits, dim=1, dtype=torch.float32, out=log_probs_buffer[: len(h)])
        loss -= log_probs.gather(1, t[:, None]).squeeze(1).masked_fill(~v, 0.0).sum()
        if grad_hidden is None and grad_weight is None:
            continue
        # d(loss)/d(logits) = (softmax - one_hot(target)) / n_valid on counted rows, 0 on ignored ones;
        # the row factor is applied to the small (rows, C) operands instead of the (rows, V) matrix
        grad_logits = log_probs.exp_()
        grad_logits[torch.arange(len(t), device=t.device), t] -= 1.0
        if grad_logits.dtype != hidden.dtype:  # bf16 matmuls: reuse the logits buffer
            grad_logits = logits.copy_(grad_logits)
        row_factor = (v * scale).to(hidden.dtype)[:, None]
        if grad_hidden is not None:
            torch.mm(grad_logits, weight, out=grad_hidden[rows])
            grad_hidden[rows] *= row_factor
        if grad_weight is not None:
            if grad_weight.dtype == hidden.dtype:
                grad_weight.addmm_(grad_logits.t(), h * row_factor)
            else:
                grad_weight += grad_logits.t() @ (h * row_factor)
    if grad_weight is not None:
        grad_weight = grad_weight.to(weight.dtype)
    return loss * scale, grad_hidden, grad_weight
