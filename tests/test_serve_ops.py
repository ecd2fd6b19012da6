"""`gptlab serve` run safely (issue 17): limits that name their flag, named API keys from a file, the Host
check, per-key rate limits, /metrics parsed by prometheus_client, JSON access logs with prompts redacted, a
bad request that cannot hurt a running stream, and draining on SIGTERM. A real server process on 127.0.0.1
and real clients (openai, requests)."""

from __future__ import annotations

import json
import signal
import threading
import time

import openai
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from gptlab import cli
from gptlab.serve.ops import APIKey, exposure_warning, load_keys
from tests.helpers import ServerProcess

ALICE, BOB = "sk-alice-0123456789", "sk-bob-9876543210"


@pytest.fixture(scope="module")
def ops_server(chat_ckpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("ops")
    (root / "keys").write_text(f"# name:key\nalice:{ALICE}\n\nbob:{BOB}\n")
    proc = ServerProcess(chat_ckpt, root / "serve.log", "--threads", "1", "--max-batch-size", "4",
                         "--api-key-file", str(root / "keys"), "--allowed-hosts", "127.0.0.1,localhost",
                         "--rate-limit", "5", "--rate-burst", "60", "--max-stop", "4", "--max-tokenize-chars", "2000000",
                         "--max-body-bytes", "5000000",
                         "--max-request-tokens", "4096", "--max-prompt-tokens", "512", "--log-level", "info")
    yield proc
    proc.stop()


def post(server: ServerProcess, path: str, body: dict | None = None, key: str = ALICE, **kwargs) -> requests.Response:
    return requests.post(server.url + path, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60, **kwargs)


def metrics(server: ServerProcess) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics (no key needed, as vLLM's), parsed by prometheus_client's own parser."""
    text = requests.get(server.url + "/metrics", timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_a_bad_temperature_fails_alone_while_another_stream_runs(ops_server):
    """Issue 17's reproduction: {"temperature": 1e-40} (or 1e-39, 5e-324, repetition_penalty 1e-39) during a
    long stream used to answer 500 and kill the stream. Now: a 400 naming the parameter; the stream's text is
    exactly what the same request gives alone."""
    long = {"prompt": "Once upon a time", "max_tokens": 200, "temperature": 0, "ignore_eos": True}
    stream = post(ops_server, "/v1/completions", {**long, "stream": True}, stream=True)
    lines = stream.iter_lines()
    pieces = [json.loads(next(line for line in lines if line)[6:])["choices"][0]["text"]]
    for field, value in [("temperature", 1e-40), ("temperature", 1e-39), ("temperature", 5e-324),
                         ("repetition_penalty", 1e-39)]:
        bad = post(ops_server, "/v1/completions", {"prompt": "a", "max_tokens": 5, field: value})
        assert bad.status_code == 400 and field in bad.json()["error"]["message"], bad.text
    finish = None
    for line in lines:
        if line and line != b"data: [DONE]":
            choice = json.loads(line[6:])["choices"][0]
            pieces.append(choice["text"])
            finish = choice["finish_reason"] or finish
    alone = post(ops_server, "/v1/completions", long).json()["choices"][0]
    assert finish == "length" and "".join(pieces) == alone["text"]


def test_each_limit_is_a_4xx_that_names_its_flag(ops_server):
    cases = [  # (body, path, status, the flag the message names)
        ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "/v1/completions", 400, "--max-stop"),
        ({"prompt": "x", "stop": ["s" * 300]}, "/v1/completions", 400, "--max-stop-chars"),
        ({"prompt": "x", "max_tokens": 300, "n": 16}, "/v1/completions", 400, "--max-request-tokens"),
        ({"prompt": [list(range(10, 20))] * 5, "max_tokens": 900}, "/v1/completions", 400, "--max-request-tokens"),
        ({"prompt": list(range(600))}, "/v1/completions", 400, "--max-prompt-tokens"),
        ({"prompt": "word " * 450_000}, "/tokenize", 400, "--max-tokenize-chars"),
        # issue 17's 5.5 MB body of 100,000 stop strings: refused before any JSON parsing
        ({"prompt": "x", "stop": ["s" * 50] * 100_000}, "/v1/completions", 413, "--max-body-bytes"),
    ]
    for body, path, status, flag in cases:
        response = post(ops_server, path, body)
        error = response.json()["error"]
        assert response.status_code == status and flag in error["message"], (flag, response.text[:300])
        assert error["code"] == "limit_exceeded"
    chunked = post(ops_server, "/v1/completions", data=iter([b'{"prompt": "', b"x" * 5_000_000, b'"}']))
    assert chunked.status_code == 413  # no Content-Length: counted as it arrives
    with pytest.raises(openai.BadRequestError, match="--max-stop"):
        openai.OpenAI(base_url=ops_server.url + "/v1", api_key=ALICE, max_retries=0).completions.create(
            model="tiny-chat", prompt="x", stop=["1", "2", "3", "4", "5"])
    ok = post(ops_server, "/v1/completions", {"prompt": "x", "max_tokens": 2, "stop": ["a", "b", "c", "d"]})
    assert ok.status_code == 200  # and the server serves on


def test_a_megabyte_tokenize_gives_the_tokenizers_ids_without_stalling_other_requests(ops_server):
    """/tokenize encodes and serializes on a worker thread: while a 1 MB text of random words (~560,000 ids) is
    tokenized, /health keeps answering. On the event loop, one /health would wait about as long as the whole
    tokenization; the bound is half of it (both stretch alike on a loaded machine), and at least three /health
    answers must arrive meanwhile. The ids are exactly the tokenizer's."""
    import random

    from gptlab.tokenizer import load

    rng = random.Random(0)
    words = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9))) for _ in range(5000)]
    text = " ".join(rng.choices(words, k=170_000))[:1_000_000]
    answers: list[tuple[float, dict]] = []

    def tokenize() -> None:
        start = time.perf_counter()
        answer = post(ops_server, "/tokenize", {"prompt": text}).json()
        answers.append((time.perf_counter() - start, answer))

    worker = threading.Thread(target=tokenize)
    worker.start()
    health = []
    while worker.is_alive():
        start = time.perf_counter()
        requests.get(ops_server.url + "/health", timeout=60)
        health.append(time.perf_counter() - start)
    worker.join()
    (took, answer), = answers
    assert len(health) >= 3 and max(health) < took / 2, (took, sorted(health)[-3:])
    assert answer["tokens"] == load("gpt2").encode(text) and answer["count"] == len(answer["tokens"])


