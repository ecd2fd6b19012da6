"""OpenAI-compatible HTTP serving with continuous batching: `gptlab serve`.

Requests are validated, tokenized and answered on the asyncio event loop. One background thread, the
`Engine`, owns the `Decoder`: between decode steps it admits waiting sequences into free KV-cache slots
(continuous batching, so concurrent requests share every forward pass) and hands each token event to its
request's asyncio queue. The waiting line is bounded (429 when full) and a client that disconnects has its
sequences cancelled, which frees their slots at the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import select
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from gptlab.chat import END_OF_TURN, chat_prompt
from gptlab.config import ConfigError
from gptlab.errors import GptlabError
from gptlab.generate import Decoder, LanguageModel, SamplingConfig, TokenEvent

log = logging.getLogger("gptlab.serve")
PUBLIC_PATHS = {"/", "/health", "/docs", "/openapi.json"}  # everything else needs the key when one is set


# --- errors in OpenAI's shape ----------------------------------------------------------------------------
class APIError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.kind = status, message, code, param, kind

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        headers = {"Retry-After": "1"} if self.status == 429 else None
        return JSONResponse(body, status_code=self.status, headers=headers)


class QueueFull(APIError):
    def __init__(self, waiting: int) -> None:
        super().__init__(429, f"the server is busy ({waiting} sequences waiting); retry later",
                         code="queue_full", kind="rate_limit_error")


class ClientDisconnected(Exception):
    """The client went away; its sequences were cancelled."""


def _validation_error(_: Request, err: RequestValidationError) -> JSONResponse:
    """Malformed JSON is 422; well-formed JSON with bad or missing parameters is 400, as OpenAI answers."""
    errors = err.errors()
    if any(e["type"] == "json_invalid" for e in errors):
        return APIError(422, f"the request body is not valid JSON: {errors[0].get('ctx', {}).get('error', '')}",
                        code="invalid_json").response()
    first = errors[0]
    param = ".".join(str(part) for part in first["loc"] if part != "body") or None
    message = f"{param}: {first['msg']}" if param else first["msg"]
    return APIError(400, message, code="invalid_parameter", param=param).response()


def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
    if err.status_code == 404:
        return APIError(404, f"unknown route {request.method} {request.url.path}", code="not_found").response()
    return APIError(err.status_code, str(err.detail)).response()


class APIKeyMiddleware:
    """Require `Authorization: Bearer KEY` (a plain ASGI middleware, so streams pass straight through)."""

    def __init__(self, app: Any, api_key: str) -> None:
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and scope["path"] not in PUBLIC_PATHS:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                message = "invalid API key" if given else "missing API key (send Authorization: Bearer KEY)"
                await APIError(401, message, code="invalid_api_key").response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


# --- request bodies --------------------------------------------------------------------------------------
class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingParams(BaseModel):
    """Fields shared by completions and chat; unknown OpenAI fields (user, metadata, ...) are ignored."""

    model_config = ConfigDict(extra="allow")
    model: str | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = None  # extension (as in vLLM); absent or <= 0 means off
    min_p: float | None = Field(None, ge=0, le=1)  # extension
    repetition_penalty: float | None = Field(None, gt=0)  # extension
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    n: int | None = Field(None, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool | None = False  # extension (as in vLLM): keep going past <|endoftext|> (benchmarks)


class CompletionRequest(SamplingParams):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool | None = False
    suffix: str | None = None


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def as_dict(self) -> dict[str, str]:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class ChatRequest(SamplingParams):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Any] | None = None


class TokenizeRequest(BaseModel):  # vLLM's /tokenize (lm-evaluation-harness's remote tokenizer uses it)
    model_config = ConfigDict(extra="allow")
    prompt: str | None = None
    messages: list[ChatMessage] | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    tokens: list[int]


# --- the engine: one thread owns the decoder -------------------------------------------------------------
@dataclass(eq=False)
class Sequence:
    """One generated choice; `deliver` hands its events (or an error) to the waiting request."""

    index: int
    prompt_ids: list[int]
    cfg: SamplingConfig
    deliver: Callable[[TokenEvent | Exception], None]
    cancelled: bool = False


@dataclass
class EngineStats:
    active: int = 0  # sequences in decoder slots
    waiting: int = 0  # sequences queued for a slot
    peak_active: int = 0  # the largest batch decoded so far
    finished: int = 0
    cancelled: int = 0
    steps: int = 0


class Engine:
    """Continuous batching: admit waiting sequences into free slots, step the decoder, dispatch events."""

    def __init__(self, decoder: Decoder, max_queue: int) -> None:
        self.decoder = decoder
        self.max_queue = max_queue
        self.stats = EngineStats()
        self._cond = threading.Condition()
        self._waiting: deque[Sequence] = deque()
        self._jobs: deque[Callable[[], None]] = deque()
        self._running: dict[int, Sequence] = {}  # slot -> sequence; touched by the engine thread only
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="gptlab-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout=10)

    def submit(self, sequences: list[Sequence]) -> None:
        """Queue all sequences of one request, or none of them (QueueFull) when the line is too long."""
        if len(sequences) > self.max_queue:  # could never fit: retrying would not help
            raise APIError(400, f"the request asks for {len(sequences)} sequences (prompts x n); this server "
                           f"queues at most {self.max_queue}", param="n")
        with self._cond:
            waiting = len(self._waiting) + len(self._jobs)
            if waiting + len(sequences) > self.max_queue:
                raise QueueFull(waiting)
            self._waiting.extend(sequences)
            self.stats.waiting = len(self._waiting)
            self._cond.notify()

    def cancel(self, sequences: list[Sequence]) -> None:
        with self._cond:
            for seq in sequences:
                seq.cancelled = True
                if seq in self._waiting:
                    self._waiting.remove(seq)
                    self.stats.cancelled += 1
            self.stats.waiting = len(self._waiting)
            self._cond.notify()

    async def run(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` (a model computation) on the engine thread between steps, so forwards never overlap."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()

        def settle(result: Any, error: BaseException | None) -> None:
            if not future.done():
                future.set_exception(error) if error else future.set_result(result)

        def job() -> None:
            try:
                result, error = fn(), None
            except Exception as err:  # handed to the request, which answers 500
                result, error = None, err
            with contextlib.suppress(RuntimeError):  # the event loop is already closed
                loop.call_soon_threadsafe(settle, result, error)

        with self._cond:
            if len(self._waiting) + len(self._jobs) >= self.max_queue:
                raise QueueFull(len(self._waiting) + len(self._jobs))
            self._jobs.append(job)
            self._cond.notify()
        return await future

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._stopping or self._waiting or self._jobs or self._running)
                if self._stopping:
                    return
                jobs, self._jobs = self._jobs, deque()
                admitted = [self._waiting.popleft() for _ in range(min(len(self._waiting), self.decoder.free_slots))]
                self.stats.waiting = len(self._waiting)
            for job in jobs:
                job()
            for seq in admitted:
                if seq.cancelled:
                    self.stats.cancelled += 1
                    continue
                try:
                    self._running[self.decoder.add(seq.prompt_ids, seq.cfg)] = seq
                except GptlabError as err:
                    seq.deliver(APIError(400, str(err)))
            for slot, seq in list(self._running.items()):
                if seq.cancelled:
                    self.decoder.cancel(slot)
                    del self._running[slot]
                    self.stats.cancelled += 1
            self.stats.active = len(self._running)
            if self._running:
                self._step()

    def _step(self) -> None:
        self.stats.peak_active = max(self.stats.peak_active, len(self._running))
        try:
            events = self.decoder.step()
        except Exception as err:  # a decoder bug must not kill the server: fail the batch, keep serving
            log.exception("decoder step failed")
            for slot, seq in self._running.items():
                self.decoder.cancel(slot)
                seq.deliver(APIError(500, f"generation failed: {err}", kind="server_error"))
            self._running.clear()
            return
        self.stats.steps += 1
        deliveries = [(self._running[slot], event) for slot, event in events.items()]
        for slot, event in events.items():
            if event.finish_reason is not None:
                del self._running[slot]
                self.stats.finished += 1
        self.stats.active = len(self._running)  # up to date before any client hears it is done
        for seq, event in deliveries:
            seq.deliver(event)


class Run:
    """The sequences of one request, read on the event loop as (choice index, event) pairs."""

    def __init__(self, engine: Engine, prompts: list[list[int]], configs: list[SamplingConfig]) -> None:
        """Choice i decodes prompts[i // len(configs)] with configs[i % len(configs)] (n choices per prompt)."""
        loop = asyncio.get_running_loop()
        self.engine = engine
        self.queue: asyncio.Queue[tuple[int, TokenEvent | Exception]] = asyncio.Queue()
        self.sequences = [Sequence(i, prompts[i // len(configs)], configs[i % len(configs)], self._deliver(loop, i))
                          for i in range(len(prompts) * len(configs))]
        self.unfinished = set(range(len(self.sequences)))
        self.watcher: asyncio.Task | None = None

    def _deliver(self, loop: asyncio.AbstractEventLoop, index: int) -> Callable[[TokenEvent | Exception], None]:
        def deliver(item: TokenEvent | Exception) -> None:  # called on the engine thread
            with contextlib.suppress(RuntimeError):  # the event loop is already closed
                loop.call_soon_threadsafe(self.queue.put_nowait, (index, item))
        return deliver

    def start(self, request: Request) -> None:
        """Queue the sequences (QueueFull: 429 before any response starts) and watch for the client leaving."""
        self.engine.submit(self.sequences)
        self.watcher = asyncio.create_task(self._cancel_on_disconnect(request))

    async def events(self) -> AsyncIterator[tuple[int, TokenEvent]]:
        """Yield events until every choice has finished; whatever is left is cancelled on exit."""
        try:
            while self.unfinished:
                index, item = await self.queue.get()
                if isinstance(item, Exception):
                    raise item
                if item.finish_reason is not None:
                    self.unfinished.discard(index)
                yield index, item
        finally:
            if self.watcher:
                self.watcher.cancel()
            self.cancel()

    async def _cancel_on_disconnect(self, request: Request) -> None:
        # the body is already read, so the next message is the disconnect (or the end of the response)
        while (await request.receive())["type"] != "http.disconnect":
            pass
        if self.unfinished:
            self.cancel()
            self.queue.put_nowait((-1, ClientDisconnected()))

    def cancel(self) -> None:
        if self.unfinished:
            self.engine.cancel([self.sequences[i] for i in self.unfinished])
            self.unfinished.clear()


@dataclass
class Choice:
    """What one choice has produced so far."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float | None] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]] | None] = field(default_factory=list)
    finish_reason: str | None = None

    def add(self, event: TokenEvent) -> None:
        self.text += event.text
        self.token_ids.append(event.token_id)
        self.logprobs.append(event.logprob)
        self.top_logprobs.append(event.top_logprobs)
        self.finish_reason = event.finish_reason


@torch.no_grad()
def prompt_logprobs(model: torch.nn.Module, ids: list[int], top_n: int,
                    ) -> tuple[list[float | None], list[list[tuple[int, float]] | None]]:
    """Each prompt token's logprob given the tokens before it, and the top_n alternatives there (the first
    token has no context: None). This is what `echo` + `logprobs` returns and loglikelihood evaluation needs."""
    device = next(model.parameters()).device
    logits, _ = model(torch.tensor([ids], device=device))
    logp = logits[0, :-1].float().log_softmax(-1)
    token_lp = logp.gather(1, torch.tensor(ids[1:], device=device)[:, None])[:, 0].tolist()
    if top_n:
        values, indices = logp.topk(top_n, dim=-1)
        tops = [list(zip(i, v, strict=True)) for i, v in zip(indices.tolist(), values.tolist(), strict=True)]
    else:
        tops = [[] for _ in token_lp]
    return [None, *token_lp], [None, *tops]


# --- the application -------------------------------------------------------------------------------------
@dataclass
class ServeConfig:
    model_name: str = "gptlab"
    api_key: str | None = None
    max_batch_size: int = 8
    max_queue: int = 256  # waiting sequences before requests get 429

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ConfigError(f"max batch size must be at least 1, got {self.max_batch_size}")
        if self.max_queue < 1:
            raise ConfigError(f"max queue must be at least 1, got {self.max_queue}")


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, separators=(',', ':'))}\n\n"


class Server:
    """The handlers' shared state: model, tokenizer, engine and the OpenAI response shapes."""

    def __init__(self, lm: LanguageModel, cfg: ServeConfig) -> None:
        self.lm, self.cfg = lm, cfg
        self.tokenizer = lm.tokenizer
        self.block_size = lm.model.config.block_size
        self.max_token_bytes = int(self.tokenizer.token_bytes.max())
        self.engine = Engine(Decoder(lm.model, lm.tokenizer, max_batch=cfg.max_batch_size, device=lm.device),
                             cfg.max_queue)

    # --- validation ---
    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.cfg.model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {self.cfg.model_name!r}",
                           code="model_not_found", param="model")

    def prompt_ids(self, prompt: str | list[str] | list[int] | list[list[int]]) -> list[list[int]]:
        """One token list per prompt; an empty prompt means 'start of a document' (<|endoftext|>), as in GPT-2."""
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompt = [prompt]
        if not prompt:
            raise APIError(400, "prompt must not be an empty list", param="prompt")
        prompts = [self.encode(p) if isinstance(p, str) else list(p) for p in prompt]
        for ids in prompts:
            if any(not 0 <= t < self.tokenizer.vocab_size for t in ids):
                raise APIError(400, f"prompt token ids must be in [0, {self.tokenizer.vocab_size})", param="prompt")
        return [ids or [self.tokenizer.eot_id] for ids in prompts]

    def encode(self, text: str) -> list[int]:
        # a token holds at most max_token_bytes bytes (>= 1 char each), so a longer text can never fit: refuse
        # it before spending the event loop's time on tokenizing it
        if len(text) > self.block_size * self.max_token_bytes:
            raise APIError(400, f"the prompt is far longer than this model's maximum context length of "
                           f"{self.block_size} tokens", code="context_length_exceeded", param="prompt")
        return self.tokenizer.encode(text)

    def budget(self, prompts: list[list[int]], max_tokens: int | None) -> int:
        """Tokens to generate per choice: max_tokens, or what the context has left when it is not given."""
        longest = max(len(ids) for ids in prompts)
        wanted = max(self.block_size - longest, 1) if max_tokens is None else max_tokens
        if longest + wanted > self.block_size:
            raise APIError(400, f"this model's maximum context length is {self.block_size} tokens, but "
                           f"{longest + wanted} were requested ({longest} in the prompt, {wanted} for the "
                           "completion); shorten the prompt or max_tokens", code="context_length_exceeded",
                           param="prompt" if max_tokens is None else "max_tokens")
        return wanted

    def configs(self, req: SamplingParams, max_new_tokens: int, logprobs: int | None,
                extra_stop: list[str]) -> list[SamplingConfig]:
        """One SamplingConfig per choice (seeds differ per choice, so n > 1 gives n different samples)."""
        if req.logit_bias:
            raise APIError(400, "logit_bias is not supported", param="logit_bias")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if not all(stop):
            raise APIError(400, "stop sequences must be non-empty strings", param="stop")
        try:
            return [SamplingConfig(
                max_new_tokens=max_new_tokens,
                temperature=1.0 if req.temperature is None else req.temperature,
                top_k=req.top_k if req.top_k and req.top_k > 0 else None,
                top_p=req.top_p if req.top_p is not None and req.top_p < 1 else None,
                min_p=req.min_p or None,
                repetition_penalty=req.repetition_penalty or 1.0,
                presence_penalty=req.presence_penalty or 0.0,
                frequency_penalty=req.frequency_penalty or 0.0,
                stop=stop + extra_stop,
                ignore_eos=bool(req.ignore_eos),
                seed=None if req.seed is None else req.seed + i,
                logprobs=logprobs,
            ) for i in range(req.n or 1)]
        except GptlabError as err:
            raise APIError(400, str(err), code="invalid_parameter") from None

    # --- response pieces ---
    def usage(self, prompts: list[list[int]], choices: list[Choice]) -> dict[str, int]:
        prompt = sum(len(ids) for ids in prompts)
        completion = sum(len(c.token_ids) for c in choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def completion_logprobs(self, ids: list[int], logprobs: list[float | None],
                            tops: list[list[tuple[int, float]] | None], offset: int) -> dict:
        """The legacy completions shape: parallel lists of tokens, logprobs, top alternatives, text offsets."""
        tokens = [self.tokenizer.decode([t]) for t in ids]
        offsets = []
        for token in tokens:
            offsets.append(offset)
            offset += len(token)
        top_dicts = [None if top is None else {self.tokenizer.decode([t]): lp for t, lp in top} for top in tops]
        return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": top_dicts, "text_offset": offsets}

    def chat_logprobs(self, ids: list[int], logprobs: list[float | None],
                      tops: list[list[tuple[int, float]] | None]) -> dict:
        def entry(token_id: int, logprob: float | None) -> dict:
            return {"token": self.tokenizer.decode([token_id]), "logprob": logprob,
                    "bytes": list(self.tokenizer.decode_bytes([token_id]))}
        return {"content": [{**entry(t, lp), "top_logprobs": [entry(a, alp) for a, alp in top or []]}
                            for t, lp, top in zip(ids, logprobs, tops, strict=True)]}

    # --- endpoints ---
    async def completions(self, req: CompletionRequest, request: Request) -> Response:
        self.check_model(req.model)
        if req.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        prompts = self.prompt_ids(req.prompt)
        max_tokens = 16 if req.max_tokens is None else req.max_tokens
        if max_tokens == 0 and not req.echo:
            raise APIError(400, "max_tokens must be at least 1 (0 is allowed only with echo)", param="max_tokens")
        self.budget(prompts, max_tokens)
        configs = self.configs(req, max(max_tokens, 1), req.logprobs, [])
        n = len(configs)
        prompt_texts = [self.tokenizer.decode(ids) for ids in prompts]
        echoes: list[dict | None] = [None] * len(prompts)  # the prompt's own logprobs (echo + logprobs)
        if req.echo and req.logprobs is not None:
            for p, ids in enumerate(prompts):
                lps, tops = await self.engine.run(lambda ids=ids: prompt_logprobs(self.lm.model, ids, req.logprobs))
                echoes[p] = self.completion_logprobs(ids, lps, tops, 0)
        choices = [Choice() for _ in range(len(prompts) * n)]
        created, rid = int(time.time()), f"cmpl-{uuid.uuid4().hex}"

        def logprobs_of(i: int, start: int, offset: int) -> dict | None:
            """Logprobs of choice i's tokens from `start` on, the first at text offset `offset`."""
            if req.logprobs is None:
                return None
            c = choices[i]
            return self.completion_logprobs(c.token_ids[start:], c.logprobs[start:], c.top_logprobs[start:], offset)

        def body(choice_list: list[dict]) -> dict:
            return {"id": rid, "object": "text_completion", "created": created, "model": self.cfg.model_name,
                    "choices": choice_list}

        run = Run(self.engine, prompts, configs) if max_tokens else None
        if run:
            run.start(request)
        if req.stream:
            async def stream() -> AsyncIterator[str]:
                if req.echo:
                    for i in range(len(choices)):
                        yield _sse(body([{"index": i, "text": prompt_texts[i // n], "logprobs": echoes[i // n],
                                          "finish_reason": None if run else "length"}]))
                sent = [0] * len(choices)  # tokens already sent, per choice
                offsets = [len(prompt_texts[i // n]) for i in range(len(choices))]  # text offset of the next one
                if run:
                    async for i, event in run.events():
                        choices[i].add(event)
                        if event.text or event.finish_reason:  # withheld text (a possible stop string) waits
                            lp = logprobs_of(i, sent[i], offsets[i])
                            sent[i] = len(choices[i].token_ids)
                            offsets[i] += sum(map(len, lp["tokens"])) if lp else 0
                            yield _sse(body([{"index": i, "text": event.text, "logprobs": lp,
                                              "finish_reason": event.finish_reason}]))
                if req.stream_options and req.stream_options.include_usage:
                    yield _sse({**body([]), "usage": self.usage(prompts, choices)})
                yield _sse("[DONE]")
            return self._streaming_response(stream())

        if run:
            async for i, event in run.events():
                choices[i].add(event)
        out = []
        for i, c in enumerate(choices):
            lp, echo = logprobs_of(i, 0, len(prompt_texts[i // n])), echoes[i // n]
            out.append({"index": i, "text": (prompt_texts[i // n] if req.echo else "") + c.text,
                        "logprobs": {k: echo[k] + lp[k] for k in lp} if lp and echo else lp,
                        "finish_reason": c.finish_reason or "length"})
        return JSONResponse({**body(out), "usage": self.usage(prompts, choices)})

    async def chat_completions(self, req: ChatRequest, request: Request) -> Response:
        self.check_model(req.model)
        if req.tools:
            raise APIError(400, "tools are not supported", param="tools")
        try:
            prompt = chat_prompt([m.as_dict() for m in req.messages])
        except ValueError as err:
            raise APIError(400, str(err), param="messages") from None
        prompts = [self.encode(prompt)]
        max_new_tokens = self.budget(prompts, req.max_completion_tokens or req.max_tokens)
        top_n = (req.top_logprobs or 0) if req.logprobs else None
        configs = self.configs(req, max_new_tokens, top_n, [END_OF_TURN])
        choices = [Choice() for _ in configs]
        created, rid = int(time.time()), f"chatcmpl-{uuid.uuid4().hex}"
        run = Run(self.engine, prompts, configs)
        run.start(request)

        def body(choice_list: list[dict], kind: str = "chat.completion") -> dict:
            return {"id": rid, "object": kind, "created": created, "model": self.cfg.model_name,
                    "choices": choice_list}

        if req.stream:
            async def stream() -> AsyncIterator[str]:
                for i in range(len(choices)):
                    yield _sse(body([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                      "finish_reason": None}], "chat.completion.chunk"))
                sent = [0] * len(choices)
                async for i, event in run.events():
                    c = choices[i]
                    c.add(event)
                    if event.text or event.finish_reason:
                        lp = (self.chat_logprobs(c.token_ids[sent[i]:], c.logprobs[sent[i]:], c.top_logprobs[sent[i]:])
                              if top_n is not None else None)
                        sent[i] = len(c.token_ids)
                        delta = {"content": event.text} if event.text else {}
                        yield _sse(body([{"index": i, "delta": delta, "logprobs": lp,
                                          "finish_reason": event.finish_reason}], "chat.completion.chunk"))
                if req.stream_options and req.stream_options.include_usage:
                    yield _sse({**body([], "chat.completion.chunk"), "usage": self.usage(prompts, choices)})
                yield _sse("[DONE]")
            return self._streaming_response(stream())

        async for i, event in run.events():
            choices[i].add(event)
        out = [{"index": i, "message": {"role": "assistant", "content": c.text},
                "logprobs": self.chat_logprobs(c.token_ids, c.logprobs, c.top_logprobs) if top_n is not None else None,
                "finish_reason": c.finish_reason} for i, c in enumerate(choices)]
        return JSONResponse({**body(out), "usage": self.usage(prompts, choices)})

    @staticmethod
    def _streaming_response(chunks: AsyncIterator[str]) -> StreamingResponse:
        async def guarded() -> AsyncIterator[str]:
            """Inside a stream the status line is already sent: an error becomes a final `data: {"error": ...}`."""
            try:
                async for chunk in chunks:
                    yield chunk
            except APIError as err:
                yield _sse({"error": {"message": err.message, "type": err.kind, "param": err.param, "code": err.code}})
                yield _sse("[DONE]")
            except ClientDisconnected:
                pass
        return StreamingResponse(guarded(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def create_app(lm: LanguageModel, cfg: ServeConfig) -> FastAPI:
    server = Server(lm, cfg)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        server.engine.start()
        yield
        server.engine.stop()

    app = FastAPI(title="gptlab", description="OpenAI-compatible API for a gptlab model", lifespan=lifespan)
    app.state.server = server
    app.add_exception_handler(APIError, lambda _, err: err.response())
    app.add_exception_handler(ClientDisconnected, lambda _, err: Response(status_code=499))
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    if cfg.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=cfg.api_key)

    playground = (resources.files("gptlab") / "static" / "playground.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(playground)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": cfg.model_name, "max_batch_size": cfg.max_batch_size,
                **vars(server.engine.stats)}

    def model_card() -> dict:
        return {"id": cfg.model_name, "object": "model", "created": 0, "owned_by": "gptlab",
                "max_model_len": server.block_size}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict:
        server.check_model(name)
        return model_card()

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request) -> Response:
        return await server.completions(req, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request) -> Response:
        return await server.chat_completions(req, request)

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict:
        eot = server.tokenizer.decode([server.tokenizer.eot_id])
        return {"eos_token": eot, "bos_token": eot, "pad_token": None, "model_max_length": server.block_size}

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest) -> dict:
        text = chat_prompt([m.as_dict() for m in req.messages]) if req.messages else req.prompt or ""
        tokens = server.tokenizer.encode(text)
        return {"count": len(tokens), "max_model_len": server.block_size, "tokens": tokens, "token_strs": None}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest) -> dict:
        if any(not 0 <= t < server.tokenizer.vocab_size for t in req.tokens):
            raise APIError(400, f"token ids must be in [0, {server.tokenizer.vocab_size})", param="tokens")
        return {"prompt": server.tokenizer.decode(req.tokens)}

    return app


def listen(host: str, port: int) -> socket.socket:
    """A listening socket (port 0 picks a free one); a busy port is a GptlabError before any model loads."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        # proto must be IPPROTO_TCP (not 0): asyncio only sets TCP_NODELAY on such sockets, and without it
        # every small response waits ~40 ms for a delayed ACK (Nagle's algorithm)
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as err:
        raise GptlabError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    sock.listen(2048)  # connections wait in the backlog until uvicorn accepts them
    return sock


def serve(lm: LanguageModel, cfg: ServeConfig, sock: socket.socket, log_level: str = "info") -> None:
    """Announce the URL as one JSON line on stdout, then serve until interrupted."""
    import uvicorn

    app = create_app(lm, cfg)
    host, port = sock.getsockname()[:2]
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    print(json.dumps({"url": url, "model": cfg.model_name, "max_batch_size": cfg.max_batch_size}), flush=True)
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=3)
    uvicorn.Server(config).run(sockets=[sock])


class ServerProcess:
    """`gptlab serve --port 0` in a child process (for tests, benchmarks, notebooks); `url` is where it listens.
    Its log goes to a file, not a pipe, so a chatty server can never block on a full pipe."""

    def __init__(self, ckpt: str | Path, log: str | Path, *flags: str, start_timeout: float = 300) -> None:
        self.log = Path(log)
        with open(self.log, "w") as stderr:
            self.proc = subprocess.Popen([sys.executable, "-m", "gptlab", "serve", "--ckpt", str(ckpt), "--port", "0",
                                          "--log-level", "warning", *flags],
                                         stdout=subprocess.PIPE, stderr=stderr, text=True)
        ready, _, _ = select.select([self.proc.stdout], [], [], start_timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.stop()
            raise RuntimeError(f"gptlab serve did not start: {self.log.read_text()}")
        self.url: str = json.loads(line)["url"]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
