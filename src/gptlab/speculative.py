"""Speculative decoding: guess several next tokens cheaply, let the model check them all in one pass.

Decoding one token reads every weight once, so on a CPU a step costs about the time to stream the weights,
whatever the number of rows it computes. Speculative decoding (Leviathan et al. 2023, Chen et al. 2023)
turns that into more than one token per read: a proposer guesses k tokens, the target model scores the last
token and the k guesses in one pass (k + 1 rows through the same weights), and keeps the longest prefix it
agrees with plus one token of its own. Two proposers:
- `DraftModel`: a small model with the target's tokenizer decodes k tokens ahead (its own KV cache, one row
  per decoder slot);
- `PromptLookup` (Saxena 2023): the k tokens that followed the latest earlier occurrence of the sequence's
  last n-gram (prompt or output), no second model; it pays off where the output copies the input.

`verify` decides what the target keeps. Greedy: the guesses up to the first one that differs from the
target's argmax, then the target's token there, so the output is the target's own greedy output. Sampling:
the rejection scheme that leaves the target's distribution exactly as it is: accept guess d with
probability min(1, p(d) / q(d)); at the first rejection sample from max(0, p - q) normalized; when all k are
accepted, one more token from p. q is the proposer's distribution (a point mass for prompt lookup and for
greedy drafts). The `Decoder` (gptlab.generate) runs the passes; this module proposes and verifies.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from gptlab import loading
from gptlab.config import ConfigError
from gptlab.model import GPT, KVCache
from gptlab.sampling import SamplingConfig, filter_logits
from gptlab.tokenizer import Tokenizer

MAX_DRAFT_TOKENS = 32


@dataclass
class SpeculativeConfig:
    """How the Decoder speculates: a draft model or prompt lookup, and how many tokens it guesses a pass."""

    draft: GPT | None = None  # a small model with the target's tokenizer
    prompt_lookup: bool = False  # guesses copied from an earlier occurrence of the last n-gram
    num_draft_tokens: int = 4  # tokens guessed per target pass (k)
    max_ngram: int = 3  # prompt lookup: the longest n-gram matched (then shorter ones, down to 1)

    def __post_init__(self) -> None:
        if (self.draft is None) == (not self.prompt_lookup):
            raise ConfigError("speculative decoding takes either a draft model or prompt lookup (one of them)")
        if isinstance(self.num_draft_tokens, bool) or not 1 <= self.num_draft_tokens <= MAX_DRAFT_TOKENS:
            raise ConfigError(f"num_draft_tokens must be in [1, {MAX_DRAFT_TOKENS}], got {self.num_draft_tokens!r}")
        if not 1 <= self.max_ngram <= 16:
            raise ConfigError(f"max_ngram must be in [1, 16], got {self.max_ngram!r}")

    @property
    def method(self) -> str:
        return "draft" if self.draft is not None else "prompt_lookup"

    def proposer(self, target: GPT, max_batch: int, max_len: int, device: torch.device) -> DraftModel | PromptLookup:
        if self.draft is None:
            return PromptLookup(self.max_ngram)
        return DraftModel(self.draft, target, max_batch, max_len, device)


def load_speculation(tokenizer: Tokenizer, draft: str | Path | None, num_draft_tokens: int) -> SpeculativeConfig:
    """The speculation of `gptlab generate/serve --draft PATH` (a model with `tokenizer`, the target's) or,
    without a draft, `--prompt-lookup`."""
    if draft is None:
        return SpeculativeConfig(prompt_lookup=True, num_draft_tokens=num_draft_tokens)
    loaded = loading.load(draft)
    if loaded.tokenizer.to_dict() != tokenizer.to_dict():
        raise ConfigError(f"the draft model {draft} has another tokenizer than the target: speculative decoding "
                          "needs the same one")
    return SpeculativeConfig(draft=loaded.gpt(), num_draft_tokens=num_draft_tokens)


@dataclass
class SpecUsage:
    """One sequence's speculation: guesses made and kept, and the target passes that produced its tokens."""

    drafted: int = 0
    accepted: int = 0
    target_passes: int = 0
    tokens: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_pass(self) -> float:
        return self.tokens / self.target_passes if self.target_passes else 0.0

    def add(self, other: SpecUsage) -> None:
        self.drafted += other.drafted
        self.accepted += other.accepted
        self.target_passes += other.target_passes
        self.tokens += other.tokens

    def to_dict(self) -> dict:
        return {"drafted_tokens": self.drafted, "accepted_tokens": self.accepted,
                "acceptance_rate": round(self.acceptance_rate, 4), "target_passes": self.target_passes,
                "tokens_per_target_pass": round(self.tokens_per_pass, 4)}


@dataclass
class Draft:
    """Guessed tokens and, for a sampled draft, the (len(tokens), vocab) distributions they came from
    (None: each guess was certain, a point mass)."""

    tokens: list[int]
    probs: torch.Tensor | None = None


def lookup(tokens: list[int], k: int, max_ngram: int) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the last n tokens (n = max_ngram, then
    shorter), or [] when none of them occurred before."""
    for n in range(min(max_ngram, len(tokens) - 1), 0, -1):
        pattern = tokens[-n:]
        for start in range(len(tokens) - n - 1, -1, -1):  # latest first; the suffix itself excluded
            if tokens[start: start + n] == pattern:
                return tokens[start + n: start + n + k]
    return []


class PromptLookup:
    """Guesses copied from the sequence itself (prompt and output so far)."""

    def __init__(self, max_ngram: int) -> None:
        self.max_ngram = max_ngram

    def propose(self, slots: list[int], seqs: list, k: int) -> list[Draft]:
        return [Draft(lookup(seq.tokens, k, self.max_ngram)) for seq in seqs]


class DraftModel:
    """A small model decoding k tokens ahead of the target for every running slot, in its own KV cache.

    Per slot it remembers the sequence it serves, how many of its tokens the draft cache holds for sure and
    the guesses it fed after them; at the next call the guesses the target kept are still valid, the rest
    (and the target's own token) are fed again in one catch-up pass."""

    def __init__(self, draft: GPT, target: GPT, max_batch: int, max_len: int, device: torch.device) -> None:
        if draft.config.vocab_size != target.config.vocab_size:
            raise ConfigError(f"the draft model's vocabulary ({draft.config.vocab_size} tokens) differs from the "
                              f"target's ({target.config.vocab_size}): they must share a tokenizer")
        if draft.config.block_size < max_len:
            raise ConfigError(f"the draft model's context ({draft.config.block_size} tokens) is shorter than "
                              f"the target's ({max_len})")
        self.model = draft.eval()
        self.cache = KVCache(draft.config, max_batch, max_len, device, draft.transformer.wte.weight.dtype)
        self.device = device
        self._state: dict[int, tuple[object, int, list[int]]] = {}  # slot -> (sequence, cached, fed guesses)

    def _cached(self, slot: int, seq) -> int:
        """Tokens of seq the draft cache holds (0: the slot served another sequence, or none yet)."""
        owner, cached, fed = self._state.get(slot, (None, 0, []))
        if owner is not seq:
            return 0
        kept = 0
        for guess, token in zip(fed, seq.tokens[cached:], strict=False):
            if guess != token:
                break
            kept += 1
        return min(cached + kept, len(seq.tokens) - 1)  # the last token is always fed: its logits are needed

    def _pick(self, logits: torch.Tensor, seq) -> tuple[int, torch.Tensor | None]:
        if seq.cfg.greedy:
            return int(logits.argmax()), None
        probs = filter_logits(logits.float()[None], seq.cfg).softmax(-1)[0]
        if not bool(torch.isfinite(probs).all()):  # the draft's numbers went bad: guess uniformly (the
            probs = torch.full_like(probs, 1.0 / probs.numel())  # acceptance rule stays exact for any q)
        return int(torch.multinomial(probs, 1, generator=seq.generator)), probs

    @torch.inference_mode()
    def propose(self, slots: list[int], seqs: list, k: int) -> list[Draft]:
        n = slots[-1] + 1  # rows 0..n-1 as in the Decoder's decode pass; other rows ride along as dummies
        cached = [self._cached(slot, seq) for slot, seq in zip(slots, seqs, strict=True)]
        logits: dict[int, torch.Tensor] = {}
        catch_up = [i for i, c in enumerate(cached) if c > 0]
        if catch_up:  # first: its dummy rows write at positions the prefill below rewrites
            width = max(len(seqs[i].tokens) - cached[i] for i in catch_up)
            idx, starts, last = torch.zeros(n, width, dtype=torch.long), [0] * n, torch.zeros(n, dtype=torch.long)
            for i in catch_up:
                pending = seqs[i].tokens[cached[i]:]
                idx[slots[i], : len(pending)] = torch.tensor(pending)
                starts[slots[i]], last[slots[i]] = cached[i], len(pending) - 1
            out = self.model.forward_cached(idx.to(self.device), self.cache, slice(0, n), starts, prefill=False,
                                            last=last.to(self.device))
            logits.update({i: out[slots[i]] for i in catch_up})
        fresh = [i for i, c in enumerate(cached) if c == 0]
        if fresh:
            width = max(len(seqs[i].tokens) for i in fresh)
            idx = torch.zeros(len(fresh), width, dtype=torch.long)
            for row, i in enumerate(fresh):
                idx[row, : len(seqs[i].tokens)] = torch.tensor(seqs[i].tokens)
            last = torch.tensor([len(seqs[i].tokens) - 1 for i in fresh], device=self.device)
            rows = torch.tensor([slots[i] for i in fresh], device=self.device)
            out = self.model.forward_cached(idx.to(self.device), self.cache, rows, [0] * len(fresh), prefill=True,
                                            last=last)
            logits.update({i: out[row] for row, i in enumerate(fresh)})
        picks = [self._pick(logits[i], seq) for i, seq in enumerate(seqs)]
        tokens = [[token] for token, _ in picks]
        probs = [[p] for _, p in picks]
        for j in range(1, k):  # one token per row and pass: the fused decode step where it runs
            idx, starts = torch.zeros(n, 1, dtype=torch.long), [0] * n
            for i, slot in enumerate(slots):
                idx[slot, 0], starts[slot] = tokens[i][-1], len(seqs[i].tokens) + j - 1
            out = self.model.forward_cached(idx.to(self.device), self.cache, slice(0, n), starts, prefill=False)
            for i, seq in enumerate(seqs):
                token, p = self._pick(out[slots[i]], seq)
                tokens[i].append(token)
                probs[i].append(p)
        for i, (slot, seq) in enumerate(zip(slots, seqs, strict=True)):
            self._state[slot] = (seq, len(seq.tokens), tokens[i][:-1])  # the last guess was never fed
        return [Draft(t, None if p[0] is None else torch.stack(p)) for t, p in zip(tokens, probs, strict=True)]


def verify(logits: torch.Tensor, draft: Draft, cfg: SamplingConfig, generator: torch.Generator | None) -> list[int]:
    """The tokens the target keeps (1 to len(draft.tokens) + 1 of them), given its float logits (>= k + 1,
    vocab) at the last token and at each guess; see the module docstring."""
    guesses = draft.tokens
    if cfg.greedy:
        best = logits[: len(guesses) + 1].max(-1).indices.tolist()  # max(): the same first maximum as argmax
        kept = []
        for guess, token in zip(guesses, best, strict=False):
            if guess != token:
                return [*kept, token]
            kept.append(guess)
        return [*kept, best[len(guesses)]]
    p = filter_logits(logits[: len(guesses) + 1], cfg).softmax(-1)
    for i, guess in enumerate(guesses):
        q_guess = 1.0 if draft.probs is None else float(draft.probs[i, guess])
        if float(torch.rand((), generator=generator)) * q_guess < float(p[i, guess]):
            continue  # accepted with probability min(1, p / q)
        if draft.probs is None:
            residual = p[i].clone()
            residual[guess] = 0
        else:
            residual = (p[i] - draft.probs[i]).clamp(min=0)
        token = int(torch.multinomial(residual / residual.sum(), 1, generator=generator))
        return [*guesses[:i], token]
    return [*guesses, int(torch.multinomial(p[len(guesses)], 1, generator=generator))]
