"""The engine: one background thread owns the Decoder. Between decode steps it admits waiting sequences
into free KV-cache slots (continuous batching, so concurrent requests share every forward pass) and hands
each token event to its request's asyncio queue. The waiting line is bounded (429 when full) and a client
that disconnects has its sequences cancelled, which frees their slots at the next step. A sequence whose
numbers go bad fails alone (the decoder checks every row); on shutdown the engine drains: it refuses new work
(503) and, past the deadline, ends what is left with a clean error."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import gc
import logging
import threading
import time
from array import array
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from fastapi import Request

from gptlab.errors import GptlabError
from gptlab.generate import Decoder, Scheduler, TokenEvent
from gptlab.sampling import SamplingConfig
from gptlab.serve.protocol import APIError, QueueFull
from gptlab.speculative import SpecUsage

if TYPE_CHECKING:
    from gptlab.serve.metrics import ServeMetrics

log = logging.getLogger("gptlab.serve")


def _glibc(name: str) -> Callable[[int], int] | Callable[[int, int], int] | None:
    """A function of glibc's malloc (malloc_trim, mallopt), or None where the C library has none (musl, macOS)."""
    with contextlib.suppress(OSError, AttributeError):
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    return None


_MALLOC_TRIM = _glibc("malloc_trim")
_MALLOPT = _glibc("mallopt")
M_ARENA_MAX = -8  # mallopt's parameter (malloc.h)
RELEASE_AFTER_IDLE_S = 1.0  # how long the engine waits without work before it releases memory
THROUGHPUT_HISTORY_S = 60  # seconds of generated-token counts kept for tokens_per_second


def release_memory() -> None:
    """Give the memory a load freed back to the operating system. glibc keeps freed chunks in its arena and
    the RSS stays at the load's peak until malloc_trim returns them; the collection first frees the reference
    cycles finished requests leave (asyncio tasks, exceptions with their tracebacks)."""
    gc.collect()
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


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
    failed: int = 0  # sequences ended by an error (their own bad numbers, a failed step, shutdown)
    steps: int = 0
    speculation: dict | None = None  # speculative decoding: guesses made and kept, tokens per target pass
    prompt_tokens: int = 0  # of admitted sequences
    generated_tokens: int = 0


class Engine:
    """Continuous batching: admit waiting sequences into free slots, step the decoder, dispatch events."""

    def __init__(self, decoder: Decoder, max_queue: int, metrics: ServeMetrics | None = None) -> None:
        self.scheduler = Scheduler(decoder)  # touched by the engine thread only
        self.max_queue = max_queue
        self.metrics = metrics
        self.stats = EngineStats()
        self._cond = threading.Condition()
        self._waiting: deque[GenerationJob] = deque()
        self._jobs: deque[Callable[[], None]] = deque()
        self._stopping = False
        self.draining = False  # shutting down: no new work
        self._abort: APIError | None = None  # set when the drain deadline passes: end everything with it
        # tokens generated in each whole second of the last minute, a ring of C integers: a step records its
        # tokens without making a Python object. A (time, tokens) tuple per step, kept for a minute, outlived a
        # burst of requests by thousands, scattered over the memory the burst had filled, and pinned it: CPython
        # gives its 1 MiB arenas back to the OS only once nothing in them is alive
        self._second_tokens = array("q", bytes(8 * THROUGHPUT_HISTORY_S))
        self._seconds = array("q", [-1] * THROUGHPUT_HISTORY_S)  # the second each slot of the ring counts
        self._worked = False  # something ran since the engine last went idle (and released memory)
        self._thread = threading.Thread(target=self._loop, name="gptlab-engine", daemon=True)

    def start(self) -> None:
        if _MALLOPT is not None:
            # one glibc arena for every thread started from now on (the engine's, anyio's workers): malloc_trim
            # returns the free pages inside a thread's own arena but never shrinks its top, which kept ~5 MB
            # that a load had freed on the engine's arena (docs/SERVING.md, memory). glibc fixes its arena limit
            # only once a 9th arena is made, so this holds in a server, whose engine is its first thread
            _MALLOPT(M_ARENA_MAX, 1)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout=10)

    def drain(self) -> None:
        """Shutdown begins: refuse new requests (503); what runs or waits goes on."""
        self.draining = True

    def abort_all(self, error: APIError) -> None:
        """The drain deadline passed: every running and waiting sequence ends now with `error`."""
        with self._cond:
            self._abort = error
            self._cond.notify()

    def tokens_per_second(self, window: int = 10) -> float:
        """Generated tokens per second over the last `window` whole seconds (at most THROUGHPUT_HISTORY_S)."""
        now = int(time.monotonic())
        return sum(n for second, n in zip(self._seconds, self._second_tokens, strict=True)
                   if now - window < second <= now) / window

    def _count_tokens(self, tokens: int) -> None:
        second = int(time.monotonic())
        slot = second % THROUGHPUT_HISTORY_S
        if self._seconds[slot] != second:  # a second ago + THROUGHPUT_HISTORY_S: start the slot again
            self._seconds[slot], self._second_tokens[slot] = second, 0
        self._second_tokens[slot] += tokens

    def _check_open(self) -> None:
        if self.draining:
            raise APIError(503, "the server is shutting down; retry on another instance", code="shutting_down",
                           kind="server_error")

    def submit(self, sequences: list[GenerationJob]) -> None:
        """Queue all sequences of one request, or none of them (QueueFull) when the line is too long."""
        self._check_open()
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

        self._check_open()
        with self._cond:
            if len(self._waiting) + len(self._jobs) >= self.max_queue:
                raise QueueFull(len(self._waiting) + len(self._jobs))
            self._jobs.append(job)
            self._cond.notify()
        return await future

    def _busy(self) -> bool:
        return bool(self._stopping or self._waiting or self._jobs or self.scheduler.running or self._abort)

    def _loop(self) -> None:
        while True:
            if self._worked:
                with self._cond:
                    idle = not self._cond.wait_for(self._busy, timeout=RELEASE_AFTER_IDLE_S)
                if idle:  # the RSS goes back to its baseline, at no cost to a busy server's latency
                    self._worked = False
                    release_memory()
            with self._cond:
                self._cond.wait_for(self._busy)
                self._worked = True
                if self._stopping:
                    return
                if self._abort:
                    self._fail(list(self._waiting) + self.scheduler.abort(), self._abort)
                    self._waiting.clear()
                    self._abort = None
                    self.stats.waiting = self.stats.active = 0
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
                    self.stats.prompt_tokens += len(seq.prompt_ids)
                except GptlabError as err:
                    seq.deliver(APIError(400, str(err)))
                except Exception as err:  # a bug in admitting one sequence fails that sequence only
                    log.exception("admitting a sequence failed")
                    self._fail([seq], APIError(500, f"generation failed: {err}", kind="server_error"))
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
            self._fail(self.scheduler.abort(), APIError(500, f"generation failed: {err}", kind="server_error"))
            self.stats.active = 0  # /health must not count the failed batch as running
            return
        self.stats.steps += 1
        failed = [seq for seq, event in results if event.finish_reason == "error"]
        self.stats.finished += sum(event.finish_reason not in (None, "error") for _, event in results)
        self.stats.generated_tokens += len(results) - len(failed)
        self._count_tokens(len(results) - len(failed))
        for _, event in results:
            if event.speculation is not None:
                usage = event.speculation
                log.info("speculative: %d of %d guesses accepted (%.0f%%), %.2f tokens per target pass",
                         usage.accepted, usage.drafted, 100 * usage.acceptance_rate, usage.tokens_per_pass)
                self.stats.speculation = self.scheduler.decoder.usage.to_dict()
        self.stats.active = len(self.scheduler.running)  # up to date before any client hears it is done
        self._fail(failed, APIError(500, "generation failed for this request: its next-token distribution became "
                                    "NaN or infinite (the other requests went on)", code="generation_failed",
                                    kind="server_error"))
        for seq, event in results:
            if event.finish_reason != "error":
                seq.deliver(event)

    def _fail(self, sequences: list[GenerationJob], error: APIError) -> None:
        self.stats.failed += len(sequences)
        for seq in sequences:
            seq.deliver(error)


