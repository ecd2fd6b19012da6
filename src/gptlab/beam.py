"""Beam search: the most likely continuation rather than a sample (`gptlab generate --num-beams N`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from gptlab.config import ConfigError
from gptlab.errors import GptlabError, check_context
from gptlab.model import GPT, KVCache


@torch.inference_mode()
def beam_search(model: GPT, prompt_ids: list[int], num_beams: int, max_new_tokens: int,
                length_penalty: float = 1.0, eos_token_ids: Sequence[int] = ()) -> list[int]:
    """The most likely continuation by beam search (Hugging Face's semantics, `early_stopping=False`).

    Keeps `num_beams` running hypotheses; a hypothesis ends at an EOS token or at max_new_tokens and
    is scored sum(logprobs) / length ** length_penalty (> 0 favours longer outputs). Returns the
    best finished hypothesis' new tokens (a final EOS token included).
    """
    if num_beams < 1:
        raise ConfigError(f"num_beams must be >= 1, got {num_beams}")
    if not prompt_ids:
        raise GptlabError("the prompt is empty")
    check_context(len(prompt_ids), max_new_tokens, model.config.block_size)
    device = model.transformer.wte.weight.device
    model.eval()
    cache = KVCache(model.config, num_beams, len(prompt_ids) + max_new_tokens, device,
                    model.transformer.wte.weight.dtype)
    prompt = torch.tensor([prompt_ids] * num_beams, device=device)
    logits = model.forward_cached(prompt, cache, slice(0, num_beams), [0] * num_beams, prefill=True)
    eos = set(eos_token_ids)
    beams = [[] for _ in range(num_beams)]
    scores = torch.full((num_beams,), -1e9, device=device)
    scores[0] = 0.0  # all beams start identical: expand only the first
    finished: list[tuple[float, list[int]]] = []  # (score, tokens), the best num_beams kept
    for step in range(max_new_tokens):
        length = step + 1
        candidates = (logits.float().log_softmax(-1) + scores[:, None]).view(-1)
        top_scores, top_ids = candidates.topk(2 * num_beams)
        vocab = logits.size(-1)
        next_beams, next_scores, parents = [], [], []
        last_step = length == max_new_tokens
        for rank, (cand_score, flat) in enumerate(zip(top_scores.tolist(), top_ids.tolist(), strict=True)):
            parent, token = divmod(flat, vocab)
            if token in eos or last_step:
                if rank < num_beams:  # only the top num_beams candidates may finish (as in HF)
                    finished.append((cand_score / length ** length_penalty, beams[parent] + [token]))
            elif len(next_beams) < num_beams:
                next_beams.append(beams[parent] + [token])
                next_scores.append(cand_score)
                parents.append(parent)
        finished = sorted(finished, key=lambda f: -f[0])[:num_beams]
        if last_step or len(next_beams) < num_beams:
            break
        # HF's early-stop heuristic: stop once the best running beam, were it to end now, cannot
        # beat the worst of num_beams finished hypotheses
        if len(finished) == num_beams and next_scores[0] / length ** length_penalty <= finished[-1][0]:
            break
        beams = next_beams
        scores = torch.tensor(next_scores, device=device)
        cache.reorder(torch.tensor(parents, device=device), len(prompt_ids) + step)
        idx = torch.tensor([b[-1] for b in beams], device=device)[:, None]
        logits = model.forward_cached(idx, cache, slice(0, num_beams), [len(prompt_ids) + step] * num_beams,
                                      prefill=False)
    return max(finished, key=lambda f: f[0])[1]
