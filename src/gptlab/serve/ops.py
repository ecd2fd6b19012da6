"""Running a server others can reach: API keys (several, each named for the logs, from a file or an environment
variable, never empty), the Host header check, per-key rate limits (token buckets: 429 + Retry-After), the
request body limit, Prometheus' HTTP metrics and structured JSON access logs (prompts redacted unless asked).
All of it is one plain ASGI middleware (`Gate`), so streamed responses pass straight through."""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gptlab.config import ConfigError
from gptlab.serve.limits import LimitExceeded
from gptlab.serve.metrics import ServeMetrics
from gptlab.serve.protocol import APIError

KEY_ENV = "GPTLAB_API_KEY"  # one or more [name:]key entries, comma-separated
PUBLIC_PATHS = {"/", "/health", "/metrics", "/docs", "/openapi.json"}  # everything else needs a key when set
access_log = logging.getLogger("gptlab.access")


@dataclass(frozen=True)
class APIKey:
    name: str  # what the logs and the rate limiter call the key's holder; never the key itself
    key: str = field(repr=False)


def parse_keys(entries: list[str], source: str, skip_blank: bool = True) -> list[APIKey]:
    """`[name:]key` entries (`#` comments and, when `skip_blank`, blank ones skipped); an unnamed key is `key-N`."""
    keys = []
    for n, entry in enumerate(entries, 1):
        entry = entry.strip()
        if entry.startswith("#") or (not entry and skip_blank):
            continue
        name, _, key = entry.partition(":") if ":" in entry else (f"key-{n}", "", entry)
        name, key = name.strip(), key.strip()
        if not key:
            raise ConfigError(f"{source}: entry {n} has an empty API key (that would turn authentication off)")
        if not name or any(c.isspace() for c in key):
            raise ConfigError(f"{source}: entry {n} must be `[name:]key` with a name and a key without spaces")
        keys.append(APIKey(name, key))
    return keys


def load_keys(api_key: str | None = None, key_file: str | Path | None = None,
              environ: dict[str, str] | None = None) -> list[APIKey]:
    """The server's keys from --api-key, --api-key-file (one `[name:]key` a line) and $GPTLAB_API_KEY."""
    environ = os.environ if environ is None else environ
    keys = []
    if api_key is not None:
        keys += parse_keys([api_key], "--api-key", skip_blank=False)
    if key_file is not None:
        try:
            lines = Path(key_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"cannot read --api-key-file {key_file}: {err}") from None
        file_keys = parse_keys(lines, f"--api-key-file {key_file}")
        if not file_keys:
            raise ConfigError(f"--api-key-file {key_file} holds no key")
        keys += file_keys
    if KEY_ENV in environ:
        env_keys = parse_keys(environ[KEY_ENV].split(","), f"${KEY_ENV}")
        if not env_keys:
            raise ConfigError(f"${KEY_ENV} is set but empty (that would turn authentication off); unset it or give a key")
        keys += env_keys
    names = [k.name for k in keys]
    if len(set(names)) != len(names) or len({k.key for k in keys}) != len(keys):
        raise ConfigError("API keys and their names must be unique")
    return keys


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def exposure_warning(host: str, port: int, keys: list[APIKey]) -> str | None:
    """The loud warning for a server reachable beyond this machine that anyone may use."""
    if is_loopback(host) or keys:
        return None
    return (f"gptlab: WARNING: listening on {host}, beyond this machine, WITHOUT an API key: anyone who can reach "
            f"port {port} can use this model. Give keys with --api-key-file or ${KEY_ENV}.")


@dataclass
class OpsConfig:
    api_keys: list[APIKey] = field(default_factory=list)
    allowed_hosts: list[str] = field(default_factory=list)  # empty: any Host header
    rate_limit: float = 0.0  # requests per second per key (per client address without keys); 0 = off
    rate_burst: int | None = None  # bucket size; default: max(1, 2 x rate_limit)
    log_prompts: bool = False  # put prompts and messages in the access log

    def __post_init__(self) -> None:
        if not (self.rate_limit >= 0 and math.isfinite(self.rate_limit)):
            raise ConfigError(f"--rate-limit must be >= 0 requests per second, got {self.rate_limit}")
        if self.rate_burst is not None and self.rate_burst < 1:
            raise ConfigError(f"--rate-burst must be at least 1, got {self.rate_burst}")
        self.allowed_hosts = [h.strip().lower() for h in self.allowed_hosts if h.strip()]

    @property
    def burst(self) -> int:
        return self.rate_burst or max(1, math.ceil(2 * self.rate_limit))


