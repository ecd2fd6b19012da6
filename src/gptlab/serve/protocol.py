"""The OpenAI API's shapes: request bodies (pydantic models) and errors as {"error": {...}} with a status."""

from __future__ import annotations

from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from gptlab.vision import IMAGE_PLACEHOLDER


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


# --- request bodies --------------------------------------------------------------------------------------
class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingParams(BaseModel):
    """Fields shared by completions and chat; unknown OpenAI fields (user, metadata, ...) are ignored."""

    model_config = ConfigDict(extra="allow")
    model: str | None = None
    temperature: float | None = None  # bounds and defaults: gptlab.sampling.SamplingConfig
    top_p: float | None = None
    top_k: int | None = None  # extension (as in vLLM); absent or <= 0 means off
    min_p: float | None = None  # extension
    repetition_penalty: float | None = None  # extension
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
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


class ImageURL(BaseModel):
    url: str
    detail: str | None = None


class ImagePart(BaseModel):  # OpenAI's image input; gptlab accepts inline data: URLs only (gptlab.vision.images)
    type: Literal["image_url"]
    image_url: ImageURL


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart | ImagePart] | None = None

    def as_dict(self) -> dict[str, str]:
        """The message as text; each image part becomes an <image> placeholder and a line break where it stood
        (LLaVA's layout: the image, then the text about it)."""
        content = self.content if isinstance(self.content, str) else "".join(
            p.text if isinstance(p, TextPart) else IMAGE_PLACEHOLDER + "\n" for p in self.content or [])
        return {"role": "system" if self.role == "developer" else self.role, "content": content}

    def image_urls(self) -> list[str]:
        return [] if isinstance(self.content, str) else [p.image_url.url for p in self.content or []
                                                        if isinstance(p, ImagePart)]


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



class ModerationRequest(BaseModel):  # POST /v1/moderations
    model_config = ConfigDict(extra="allow")
    input: str | list[str] | list[TextPart]
    model: str | None = None

    def texts(self) -> list[str]:
        if isinstance(self.input, str):
            return [self.input]
        return [part.text if isinstance(part, TextPart) else part for part in self.input]


class PredictRequest(BaseModel):
    """POST /v1/predict of a classifier or tagger: one text, or a list of texts or `gptlab predict` records."""

    model: str | None = None
    input: str | list[str | dict[str, Any]]
