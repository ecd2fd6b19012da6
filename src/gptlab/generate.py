"""Text generation: a KV-cached, continuously batched decoder with the usual sampling controls.

Layers, bottom up:
- `SamplingConfig` (gptlab.sampling): what to sample (temperature, top-k/p, min-p, penalties, stops,
  seed, logprobs).
- `Decoder`: continuous batching over a preallocated `KVCache` with `max_batch` slots. `add` a
  prompt, call `step` to get one `TokenEvent` per active slot; finished slots free themselves.
  This is what a server drives.
- speculative decoding (gptlab.speculative): with a `SpeculativeConfig` the Decoder's decode pass checks
  a draft model's or prompt lookup's guesses, so a step may give a slot several tokens.
- `Scheduler`: continuous batching of requests over a Decoder; `complete` and the server's engine
  both drive one.
- `LanguageModel` (gptlab.language_model; what `gptlab.load` returns) builds `generate`, `stream` and
  `complete` on these; `prompt_logprobs` scores given text.

Every sequence keeps its own cache row and positions, so prompts of different lengths batch
together without padding in the cache (prefill right-pads the new prompts; the causal mask makes
the padding invisible) and each one gives the same tokens as when generated alone.
"""

from __future__ import annotations

import codecs
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from gptlab.config import ConfigError
from gptlab.errors import GptlabError, check_context
from gptlab.model import GPT, KVCache
from gptlab.sampling import SamplingConfig, filter_logits
from gptlab.speculative import Draft, SpeculativeConfig, SpecUsage, verify
from gptlab.tokenizer import Tokenizer


@dataclass
class TokenEvent:
    """What one decode step produced for one sequence."""

    token_id: int
    text: str  # newly released text (UTF-8 safe, stop strings withheld/removed); may be ""
    logprob: float | None
    top_logprobs: list[tuple[int, float]] | None
    # None while running, then "stop" or "length"; "error" (token_id -1) when this sequence's own numbers went
    # bad (NaN logits, a distribution that is not finite): it alone ends, the batch goes on
    finish_reason: str | None
    speculation: SpecUsage | None = None  # on a speculative decoder's last event of a sequence


@dataclass
class Completion:
    """One finished generation. token_ids are all sampled tokens (a stop token or the tokens of a
    stop string included), so completion_tokens == len(token_ids); text excludes the stop."""

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[float] | None = None  # per generated token, from the model's distribution
    top_logprobs: list[list[tuple[int, float]]] | None = None
    speculation: SpecUsage | None = None  # guesses made and kept (speculative decoding only)


class SequenceError(GptlabError):
    """One sequence's next-token distribution was not finite (NaN logits); the other sequences went on."""


class _TextReleaser:
    """Turns token bytes into text that is safe to show: never half a UTF-8 character, never the
    beginning of what may become a stop string, never the stop string itself."""

    def __init__(self, stop: list[str]) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = stop
        self._held = ""  # decoded text not released yet (a possible start of a stop string)

    def push(self, data: bytes) -> tuple[str, bool]:
        """Add a token's bytes; return (text to release, whether a stop string was found)."""
        text = self._held + self._utf8.decode(data)
        if not self._stop:
            self._held = ""
            return text, False
        hits = [i for i in (text.find(s) for s in self._stop) if i >= 0]
        if hits:
            self._held = ""
            return text[: min(hits)], True
        # hold back the longest tail that is the beginning of some stop string
        hold = max((k for s in self._stop for k in range(min(len(s) - 1, len(text)), 0, -1)
                    if text.endswith(s[:k])), default=0)
        self._held = text[len(text) - hold:]
        return text[: len(text) - hold], False

    def flush(self) -> str:
        """Everything still held (the generation ended without completing a stop string)."""
        text, self._held = self._held + self._utf8.decode(b"", final=True), ""
        return text


