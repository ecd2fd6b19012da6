"""`gptlab serve` as a real process on 127.0.0.1, driven by real clients (openai, requests, lm-eval)."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import openai
import pytest
import requests
import torch

from gptlab import cli
from gptlab.language_model import LanguageModel
from gptlab.prompts import STYLES, messages_from
from tests.conftest import API_KEY, load_gpt
from tests.helpers import ServerProcess

CHAT = STYLES["chat"]
AUTH = {"Authorization": f"Bearer {API_KEY}"}
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def lm(chat_ckpt) -> LanguageModel:
    return LanguageModel.load(chat_ckpt)


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


def greedy(lm: LanguageModel, prompt: str, max_tokens: int, **extra) -> str:
    return lm.generate(prompt, max_new_tokens=max_tokens, temperature=0, **extra)[0]


def sampled_chat(lm: LanguageModel, messages: list[dict], max_tokens: int, seed: int) -> str:
    """The in-process reply (sampled: this random model's greedy chat replies are all newlines)."""
    return lm.generate([chat_ids(lm, messages)], max_new_tokens=max_tokens, temperature=1.0, seed=seed,
                       stop=list(CHAT.stop))[0]


def chat_ids(lm: LanguageModel, messages: list[dict]) -> list[int]:
    """The prompt a base model gets for a conversation: the chat style (gptlab.prompts)."""
    return CHAT.prompt_ids(messages_from(messages), lm.tokenizer)


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny-chat"]
    assert client.models.retrieve("tiny-chat").id == "tiny-chat"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    health = requests.get(server.url + "/health", timeout=10).json()  # public: no key needed
    assert health["status"] == "ok" and health["max_batch_size"] == 8


def test_completion_matches_in_process_generation(client, lm):
    out = client.completions.create(model="tiny-chat", prompt="The meaning of life is", max_tokens=12,
                                    temperature=0)
    assert out.choices[0].text == greedy(lm, "The meaning of life is", 12)
    assert out.choices[0].finish_reason == "length" and out.object == "text_completion"
    n_prompt = len(lm.tokenizer.encode("The meaning of life is"))
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == \
        (n_prompt, 12, n_prompt + 12)
    # a batch of prompts (text and token ids) gives one choice per prompt, in order
    ids = lm.tokenizer.encode("Once upon a time")
    batch = client.completions.create(model="tiny-chat", prompt=[ids, ids[:2]], max_tokens=5, temperature=0)
    assert [c.text for c in batch.choices] == [greedy(lm, "Once upon a time", 5),
                                              greedy(lm, lm.tokenizer.decode(ids[:2]), 5)]


def test_chat_matches_in_process_generation_with_the_shared_template(client, lm):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]
    out = client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=10, temperature=1.0,
                                         seed=7)
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == sampled_chat(lm, messages, 10, seed=7) != ""
    assert out.usage.prompt_tokens == len(chat_ids(lm, messages))


