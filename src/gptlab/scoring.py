"""Log-likelihoods of given tokens, batched: the one scorer behind perplexity, multiple-choice tasks and the
lm-eval requests. A request is (tokens, first): score tokens[first:], each given every token before it.

Requests of different lengths share a forward pass right-padded (the causal mask keeps the padding out of
every real position), longest first so a batch holds similar lengths; only the scored positions go through
the LM head, in chunks, so the (tokens, vocab) log-probabilities of a long window never exist at once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from gptlab.errors import GptlabError
from gptlab.model import GPT

HEAD_ROWS = 1024  # scored positions per LM-head chunk: 1024 x 50257 fp32 = 200 MB at most


@dataclass
class Scored:
    logprobs: list[float]  # of tokens[first:], in order
    greedy: bool  # every scored token is the model's argmax (lm-eval's is_greedy)

    @property
    def total(self) -> float:
        return sum(self.logprobs)


@torch.inference_mode()
def score(model: GPT, requests: Sequence[tuple[Sequence[int], int]], batch_size: int = 8,
          progress: Callable[[int], None] | None = None) -> list[Scored]:
    """Score every request (see the module docstring); `progress(n)` is called as n requests finish."""
    block = model.config.block_size
    for tokens, first in requests:
        if not 1 <= first < len(tokens):
            raise GptlabError(f"nothing to score: a request of {len(tokens)} tokens scored from position {first}")
        if len(tokens) - 1 > block:
            raise GptlabError(f"a request of {len(tokens)} tokens does not fit the model's context ({block} + 1)")
    model.eval()
    device = model.transformer.wte.weight.device
    results: list[Scored | None] = [None] * len(requests)
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i][0]))
    for start in range(0, len(order), batch_size):
        chunk = order[start: start + batch_size]
        width = max(len(requests[i][0]) - 1 for i in chunk)
        idx = torch.zeros(len(chunk), width, dtype=torch.long)
        rows, positions, targets, sizes = [], [], [], []
        for row, i in enumerate(chunk):
            tokens, first = requests[i]
            idx[row, : len(tokens) - 1] = torch.as_tensor(tokens[:-1])
            rows += [row] * (len(tokens) - first)
            positions += range(first - 1, len(tokens) - 1)
            targets += tokens[first:]
            sizes.append(len(tokens) - first)
        hidden = model.hidden_states(idx.to(device))[torch.tensor(rows), torch.tensor(positions)]
        target = torch.tensor(targets, device=device)
        logprobs, greedy = [], []
        for part in range(0, len(targets), HEAD_ROWS):
            logp = model.lm_head(hidden[part: part + HEAD_ROWS]).float().log_softmax(-1)
            wanted = target[part: part + HEAD_ROWS]
            logprobs.append(logp.gather(1, wanted[:, None])[:, 0])
            greedy.append(logp.argmax(-1) == wanted)
        logprobs_list, greedy_all = torch.cat(logprobs).tolist(), torch.cat(greedy).tolist()
        offset = 0
        for i, size in zip(chunk, sizes, strict=True):
            results[i] = Scored(logprobs_list[offset: offset + size], all(greedy_all[offset: offset + size]))
            offset += size
        if progress is not None:
            progress(len(chunk))
    return results


def continuation_request(context: Sequence[int], continuation: Sequence[int], block: int,
                          ) -> tuple[list[int], int]:
    """The request scoring `continuation` after `context`, keeping the context's end when both do not fit
    the context window (lm-eval's left truncation). An empty context is not allowed: give a start token."""
    if not context or not continuation:
        raise GptlabError("a log-likelihood request needs a non-empty context and continuation")
    if len(continuation) > block:
        raise GptlabError(f"a continuation of {len(continuation)} tokens does not fit the model's context ({block})")
    tokens = [*context, *continuation][-(block + 1):]
    return tokens, len(tokens) - len(continuation)
