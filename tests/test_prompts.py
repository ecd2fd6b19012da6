"""Prompt styles: what each renders, what fine-tuning trains in it, and which style a checkpoint gets."""

from __future__ import annotations

import pytest

from gptlab import prompts
from gptlab import tokenizer as tok
from gptlab.prompts import STYLES, Message, PromptError, messages_from

CONVERSATION = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]


def test_chat_style_renders_turns_and_the_assistant_cue():
    assert STYLES["chat"].render(messages_from(CONVERSATION)) == (
        "<|system|>\nBe kind.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\nHello!<|end|>\n"
        "<|user|>\nBye<|end|>\n<|assistant|>\n")
    assert STYLES["chat"].stop == ("<|end|>",)
    with pytest.raises(PromptError, match="role"):
        messages_from([{"role": "robot", "content": "x"}])
    with pytest.raises(PromptError, match="content must be a string"):
        messages_from([{"role": "user", "content": 3}])
    with pytest.raises(PromptError, match="at least one"):
        messages_from([])


def test_instruction_and_plain_styles():
    messages = messages_from(CONVERSATION)
    assert STYLES["instruction"].render(messages) == (
        "### System:\nBe kind.\n\n### User:\nHi\n\n### Assistant:\nHello!<|endoftext|>### User:\nBye\n\n"
        "### Assistant:\n")
    assert STYLES["plain"].render(messages) == "Be kind.\nHi\nHello!<|endoftext|>Bye\n"


@pytest.mark.parametrize("name,end", [("chat", "<|end|>\n"), ("instruction", "<|endoftext|>")])
def test_encode_trains_each_reply_with_its_end_and_matches_the_generation_prompt(name, end):
    tokenizer, style = tok.load("gpt2"), STYLES[name]
    messages = messages_from(CONVERSATION) + [Message("assistant", "Fine.")]
    ids, trained = style.encode(messages, tokenizer, generation_prompt=False)
    assert tokenizer.decode(ids) == style.render(messages, generation_prompt=False)
    assert tokenizer.decode([i for i, t in zip(ids, trained, strict=True) if t]) == f"Hello!{end}Fine.{end}"
    prompt = style.prompt_ids(messages[:-1], tokenizer)  # what a server answering the conversation sends
    assert ids[: len(prompt)] == prompt and all(trained[len(prompt):])
    assert tokenizer.decode(ids[len(prompt):]) == f"Fine.{end}"


def test_a_checkpoint_gets_the_style_it_was_fine_tuned_with():
    assert prompts.style_of({"prompt_style": "chat", "finetune": {}}).name == "chat"
    # written before styles were recorded: `gptlab finetune` trained on the instruction template ...
    assert prompts.style_of({"finetune": {}}).name == "instruction"
    # ... and every other model was served with the chat template
    assert prompts.style_of({}).name == "chat"
    with pytest.raises(PromptError, match="unknown prompt style"):
        prompts.get("alpaca")