def test_streaming_gives_the_same_text_in_pieces(client, lm):
    prompt = "In the beginning"
    chunks = list(client.completions.create(model="tiny-chat", prompt=prompt, max_tokens=16, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text_chunks = [c for c in chunks if c.choices]
    assert len(text_chunks) > 1 and "".join(c.choices[0].text for c in text_chunks) == greedy(lm, prompt, 16)
    assert text_chunks[-1].choices[0].finish_reason == "length" and chunks[-1].usage.completion_tokens == 16

    messages = [{"role": "user", "content": "Tell me a story."}]
    chunks = list(client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=16,
                                                 temperature=1.0, seed=5, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c.choices[0].delta.content for c in chunks if c.choices[0].delta.content]
    assert len(content) > 1 and "".join(content) == sampled_chat(lm, messages, 16, seed=5)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_raw_sse_framing(server):
    response = requests.post(server.url + "/v1/completions", headers=AUTH, stream=True, timeout=30,
                             json={"prompt": "Hi", "max_tokens": 3, "temperature": 0, "stream": True})
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [line for line in response.iter_lines(decode_unicode=True) if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert [json.loads(e[6:])["object"] for e in events[:-1]] == ["text_completion"] * 3


def test_stop_sequences_and_finish_reason(client, lm):
    full = greedy(lm, "Hello", 20)
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert stop.strip(), f"pick a visible stop string from {full!r}"
    out = client.completions.create(model="tiny-chat", prompt="Hello", max_tokens=20, temperature=0, stop=[stop])
    assert out.choices[0].text == full[: full.index(stop)] and out.choices[0].finish_reason == "stop"


def test_n_choices_and_seed(client):
    def sample() -> list[str]:
        out = client.completions.create(model="tiny-chat", prompt="Once", max_tokens=8, n=3, seed=42,
                                        temperature=1.0, top_p=0.95, presence_penalty=0.5,
                                        frequency_penalty=0.5, extra_body={"top_k": 50})
        assert [c.index for c in out.choices] == [0, 1, 2]
        return [c.text for c in out.choices]
    first = sample()
    assert sample() == first and len(set(first)) == 3  # same seed: same samples; each choice its own


def test_every_sequence_of_a_seeded_request_has_its_own_seed(client):
    """Prompt p's choice c samples with seed + p * n + c: two prompts with n=2 give four different texts, each
    what a one-prompt request with that seed gives (so a rerun repeats them)."""
    def texts(prompt, seed: int) -> list[str]:
        out = client.completions.create(model="tiny-chat", prompt=prompt, max_tokens=8, n=2, seed=seed,
                                        temperature=1.0)
        return [c.text for c in out.choices]
    both = texts(["ROMEO:", "JULIET:"], 42)
    assert len(set(both)) == 4
    assert both == texts("ROMEO:", 42) + texts("JULIET:", 44)


def test_beam_search_requests_are_refused_not_ignored(client):
    for extra in ({"use_beam_search": True}, {"best_of": 3}):
        with pytest.raises(openai.BadRequestError, match=next(iter(extra))):
            client.completions.create(model="tiny-chat", prompt="Once", max_tokens=4, temperature=0.8,
                                      extra_body=extra)


def test_logprobs(client, lm):
    out = client.completions.create(model="tiny-chat", prompt="Hello", max_tokens=4, temperature=0, logprobs=3)
    lp = out.choices[0].logprobs
    assert "".join(lp.tokens) == out.choices[0].text and len(lp.token_logprobs) == 4
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert len(top) == 3 and max(top.values()) == logprob and top[token] == logprob  # greedy: the top pick
    assert lp.text_offset[0] == len("Hello")
    chunks = client.completions.create(model="tiny-chat", prompt="Hello", max_tokens=4, temperature=0, logprobs=3,
                                       stream=True)
    streamed = [c.choices[0].logprobs for c in chunks if c.choices[0].logprobs]
    for field in ("tokens", "token_logprobs", "text_offset"):
        assert sum((getattr(s, field) for s in streamed), []) == getattr(lp, field)

    chat = client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=3, temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob == c.logprob for c in content)


def test_echo_returns_the_prompts_own_logprobs(client, lm):
    ids = lm.tokenizer.encode("The quick brown fox jumps")
    out = client.completions.create(model="tiny-chat", prompt=ids, max_tokens=1, temperature=0, logprobs=1,
                                    echo=True)
    lp = out.choices[0].logprobs
    with torch.no_grad():
        expected = lm.model(torch.tensor([ids]))[0][0].float().log_softmax(-1)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for pos in range(1, len(ids)):
        assert lp.token_logprobs[pos] == pytest.approx(float(expected[pos - 1, ids[pos]]), abs=1e-4)
        assert max(lp.top_logprobs[pos].values()) == pytest.approx(float(expected[pos - 1].max()), abs=1e-4)
    assert out.choices[0].text.startswith("The quick brown fox jumps") and len(lp.tokens) == len(ids) + 1
    only_prompt = client.completions.create(model="tiny-chat", prompt=ids, max_tokens=0, echo=True, logprobs=0)
    assert only_prompt.choices[0].text == "The quick brown fox jumps" and only_prompt.usage.completion_tokens == 0
    full_context = client.completions.create(model="tiny-chat", prompt=(ids * 300)[:1024], max_tokens=0, echo=True,
                                             logprobs=0)  # scoring may use the whole context
    assert len(full_context.choices[0].logprobs.token_logprobs) == 1024


def test_errors_have_openai_shape_and_status(server, client):
    bad_key = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_key.models.list()
    assert requests.get(server.url + "/v1/models", timeout=10).status_code == 401  # no key at all
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="tiny-chat", prompt="x", temperature=3)
    with pytest.raises(openai.BadRequestError, match="maximum context length") as err:
        client.completions.create(model="tiny-chat", prompt="word " * 1000, max_tokens=100)
    assert err.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="far longer") as err:  # refused without tokenizing it
        client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "x" * 200_000}])
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])
    assert err.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny-chat", messages=[{"role": "robot", "content": "x"}])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny-chat", messages=[])

    for method, path, body, status in [("POST", "/v1/completions", '{"prompt": "x",', 422),
                                       ("POST", "/v1/completions", '{"max_tokens": 5}', 400),
                                       ("POST", "/v1/completions", '{"prompt": "x", "n": "many"}', 400),
                                       ("GET", "/v1/nowhere", None, 404)]:
        response = requests.request(method, server.url + path, data=body, timeout=10,
                                    headers={**AUTH, "Content-Type": "application/json"})
        error = response.json()["error"]
        assert response.status_code == status and error["message"] and {"type", "param", "code"} <= set(error)


