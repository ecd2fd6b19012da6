"""Moderation in the server: `POST /v1/moderations`, refusing flagged input (400 content_policy_violation)
and screening output as it is generated (a flagged choice stops with finish_reason "content_filter").

Moderators run in a worker thread, so a slow one never stalls the event loop. Output is held back per choice
until a window of it has been screened (gptlab.moderation.StreamScreen): a client never receives text
from a window that was flagged."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator
from typing import Literal

from gptlab.generate import TokenEvent
from gptlab.moderation import Moderation, StreamScreen, Verdict
from gptlab.serve.engine import Run
from gptlab.serve.protocol import APIError, ModerationRequest

MODES = ("input", "output", "both")
MAX_MODERATION_INPUTS = 64
MAX_MODERATION_CHARS = 200_000  # all inputs of one /v1/moderations request together


class ContentPolicyViolation(APIError):
    def __init__(self, param: str, categories: list[str]) -> None:
        super().__init__(400, f"the {param} was flagged by this server's moderation ({', '.join(categories)}) and "
                         "cannot be processed", code="content_policy_violation", param=param)


class ModerationGate:
    """What the server screens (`mode`: input, output, both, or None for nothing) and with which moderator."""

    def __init__(self, moderation: Moderation | None, mode: Literal["input", "output", "both"] | None) -> None:
        self.moderation = moderation
        self.screens_input = moderation is not None and mode in ("input", "both")
        self.screens_output = moderation is not None and mode in ("output", "both")

    async def check(self, texts: list[str]) -> list[Verdict]:
        assert self.moderation is not None
        return await asyncio.to_thread(self.moderation.check, texts)

    async def check_input(self, texts: list[str], param: str) -> None:
        """Refuse a request whose prompt or messages are flagged."""
        if not self.screens_input or not texts:
            return
        flagged = [name for v in await self.check(texts) for name, hit in v.categories.items() if hit]
        if flagged:
            raise ContentPolicyViolation(param, sorted(set(flagged)))

    async def screen(self, run: Run) -> AsyncIterator[tuple[int, TokenEvent]]:
        """run.events() with each choice's text released only after screening; a flagged choice is stopped
        and its last event carries finish_reason "content_filter" (and none of the flagged window's text)."""
        if not self.screens_output:
            async for item in run.events():
                yield item
            return
        screens = [StreamScreen() for _ in run.sequences]
        async for i, event in run.events():
            final = event.finish_reason is not None
            window = screens[i].add(event.text, final)
            if window is None:
                yield i, dataclasses.replace(event, text="")
            elif (await self.check([window]))[0].flagged:
                if not final:
                    run.stop(i)
                yield i, dataclasses.replace(event, text="", finish_reason="content_filter")
            else:
                yield i, dataclasses.replace(event, text=screens[i].release(final))

    async def moderations(self, req: ModerationRequest) -> dict:
        if self.moderation is None:
            raise APIError(404, "this server has no moderator: start it with --moderator NAME|CKPT (or --moderate)",
                           code="not_found")
        if req.model is not None and req.model != self.moderation.name:
            raise APIError(404, f"the moderation model {req.model!r} does not exist; this server's moderator is "
                           f"{self.moderation.name!r}", code="model_not_found", param="model")
        texts = req.texts()
        if not texts:
            raise APIError(400, "input must not be empty", param="input")
        if len(texts) > MAX_MODERATION_INPUTS:
            raise APIError(400, f"input holds {len(texts)} texts; at most {MAX_MODERATION_INPUTS} per request",
                           param="input")
        if sum(map(len, texts)) > MAX_MODERATION_CHARS:
            raise APIError(400, f"input holds more than {MAX_MODERATION_CHARS} characters", param="input")
        verdicts = await self.check(texts)
        return {"id": f"modr-{uuid.uuid4().hex}", "model": self.moderation.name,
                "results": [v.to_dict() for v in verdicts]}
