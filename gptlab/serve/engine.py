"""The engine: one background thread owns the Decoder. Between decode steps it admits waiting sequences
into free KV-cache slots (continuous batching, so concurrent requests share every forward pass) and hands
each token event to its request's asyncio queue. The waiting line is bounded (429 when full) and a client
that disconnects has its sequences cancelled, which frees their slots at the next step."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from fastapi import Request

from gptlab.errors import GptlabError
from gptlab.generate import Decoder, Scheduler, TokenEvent
from gptlab.sampling import SamplingConfig
from gptlab.serve.protocol import APIError, QueueFull

log = logging.getLogger("gptlab.serve")


class ClientDisconnected(Exception):
    """The client went away; its sequences were cancelled."""


@dataclass(eq=False)
class GenerationJob:
    """One generated choice of a request; `deliver` hands its events (or an error) to the waiting request."""

    index: int
    prompt_ids: list[int]
    cfg: SamplingConfig
    deliver: Callable[[TokenEvent | Exception], None]
    cancelled: bool = False
    embeds: torch.Tensor | None = None  # the prompt's input embeddings when it holds images


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
        self.scheduler = Scheduler(decoder)  # touched by the engine thread only
        self.max_queue = max_queue
        self.stats = EngineStats()
        self._cond = threading.Condition()
        self._waiting: deque[GenerationJob] = deque()
        self._jobs: deque[Callable[[], None]] = deque()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="gptlab-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout=10)

    def submit(self, sequences: list[GenerationJob]) -> None:
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

    def cancel(self, sequences: list[GenerationJob]) -> None:
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
                self._cond.wait_for(lambda: self._stopping or self._waiting or self._jobs or self.scheduler.running)
                if self._stopping:
                    return
                jobs, self._jobs = self._jobs, deque()
                admitted = [self._waiting.popleft() for _ in range(min(len(self._waiting), self.scheduler.free_slots))]
                self.stats.waiting = len(self._waiting)
            for job in jobs:
                job()
            for seq in admitted:
                if seq.cancelled:
                    self.stats.cancelled += 1
                    continue
                try:
                    self.scheduler.admit(seq, seq.prompt_ids, seq.cfg, seq.embeds)
                except GptlabError as err:
                    seq.deliver(APIError(400, str(err)))
            for seq in [s for s in self.scheduler.running.values() if s.cancelled]:
                self.scheduler.cancel(seq)
                self.stats.cancelled += 1
            self.stats.active = len(self.scheduler.running)
            if self.scheduler.running:
                self._step()

    def _step(self) -> None:
        self.stats.peak_active = max(self.stats.peak_active, len(self.scheduler.running))
        try:
            results = self.scheduler.step()
        except Exception as err:  # a decoder bug must not kill the server: fail the batch, keep serving
            log.exception("decoder step failed")
            for seq in self.scheduler.abort():
                seq.deliver(APIError(500, f"generation failed: {err}", kind="server_error"))
            return
        self.stats.steps += 1
        self.stats.finished += sum(event.finish_reason is not None for _, event in results)
        self.stats.active = len(self.scheduler.running)  # up to date before any client hears it is done
        for seq, event in results:
            seq.deliver(event)


class Run:
    """The sequences of one request, read on the event loop as (choice index, event) pairs."""

    def __init__(self, engine: Engine, prompts: list[list[int]], configs: list[SamplingConfig],
                 embeds: list[torch.Tensor] | None = None) -> None:
        """Choice i decodes prompts[i // len(configs)] with configs[i % len(configs)] (n choices per prompt);
        embeds: per prompt, its input embeddings when it holds images."""
        loop = asyncio.get_running_loop()
        self.engine = engine
        self.queue: asyncio.Queue[tuple[int, TokenEvent | Exception]] = asyncio.Queue()
        self.sequences = [GenerationJob(i, prompts[i // len(configs)], configs[i % len(configs)], self._deliver(loop, i),
                                        embeds=None if embeds is None else embeds[i // len(configs)])
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

