"""Prompt styles: how a conversation becomes the text a model reads, in one place for every user of it.

A fine-tuned model only answers well in the format it was trained on, so `gptlab finetune` records its
style in the checkpoint (`payload["prompt_style"]`, LitGPT's `save_prompt_style`) and `gptlab serve`,
`gptlab chat`, `gptlab eval-task` and `/tokenize` render with the style of the checkpoint they load.

  chat         <|role|>\\n{content}<|end|>\\n per message, then <|assistant|>\\n; a reply ends with <|end|>
               (a stop string, not a special token: GPT-2's vocabulary has none)
  instruction  ### Role:\\n{content}\\n\\n per message, then ### Assistant:\\n; a reply ends with <|endoftext|>
  plain        the contents one per line, no roles: a base model continues the text

Checkpoints written before styles were recorded: `gptlab finetune` runs trained on `instruction`, every
other model gets `chat` (what the server always rendered for them).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from gptlab.errors import GptlabError
from gptlab.tokenizer import EOT, Tokenizer

ROLES = ("system", "user", "assistant")


class PromptError(GptlabError):
    """A conversation that no prompt style can render (unknown role, no messages, ...)."""


@dataclass(frozen=True)
class Message:
    role: str
    content: str


def messages_from(items: Iterable[Mapping[str, Any] | Message], where: str = "") -> list[Message]:
    """Validated messages from {"role", "content"} mappings (requests, JSONL records, the terminal chat)."""
    prefix = f"{where}: " if where else ""
    result = []
    for i, item in enumerate(items):
        if isinstance(item, Message):
            result.append(item)
            continue
        role, content = (item.get("role"), item.get("content")) if isinstance(item, Mapping) else (None, None)
        if role not in ROLES:
            raise PromptError(f"{prefix}message {i} needs a role of {', '.join(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise PromptError(f"{prefix}message {i}: content must be a string, got {type(content).__name__}")
        result.append(Message(role, content))
    if not result:
        raise PromptError(f"{prefix}messages must hold at least one message")
    return result


@dataclass(frozen=True)
class PromptStyle:
    """A template: each message is header + content + end; an assistant's reply is what fine-tuning trains."""

    name: str
    header: str  # before a message's content; {role} and {Role} are filled in
    message_end: str  # after a system or user message
    reply_end: str  # after an assistant reply, trained: the model learns to close its turn with it
    reply_eot: bool  # a reply ends with <|endoftext|>, which the decoder stops on
    stop: tuple[str, ...] = ()  # stop strings that end a reply when generating

    def _header(self, role: str) -> str:
        return self.header.format(role=role, Role=role.capitalize())

    def render(self, messages: list[Message], generation_prompt: bool = True) -> str:
        """The conversation as text (what `encode` tokenizes), then the assistant's header to answer after."""
        text = "".join(self._header(m.role) + m.content
                       + (self.reply_end + (EOT if self.reply_eot else "") if m.role == "assistant" else self.message_end)
                       for m in messages)
        return text + (self._header("assistant") if generation_prompt else "")

    def encode(self, messages: list[Message], tokenizer: Tokenizer, generation_prompt: bool = True,
               ) -> tuple[list[int], list[bool]]:
        """Token ids of the conversation and, per token, whether fine-tuning trains it (each assistant reply
        with its end). Replies are encoded on their own, so the tokens before a reply are exactly those
        a generation prompt for it gets."""
        ids: list[int] = []
        trained: list[bool] = []
        prompt = ""
        for message in messages:
            if message.role != "assistant":
                prompt += self._header(message.role) + message.content + self.message_end
                continue
            prompt_ids = tokenizer.encode(prompt + self._header("assistant"))
            reply_ids = tokenizer.encode(message.content + self.reply_end) + ([tokenizer.eot_id] if self.reply_eot else [])
            ids += prompt_ids + reply_ids
            trained += [False] * len(prompt_ids) + [True] * len(reply_ids)
            prompt = ""
        if generation_prompt:
            prompt += self._header("assistant")
        tail = tokenizer.encode(prompt) if prompt else []
        return ids + tail, trained + [False] * len(tail)

    def prompt_ids(self, messages: list[Message], tokenizer: Tokenizer) -> list[int]:
        """The tokens a model answers the conversation after."""
        return self.encode(messages, tokenizer, generation_prompt=True)[0]


STYLES: dict[str, PromptStyle] = {style.name: style for style in (
    PromptStyle("chat", header="<|{role}|>\n", message_end="<|end|>\n", reply_end="<|end|>\n", reply_eot=False,
                stop=("<|end|>",)),
    PromptStyle("instruction", header="### {Role}:\n", message_end="\n\n", reply_end="", reply_eot=True),
    PromptStyle("plain", header="", message_end="\n", reply_end="", reply_eot=True),
)}
DEFAULT_STYLE = "chat"  # what a model that was never fine-tuned is prompted with


def get(name: str) -> PromptStyle:
    if name not in STYLES:
        raise PromptError(f"unknown prompt style {name!r}; choose one of: {', '.join(STYLES)}")
    return STYLES[name]


def style_of(payload: dict[str, Any]) -> PromptStyle:
    """The style a checkpoint was fine-tuned with; before styles were recorded, `gptlab finetune` trained on
    the instruction template and every other checkpoint was served with the chat template."""
    return get(payload.get("prompt_style") or ("instruction" if "finetune" in payload else DEFAULT_STYLE))
