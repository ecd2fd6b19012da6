"""Chat: the chat template (shared with the server) and `gptlab chat`, an interactive terminal chat."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from typing import TextIO

from gptlab.errors import ContextLengthError, GptlabError
from gptlab.generate import LanguageModel, SamplingConfig

ROLES = ("system", "user", "assistant")
END_OF_TURN = "<|end|>"  # generation stops here (a stop string, not a special token: GPT-2's vocab has none)
HELP = "/reset clears the history, /system TEXT sets the system prompt, /exit quits"


def chat_prompt(messages: list[dict[str, str]]) -> str:
    """Render a conversation as one prompt: `<|role|>\\n{content}<|end|>\\n` per turn, then `<|assistant|>\\n`.

    Fine-tuning on this format teaches a model to close its turn with `<|end|>`; a base model gets the same
    structure as a plain-text cue.
    """
    if not messages:
        raise GptlabError("messages must hold at least one message")
    turns = []
    for message in messages:
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise GptlabError(f"message role must be one of {', '.join(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise GptlabError(f"message content must be a string, got {type(content).__name__}")
        turns.append(f"<|{role}|>\n{content}{END_OF_TURN}\n")
    return "".join(turns) + "<|assistant|>\n"


class ChatSession:
    """The history of one conversation, trimmed from the oldest turn so prompt + reply fit the context."""

    def __init__(self, lm: LanguageModel, system: str | None = None, **sampling) -> None:
        self.lm = lm
        self.system = system
        self.sampling = {"max_new_tokens": 256, **sampling, "stop": [END_OF_TURN]}
        SamplingConfig(**self.sampling)  # bad settings fail now, not at the first message
        self.turns: list[dict[str, str]] = []

    def reset(self) -> None:
        self.turns = []

    def messages(self) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.turns

    def _prompt(self) -> tuple[str, int]:
        """The prompt for the next reply and the tokens left to answer in, dropping the oldest turns while
        fewer than min(max_new_tokens, half the context) are left."""
        block = self.lm.model.config.block_size
        wanted = self.sampling["max_new_tokens"]
        while True:
            prompt = chat_prompt(self.messages())
            room = block - len(self.lm.tokenizer.encode(prompt))
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
