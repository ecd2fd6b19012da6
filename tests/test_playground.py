"""The playground page in headless Chromium (the system's browser, driven by Playwright): type, see it stream."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tests.conftest import API_KEY, tiny_model_config
from tests.helpers import ServerProcess

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(os.environ.get("GPTLAB_TEST_ARTIFACTS", Path(__file__).resolve().parent.parent / "artifacts"))
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            pytest.fail("CI must install chromium (apt-get install chromium chromium-driver)")
        pytest.skip("no /usr/bin/chromium (apt-get install chromium chromium-driver)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=BROWSER_ARGS)
        yield browser
        browser.close()


def test_playground_streams_a_reply(server, browser):
    page = browser.new_page(viewport={"width": 1100, "height": 640})
    page.goto(server.url + "/")
    assert page.title() == "gptlab playground"
    page.fill("#api-key", API_KEY)
    page.dispatch_event("#api-key", "change")
    page.wait_for_selector("#model:has-text('model: tiny-chat')", timeout=10_000)

    page.eval_on_selector("#temperature", "el => { el.value = '1'; el.dispatchEvent(new Event('input')); }")
    page.fill("#max-tokens", "150")
    page.fill("#input", "Hello! Who are you?")
    # caught mid-stream: an observer notes the first text shown while the reply is still streaming (polling
    # from the test could miss that window on a busy machine)
    page.evaluate("""() => new MutationObserver((_, observer) => {
        const reply = document.querySelector('.msg.assistant.streaming .text');
        if (reply && reply.textContent.length > 0) { window.firstPartial = reply.textContent; observer.disconnect(); }
    }).observe(document.body, {childList: true, subtree: true, characterData: true})""")
    page.press("#input", "Enter")
    reply = page.wait_for_selector(".msg.assistant[data-done='true']", timeout=60_000)
    partial = page.evaluate("window.firstPartial")
    final = reply.query_selector(".text").text_content()

    assert page.text_content(".msg.user .text") == "Hello! Who are you?"
    assert not page.query_selector(".msg.error")
    assert final.startswith(partial) and len(final) > len(partial)
    assert int(reply.get_attribute("data-chunks")) > 1
    # every generated token is shaded by its probability, which hovering shows; the text stays the same
    spans = reply.query_selector_all(".text .tok")
    assert len(spans) > 1 and reply.query_selector(".text").text_content() == final
    assert all(0 < float(span.get_attribute("data-p")) <= 1 for span in spans)
    assert spans[0].get_attribute("title").startswith("p = ")
    stats = page.text_content("#stats")
    assert re.match(r"\d+ tokens in [\d.]+ s · first token after [\d.]+ s", stats), stats

    # a second turn: the history goes along, and the page shows both exchanges
    page.fill("#max-tokens", "24")
    page.fill("#input", "Tell me more.")
    page.press("#input", "Enter")
    page.wait_for_function("document.querySelectorAll(\".msg.assistant[data-done='true']\").length == 2",
                           timeout=30_000)
    assert len(page.query_selector_all(".msg.user")) == 2
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "playground.png"))
    page.close()


def test_playground_shows_api_errors(server, browser):
    page = browser.new_page()
    page.goto(server.url + "/")
    page.fill("#api-key", "wrong-key")
    page.dispatch_event("#api-key", "change")
    page.fill("#input", "Hello")
    page.press("#input", "Enter")
    error = page.wait_for_selector(".msg.error", timeout=10_000)
    assert "invalid API key" in error.text_content()
    page.close()


@pytest.fixture(scope="module")
def short_context_server(tmp_path_factory):
    """`gptlab serve` of a random-init model with GPT-2's tokenizer and a 256-token context: a reply of the
    playground's default 128 tokens leaves no room for a second exchange without trimming."""
    import torch

    from gptlab import checkpoint
    from gptlab.model import GPT
    from gptlab.tokenizer import load

    torch.manual_seed(0)
    model = GPT(tiny_model_config(vocab_size=50257, block_size=256))
    path = tmp_path_factory.mktemp("short-context") / "short-chat"
    checkpoint.save(path / checkpoint.CKPT_NAME, {"model": model.state_dict(), "model_config": model.config.to_dict(),
                                                  "tokenizer": load("gpt2").to_dict(), "step": 0})
    with ServerProcess(path, path.parent / "serve.log", "--threads", "1") as server:
        yield server


def test_playground_trims_history_to_the_context(short_context_server, browser):
    """Five messages in a row to a 256-token model at 128 max tokens: five replies, the oldest turns left out
    (with a note) as the conversation outgrows the context; then a message too long for the context fails
    on its own and the next one gets its reply (a failed turn is not kept)."""
    page = browser.new_page(viewport={"width": 1100, "height": 800})
    page.goto(short_context_server.url + "/")
    page.wait_for_selector("#model:has-text('context 256 tokens')", timeout=10_000)
    assert page.input_value("#max-tokens") == "128"

    def send(text: str, replies: int) -> None:
        page.fill("#input", text)
        page.press("#input", "Enter")
        page.wait_for_function(f"document.querySelectorAll(\".msg.assistant[data-done='true']\").length == {replies}"
                               " && !document.querySelector('.msg.assistant.streaming')", timeout=120_000)

    for turn in range(1, 6):
        send(f"Message number {turn}: tell me a story.", turn)
    assert not page.query_selector(".msg.error")
    replies = page.query_selector_all(".msg.assistant .text")
    assert len(replies) == 5 and all(reply.text_content() for reply in replies)
    notes = [note.text_content() for note in page.query_selector_all(".msg.note")]
    assert notes and all("256-token context" in note for note in notes), notes
    assert page.query_selector_all(".msg.user.dropped")  # left out, still shown

    page.fill("#max-tokens", "16")
    page.fill("#input", "word " * 400)
    page.press("#input", "Enter")
    error = page.wait_for_selector(".msg.error", timeout=30_000)
    assert "does not fit the model's context of 256 tokens" in error.text_content()
    send("And now a short one.", 6)
    assert len(page.query_selector_all(".msg.error")) == 1
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "playground-trimmed.png"), full_page=True)
    page.close()