def test_named_keys_from_a_file_and_json_access_logs_without_prompts(ops_server):
    secret_prompt = "my secret prompt 4711"
    for key in (ALICE, BOB):
        assert post(ops_server, "/v1/completions", {"prompt": secret_prompt, "max_tokens": 2}, key=key).ok
    wrong = post(ops_server, "/v1/completions", {"prompt": "x"}, key="sk-wrong")
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    time.sleep(0.2)
    log = ops_server.log.read_text()
    records = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    mine = [r for r in records if r["path"] == "/v1/completions" and r.get("key") in ("alice", "bob")]
    assert {r["key"] for r in mine} == {"alice", "bob"} and all(r["status"] in (200, 400, 413) for r in mine)
    assert {"time", "client", "method", "status", "duration_s", "body_bytes"} <= set(mine[-1])
    assert any(r["status"] == 401 and "key" not in r for r in records)
    assert secret_prompt not in log and ALICE not in log and BOB not in log  # redacted; keys never logged


def test_host_header_is_checked(ops_server):
    port = ops_server.url.rsplit(":", 1)[1]
    evil = requests.get(ops_server.url + "/health", headers={"Host": "evil.example"}, timeout=10)
    assert evil.status_code == 400 and evil.json()["error"]["code"] == "invalid_host"
    assert requests.get(ops_server.url + "/health", headers={"Host": f"localhost:{port}"}, timeout=10).ok


def test_rate_limit_is_per_key_with_retry_after(ops_server):
    """bob spends his burst of 60: then 429 with Retry-After; alice's bucket is her own."""
    statuses, retry = [], None
    session = requests.Session()
    for _ in range(90):
        response = session.get(ops_server.url + "/v1/models", headers={"Authorization": f"Bearer {BOB}"}, timeout=10)
        statuses.append(response.status_code)
        if response.status_code == 429:
            retry, error = response.headers["Retry-After"], response.json()["error"]
    assert set(statuses) == {200, 429} and statuses[0] == 200
    assert int(retry) >= 1 and error["code"] == "rate_limit_exceeded" and "bob" in error["message"]
    assert requests.get(ops_server.url + "/v1/models", headers={"Authorization": f"Bearer {ALICE}"}, timeout=10).ok


