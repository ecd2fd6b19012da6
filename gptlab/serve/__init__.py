"""OpenAI-compatible HTTP serving with continuous batching: `gptlab serve`. Split as vLLM's OpenAI
entrypoint is, bottom up:

  protocol   request bodies and error shapes of the OpenAI API
  engine     the thread that owns the Decoder and schedules sequences into its slots
  handlers   each endpoint's work: requests -> prompts and sampling configs -> engine -> responses
  app        the FastAPI application, its middleware and error mapping, the socket, `serve`
"""

from gptlab.serve.app import ServeConfig, create_app, listen, serve

__all__ = ["ServeConfig", "create_app", "listen", "serve"]