def test_backpressure_and_disconnect_free_the_slot(chat_ckpt, tmp_path):
    """One slot, a waiting line of one: a third request gets 429; a client that goes away frees its slot."""
    proc = ServerProcess(chat_ckpt, tmp_path / "serve.log", "--max-batch-size", "1", "--max-queue", "1",
                         "--threads", "1")
    try:
        health = lambda: requests.get(proc.url + "/health", timeout=10).json()  # noqa: E731
        long = {"prompt": "Hi", "max_tokens": 1000, "ignore_eos": True, "stream": True}
        streaming = requests.post(proc.url + "/v1/completions", json=long, stream=True, timeout=30)
        lines = streaming.iter_lines()
        assert next(line for line in lines if line).startswith(b"data: ")  # generating: the slot is taken

        waiting: dict = {}
        waiter = threading.Thread(target=lambda: waiting.update(requests.post(
            proc.url + "/v1/completions", json={"prompt": "Yo", "max_tokens": 3}, timeout=60).json()))
        waiter.start()
        deadline = time.monotonic() + 10
        while health()["waiting"] != 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        busy = requests.post(proc.url + "/v1/completions", json={"prompt": "Hey", "max_tokens": 3}, timeout=10)
        assert busy.status_code == 429 and busy.json()["error"]["code"] == "queue_full"
        assert busy.headers["retry-after"] == "1"
        too_big = requests.post(proc.url + "/v1/completions", json={"prompt": "Hey", "max_tokens": 3, "n": 2},
                                timeout=10)
        assert too_big.status_code == 400 and too_big.json()["error"]["param"] == "n"  # could never fit

        streaming.close()  # the client goes away mid-stream
        waiter.join(timeout=30)
        assert waiting["choices"][0]["finish_reason"] == "length"  # the freed slot served the waiting request
        stats = health()
        assert stats["cancelled"] == 1 and stats["active"] == 0 and stats["finished"] == 1

        with pytest.raises(requests.exceptions.ReadTimeout):  # a non-streaming client that gives up
            requests.post(proc.url + "/v1/completions", timeout=0.5,
                          json={"prompt": "Hi", "max_tokens": 1000, "ignore_eos": True})
        deadline = time.monotonic() + 10
        while health()["cancelled"] != 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert health()["cancelled"] == 2 and health()["active"] == 0
    finally:
        proc.stop()


