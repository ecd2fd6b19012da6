"""The FastAPI application of `gptlab serve`: routes, API-key middleware, error mapping, the listening socket."""

from __future__ import annotations

import contextlib
import hmac
import json
import socket
import threading
from collections.abc import AsyncIterator, Callable
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from gptlab.errors import GptlabError
from gptlab.finetune.predict import Predictor
from gptlab.generate import LanguageModel
from gptlab.serve.engine import ClientDisconnected
from gptlab.serve.handlers import Handlers, ServeConfig
from gptlab.serve.protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    PredictRequest,
    TokenizeRequest,
)

PUBLIC_PATHS = {"/", "/health", "/docs", "/openapi.json"}  # everything else needs the key when one is set


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
        tokens = server.chat_ids(req.messages) if req.messages else server.tokenizer.encode(req.prompt or "")
        return {"count": len(tokens), "max_model_len": server.block_size, "tokens": tokens, "token_strs": None}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest) -> dict:
        if any(not 0 <= t < server.tokenizer.vocab_size for t in req.tokens):
            raise APIError(400, f"token ids must be in [0, {server.tokenizer.vocab_size})", param="tokens")
        return {"prompt": server.tokenizer.decode(req.tokens)}

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
    if cfg.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=cfg.api_key)
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
    """Announce the URL as one JSON line on stdout, then serve until interrupted (a classifier or tagger gets
    the prediction API, a language model the OpenAI one)."""
    import uvicorn

    app = create_predict_app(lm, cfg) if isinstance(lm, Predictor) else create_app(lm, cfg)
    host, port = sock.getsockname()[:2]
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    print(json.dumps({"url": url, "model": cfg.model_name, "max_batch_size": cfg.max_batch_size}), flush=True)
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=3)
    uvicorn.Server(config).run(sockets=[sock])