class Run:
    """The sequences of one request, read on the event loop as (choice index, event) pairs."""

    def __init__(self, engine: Engine, prompts: list[list[int]], configs: list[SamplingConfig],
                 embeds: list[torch.Tensor] | None = None) -> None:
        """Choice i decodes prompts[i // len(configs)] with configs[i % len(configs)] (n choices per prompt),
        seeded with the request's seed + i (SamplingConfig.for_sequence: no two choices share a random stream);
        embeds: per prompt, its input embeddings when it holds images."""
        loop = asyncio.get_running_loop()
        self.engine = engine
        self.queue: asyncio.Queue[tuple[int, TokenEvent | Exception]] = asyncio.Queue()
        self.sequences = [GenerationJob(i, prompts[i // len(configs)], configs[i % len(configs)].for_sequence(i),
                                        self._deliver(loop, i),
                                        embeds=None if embeds is None else embeds[i // len(configs)])
                          for i in range(len(prompts) * len(configs))]
        self.unfinished = set(range(len(self.sequences)))
        self.watcher: asyncio.Task | None = None
        self.started = time.monotonic()

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
        metrics, first = self.engine.metrics, True
        try:
            while self.unfinished:
                index, item = await self.queue.get()
                if index >= 0 and index not in self.unfinished:  # a choice stopped early: its last events
                    continue
                if isinstance(item, Exception):
                    raise item
                if first and metrics:
                    metrics.time_to_first_token.observe(time.monotonic() - self.started)
                    first = False
                if item.finish_reason is not None:
                    self.unfinished.discard(index)
                    if metrics:
                        metrics.request_success.labels(finished_reason=item.finish_reason).inc()
                yield index, item
            if metrics:
                metrics.e2e_request_latency.observe(time.monotonic() - self.started)
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

    def stop(self, index: int) -> None:
        """End choice `index` now (moderation flagged it); the other choices go on."""
        if index in self.unfinished:
            self.engine.cancel([self.sequences[index]])
            self.unfinished.discard(index)

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
    speculation: SpecUsage | None = None

    def add(self, event: TokenEvent) -> None:
        self.speculation = event.speculation or self.speculation
        self.text += event.text
        self.token_ids.append(event.token_id)
        self.logprobs.append(event.logprob)
        self.top_logprobs.append(event.top_logprobs)
        self.finish_reason = event.finish_reason