def test_metrics_are_scraped_and_parsed(ops_server):
    before = metrics(ops_server)
    out = post(ops_server, "/v1/completions", {"prompt": "Counting tokens", "max_tokens": 5, "temperature": 0,
                                               "ignore_eos": True}).json()
    after = metrics(ops_server)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after[key] - before.get(key, 0.0)

    assert delta("gptlab:generation_tokens_total") == out["usage"]["completion_tokens"] == 5
    assert delta("gptlab:prompt_tokens_total") == out["usage"]["prompt_tokens"]
    assert delta("gptlab:request_success_total", finished_reason="length") == 1
    assert delta("gptlab:time_to_first_token_seconds_count") == 1
    assert delta("gptlab:e2e_request_latency_seconds_count") == 1
    assert delta("http_requests_total", handler="/v1/completions", method="POST", status="200") == 1
    assert after[("gptlab:num_requests_running", ())] == 0 and after[("gptlab:num_requests_waiting", ())] == 0
    assert after[("gptlab:avg_generation_throughput_toks_per_s", ())] > 0


def test_keys_are_never_empty_and_exposure_is_warned(tmp_path, chat_ckpt, capsys, monkeypatch):
    """`--api-key ""` used to turn authentication off silently: every empty key is now a one-line error."""
    (tmp_path / "keys").write_text("alice:\n")
    (tmp_path / "none").write_text("# nobody\n")
    monkeypatch.delenv("GPTLAB_API_KEY", raising=False)
    for flags, env, message in [(["--api-key", ""], None, "empty API key"),
                                (["--api-key-file", str(tmp_path / "keys")], None, "empty API key"),
                                (["--api-key-file", str(tmp_path / "none")], None, "holds no key"),
                                ([], "", "GPTLAB_API_KEY is set but empty"),
                                ([], "a:1,a:2", "unique")]:
        if env is not None:
            monkeypatch.setenv("GPTLAB_API_KEY", env)
        with pytest.raises(SystemExit) as exit_:
            cli.main(["serve", "--ckpt", str(chat_ckpt), "--port", "0", *flags])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and message in err and err.count("\n") == 1, err
        monkeypatch.delenv("GPTLAB_API_KEY", raising=False)
    keys = load_keys(None, None, {"GPTLAB_API_KEY": "ci:sk-1,sk-2"})
    assert [(k.name, k.key) for k in keys] == [("ci", "sk-1"), ("key-2", "sk-2")]
    assert "sk-1" not in repr(keys)
    assert "WITHOUT an API key" in exposure_warning("0.0.0.0", 8000, [])
    assert exposure_warning("0.0.0.0", 8000, [APIKey("a", "k")]) is None
    assert exposure_warning("127.0.0.1", 8000, []) is None and exposure_warning("::1", 8000, []) is None


def test_sigterm_drains_in_flight_requests_and_exits_0(chat_ckpt, tmp_path):
    """SIGTERM with streams running: no new connection is accepted, a short request finishes, streams longer
    than --drain-timeout end with a clean error event (then [DONE]), and the process exits 0."""
    proc = ServerProcess(chat_ckpt, tmp_path / "serve.log", "--threads", "1", "--max-batch-size", "4",
                         "--drain-timeout", "2")
    try:
        results: dict[int, tuple[str, list]] = {}

        def stream(i: int, max_tokens: int) -> None:
            body = {"prompt": "Hi", "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
            with requests.post(proc.url + "/v1/completions", json=body, stream=True, timeout=120) as response:
                events = [line[6:].decode() for line in response.iter_lines() if line]
            results[i] = (events[-1], [json.loads(e) for e in events[:-1]])

        clients = [threading.Thread(target=stream, args=(i, 1000)) for i in range(3)]
        clients.append(threading.Thread(target=stream, args=(3, 3)))
        for client in clients:
            client.start()
        time.sleep(1.0)
        while requests.get(proc.url + "/health", timeout=10).json()["active"] < 3:
            time.sleep(0.05)
        proc.proc.send_signal(signal.SIGTERM)
        for client in clients:
            client.join(timeout=60)
        assert proc.proc.wait(timeout=60) == 0
        with pytest.raises(requests.ConnectionError):
            requests.get(proc.url + "/health", timeout=5)
        assert all(last == "[DONE]" for last, _ in results.values()) and len(results) == 4
        assert results[3][1][-1]["choices"][0]["finish_reason"] == "length"
        for i in range(3):
            last = results[i][1][-1]
            assert last.get("error", {}).get("code") == "shutting_down" or \
                last["choices"][0]["finish_reason"] == "length", last
        assert any("error" in results[i][1][-1] for i in range(3))  # 1000 tokens outlast a 2 s drain
    finally:
        proc.stop()
