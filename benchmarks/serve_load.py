"""Load and shutdown acceptance of `gptlab serve` (issue 17): nothing lost, memory back to its baseline.

One server (a random-init tiny model with GPT-2's tokenizer and a 1024-token context; the server's default
limits, --max-batch-size 16) gets at once: 128 streaming clients, 500 short non-streaming requests, one slow
client that reads its stream a chunk every 0.2 s, and 20 clients that disconnect after their first token
(--max-queue 1024 by default, so every request is admitted; with the default 256 the rest get 429).
Every request must complete or get an explicit 4xx / 429 (counted by status); a stream cut without [DONE]
or an error event, or a connection error, is "lost". The server's RSS is measured once the model is loaded
and has answered one warm-up request (the baseline), at its peak, and 3 s after the load (the engine releases
freed memory after 1 s without work).

Then the same load against a fresh server that gets SIGTERM mid-way: every request in flight must finish or
end with a clean error (503 shutting_down, or a final error event in a stream), requests that start after it
are refused at connect, and the server exits 0. One JSON line per phase.

    python benchmarks/serve_load.py [--streams 128] [--short 500] [--drain-timeout 5]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import signal
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import psutil
import torch

from gptlab import checkpoint
from gptlab.config import GPTConfig
from gptlab.model import GPT
from gptlab.tokenizer import load as load_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: tests.helpers
from tests.helpers import ServerProcess  # noqa: E402


def make_checkpoint(directory: Path) -> Path:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50257, block_size=1024, n_layer=2, n_head=2, n_embd=64))
    path = directory / "tiny-load"
    checkpoint.save(path / checkpoint.CKPT_NAME, {"model": model.state_dict(), "model_config": model.config.to_dict(),
                                                  "tokenizer": load_tokenizer("gpt2").to_dict(), "step": 0})
    return path


async def request(session: aiohttp.ClientSession, url: str, body: dict, kind: str) -> str:
    """One request; its outcome: completed, disconnected (on purpose), http_<status>, stream_error_<code>,
    refused (no connection: the server had stopped accepting) or lost."""
    try:
        async with session.post(url + "/v1/completions", json=body) as response:
            if response.status != 200:
                return f"http_{response.status}"
            if not body.get("stream"):
                data = await response.json()
                return "completed" if data["choices"][0]["finish_reason"] else "lost"
            last, finish = None, None
            async for raw in response.content:
                line = raw.decode().strip()
                if not line:
                    continue
                last = line[6:]
                if kind == "disconnect":
                    response.close()  # goes away mid-stream, after its first event
                    return "disconnected"
                if kind == "slow":
                    await asyncio.sleep(0.2)
                if last not in ("[DONE]",):
                    event = json.loads(last)
                    if "error" in event:
                        finish = f"stream_error_{event['error']['code']}"
                    elif event["choices"]:
                        finish = event["choices"][0]["finish_reason"] or finish
            if last != "[DONE]":
                return "lost"
            return finish if finish and finish.startswith("stream_error") else "completed"
    except aiohttp.ClientConnectorError:
        return "refused"
    except (TimeoutError, aiohttp.ClientError, json.JSONDecodeError) as err:
        return f"lost ({type(err).__name__})"


async def load(url: str, streams: int, short: int, on_started=None) -> collections.Counter:
    jobs = ([({"prompt": "Slowly", "max_tokens": 32, "ignore_eos": True, "stream": True}, "slow")]
            + [({"prompt": f"Leaving {i}", "max_tokens": 500, "ignore_eos": True, "stream": True}, "disconnect")
               for i in range(20)]
            + [({"prompt": f"Client {i} says", "max_tokens": 64, "temperature": 1.0, "ignore_eos": True,
                 "stream": True}, "stream") for i in range(streams)]
            + [({"prompt": f"Short {i}", "max_tokens": 4, "temperature": 0}, "short") for i in range(short)])
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
        tasks = [asyncio.create_task(request(session, url, body, kind)) for body, kind in jobs]
        if on_started:
            await on_started()
        outcomes = await asyncio.gather(*tasks)
    counts = collections.Counter(f"{kind}:{outcome}" for (_, kind), outcome in zip(jobs, outcomes, strict=True))
    return counts


async def warm_up(url: str) -> None:
    """One short request, so the baseline includes what the first request loads (kernels, caches)."""
    async with aiohttp.ClientSession() as session:
        assert await request(session, url, {"prompt": "Warm up", "max_tokens": 4}, "short") == "completed"


def rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


def lost(counts: collections.Counter) -> int:
    return sum(n for key, n in counts.items() if ":lost" in key)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=128)
    parser.add_argument("--short", type=int, default=500)
    parser.add_argument("--drain-timeout", type=float, default=30.0)
    parser.add_argument("--max-queue", type=int, default=1024, help="the server's; below ~650 some requests get 429")
    parser.add_argument("--sigterm-after", type=float, default=3.0, help="seconds into the second load")
    args = parser.parse_args()
    flags = ("--threads", "1", "--max-batch-size", "16", "--max-queue", str(args.max_queue))
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = make_checkpoint(Path(tmp))
        with ServerProcess(ckpt, Path(tmp) / "serve.log", *flags) as server:
            pid = server.proc.pid
            asyncio.run(warm_up(server.url))
            time.sleep(3)
            baseline = rss_mb(pid)
            peak = [baseline]

            async def sample_rss() -> None:
                async def sampler() -> None:
                    while True:
                        peak[0] = max(peak[0], rss_mb(pid))
                        await asyncio.sleep(0.1)
                asyncio.get_running_loop().create_task(sampler())

            start = time.perf_counter()
            counts = asyncio.run(load(server.url, args.streams, args.short, sample_rss))
            wall = time.perf_counter() - start
            time.sleep(3)
            after = rss_mb(pid)
            health = asyncio.run(_health(server.url))
        print(json.dumps({"phase": "load", "requests": sum(counts.values()), "outcomes": dict(sorted(counts.items())),
                          "lost": lost(counts), "wall_s": round(wall, 1), "rss_baseline_mb": round(baseline, 1),
                          "rss_peak_mb": round(peak[0], 1), "rss_after_mb": round(after, 1),
                          "health_after": {k: health[k] for k in ("active", "waiting", "finished", "cancelled",
                                                                  "failed")}}), flush=True)

        server = ServerProcess(ckpt, Path(tmp) / "serve-term.log", *flags, "--drain-timeout", str(args.drain_timeout))
        try:
            async def terminate_later() -> None:
                async def later() -> None:
                    await asyncio.sleep(args.sigterm_after)
                    server.proc.send_signal(signal.SIGTERM)
                asyncio.get_running_loop().create_task(later())

            start = time.perf_counter()
            counts = asyncio.run(load(server.url, args.streams, args.short, terminate_later))
            code = server.proc.wait(timeout=args.drain_timeout + 30)
            wall = time.perf_counter() - start
        finally:
            server.stop()
        print(json.dumps({"phase": "sigterm", "requests": sum(counts.values()), "outcomes": dict(sorted(counts.items())),
                          "lost": lost(counts), "exit_code": code, "wall_s": round(wall, 1),
                          "drain_timeout_s": args.drain_timeout, "sigterm_after_s": args.sigterm_after}), flush=True)


async def _health(url: str) -> dict:
    async with aiohttp.ClientSession() as session, session.get(url + "/health") as response:
        return await response.json()


if __name__ == "__main__":
    main()
