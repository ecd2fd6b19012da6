"""Log-likelihood scoring shared by the audits: many continuations of one prefix, batched."""

from __future__ import annotations

import torch

from gptlab.model import GPT


@torch.no_grad()
def continuation_logprobs(model: GPT, prefix: list[int], continuations: list[list[int]], batch: int = 256,
                          ) -> torch.Tensor:
    """(N,) summed log-probability of each continuation after `prefix` (continuations may differ in length)."""
    device = model.transformer.wte.weight.device
    scores = []
    model.eval()
    for start in range(0, len(continuations), batch):
        chunk = continuations[start: start + batch]
        width = len(prefix) + max(len(c) for c in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width - 1, dtype=torch.bool)
        for row, c in enumerate(chunk):
            ids[row, : len(prefix) + len(c)] = torch.tensor(prefix + c)
            mask[row, len(prefix) - 1: len(prefix) + len(c) - 1] = True
        logits, _ = model(ids.to(device))
        logp = logits[:, :-1].float().log_softmax(-1).gather(2, ids[:, 1:, None].to(device))[..., 0]
        scores.append((logp * mask.to(device)).sum(-1).cpu())
    return torch.cat(scores)