class TokenBuckets:
    """One token bucket per caller: `rate` requests per second on average, bursts of up to `burst`."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self.clock = rate, burst, clock
        self._buckets: dict[str, tuple[float, float]] = {}  # caller -> (tokens, time)
        self._lock = threading.Lock()

    def take(self, caller: str) -> float:
        """0 when the request may go ahead (one token taken), else the seconds until a token is back."""
        with self._lock:
            now = self.clock()
            tokens, then = self._buckets.get(caller, (self.burst, now))
            tokens = min(self.burst, tokens + (now - then) * self.rate)
            if tokens >= 1:
                self._buckets[caller] = (tokens - 1, now)
                return 0.0
            self._buckets[caller] = (tokens, now)
            return (1 - tokens) / self.rate


class Gate:
    """Host check -> API key -> rate limit -> body size, then the app; every request gets an access log line
    and the HTTP metrics."""

    def __init__(self, app: Any, ops: OpsConfig, max_body_bytes: int, metrics: ServeMetrics, routes: set[str]) -> None:
        self.app, self.ops, self.metrics, self.routes = app, ops, metrics, routes
        self.max_body_bytes = max_body_bytes
        self.keys = [(k.name, f"Bearer {k.key}".encode()) for k in ops.api_keys]
        self.buckets = TokenBuckets(ops.rate_limit, ops.burst) if ops.rate_limit else None

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, record = time.monotonic(), {"method": scope["method"], "path": scope["path"], "status": 500}

        async def logged_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                record["status"] = message["status"]
            await send(message)

        try:
            error, receive = await self._admit(scope, receive, record)
            if error:
                await error(scope, receive, logged_send)
            else:
                await self.app(scope, receive, logged_send)
        finally:
            duration = time.monotonic() - start
            handler = scope["path"] if scope["path"] in self.routes else "other"
            self.metrics.http_request(scope["method"], handler, record["status"], duration)
            client = scope.get("client")
            access_log.info(json.dumps({"time": round(time.time(), 3), "client": client[0] if client else None,
                                        **record, "duration_s": round(duration, 4)}, ensure_ascii=False))

    async def _admit(self, scope: dict, receive: Callable, record: dict) -> tuple[Any, Callable]:
        """(an error response or None, the receive the app gets: the body already read, replayed)."""
        headers = dict(scope["headers"])
        if self.ops.allowed_hosts:
            host = headers.get(b"host", b"").decode("latin-1").lower()
            host = host.rsplit(":", 1)[0] if not host.endswith("]") else host  # drop the port
            if not any(host == h or (h.startswith("*.") and host.endswith(h[1:])) for h in self.ops.allowed_hosts):
                return APIError(400, f"the Host header {host!r} is not one this server answers to (--allowed-hosts)",
                                code="invalid_host").response(), receive
        public = scope["path"] in PUBLIC_PATHS
        caller = scope.get("client", ("?",))[0] if scope.get("client") else "?"
        if self.keys and not public:
            given = headers.get(b"authorization", b"")
            matches = [name for name, expected in self.keys if hmac.compare_digest(given, expected)]  # every key
            if not matches:
                message = "invalid API key" if given else "missing API key (send Authorization: Bearer KEY)"
                return APIError(401, message, code="invalid_api_key").response(), receive
            caller = record["key"] = matches[0]
        if self.buckets and not public:
            wait = self.buckets.take(caller)
            if wait:
                self.metrics.rate_limited.inc()
                response = APIError(429, f"rate limit of {self.ops.rate_limit:g} requests/s exceeded for "
                                    f"{caller}; retry after {wait:.2f} s", code="rate_limit_exceeded",
                                    kind="rate_limit_error").response()
                response.headers["Retry-After"] = str(max(1, math.ceil(wait)))
                return response, receive
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return None, receive
        return await self._read_body(scope, headers, receive, record)

    async def _read_body(self, scope: dict, headers: dict, receive: Callable, record: dict) -> tuple[Any, Callable]:
        limit = self.max_body_bytes
        too_big = LimitExceeded("max_body_bytes", f"the request body is larger than {limit} bytes", None, 413)
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > 64 * limit:  # not worth reading: answer, then close
            return _limit_response(too_big), receive
        chunks, size = [], 0
        while True:  # past the limit the rest is read and dropped, so the client gets to read the 413
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            size += len(message.get("body", b""))
            if size <= limit:
                chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        if size > limit:
            return _limit_response(too_big), receive
        body, replayed = b"".join(chunks), False
        record["body_bytes"] = len(body)
        if self.ops.log_prompts:
            record.update(_prompts_of(body))

        async def replay() -> dict:  # the body once, then the client's next messages (its disconnect)
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()
        return None, replay


def _limit_response(err: LimitExceeded) -> Any:
    return APIError(err.status, str(err), code="limit_exceeded", param=err.param).response()


def _prompts_of(body: bytes) -> dict:
    try:
        data = json.loads(body)
    except ValueError:
        return {}
    return {k: data[k] for k in ("prompt", "messages") if isinstance(data, dict) and k in data}
