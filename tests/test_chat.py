"""`gptlab chat`: the session's history trimming, and the terminal chat driven through a pseudo-terminal against the server's answers."""

from __future__ import annotations

import sys

import openai
import pexpect
import pytest
import torch

from gptlab.chat import ChatSession
from gptlab.language_model import LanguageModel
from gptlab.model import GPT
from gptlab.prompts import STYLES, messages_from
from gptlab.tokenizer import load
from tests.conftest import API_KEY, tiny_model_config


@pytest.mark.usefixtures("one_torch_thread")
def test_chat_session_drops_the_oldest_turns_to_fit_the_context():
    torch.manual_seed(0)
    lm = LanguageModel(GPT(tiny_model_config(vocab_size=50257, block_size=64)), load("gpt2"))
    session = ChatSession(lm, system="Be brief.", max_new_tokens=8, temperature=0)
    pieces: list[str] = []
    replies = []
    for i in range(6):
        replies.append(session.reply(f"message number {i} with a few more words in it", pieces.append))
        prompt_tokens = len(STYLES["chat"].prompt_ids(messages_from(session.messages()[:-1]), lm.tokenizer))
        assert prompt_tokens + 8 <= 64 and session.messages()[-1] == {"role": "assistant", "content": replies[-1]}
    assert "".join(pieces) == "".join(replies)  # what was streamed is what was kept
    assert session.messages()[0]["role"] == "system" and "number 0" not in STYLES["chat"].render(messages_from(session.messages()))
    with pytest.raises(ValueError, match="does not fit"):
        session.reply("word " * 100, pieces.append)
    assert session.turns == []


def test_chat_repl_streams_keeps_history_and_uses_the_servers_template(chat_ckpt, server):
    """Every reply equals the server's chat completion for the same conversation (same template, same seed)."""
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)

    def server_reply(messages: list[dict]) -> str:
        out = client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=12, temperature=1.0,
                                             seed=3)
        return out.choices[0].message.content

    child = pexpect.spawn(sys.executable, ["-m", "gptlab", "chat", "--ckpt", str(chat_ckpt), "--temperature", "1",
                                           "--seed", "3", "--max-new-tokens", "12", "--threads", "1"], encoding="utf-8", timeout=90)
    try:
        child.expect_exact("/reset clears the history")
        child.expect_exact("> ")

        def say(line: str) -> str:
            """Type a line; return what the chat printed before its next prompt."""
            child.sendline(line)
            child.expect_exact("\r\n")  # the terminal echoes what was typed
            child.expect_exact("\r\n> ")
            return child.before.replace("\r\n", "\n")

        history = [{"role": "user", "content": "Hello"}]
        first = say("Hello")
        assert first == server_reply(history) and first.strip()
        history += [{"role": "assistant", "content": first}, {"role": "user", "content": "Tell me more"}]
        assert say("Tell me more") == server_reply(history)  # the history goes into the prompt

        assert say("/system Be brief.") == "(system prompt set)"
        system = [{"role": "system", "content": "Be brief."}]
        assert say("/reset") == "(history cleared)"
        assert say("Hello") == server_reply(system + [{"role": "user", "content": "Hello"}])
        assert "unknown command" in say("/nonsense")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
