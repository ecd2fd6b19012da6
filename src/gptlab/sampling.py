"""What to sample: `SamplingConfig`, the one set of sampling defaults and bounds (the CLI's flag defaults,
the server's defaults for absent request fields, the Python API's keyword defaults), and the logit filters
it selects."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING

from gptlab.config import ConfigError

if TYPE_CHECKING:  # the filters use tensor methods only, so the CLI reads SamplingConfig without loading torch
    import torch

# Bounds where float32 sampling arithmetic stays finite: logits are divided by the temperature and by (or
# multiplied with) the repetition penalty, and a logit of ~1e4 over 1e-40 overflows to inf, which makes the
# softmax NaN. Below MIN_TEMPERATURE every model samples its argmax anyway (vLLM clamps to the same 1e-2).
MIN_TEMPERATURE = 1e-2
REPETITION_PENALTY_RANGE = (1e-2, 1e2)
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts

@dataclass
class SamplingConfig:
    """How to pick each next token. Penalties follow vLLM / OpenAI: the repetition penalty (HF
    style: divide positive logits, multiply negative ones) covers prompt and output tokens;
    presence and frequency penalties cover output tokens only."""

    max_new_tokens: int = 100
    temperature: float = 1.0  # 0 = greedy; at most 2, as OpenAI's API (beyond it the text is noise)
    top_k: int | None = None
    top_p: float | None = None  # (0, 1]
    min_p: float | None = None  # [0, 1]: drop tokens below min_p * p(most likely token)
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: list[str] = field(default_factory=list)  # checked on decoded text; the stop text is not returned
    stop_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's logprob plus the top-k alternatives
    ignore_eos: bool = False  # keep going after the tokenizer's <|endoftext|> (benchmarks)

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) \
                or self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not (self.temperature == 0 or MIN_TEMPERATURE <= self.temperature <= 2):
            raise ConfigError(f"temperature must be 0 (greedy) or in [{MIN_TEMPERATURE}, 2], got {self.temperature}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise ConfigError(f"top_k must be a positive integer, got {self.top_k!r}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            raise ConfigError(f"min_p must be in [0, 1], got {self.min_p}")
        low, high = REPETITION_PENALTY_RANGE
        if not low <= self.repetition_penalty <= high:
            raise ConfigError(f"repetition_penalty must be in [{low}, {high}] (1 = off), got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ConfigError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ConfigError(f"stop must be a list of non-empty strings, got {self.stop!r}")
        if not all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids):
            raise ConfigError(f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]):
            raise ConfigError(f"seed must be an integer in [-2**63, 2**64 - 1], got {self.seed!r}")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or self.logprobs < 0):
            raise ConfigError(f"logprobs must be a non-negative integer, got {self.logprobs!r}")

    def for_sequence(self, index: int) -> SamplingConfig:
        """The config of a request's index-th sequence: seed + index, so each sequence of a seeded request
        draws its own random stream (vLLM and transformers reuse one stream per request, which gives the same
        prompt the same text in every row) and the same request with the same seed repeats every one."""
        return self if self.seed is None or index == 0 else replace(self, seed=self.seed + index)

    def changed(self) -> list[str]:
        """The fields set away from their defaults."""
        default = SamplingConfig()
        return [f.name for f in fields(self) if getattr(self, f.name) != getattr(default, f.name)]

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0


def filter_logits(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """Temperature, then top-k, top-p (nucleus) and min-p filtering of (B, vocab) logits."""
    logits = logits / cfg.temperature
    if cfg.top_k is not None and cfg.top_k < logits.size(-1):
        kth = logits.topk(cfg.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p is not None and cfg.top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # drop a token once the mass before it already reaches top_p; the first token always stays (a top_p
        # that float32 rounds to 0, such as 5e-324, would otherwise drop every token: a NaN distribution)
        drop = (probs.cumsum(-1) - probs) >= cfg.top_p
        drop[..., 0] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    if cfg.min_p:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < cfg.min_p * probs.amax(-1, keepdim=True), float("-inf"))
    return logits
