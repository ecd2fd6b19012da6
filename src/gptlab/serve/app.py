"""The FastAPI application of `gptlab serve`: routes, the gate middleware (gptlab.serve.ops), error mapping, the
listening socket, and the server's life: it drains on SIGTERM (no new connections or requests, in-flight ones
get --drain-timeout seconds to finish, then a clean error) and exits 0."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import socket
import sys
import threading
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from gptlab.errors import GptlabError
from gptlab.finetune.predict import Predictor
from gptlab.language_model import LanguageModel
from gptlab.serve.engine import ClientDisconnected, Engine
from gptlab.serve.handlers import Handlers, ServeConfig
from gptlab.serve.limits import LimitExceeded
from gptlab.serve.metrics import ServeMetrics
from gptlab.serve.ops import Gate, access_log, exposure_warning
from gptlab.serve.protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    ModerationRequest,
    PredictRequest,
    TokenizeRequest,
)


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


def create_app(lm: LanguageModel, cfg: ServeConfig) -> FastAPI:
    server = Handlers(lm, cfg)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        server.engine.start()
        yield
        server.engine.stop()

    app = FastAPI(title="gptlab", description="OpenAI-compatible API for a gptlab model", lifespan=lifespan)
    app.state.server = server
    app.add_exception_handler(APIError, lambda _, err: err.response())
    app.add_exception_handler(LimitExceeded, lambda _, err: APIError(err.status, str(err), code="limit_exceeded",
                                                                     param=err.param).response())
    app.add_exception_handler(ClientDisconnected, lambda _, err: Response(status_code=499))
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)

    playground = (resources.files("gptlab") / "static" / "playground.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(playground)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "draining" if server.engine.draining else "ok", "model": cfg.model_name, "max_batch_size": cfg.max_batch_size,
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

    @app.post("/v1/moderations")
    async def moderations(req: ModerationRequest) -> dict:
        return await server.moderation.moderations(req)

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict:
        eot = server.tokenizer.decode([server.tokenizer.eot_id])
        return {"eos_token": eot, "bos_token": eot, "pad_token": None, "model_max_length": server.block_size}

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return PlainTextResponse(server.metrics.exposition(), media_type="text/plain; version=0.0.4")

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest) -> Response:
        def answer(tokens: list[int]) -> bytes:
            # written 65,536 ids at a time: one json.dumps of a million ids would hold the GIL (and so the
            # event loop) for its whole run; between chunks the loop gets its turn
            ids = ",".join(",".join(map(str, tokens[i:i + 65536])) for i in range(0, len(tokens), 65536))
            return (f'{{"count": {len(tokens)}, "max_model_len": {server.block_size}, "tokens": [{ids}], '
                    '"token_strs": null}').encode()

        if req.messages:
            return Response(answer(server.chat_ids(req.messages)), media_type="application/json")
        server.limits.check_tokenize(req.prompt or "")
        # bounded, and encoded and serialized on a worker thread: the JSON of a million ids takes as long as
        # the encoding, and neither may stall the event loop (every other request waits on it)
        body = await asyncio.to_thread(lambda: answer(server.tokenizer.encode(req.prompt or "")))
        return Response(body, media_type="application/json")

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest) -> dict:
        if any(not 0 <= t < server.tokenizer.vocab_size for t in req.tokens):
            raise APIError(400, f"token ids must be in [0, {server.tokenizer.vocab_size})", param="tokens")
        return {"prompt": server.tokenizer.decode(req.tokens)}

    app.add_middleware(Gate, ops=cfg.ops, max_body_bytes=cfg.limits.max_body_bytes, metrics=server.metrics,
                       routes={route.path for route in app.routes})
    return app


def create_predict_app(predictor: Predictor, cfg: ServeConfig) -> FastAPI:
    """The API of a classifier or tagger checkpoint: POST /v1/predict (as `gptlab predict`), /health, /v1/models.

    Request: {"model": optional, "input": "text" | ["text", ...] | [{"text"} or {"tokens": [...]}, ...]}.
    Response: {"object": "list", "model", "task", "data": [one `gptlab predict` result per input]}.
    """
    app = FastAPI(title="gptlab", description=f"a gptlab {predictor.task} model")
    app.add_exception_handler(APIError, lambda _, err: err.response())
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    lock = threading.Lock()  # one model: requests take turns (each is already batched)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": cfg.model_name, "task": predictor.task}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": cfg.model_name, "object": "model", "created": 0,
                                            "owned_by": "gptlab", "task": predictor.task,
                                            "labels": predictor.labels}]}

    def run(req: PredictRequest) -> dict:
        if req.model is not None and req.model != cfg.model_name:
            raise APIError(404, f"the model {req.model!r} does not exist (this server has {cfg.model_name!r})",
                           code="model_not_found", param="model")
        inputs = [req.input] if isinstance(req.input, str) else req.input
        if not inputs or len(inputs) > cfg.max_queue:
            raise APIError(400, f"input must hold 1 to {cfg.max_queue} items, got {len(inputs)}",
                           code="invalid_parameter", param="input")
        items = [(f"input[{i}]", {"text": x} if isinstance(x, str) else x) for i, x in enumerate(inputs)]
        try:
            with lock:
                data = predictor(predictor.parse(items))
        except GptlabError as err:
            raise APIError(400, str(err), code="invalid_parameter", param="input") from None
        return {"object": "list", "model": cfg.model_name, "task": predictor.task, "data": data}

    @app.post("/v1/predict")
    async def predict(req: PredictRequest) -> dict:
        return await run_in_threadpool(run, req)

    # the same keys, hosts, rate limits, body limit and access log as the OpenAI API
    app.add_middleware(Gate, ops=cfg.ops, max_body_bytes=cfg.limits.max_body_bytes, metrics=ServeMetrics(),
                       routes={route.path for route in app.routes})
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


def serve(lm: LanguageModel | Predictor, cfg: ServeConfig, sock: socket.socket, log_level: str = "info") -> None:
    """Announce the URL as one JSON line on stdout, then serve until SIGTERM (exit 0 once drained) or Ctrl-C
    (a classifier or tagger gets the prediction API, a language model the OpenAI one)."""
    host, port = sock.getsockname()[:2]
    warning = exposure_warning(host, port, cfg.ops.api_keys)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    handler = logging.StreamHandler(sys.stderr)  # one JSON object a line
    handler.setFormatter(logging.Formatter("%(message)s"))
    access_log.addHandler(handler)
    access_log.setLevel(log_level.upper())
    access_log.propagate = False
    predictor = isinstance(lm, Predictor)
    app = create_predict_app(lm, cfg) if predictor else create_app(lm, cfg)
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    print(json.dumps({"url": url, "model": cfg.model_name, "max_batch_size": cfg.max_batch_size}), flush=True)
    # uvicorn's own grace period only backs ours up: by its end every request has had its answer or its error
    config = uvicorn.Config(app, log_level=log_level, access_log=False, timeout_graceful_shutdown=cfg.drain_timeout + 5)
    if predictor:  # no engine to drain: each request is one call of the model
        uvicorn.Server(config).run(sockets=[sock])
    else:
        _DrainingServer(config, app.state.server.engine, cfg.drain_timeout).run(sockets=[sock])


class _DrainingServer(uvicorn.Server):
    """uvicorn's Server, draining on SIGTERM: it stops accepting connections (uvicorn), the engine refuses new
    requests (503) and finishes the running ones; whatever is left after `drain_timeout` seconds ends with a
    503 error (a final error event in a stream). A SIGTERM handled so exits 0 (uvicorn would re-raise it,
    which ends the process with the signal's status)."""

    def __init__(self, config: uvicorn.Config, engine: Engine, drain_timeout: float) -> None:
        super().__init__(config)
        self.engine, self.drain_timeout = engine, drain_timeout

    def handle_exit(self, sig: int, frame: Any) -> None:
        if sig == signal.SIGTERM and not self.should_exit:
            self.should_exit = True  # not recorded in _captured_signals: not re-raised
            return
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.engine.drain()
        error = APIError(503, f"the server shut down before this request finished (it had {self.drain_timeout:g} s)",
                         code="shutting_down", kind="server_error")
        deadline = asyncio.get_running_loop().call_later(self.drain_timeout, self.engine.abort_all, error)
        try:
            await super().shutdown(sockets)
        finally:
            deadline.cancel()
