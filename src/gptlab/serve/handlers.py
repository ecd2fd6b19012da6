"""The endpoints' work: validate a request, turn it into sampling configs and token prompts (in the model's
prompt style), run it on the engine and answer in OpenAI's shapes, streamed as server-sent events or whole."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import torch
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from gptlab.config import ConfigError
from gptlab.errors import ContextLengthError, GptlabError, check_context
from gptlab.generate import Decoder, prompt_logprobs
from gptlab.language_model import LanguageModel
from gptlab.moderation import SAFE_LABEL, Moderation, load_moderator
from gptlab.prompts import PromptError, messages_from
from gptlab.sampling import SamplingConfig
from gptlab.serve.engine import Choice, ClientDisconnected, Engine, Run
from gptlab.serve.limits import Limits
from gptlab.serve.metrics import ServeMetrics
from gptlab.serve.moderation import MODES, ModerationGate
from gptlab.serve.ops import OpsConfig, parse_keys
from gptlab.serve.protocol import APIError, ChatMessage, ChatRequest, CompletionRequest, SamplingParams
from gptlab.speculative import SpecUsage
from gptlab.vision.images import decode_data_url


@dataclass
class ServeConfig:
    model_name: str = "gptlab"
    api_key: str | None = None
    max_batch_size: int = 8
    max_queue: int = 256  # waiting sequences before requests get 429
    moderate: str | None = None  # screen "input", "output" or "both" (gptlab.serve.moderation)
    moderator: str | None = None  # a named moderator or classifier checkpoint; default with moderate: profanity-check
    moderation_threshold: float = 0.5
    safe_label: str = SAFE_LABEL  # a classifier moderator's harmless label
    limits: Limits = field(default_factory=Limits)
    ops: OpsConfig = field(default_factory=OpsConfig)  # keys, hosts, rate limits, access logs
    drain_timeout: float = 30.0  # on SIGTERM: seconds in-flight requests get to finish

    def __post_init__(self) -> None:
        if self.api_key is not None:  # the Python API's single key ("" is an error, not "no authentication")
            self.ops.api_keys = [*self.ops.api_keys, *parse_keys([self.api_key], "api_key", skip_blank=False)]
            self.api_key = None
        if not self.drain_timeout >= 0:
            raise ConfigError(f"--drain-timeout must be >= 0 seconds, got {self.drain_timeout}")
        if self.moderate is not None and self.moderate not in MODES:
            raise ConfigError(f"moderate must be one of {', '.join(MODES)}, got {self.moderate!r}")
        if self.max_batch_size < 1:
            raise ConfigError(f"max batch size must be at least 1, got {self.max_batch_size}")
        if self.max_queue < 1:
            raise ConfigError(f"max queue must be at least 1, got {self.max_queue}")


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, separators=(',', ':'))}\n\n"


class Handlers:
    """The endpoints' shared state (model, tokenizer, engine) and the OpenAI response shapes."""

    def __init__(self, lm: LanguageModel, cfg: ServeConfig) -> None:
        self.lm, self.cfg = lm, cfg
        self.tokenizer = lm.tokenizer
        self.block_size = lm.model.config.block_size
        self.max_token_bytes = int(self.tokenizer.token_bytes.max())
        self.limits = cfg.limits
        self.metrics = ServeMetrics()
        self.engine = Engine(Decoder(lm.model, lm.tokenizer, max_batch=cfg.max_batch_size, device=lm.device,
                                     speculation=lm.speculation), cfg.max_queue, self.metrics)
        self.metrics.watch(self.engine)
        moderator = cfg.moderator or ("profanity-check" if cfg.moderate else None)
        self.moderation = ModerationGate(moderator and Moderation(load_moderator(moderator, cfg.safe_label), cfg.moderation_threshold),
                         cfg.moderate)

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
        self.check_length(text)
        return self.tokenizer.encode(text)

    def check_length(self, text: str) -> None:
        # a token holds at most max_token_bytes bytes (>= 1 char each), so a longer text can never fit: refuse
        # it before spending the event loop's time on tokenizing it
        if len(text) > self.block_size * self.max_token_bytes:
            raise APIError(400, f"the prompt is far longer than this model's maximum context length of "
                           f"{self.block_size} tokens", code="context_length_exceeded", param="prompt")

    def chat_ids(self, messages: list[ChatMessage]) -> list[int]:
        """The conversation in the model's prompt style (the one it was fine-tuned with), as token ids."""
        dicts = [m.as_dict() for m in messages]
        self.check_length("".join(m["content"] for m in dicts))
        try:
            return self.lm.prompt_style.prompt_ids(messages_from(dicts), self.tokenizer)
        except PromptError as err:
            raise APIError(400, str(err), param="messages") from None

    async def chat_inputs(self, messages: list[ChatMessage]) -> tuple[list[list[int]], list[torch.Tensor] | None]:
        """The conversation's token ids and, when it holds images (inline data: URLs only), its input
        embeddings with the images spliced in, computed on the engine thread."""
        urls = [url for m in messages for url in m.image_urls()]
        if not urls:
            return [self.chat_ids(messages)], None
        if self.lm.vision is None:
            raise APIError(400, "this model takes no images: it has no vision encoder", param="messages")
        dicts = [m.as_dict() for m in messages]
        self.check_length("".join(m["content"] for m in dicts))
        try:
            pixels = self.lm.load_images([decode_data_url(url) for url in urls])
            text = self.lm.prompt_style.render(messages_from(dicts))
            ids, embeds = await self.engine.run(lambda: self.lm.image_prompt(text, pixels))
        except GptlabError as err:  # not an image, too large, a remote URL, placeholders that do not match
            raise APIError(400, str(err), param="messages") from None
        return [ids], [embeds]

    def budget(self, prompts: list[list[int]], max_tokens: int | None) -> int:
        """Tokens to generate per choice: max_tokens, or (as OpenAI) what the context leaves after the longest
        prompt when it is not given; checked by the one context rule (gptlab.errors.check_context)."""
        self.limits.check_prompts(prompts)
        longest = max(len(ids) for ids in prompts)
        wanted = max(self.block_size - longest, 1) if max_tokens is None else max_tokens
        try:
            check_context(longest, wanted, self.block_size)
        except ContextLengthError as err:
            raise APIError(400, str(err), code="context_length_exceeded",
                           param="prompt" if max_tokens is None else "max_tokens") from None
        return wanted

    def configs(self, req: SamplingParams, prompts: list[list[int]], max_new_tokens: int, logprobs: int | None,
                extra_stop: list[str]) -> list[SamplingConfig]:
        """One SamplingConfig per choice of a prompt (the Run gives every sequence its own seed)."""
        if req.logit_bias:
            raise APIError(400, "logit_bias is not supported", param="logit_bias")
        extra = req.model_extra or {}
        # vLLM's beam search and OpenAI's best-of-n (best_of 1 is plain sampling): not served
        for name, asked in (("use_beam_search", bool(extra.get("use_beam_search"))),
                            ("best_of", extra.get("best_of") not in (None, 1))):
            if asked:
                raise APIError(400, f"{name} is not supported: the server samples (set n for several samples; "
                               "beam search is `gptlab generate --num-beams`)", param=name)
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if not all(stop):
            raise APIError(400, "stop sequences must be non-empty strings", param="stop")
        self.limits.check_stop(stop)
        self.limits.check_request_tokens(len(prompts) * (req.n or 1), max_new_tokens)
        # what the request leaves out keeps SamplingConfig's default; SamplingConfig checks the bounds
        given = {"temperature": req.temperature, "top_k": req.top_k if req.top_k and req.top_k > 0 else None,
                 "top_p": req.top_p, "min_p": req.min_p,
                 "repetition_penalty": req.repetition_penalty, "presence_penalty": req.presence_penalty,
                 "frequency_penalty": req.frequency_penalty}
        try:
            return [SamplingConfig(max_new_tokens=max_new_tokens, stop=stop + extra_stop, ignore_eos=bool(req.ignore_eos),
                                   seed=req.seed, logprobs=logprobs, **{k: v for k, v in given.items() if v is not None})
                    for _ in range(req.n or 1)]
        except GptlabError as err:
            raise APIError(400, str(err), code="invalid_parameter") from None

    # --- response pieces ---
    def usage(self, prompts: list[list[int]], choices: list[Choice]) -> dict:
        """OpenAI's token counts; with speculative decoding also `speculative`: the choices' guesses made and
        accepted, and their tokens per target pass."""
        prompt = sum(len(ids) for ids in prompts)
        completion = sum(len(c.token_ids) for c in choices)
        usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
        if self.lm.speculation is not None:
            total = SpecUsage()
            for choice in choices:
                if choice.speculation is not None:
                    total.add(choice.speculation)
            usage["speculative"] = {"method": self.lm.speculation.method, **total.to_dict()}
        return usage

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
        configs = self.configs(req, prompts, max(max_tokens, 1), req.logprobs, [])
        n = len(configs)
        prompt_texts = [self.tokenizer.decode(ids) for ids in prompts]
        await self.moderation.check_input(prompt_texts, "prompt")
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
                    async for i, event in self.moderation.screen(run):
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
            async for i, event in self.moderation.screen(run):
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
        await self.moderation.check_input([m.as_dict()["content"] for m in req.messages], "messages")
        prompts, embeds = await self.chat_inputs(req.messages)
        max_new_tokens = self.budget(prompts, req.max_completion_tokens or req.max_tokens)
        top_n = (req.top_logprobs or 0) if req.logprobs else None
        configs = self.configs(req, prompts, max_new_tokens, top_n, list(self.lm.prompt_style.stop))
        choices = [Choice() for _ in configs]
        created, rid = int(time.time()), f"chatcmpl-{uuid.uuid4().hex}"
        run = Run(self.engine, prompts, configs, embeds)
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
                async for i, event in self.moderation.screen(run):
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

        async for i, event in self.moderation.screen(run):
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

