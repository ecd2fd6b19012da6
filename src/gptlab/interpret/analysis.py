"""What a GPT computes on one prompt, as tensors: the Python API behind `gptlab inspect`.

- `token_stats`: each token's surprisal and the entropy of the next-token distribution (bits);
- `run_with_internals`: logits, the residual stream after the embedding and after every block, and the
  attention weights of every layer and head (the model's explicit attention path, `keep_weights`);
- `logit_lens` (nostalgebraist 2020): each layer's residual stream read through the final LayerNorm and the
  unembedding, top-k tokens per position;
- `integrated_gradients`: attribution of the target's log-probability to each input token (Captum's
  LayerIntegratedGradients over the token embeddings);
- `activation_patching`: restore one layer x position of the clean run inside the corrupted run and
  measure the target's log-probability;
- `induction_scores` (Olsson et al. 2022): on a repeated random sequence, each head's mean attention from
  a token to the token after its previous occurrence.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from gptlab.errors import GptlabError, require_package
from gptlab.model import GPT

LN2 = math.log(2)


class InspectError(GptlabError):
    """An inspection that cannot run on the input given (too long, mismatched lengths, ...)."""


@dataclass
class Internals:
    logits: torch.Tensor  # (T, vocab)
    residuals: torch.Tensor  # (n_layer + 1, T, C): after the embedding, then after each block
    attention: torch.Tensor  # (n_layer, n_head, T, T)


@contextlib.contextmanager
def attention_kept(model: GPT) -> Iterator[list]:
    """Every attention layer takes its explicit path and keeps its weights while the block runs."""
    layers = [block.attn for block in model.transformer.h]
    for attn in layers:
        attn.keep_weights = True
    try:
        yield layers
    finally:
        for attn in layers:
            attn.keep_weights, attn.weights = False, None


def _device(model: GPT) -> torch.device:
    return model.transformer.wte.weight.device


def check_length(model: GPT, n_tokens: int) -> None:
    if n_tokens < 1:
        raise InspectError("nothing to inspect: the prompt is empty")
    if n_tokens > model.config.block_size:
        raise InspectError(f"{n_tokens} tokens exceed the model's context of {model.config.block_size}")


@torch.no_grad()
def run_with_internals(model: GPT, ids: list[int]) -> Internals:
    """One forward pass over `ids` that keeps the residual stream and the attention weights."""
    check_length(model, len(ids))
    model.eval()
    streams: list[torch.Tensor] = []
    hooks = [model.transformer.h[0].register_forward_pre_hook(lambda _m, args: streams.append(args[0][0]))]
    hooks += [block.register_forward_hook(lambda _m, _a, out: streams.append(out[0]))
              for block in model.transformer.h]
    try:
        with attention_kept(model) as layers:
            logits, _ = model(torch.tensor([ids], device=_device(model)))
            attention = torch.stack([attn.weights[0] for attn in layers])
    finally:
        for hook in hooks:
            hook.remove()
    return Internals(logits[0].float(), torch.stack(streams).float(), attention.float())


def token_stats(logits: torch.Tensor, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(surprisal, entropy), both (T,) in bits: surprisal[t] = -log2 p(ids[t] | ids[:t]) (nan for the first
    token, which has no context); entropy[t] of the distribution over the token after ids[t]."""
    logp = logits.float().log_softmax(-1)
    entropy = -(logp.exp() * logp).sum(-1) / LN2
    surprisal = torch.full((len(ids),), float("nan"))
    if len(ids) > 1:
        targets = torch.tensor(ids[1:], device=logp.device)
        surprisal[1:] = -logp[:-1].gather(1, targets[:, None])[:, 0].cpu() / LN2
    return surprisal, entropy.cpu()


