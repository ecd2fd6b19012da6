"""Serving throughput: continuous batching vs one request at a time, in the same run.

A random-init `gpt2` preset checkpoint (124M parameters, GPT-2's tokenizer) is served twice by `gptlab serve`:
with batching (--max-batch-size = the number of clients) and with batching off (--max-batch-size 1).
Each time N concurrent clients stream one completion of T tokens each (ignore_eos, so every answer has
exactly T tokens). Reported: aggregate generated tokens/s, time to first token (p50/p95), and the ratio;
the last line is one JSON object.

    python benchmarks/serve.py [--clients 16] [--tokens 64] [--threads N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import openai
import torch

from gptlab import checkpoint
from gptlab.config import GPTConfig
from gptlab.model import GPT
from gptlab.tokenizer import load as load_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: tests.helpers
from tests.helpers import ServerProcess  # noqa: E402

PROMPTS = ["The history of the city begins", "In a small village by the sea", "Scientists announced today that",
           "The recipe calls for", "Once upon a time, a king", "The market opened higher after",
           "She looked at the map and", "Our first experiment measured"]


def make_checkpoint(directory: Path) -> Path:
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("gpt2"))
    path = directory / "gpt2-random"
    checkpoint.save(path / checkpoint.CKPT_NAME, {"model": model.state_dict(), "model_config": model.config.to_dict(),
                                       "tokenizer": load_tokenizer("gpt2").to_dict(), "step": 0})
    return path


async def one_client(client: openai.AsyncOpenAI, prompt: str, tokens: int) -> tuple[float, int]:
    """Stream one completion; return (seconds to the first token, tokens generated)."""
    start = time.perf_counter()
    first, generated = None, 0
    stream = await client.completions.create(model="gpt2-random", prompt=prompt, max_tokens=tokens,
                                             temperature=1.0, stream=True, stream_options={"include_usage": True},
                                             extra_body={"ignore_eos": True})
    async for chunk in stream:
        if first is None and chunk.choices:
            first = time.perf_counter() - start
        if chunk.usage:
            generated = chunk.usage.completion_tokens
    return first, generated


async def load(url: str, clients: int, tokens: int) -> dict:
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=3600)
    await one_client(client, "Warm up", 4)
    start = time.perf_counter()
    results = await asyncio.gather(*(one_client(client, PROMPTS[i % len(PROMPTS)], tokens) for i in range(clients)))
    wall = time.perf_counter() - start
    ttft = sorted(r[0] for r in results)
    generated = sum(r[1] for r in results)
    assert generated == clients * tokens, f"expected {clients * tokens} tokens, got {generated}"
    return {"tok_s": generated / wall, "wall_s": wall, "ttft_p50_s": statistics.median(ttft),
            "ttft_p95_s": ttft[min(len(ttft) - 1, round(0.95 * (len(ttft) - 1)))]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, help="the servers' torch threads (default: torch's choice)")
    args = parser.parse_args()
    threads = ["--threads", str(args.threads)] if args.threads else []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = make_checkpoint(Path(tmp))
        runs = {}
        for name, batch in [("batched", args.clients), ("unbatched", 1)]:
            with ServerProcess(ckpt, Path(tmp) / f"{name}.log", "--max-batch-size", str(batch), *threads) as server:
                runs[name] = asyncio.run(load(server.url, args.clients, args.tokens))
            print(json.dumps({"bench": "serve", "mode": name, "max_batch_size": batch, "clients": args.clients,
                              "tokens": args.tokens, **{k: round(v, 3) for k, v in runs[name].items()}}), flush=True)
    batched, unbatched = runs["batched"], runs["unbatched"]
    print(json.dumps({"bench": "serve", "batched_tok_s": round(batched["tok_s"], 2),
                      "unbatched_tok_s": round(unbatched["tok_s"], 2),
                      "ratio": round(batched["tok_s"] / unbatched["tok_s"], 2),
                      "ttft_p50_s": round(batched["ttft_p50_s"], 3), "ttft_p95_s": round(batched["ttft_p95_s"], 3),
                      "unbatched_ttft_p50_s": round(unbatched["ttft_p50_s"], 3),
                      "unbatched_ttft_p95_s": round(unbatched["ttft_p95_s"], 3)}))


if __name__ == "__main__":
    main()