class _Sequence:
    """The state of one slot: its tokens, sampling state and text released so far."""

    def __init__(self, prompt: list[int], cfg: SamplingConfig, stop_ids: set[int], vocab: int,
                 device: torch.device, embeds: torch.Tensor | None = None) -> None:
        self.prompt_len = len(prompt)
        self.embeds = embeds  # the prompt's input embeddings when they are not just its tokens' (images)
        self.tokens = list(prompt)
        self.start = 0  # tokens[start:] are in the cache row (start > 0 once a sliding context has moved)
        self.cfg = cfg
        self.stop_ids = stop_ids
        self.prefilled = False
        self.usage = SpecUsage()  # speculative decoding's counts (target passes counted always)
        self.releaser = _TextReleaser(cfg.stop)
        self.generator: torch.Generator | None = None
        if not cfg.greedy:
            self.generator = torch.Generator(device=device)
            if cfg.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(cfg.seed)
        self.seen: torch.Tensor | None = None  # tokens of prompt + output (repetition penalty)
        self.counts: torch.Tensor | None = None  # output token counts (presence/frequency penalties)
        if cfg.penalized:
            self.seen = torch.zeros(vocab, dtype=torch.bool, device=device)
            self.seen[torch.tensor(prompt, device=device)] = True
            self.counts = torch.zeros(vocab, device=device)

    @property
    def generated(self) -> int:
        return len(self.tokens) - self.prompt_len

    def penalize(self, logits: torch.Tensor) -> torch.Tensor:
        """Apply the repetition / presence / frequency penalties to this sequence's (vocab,) logits."""
        cfg = self.cfg
        if cfg.repetition_penalty != 1:
            penalized = torch.where(logits > 0, logits / cfg.repetition_penalty, logits * cfg.repetition_penalty)
            logits = torch.where(self.seen, penalized, logits)
        if cfg.presence_penalty or cfg.frequency_penalty:
            logits = logits - cfg.frequency_penalty * self.counts - cfg.presence_penalty * (self.counts > 0)
        return logits

    def record(self, token: int) -> None:
        self.tokens.append(token)
        if self.seen is not None:
            self.seen[token] = True
            self.counts[token] += 1


