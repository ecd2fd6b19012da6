"""Text generation: sampling controls and the `LanguageModel` returned by `gptlab.load`."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from gptlab import checkpoint
from gptlab.model import GPT
from gptlab.tokenizer import Tokenizer


@dataclass
class SamplingConfig:
    max_new_tokens: int = 100
    temperature: float = 1.0  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def filter_logits(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """Temperature, then top-k, then nucleus (top-p) filtering of (B, vocab) logits."""
    logits = logits / cfg.temperature
    if cfg.top_k is not None and cfg.top_k < logits.size(-1):
        kth = torch.topk(logits, cfg.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p is not None and cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token once the mass before it already reaches top_p (the first token always stays)
        drop = (cumulative - sorted_logits.softmax(-1)) >= cfg.top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


@torch.no_grad()
def generate_ids(model: GPT, prompt: list[int], cfg: SamplingConfig) -> Iterator[int]:
    """Yield new token ids one at a time (full forward over the last block_size tokens)."""
    block = model.config.block_size
    if not prompt:
        raise ValueError("the prompt is empty")
    if len(prompt) >= block:
        raise ValueError(f"the prompt has {len(prompt)} tokens; the context holds {block} (leave room to generate)")
    device = next(model.parameters()).device
    generator = torch.Generator(device=device)
    if cfg.seed is not None:
        generator.manual_seed(cfg.seed)
    else:
        generator.seed()
    ids = torch.tensor([prompt], device=device)
    model.eval()
    for _ in range(cfg.max_new_tokens):
        logits, _ = model(ids[:, -block:])
        logits = logits[:, -1, :].float()
        if cfg.temperature == 0:
            next_id = logits.argmax(-1, keepdim=True)
        else:
            probs = filter_logits(logits, cfg).softmax(-1)
            next_id = torch.multinomial(probs, 1, generator=generator)
        ids = torch.cat([ids, next_id], dim=1)
        yield int(next_id)


class LanguageModel:
    """A model with its tokenizer, ready to generate: what `gptlab.load(path)` returns."""

    def __init__(self, model: GPT, tokenizer: Tokenizer, device: torch.device | str = "cpu") -> None:
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.device = torch.device(device)

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> LanguageModel:
        model, tokenizer = checkpoint.load_model(path)
        return cls(model, tokenizer, device)

    def generate(self, prompts: str | list[str], **sampling) -> list[str]:
        """Continuations of each prompt (the prompt itself is not repeated)."""
        cfg = SamplingConfig(**sampling)
        prompts = [prompts] if isinstance(prompts, str) else prompts
        if not prompts:
            raise ValueError("no prompts given")
        return [self.tokenizer.decode(list(generate_ids(self.model, self.tokenizer.encode(p), cfg))) for p in prompts]

    def stream(self, prompt: str, **sampling) -> Iterator[str]:
        """Yield text pieces as tokens arrive; bytes of an unfinished UTF-8 character are held back."""
        cfg = SamplingConfig(**sampling)
        pending = b""
        for token in generate_ids(self.model, self.tokenizer.encode(prompt), cfg):
            pending += self.tokenizer.decode_bytes([token])
            text, pending = _split_utf8(pending)
            if text:
                yield text
        if pending:
            yield pending.decode("utf-8", errors="replace")


def _split_utf8(data: bytes) -> tuple[str, bytes]:
    """Decode the complete UTF-8 prefix of `data`; return it and the incomplete tail."""
    for cut in range(len(data), max(-1, len(data) - 4), -1):
        try:
            return data[:cut].decode("utf-8"), data[cut:]
        except UnicodeDecodeError:
            continue
    return data.decode("utf-8", errors="replace"), b""
