"""gptlab: GPT-style language models end to end.

The Python API (`gptlab.load`, `LanguageModel`, `GPT`, the configs) is imported on first use (PEP 562): torch
takes seconds to import, and `import gptlab` (which the command line's `--help` does) should not pay for it.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gptlab.config import GPTConfig, TrainConfig
    from gptlab.language_model import LanguageModel
    from gptlab.model import GPT

__all__ = ["GPT", "GPTConfig", "LanguageModel", "TrainConfig", "load"]
__version__ = "0.1.0"

_API = {"GPT": "gptlab.model", "GPTConfig": "gptlab.config", "TrainConfig": "gptlab.config",
        "LanguageModel": "gptlab.language_model"}


def load(path: str | Path, device: str = "cpu", quantize: str | None = None, draft: str | Path | None = None,
         num_draft_tokens: int = 4, prompt_lookup: bool = False) -> LanguageModel:
    """Load a gptlab run directory or checkpoint file (fine-tuned runs too, LoRA merged in) or a Hugging Face
    GPT-2 directory (see gptlab.loading), ready to generate.

    `m = load(path); m.generate(["a", "b"], max_new_tokens=50, temperature=0.8)`; `m.stream("a")`.
    quantize="int8": int8 weights for faster CPU inference. Speculative decoding (docs/GENERATION.md): `draft`
    (a small model with the same tokenizer) or `prompt_lookup=True`, `num_draft_tokens` guesses per pass.
    """
    return __getattr__("LanguageModel").load(path, device, quantize, draft, num_draft_tokens, prompt_lookup)


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'gptlab' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value  # later lookups find it without calling this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
