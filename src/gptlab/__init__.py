"""gptlab: GPT-style language models end to end."""

from __future__ import annotations

from pathlib import Path

from gptlab.config import GPTConfig, TrainConfig
from gptlab.language_model import LanguageModel
from gptlab.model import GPT

__all__ = ["GPT", "GPTConfig", "LanguageModel", "TrainConfig", "load"]
__version__ = "0.1.0"


def load(path: str | Path, device: str = "cpu", quantize: str | None = None, draft: str | Path | None = None,
         num_draft_tokens: int = 4, prompt_lookup: bool = False) -> LanguageModel:
    """Load a gptlab run directory or checkpoint file (fine-tuned runs too, LoRA merged in) or a Hugging Face
    GPT-2 directory (see gptlab.loading), ready to generate.

    `m = load(path); m.generate(["a", "b"], max_new_tokens=50, temperature=0.8)`; `m.stream("a")`.
    quantize="int8": int8 weights for faster CPU inference. Speculative decoding (docs/GENERATION.md): `draft`
    (a small model with the same tokenizer) or `prompt_lookup=True`, `num_draft_tokens` guesses per pass.
    """
    return LanguageModel.load(path, device, quantize, draft, num_draft_tokens, prompt_lookup)