def test_load_32_clients_mixed_streaming_none_lost(server, lm):
    """32 concurrent clients x 4 requests (completions/chat, streaming or not): every answer is exactly the
    in-process text (greedy, or seeded sampling), requests share batches, /health answers throughout, and
    bad requests sent meanwhile fail on their own."""
    prompts = ["The king", "A ship", "In the morning", "She said", "Numbers:", "Once", "Why", "Rain"]
    jobs = [(c, r, prompts[(c + r) % len(prompts)], 4 + (c % 2) * 4) for c in range(32) for r in range(4)]
    expected = {}  # (0 completion | 1 chat, prompt, max_tokens) -> the text generated in-process
    for max_tokens in {j[3] for j in jobs}:
        texts = lm.generate(prompts, max_new_tokens=max_tokens, temperature=0)
        # each chat request alone has seed 11 (in one seeded batch, prompt i would sample with 11 + i)
        chats = [lm.generate([chat_ids(lm, [{"role": "user", "content": p}])], max_new_tokens=max_tokens,
                             temperature=1.0, seed=11, stop=list(CHAT.stop))[0] for p in prompts]
        for prompt, text, chat in zip(prompts, texts, chats, strict=True):
            expected[0, prompt, max_tokens], expected[1, prompt, max_tokens] = text, chat

    health_latency: list[float] = []
    peak = [0]
    bad_statuses: list[bool] = []
    done = threading.Event()
    bad_requests = [('{"prompt": "x", "max_tokens": ', 422), ('{"prompt": "x", "temperature": 5}', 400),
                    ('{"prompt": "' + "word " * 1100 + '"}', 400), ('{"prompt": [99999999]}', 400)]

    def poll_health_and_send_bad_requests() -> None:
        """Meanwhile: /health must answer fast, and bad requests must fail alone (the answers stay exact)."""
        while not done.is_set():
            start = time.monotonic()
            stats = requests.get(server.url + "/health", timeout=10).json()
            health_latency.append(time.monotonic() - start)
            peak[0] = max(peak[0], stats["active"])
            body, status = bad_requests[len(health_latency) % len(bad_requests)]
            response = requests.post(server.url + "/v1/completions", data=body, timeout=10,
                                     headers={**AUTH, "Content-Type": "application/json"})
            bad_statuses.append(response.status_code == status)
            time.sleep(0.05)

    async def one_client(aclient: openai.AsyncOpenAI, c: int) -> list[tuple]:
        answers = []
        for _, r, prompt, max_tokens in [j for j in jobs if j[0] == c]:
            stream = (c + r) % 2 == 1
            if r % 2 == 0:
                out = await aclient.completions.create(model="tiny-chat", prompt=prompt, max_tokens=max_tokens,
                                                       temperature=0, stream=stream)
                text = ("".join([ch.choices[0].text async for ch in out]) if stream else out.choices[0].text)
            else:
                out = await aclient.chat.completions.create(
                    model="tiny-chat", messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
                    temperature=1.0, seed=11, stream=stream)
                text = ("".join([ch.choices[0].delta.content or "" async for ch in out]) if stream
                        else out.choices[0].message.content)
            answers.append(((r % 2, prompt, max_tokens), text))
        return answers

    async def all_clients() -> list[tuple]:
        aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
        results = await asyncio.gather(*(one_client(aclient, c) for c in range(32)))
        return [answer for answers in results for answer in answers]

    poller = threading.Thread(target=poll_health_and_send_bad_requests)
    poller.start()
    try:
        answers = asyncio.run(all_clients())
    finally:
        done.set()
        poller.join()
    assert len(answers) == 128
    wrong = [(key, text) for key, text in answers if text != expected[key]]
    assert not wrong, wrong[:3]
    assert peak[0] > 1, "requests were decoded one at a time"
    assert len(health_latency) >= 3 and max(health_latency) < 2.0
    assert all(bad_statuses)