@torch.no_grad()
def logit_lens(model: GPT, residuals: torch.Tensor, k: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k next tokens read from every residual stream (n_layer + 1, T, C) through the final LayerNorm
    and the unembedding: (ids, probabilities), each (n_layer + 1, T, k). Its last layer is the model's
    own prediction."""
    logits = model.lm_head(model.transformer.ln_f(residuals.to(_device(model))))
    probs, top = logits.float().softmax(-1).topk(k, dim=-1)
    return top.cpu(), probs.cpu()


def target_logprob(model: GPT, ids: torch.Tensor, n_prompt: int) -> torch.Tensor:
    """(B,) summed log-probability of tokens n_prompt.. of each row given the tokens before them."""
    logits, _ = model(ids)
    logp = logits[:, n_prompt - 1: -1].float().log_softmax(-1)
    return logp.gather(2, ids[:, n_prompt:, None])[..., 0].sum(-1)


def integrated_gradients(model: GPT, prompt: list[int], target: list[int], baseline_id: int,
                         steps: int = 64) -> tuple[torch.Tensor, float, float]:
    """Integrated gradients of the target's log-probability w.r.t. each prompt token's embedding, summed
    over the embedding: (attributions (len(prompt),), log-prob at the input, log-prob at the baseline).
    The baseline puts `baseline_id` at every prompt position (the target stays), so by completeness the
    attributions sum to the difference of the two log-probabilities (up to the integral's error)."""
    require_package("captum", "pip install 'gptlab[inspect]'", "integrated gradients")
    from captum.attr import LayerIntegratedGradients

    check_length(model, len(prompt) + len(target))
    if not prompt or not target:
        raise InspectError("integrated gradients needs a prompt and a target")
    model.eval()
    device = _device(model)
    inputs = torch.tensor([prompt + target], device=device)
    baseline = torch.tensor([[baseline_id] * len(prompt) + target], device=device)

    def forward(batch: torch.Tensor) -> torch.Tensor:
        return target_logprob(model, batch, len(prompt))

    ig = LayerIntegratedGradients(forward, model.transformer.wte)
    attributions = ig.attribute(inputs, baselines=baseline, n_steps=steps, internal_batch_size=16)
    model.zero_grad(set_to_none=True)  # the backward passes also filled the weights' gradients
    with torch.no_grad():
        at_input, at_baseline = forward(inputs).item(), forward(baseline).item()
    return attributions[0, : len(prompt)].sum(-1).detach().float().cpu(), at_input, at_baseline


@torch.no_grad()
def activation_patching(model: GPT, clean: list[int], corrupt: list[int], target: list[int],
                        ) -> tuple[torch.Tensor, float, float]:
    """Restore the clean residual stream after block l at position p inside the corrupted run, for every
    l and p: (target log-probabilities (n_layer, T), clean log-prob, corrupted log-prob), T = len(clean)."""
    if len(clean) != len(corrupt):
        raise InspectError(f"the corrupted prompt has {len(corrupt)} tokens, the prompt {len(clean)}: activation "
                           "patching needs the same number of tokens (change words, not their count)")
    if not target:
        raise InspectError("activation patching needs a target")
    check_length(model, len(clean) + len(target))
    model.eval()
    device = _device(model)
    T = len(clean)
    clean_ids = torch.tensor([clean + target], device=device)
    corrupt_ids = torch.tensor([corrupt + target], device=device)
    saved: list[torch.Tensor] = []
    hooks = [block.register_forward_hook(lambda _m, _a, out: saved.append(out)) for block in model.transformer.h]
    try:
        clean_lp = target_logprob(model, clean_ids, T).item()
    finally:
        for hook in hooks:
            hook.remove()
    corrupt_lp = target_logprob(model, corrupt_ids, T).item()
    rows = torch.arange(T, device=device)
    effects = torch.empty(len(model.transformer.h), T)
    for layer, block in enumerate(model.transformer.h):
        def restore(_m, _a, out: torch.Tensor, layer: int = layer) -> torch.Tensor:
            out = out.clone()
            out[rows, rows] = saved[layer][0, :T]  # row p restores position p
            return out
        hook = block.register_forward_hook(restore)
        try:
            effects[layer] = target_logprob(model, corrupt_ids.expand(T, -1), T).cpu()
        finally:
            hook.remove()
    return effects, clean_lp, corrupt_lp


@torch.no_grad()
def induction_scores(model: GPT, vocab: list[int] | None = None, length: int | None = None, batch: int = 8,
                     seed: int = 0) -> torch.Tensor:
    """(n_layer, n_head): each head's mean attention, over `batch` random sequences of `length` tokens
    (from `vocab`, default every token) each repeated once, from every token of the repeat to the token
    that followed its previous occurrence."""
    length = length or min(32, model.config.block_size // 2)
    if not 2 <= length <= model.config.block_size // 2:
        raise InspectError(f"induction sequences must have 2..{model.config.block_size // 2} tokens, got {length}")
    generator = torch.Generator().manual_seed(seed)
    pool = torch.tensor(vocab) if vocab is not None else torch.arange(model.config.vocab_size)
    half = pool[torch.randint(len(pool), (batch, length), generator=generator)]
    ids = torch.cat([half, half], dim=1).to(_device(model))
    model.eval()
    with attention_kept(model) as layers:
        model(ids)
        weights = torch.stack([attn.weights for attn in layers])  # (L, B, H, 2n, 2n)
    query = torch.arange(length, 2 * length)
    return weights[:, :, :, query, query - length + 1].float().mean(dim=(1, 3)).cpu()

