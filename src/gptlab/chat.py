"""`gptlab chat`: an interactive terminal chat, prompted in the model's own style (gptlab.prompts), as the server does."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from typing import TextIO

from gptlab.errors import ContextLengthError, GptlabError
from gptlab.language_model import LanguageModel
from gptlab.prompts import messages_from
from gptlab.sampling import SamplingConfig

HELP = "/reset clears the history, /system TEXT sets the system prompt, /exit quits"


class ChatSession:
    """The history of one conversation, trimmed from the oldest turn so prompt + reply fit the context."""

    def __init__(self, lm: LanguageModel, system: str | None = None, **sampling) -> None:
        self.lm = lm
        self.system = system
        self.sampling = {"max_new_tokens": 256, **sampling, "stop": list(lm.prompt_style.stop)}
        SamplingConfig(**self.sampling)  # bad settings fail now, not at the first message
        self.turns: list[dict[str, str]] = []

    def reset(self) -> None:
        self.turns = []

    def messages(self) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.turns

    def prompt_ids(self) -> list[int]:
        return self.lm.prompt_style.prompt_ids(messages_from(self.messages()), self.lm.tokenizer)

    def _prompt(self) -> tuple[list[int], int]:
        """The prompt for the next reply and the tokens left to answer in, dropping the oldest turns while
        fewer than min(max_new_tokens, half the context) are left. (The server refuses what does not fit
        instead: its clients keep their own history.)"""
        block = self.lm.model.config.block_size
        wanted = self.sampling["max_new_tokens"]
        while True:
            prompt = self.prompt_ids()
            room = block - len(prompt)
            if room >= min(wanted, block // 2):
                return prompt, min(wanted, room)
            if len(self.turns) <= 1:
                self.turns = []
                raise ContextLengthError(f"the message does not fit the model's context of {block} tokens")
            self.turns.pop(0)

    def reply(self, text: str, write: Callable[[str], None]) -> str:
        """Add the user's message, stream the model's answer through `write` and keep it in the history."""
        self.turns.append({"role": "user", "content": text})
        prompt, max_new_tokens = self._prompt()
        pieces: list[str] = []
        try:
            for piece in self.lm.stream(prompt, **{**self.sampling, "max_new_tokens": max_new_tokens}):
                pieces.append(piece)
                write(piece)
        finally:  # an interrupted answer stays in the history as far as it got
            self.turns.append({"role": "assistant", "content": "".join(pieces)})
        return "".join(pieces)


def repl(session: ChatSession, read: Callable[[str], str] = input, out: TextIO = sys.stdout) -> None:
    """Read lines until /exit or end of input; a line starting with / is a command, anything else a message."""
    def write(text: str) -> None:
        out.write(text)
        out.flush()

    write(f"gptlab chat: {HELP}.\n")
    while True:
        try:
            line = read("> ").strip()
        except EOFError:
            write("\n")
            return
        except KeyboardInterrupt:
            write("\n")
            continue
        if not line:
            continue
        command, _, argument = line.partition(" ")
        if command in ("/exit", "/quit"):
            return
        if command == "/reset":
            session.reset()
            write("(history cleared)\n")
        elif command == "/system":
            session.system = argument.strip() or None
            write("(system prompt set)\n" if session.system else "(system prompt removed)\n")
        elif command.startswith("/"):
            write(f"unknown command {command}: {HELP}\n")
        else:
            try:
                session.reply(line, write)
            except KeyboardInterrupt:
                write(" [interrupted]")
            except GptlabError as err:
                write(f"error: {err}")
            write("\n")


def main(lm: LanguageModel, system: str | None = None, **sampling) -> None:
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (line editing and up-arrow history for input())
    repl(ChatSession(lm, system, **sampling))