def test_lm_eval_local_completions_matches_in_process(server, chat_ckpt, tmp_path, monkeypatch):
    """lm-evaluation-harness scores a local multiple-choice task through the API (echo + logprobs) and gets the
    same accuracy and loglikelihoods as evaluating the checkpoint in-process (its HF GPT-2 conversion)."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from gptlab import hf

    questions = [("The sky is", [" blue", " green", " loud"]), ("Fire is", [" hot", " cold", " square"]),
                 ("Two plus two is", [" four", " five", " nine"]), ("Ice is", [" cold", " warm", " purple"]),
                 ("The sun rises in the", [" east", " west", " sea"]), ("Cats like to", [" sleep", " fly"]),
                 ("Water is", [" wet", " dry", " loud"]), ("A week has seven", [" days", " hours"]),
                 ("Birds can", [" fly", " read", " sing"]), ("Snow is", [" white", " black", " red"]),
                 ("Paris is in", [" France", " Peru"]), ("Lemons taste", [" sour", " sweet", " salty"])]
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": 0}) + "\n" for q, c in questions))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "gptlab_qa.yaml").write_text(f"""task: gptlab_qa
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
""")
    tasks = TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False)

    def evaluate(model: str, model_args: str) -> tuple[float, list[list[float]]]:
        result = simple_evaluate(model=model, model_args=model_args, tasks=["gptlab_qa"], task_manager=tasks,
                                 log_samples=True, batch_size=4)
        samples = sorted(result["samples"]["gptlab_qa"], key=lambda s: s["doc_id"])
        return result["results"]["gptlab_qa"]["acc,none"], [[r[0][0] for r in s["resps"]] for s in samples]

    api_acc, api_ll = evaluate("local-completions", f"model=tiny-chat,base_url={server.url}/v1/completions,"
                                                    f"tokenizer_backend=remote,auth_token={API_KEY},max_length=1024,num_concurrent=2")
    model, tokenizer = load_gpt(chat_ckpt)
    hf.save_hf(model, tokenizer, tmp_path / "hf-model")
    local_acc, local_ll = evaluate("hf", f"pretrained={tmp_path / 'hf-model'},device=cpu,dtype=float32")
    assert api_acc == local_acc
    assert [len(ll) for ll in api_ll] == [len(c) for _, c in questions]
    flat_api, flat_local = sum(api_ll, []), sum(local_ll, [])
    assert flat_api == pytest.approx(flat_local, abs=1e-3) and len(set(flat_api)) == len(flat_api)
    assert 0 < api_acc < 1  # a real spread of right and wrong answers, not a degenerate score


def test_cli_errors_are_one_line(chat_ckpt, tmp_path, server, capsys):
    port = server.url.rsplit(":", 1)[1]
    for args, message in [(["--ckpt", str(chat_ckpt), "--port", port], "cannot listen"),
                          (["--ckpt", str(tmp_path / "missing")], "checkpoint not found"),
                          (["--ckpt", str(chat_ckpt), "--max-batch-size", "0"], "max batch size")]:
        with pytest.raises(SystemExit) as exit_:
            cli.main(["serve", "--port", "0", *args])
        stderr = capsys.readouterr().err
        assert exit_.value.code == 2 and message in stderr and stderr.count("\n") == 1, stderr


def test_listening_socket_gets_tcp_nodelay_connections():
    """asyncio sets TCP_NODELAY only on IPPROTO_TCP sockets; without it small responses wait for delayed ACKs."""
    import socket

    from gptlab.serve import listen

    with listen("127.0.0.1", 0) as sock:
        assert sock.proto == socket.IPPROTO_TCP and sock.getsockname()[1] > 0
