"""Every view of one prompt at once: `inspect_text` returns an `Inspection` of tensors (the Python API of
`gptlab inspect`; `gptlab.interpret.report` writes it as HTML, PNGs and JSON)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from gptlab.interpret import analysis
from gptlab.model import GPT
from gptlab.tokenizer import Tokenizer


@dataclass
class Inspection:
    tokens: list[str]  # the text of each token: prompt, then target
    ids: list[int]
    n_prompt: int  # tokens[:n_prompt] are the prompt, the rest the target
    surprisal: torch.Tensor  # (T,) bits; nan for the first token
    entropy: torch.Tensor  # (T,) bits, of the distribution over the token after each one
    attention: torch.Tensor  # (n_layer, n_head, T, T)
    lens_ids: torch.Tensor  # (n_layer + 1, T, k): top-k next tokens read from each residual stream
    lens_probs: torch.Tensor  # (n_layer + 1, T, k)
    lens_tokens: list[list[list[str]]]  # the text of lens_ids
    attribution: torch.Tensor  # (n_prompt,) integrated gradients of the target's log-prob per prompt token
    target_logprob: float  # summed log-prob of the target given the prompt (nats)
    baseline_logprob: float  # ... given the baseline prompt (every token <|endoftext|>)
    induction: torch.Tensor  # (n_layer, n_head)
    patching: torch.Tensor | None = None  # (n_layer, n_prompt) target log-prob with one layer x position restored
    corrupt_tokens: list[str] = field(default_factory=list)
    corrupt_logprob: float | None = None


def inspect_text(model: GPT, tokenizer: Tokenizer, prompt: str, target: str | None = None,
                 corrupt: str | None = None, top_k: int = 5, ig_steps: int = 64) -> Inspection:
    """Inspect `prompt` followed by `target` (default: the model's most likely next token); with `corrupt`
    (a prompt of as many tokens), activation patching from the prompt into the corrupted prompt."""
    prompt_ids = tokenizer.encode(prompt)
    analysis.check_length(model, len(prompt_ids))
    if target:
        target_ids = tokenizer.encode(target)
    else:
        logits = analysis.run_with_internals(model, prompt_ids).logits
        target_ids = [int(logits[-1].argmax())]
    ids = prompt_ids + target_ids
    internals = analysis.run_with_internals(model, ids)
    surprisal, entropy = analysis.token_stats(internals.logits, ids)
    lens_ids, lens_probs = analysis.logit_lens(model, internals.residuals, k=top_k)
    attribution, target_lp, baseline_lp = analysis.integrated_gradients(
        model, prompt_ids, target_ids, tokenizer.eot_id, steps=ig_steps)
    inspection = Inspection(
        tokens=[tokenizer.decode([i]) for i in ids], ids=ids, n_prompt=len(prompt_ids), surprisal=surprisal,
        entropy=entropy, attention=internals.attention, lens_ids=lens_ids, lens_probs=lens_probs,
        lens_tokens=[[[tokenizer.decode([i]) for i in row] for row in layer] for layer in lens_ids.tolist()],
        attribution=attribution, target_logprob=target_lp, baseline_logprob=baseline_lp,
        induction=analysis.induction_scores(model, vocab=_plain_tokens(tokenizer)))
    if corrupt:
        corrupt_ids = tokenizer.encode(corrupt)
        inspection.patching, _, inspection.corrupt_logprob = analysis.activation_patching(
            model, prompt_ids, corrupt_ids, target_ids)
        inspection.corrupt_tokens = [tokenizer.decode([i]) for i in corrupt_ids]
    return inspection


def _plain_tokens(tokenizer: Tokenizer) -> list[int]:
    """Every token but <|endoftext|>: what the random sequences of the induction test are drawn from."""
    return [i for i in range(tokenizer.vocab_size) if i != tokenizer.eot_id]


def to_json(inspection: Inspection) -> dict:
    """The inspection as plain lists (nan -> None), what report.json and the HTML page hold."""
    def plain(value):
        if isinstance(value, torch.Tensor):
            return plain(value.tolist())
        if isinstance(value, list):
            return [plain(v) for v in value]
        if isinstance(value, float) and value != value:
            return None
        return round(value, 6) if isinstance(value, float) else value
    return {name: plain(value) for name, value in vars(inspection).items()}