class Decoder:
    """Continuous batching over a preallocated KV cache with `max_batch` slots.

    `add` registers a prompt (its prefill runs in the next `step`, batched with other new prompts);
    each `step` produces one token for every active slot; a slot whose event has a finish_reason is
    free again. Prompt + max_new_tokens must fit in `max_len` (default: the model's context), else
    ContextLengthError. With `slide=True` a sequence may run past it instead (nanoGPT crops its input to the
    context; llama.cpp calls it a context shift): a longer prompt keeps its last `max_len` tokens, and when a
    row is full its newest half is prefilled again and generation goes on, so the model no longer sees the
    start (a prefill every max_len / 2 tokens rather than nanoGPT's full forward pass for every token).
    With `speculation`, a decode pass also checks guesses (gptlab.speculative) and `step_many` may give a
    slot several tokens; greedy output stays the model's own, sampling keeps its distribution.
    """

    def __init__(self, model: GPT, tokenizer: Tokenizer, max_batch: int = 8,
                 device: torch.device | str | None = None, max_len: int | None = None,
                 speculation: SpeculativeConfig | None = None, slide: bool = False) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if slide and speculation is not None:  # the draft model's cache and guesses assume a fixed start
            raise ConfigError("a sliding context (--slide-context) does not combine with speculative decoding")
        block = model.config.block_size
        if max_len is not None and not 0 < max_len <= block:
            raise ValueError(f"max_len must be in [1, {block}] (the model's context), got {max_len}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = torch.device(device) if device is not None else model.transformer.wte.weight.device
        self.vocab_size = model.config.vocab_size
        self.cache = KVCache(model.config, max_batch, max_len, self.device, model.transformer.wte.weight.dtype)
        self._slots: list[_Sequence | None] = [None] * max_batch
        self.slide = slide
        self.speculation = speculation
        self.proposer = speculation and speculation.proposer(model, max_batch, self.cache.max_len, self.device)
        self.usage = SpecUsage()  # every sequence's, summed (logs)

    @property
    def free_slots(self) -> int:
        return self._slots.count(None)

    @property
    def active(self) -> int:
        return len(self._slots) - self.free_slots

    def add(self, prompt_ids: Sequence[int], cfg: SamplingConfig, embeds: torch.Tensor | None = None) -> int:
        """Queue a prompt for generation; returns its slot id. embeds: the prompt's (len, C) input embeddings
        when they are not only its tokens' (image embeddings spliced in, see gptlab.vision)."""
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise GptlabError("the prompt is empty")
        if min(prompt) < 0 or max(prompt) >= self.vocab_size:
            raise GptlabError(f"prompt token ids must be in [0, {self.vocab_size})")
        if not self.slide:
            check_context(len(prompt), cfg.max_new_tokens, self.cache.max_len)
        if embeds is not None and embeds.shape != (len(prompt), self.model.config.n_embd):
            raise ValueError(f"embeds must be ({len(prompt)}, {self.model.config.n_embd}), got {tuple(embeds.shape)}")
        if None not in self._slots:
            raise ValueError(f"no free slot: all {len(self._slots)} are generating")
        slot = self._slots.index(None)  # lowest first keeps the decode batch (rows 0..n-1) compact
        stop_ids = set(cfg.stop_token_ids)
        if not cfg.ignore_eos:
            stop_ids.add(self.tokenizer.eot_id)
        seq = _Sequence(prompt, cfg, stop_ids, self.vocab_size, self.device, embeds)
        seq.start = max(len(prompt) - self.cache.max_len, 0)  # sliding: a prompt longer than a row keeps its end
        self._slots[slot] = seq
        return slot

    def cancel(self, slot: int) -> None:
        """Free a slot (e.g. the client disconnected); unknown or free slots are ignored."""
        if 0 <= slot < len(self._slots):
            self._slots[slot] = None

    def step(self) -> dict[int, TokenEvent]:
        """One token for every active slot (a decoder without speculation; else use `step_many`)."""
        if self.speculation is not None:
            raise ValueError("a speculative decoder may give a slot several tokens a step: use step_many()")
        return dict(self.step_many())

    @torch.inference_mode()
    def step_many(self) -> list[tuple[int, TokenEvent]]:
        """Decode the running slots, prefill the newly added ones: (slot, event) in order, one event per
        active slot, or several with speculation; a slot's last event may have a finish_reason."""
        events: list[tuple[int, TokenEvent]] = []
        for seq in self._slots:  # sliding: a full row is prefilled again from the newest half of its tokens
            if seq is not None and seq.prefilled and len(seq.tokens) - seq.start > self.cache.max_len:
                seq.start, seq.prefilled = len(seq.tokens) - max(self.cache.max_len // 2, 1), False
        running = [i for i, s in enumerate(self._slots) if s is not None and s.prefilled]
        if running:
            k = self._num_guesses(running)
            events += self._speculate(running, k) if k else self._decode(running).items()
        new = [i for i, s in enumerate(self._slots) if s is not None and not s.prefilled]
        if new:
            events += self._prefill(new).items()
        for slot in {*running, *new}:
            self._slots[slot].usage.target_passes += 1
        for slot, event in events:
            if event.finish_reason is not None:
                seq = self._slots[slot]
                self.usage.add(seq.usage)
                if self.speculation is not None:
                    event.speculation = seq.usage
                self._slots[slot] = None
        return events

    def _num_guesses(self, running: list[int]) -> int:
        """Guesses per row this pass: the configured k, fewer where a row nears its max_new_tokens or the
        cache's end (the pass writes k + 1 positions), none with penalties (they change within the guesses)."""
        if self.speculation is None:
            return 0
        k = self.speculation.num_draft_tokens
        for seq in (self._slots[i] for i in running):
            if seq.cfg.penalized:
                return 0
            k = min(k, seq.cfg.max_new_tokens - seq.generated - 1, self.cache.max_len - len(seq.tokens))
        return max(k, 0)

    def _speculate(self, running: list[int], k: int) -> list[tuple[int, TokenEvent]]:
        """One target pass over each row's last token and up to k guesses; the tokens it keeps become events."""
        seqs = [self._slots[i] for i in running]
        drafts: list[Draft] = self.proposer.propose(running, seqs, k)
        if not any(d.tokens for d in drafts):
            return list(self._decode(running).items())
        n, width = running[-1] + 1, 1 + max(len(d.tokens) for d in drafts)
        idx, starts = torch.zeros(n, width, dtype=torch.long), [0] * n  # other rows: dummies, as in _decode
        for slot, seq, draft in zip(running, seqs, drafts, strict=True):
            idx[slot, : 1 + len(draft.tokens)] = torch.tensor([seq.tokens[-1], *draft.tokens])
            starts[slot] = len(seq.tokens) - 1
        logits = self.model.forward_cached(idx.to(self.device), self.cache, slice(0, n), starts, prefill=False,
                                           every=True).float()
        events = []
        for slot, seq, draft in zip(running, seqs, drafts, strict=True):
            if not bool(torch.isfinite(logits[slot, : len(draft.tokens) + 1]).all()):
                events.append((slot, TokenEvent(-1, "", None, None, "error")))  # as in _sample: this row alone
                continue
            kept = verify(logits[slot], draft, seq.cfg, seq.generator)
            seq.usage.drafted += len(draft.tokens)
            seq.usage.accepted += len(kept) - 1
            for i, token in enumerate(kept):
                logprob, top = None, None
                if seq.cfg.logprobs is not None:
                    logprob, top = _logprobs(logits[slot, i], token, seq.cfg.logprobs)
                event = self._advance(seq, token, logprob, top)
                events.append((slot, event))
                if event.finish_reason is not None:
                    break
        return events

    def _decode(self, running: list[int]) -> dict[int, TokenEvent]:
        # rows 0..n-1 as one batch (a view of the cache, no gather); rows that are free or not yet
        # prefilled ride along with a dummy token at position 0, which their prefill overwrites
        n = running[-1] + 1
        tokens, positions = [0] * n, [0] * n
        for i in running:
            seq = self._slots[i]
            tokens[i], positions[i] = seq.tokens[-1], len(seq.tokens) - 1 - seq.start
        idx = torch.tensor(tokens, device=self.device)[:, None]
        logits = self.model.forward_cached(idx, self.cache, slice(0, n), positions, prefill=False)
        return self._sample(running, logits[running] if len(running) < n else logits)

    def _prefill(self, new: list[int]) -> dict[int, TokenEvent]:
        prompts = [self._slots[i].tokens[self._slots[i].start:] for i in new]
        width = max(map(len, prompts))
        idx = torch.zeros(len(new), width, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            idx[row, : len(prompt)] = torch.tensor(prompt)
        last = torch.tensor([len(p) - 1 for p in prompts], device=self.device)
        rows = slice(new[0], new[-1] + 1) if new[-1] - new[0] == len(new) - 1 else torch.tensor(new, device=self.device)
        idx = idx.to(self.device)
        embeds = None
        if any(self._slots[i].embeds is not None for i in new):  # images: their embeddings replace the slots'
            embeds = self.model.transformer.wte(idx)
            for row, i in enumerate(new):
                seq = self._slots[i]
                if seq.embeds is not None and seq.start < len(seq.embeds):  # the part of the prompt still in view
                    kept = seq.embeds[seq.start:]
                    embeds[row, : len(kept)] = kept.to(embeds.dtype)
        logits = self.model.forward_cached(idx, self.cache, rows, [0] * len(new), prefill=True, last=last,
                                           embeds=embeds)
        for i in new:
            self._slots[i].prefilled = True
        return self._sample(new, logits)

    def _sample(self, slots: list[int], logits: torch.Tensor) -> dict[int, TokenEvent]:
        """Pick the next token of each slot from its (vocab,) logits row and turn it into an event."""
        logits = logits.float()
        seqs = [self._slots[i] for i in slots]
        if all(s.cfg.greedy and not s.cfg.penalized for s in seqs):
            # the common fast path, one op for the whole batch; max() finds the same first maximum as
            # argmax() in a third of the time (8 x 50257 logits: 89 vs 282 us); a row with a NaN has max NaN
            values, indices = logits.max(-1)
            chosen = [-1 if bad else token for token, bad in zip(indices.tolist(), values.isnan().tolist(), strict=True)]
        else:
            chosen = []
            for row, seq in enumerate(seqs):
                scores = seq.penalize(logits[row]) if seq.cfg.penalized else logits[row]
                if seq.cfg.greedy:
                    best = scores.max(-1)
                    chosen.append(-1 if best.values.isnan() else int(best.indices))
                else:  # a NaN or inf anywhere makes the sum NaN: this row fails, not torch.multinomial's batch
                    probs = filter_logits(scores[None], seq.cfg).softmax(-1)
                    total = float(probs.sum())
                    chosen.append(int(torch.multinomial(probs, 1, generator=seq.generator))
                                  if math.isfinite(total) and total > 0 else -1)
        events = {}
        for row, (slot, seq, token) in enumerate(zip(slots, seqs, chosen, strict=True)):
            if token < 0:
                events[slot] = TokenEvent(-1, "", None, None, "error")
                continue
            logprob, top = None, None
            if seq.cfg.logprobs is not None:
                logprob, top = _logprobs(logits[row], token, seq.cfg.logprobs)
            events[slot] = self._advance(seq, token, logprob, top)
        return events

    def _advance(self, seq: _Sequence, token: int, logprob: float | None,
                 top: list[tuple[int, float]] | None) -> TokenEvent:
        seq.record(token)
        seq.usage.tokens += 1
        if token in seq.stop_ids:
            return TokenEvent(token, seq.releaser.flush(), logprob, top, "stop")
        text, stopped = seq.releaser.push(self.tokenizer.decode_bytes([token]))
        if stopped:
            return TokenEvent(token, text, logprob, top, "stop")
        if seq.generated >= seq.cfg.max_new_tokens:
            return TokenEvent(token, text + seq.releaser.flush(), logprob, top, "length")
        return TokenEvent(token, text, logprob, top, None)


def _logprobs(logits: torch.Tensor, token: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    """The chosen token's log-probability under the model (before penalties, temperature and
    filtering) and the k most likely alternatives."""
    logprobs = logits.log_softmax(-1)
    top = []
    if k:
        values, ids = logprobs.topk(min(k, logprobs.size(-1)))
        top = list(zip(ids.tolist(), values.tolist(), strict=True))
    return float(logprobs[token]), top


@torch.inference_mode()
def prompt_logprobs(model: GPT, ids: list[int], top_n: int = 0,
                    ) -> tuple[list[float | None], list[list[tuple[int, float]] | None]]:
    """Each token's log-probability given the ones before it, and the top_n alternatives there (the first
    token has no context: None). What `echo` + `logprobs` returns and loglikelihood evaluation needs."""
    if not ids:
        raise GptlabError("no tokens to score")
    device = model.transformer.wte.weight.device
    logits, _ = model.eval()(torch.tensor([ids], device=device))
    logp = logits[0, :-1].float().log_softmax(-1)
    token_lp = logp.gather(1, torch.tensor(ids[1:], device=device)[:, None])[:, 0].tolist()
    if top_n:
        values, indices = logp.topk(top_n, dim=-1)
        tops = [list(zip(i, v, strict=True)) for i, v in zip(indices.tolist(), values.tolist(), strict=True)]
    else:
        tops = [[] for _ in token_lp]
    return [None, *token_lp], [None, *tops]


class Scheduler:
    """Continuous batching over a Decoder, the one scheduler behind `complete` (so LanguageModel and
    evaluation) and the server's engine: the caller `admit`s requests (any object it tracks them by) while
    there are free slots, and each `step` advances every running request by one token."""

    def __init__(self, decoder: Decoder) -> None:
        self.decoder = decoder
        self.running: dict[int, Any] = {}  # slot -> request

    @property
    def free_slots(self) -> int:
        return self.decoder.free_slots

    def admit(self, request: Any, prompt_ids: Sequence[int], cfg: SamplingConfig,
              embeds: torch.Tensor | None = None) -> None:
        """Start `request` in a free slot; a prompt that cannot run raises a GptlabError and takes none."""
        self.running[self.decoder.add(prompt_ids, cfg, embeds)] = request

    def cancel(self, request: Any) -> None:
        for slot, running in list(self.running.items()):
            if running is request:
                self.decoder.cancel(slot)
                del self.running[slot]

    def abort(self) -> list[Any]:
        """Free every slot (after a failed step); returns the requests that were running."""
        requests = list(self.running.values())
        for slot in self.running:
            self.decoder.cancel(slot)
        self.running.clear()
        return requests

    def step(self) -> list[tuple[Any, TokenEvent]]:
        """One token for every running request; a request whose event has a finish_reason is done."""
        results = []
        for slot, event in self.decoder.step_many():
            request = self.running.pop(slot) if event.finish_reason is not None else self.running[slot]
            results.append((request, event))
        return results


def complete(model: GPT, tokenizer: Tokenizer, prompts: list[list[int]], configs: list[SamplingConfig],
             max_batch: int = 8, speculation: SpeculativeConfig | None = None,
             embeds: Sequence[torch.Tensor | None] | None = None, slide: bool = False) -> list[Completion]:
    """Generate for every token prompt with its config, up to `max_batch` at a time with continuous batching:
    a finished sequence's slot goes to the next waiting prompt at once. Every prompt is checked against the
    context before any work starts (`slide`: generation may run past it, see Decoder). embeds: per prompt, its
    input embeddings if not only its tokens' (images)."""
    block = model.config.block_size
    for ids, cfg in zip(prompts, configs, strict=True):
        if not slide:
            check_context(len(ids), cfg.max_new_tokens, block)
    longest = max(len(ids) + cfg.max_new_tokens for ids, cfg in zip(prompts, configs, strict=True))
    scheduler = Scheduler(Decoder(model, tokenizer, min(max_batch, len(prompts)), max_len=min(longest, block),
                                  speculation=speculation, slide=slide))
    results: list[Completion | None] = [None] * len(prompts)
    events: list[list[TokenEvent]] = [[] for _ in prompts]
    waiting = deque(range(len(prompts)))
    while waiting or scheduler.running:
        while waiting and scheduler.free_slots:
            i = waiting.popleft()
            scheduler.admit(i, prompts[i], configs[i], None if embeds is None else embeds[i])
        for i, event in scheduler.step():
            if event.finish_reason == "error":
                raise SequenceError(f"generation for prompt {i} failed: its next-token distribution is not finite")
            events[i].append(event)
            if event.finish_reason is not None:
                want_logprobs = configs[i].logprobs is not None
                results[i] = Completion(
                    text="".join(e.text for e in events[i]), token_ids=[e.token_id for e in events[i]],
                    finish_reason=event.finish_reason, prompt_tokens=len(prompts[i]),
                    completion_tokens=len(events[i]),
                    logprobs=[e.logprob for e in events[i]] if want_logprobs else None,
                    top_logprobs=[e.top_logprobs for e in events[i]] if want_logprobs else None,
                    speculation=event.speculation)
    return results
