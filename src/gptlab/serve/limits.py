"""Limits on everything a client controls, so no request can take an unbounded share of the server: the body's
size, stop strings (count and length), `/tokenize` input, prompt length and the tokens one request may ask
for (prompts x n x max_tokens). Each is a `gptlab serve` flag (FLAGS); a request past one gets a 400 that
names the flag (the body size: 413). Light to import (no web framework): the CLI builds its flags from it."""

from __future__ import annotations

from dataclasses import dataclass, fields

from gptlab.config import ConfigError
from gptlab.errors import GptlabError


class LimitExceeded(GptlabError):
    """A request went past one of the server's limits; the server answers `status` naming the flag."""

    def __init__(self, flag: str, message: str, param: str | None, status: int = 400) -> None:
        super().__init__(f"{message} (this server's --{flag.replace('_', '-')})")
        self.param, self.status = param, status


@dataclass
class Limits:
    max_body_bytes: int = 1 << 20  # 1 MiB: a full 1024-token context is ~5 KB of text or ids
    max_stop: int = 16  # stop strings per request (OpenAI allows 4)
    max_stop_chars: int = 256  # characters per stop string
    max_tokenize_chars: int = 500_000  # text sent to /tokenize (lm-eval tokenizes whole documents there)
    max_prompt_tokens: int | None = None  # tokens per prompt; None: the model's context
    max_request_tokens: int = 32_768  # prompts x n x max_tokens: tokens one request may ask to generate

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"--{f.name.replace('_', '-')} must be a positive integer, got {value!r}")

    def check_stop(self, stop: list[str]) -> None:
        if len(stop) > self.max_stop:
            raise LimitExceeded("max_stop", f"{len(stop)} stop strings given; at most {self.max_stop} are allowed",
                                "stop")
        longest = max(map(len, stop), default=0)
        if longest > self.max_stop_chars:
            raise LimitExceeded("max_stop_chars", f"a stop string has {longest} characters; at most "
                                f"{self.max_stop_chars} are allowed", "stop")

    def check_prompts(self, prompts: list[list[int]]) -> None:
        longest = max(map(len, prompts))
        if self.max_prompt_tokens is not None and longest > self.max_prompt_tokens:
            raise LimitExceeded("max_prompt_tokens", f"a prompt has {longest} tokens; at most "
                                f"{self.max_prompt_tokens} are allowed", "prompt")

    def check_request_tokens(self, sequences: int, max_tokens: int) -> None:
        """`sequences` = prompts x n choices, each generating up to `max_tokens`."""
        if sequences * max_tokens > self.max_request_tokens:
            raise LimitExceeded("max_request_tokens", f"the request asks for up to {sequences * max_tokens} tokens "
                                f"({sequences} sequences (prompts x n) x {max_tokens} max_tokens); at most "
                                f"{self.max_request_tokens} are allowed", "max_tokens")

    def check_tokenize(self, text: str) -> None:
        if len(text) > self.max_tokenize_chars:
            raise LimitExceeded("max_tokenize_chars", f"the text to tokenize has {len(text)} characters; at most "
                                f"{self.max_tokenize_chars} are allowed", "prompt")


# the help of each limit's `gptlab serve` flag
FLAGS = {
    "max_body_bytes": "largest request body in bytes (413 beyond it)",
    "max_stop": "most stop strings per request",
    "max_stop_chars": "longest stop string, in characters",
    "max_tokenize_chars": "longest text /tokenize accepts, in characters",
    "max_prompt_tokens": "longest prompt in tokens (default: the model's context)",
    "max_request_tokens": "most tokens one request may ask to generate: prompts x n x max_tokens",
}
