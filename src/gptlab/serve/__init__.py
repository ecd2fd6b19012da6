"""OpenAI-compatible HTTP serving with continuous batching: `gptlab serve`. Split as vLLM's OpenAI
entrypoint is, bottom up:

  protocol   request bodies and error shapes of the OpenAI API
  limits     the bounds on what a client controls (light: the CLI builds its flags from it)
  metrics    the Prometheus metrics (GET /metrics)
  engine     the thread that owns the Decoder and schedules sequences into its slots
  ops        API keys, the Host check, rate limits, the body limit, access logs: one ASGI middleware
  handlers   each endpoint's work: requests -> prompts and sampling configs -> engine -> responses
  app        the FastAPI application, its error mapping, the socket, `serve` (draining on SIGTERM)

The web framework loads on first use of `ServeConfig`, `create_app`, `listen` or `serve`, so `gptlab --help`
(which reads gptlab.serve.limits for its flags) stays fast and works without the serve extra.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["ServeConfig", "create_app", "listen", "serve"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("gptlab.serve.app"), name)
    raise AttributeError(f"module 'gptlab.serve' has no attribute {name!r}")
