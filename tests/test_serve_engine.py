"""The engine's throughput history (GET /metrics' tokens/s): what it counts, and that a burst of decoder steps
leaves no Python objects behind (they would pin the memory the burst used: docs/SERVING.md, memory)."""

from __future__ import annotations

import sys

import pytest
import torch

from gptlab.generate import Decoder
from gptlab.model import GPT
from gptlab.serve import engine as engine_module
from gptlab.serve.engine import THROUGHPUT_HISTORY_S, Engine
from gptlab.tokenizer import load as load_tokenizer
from tests.conftest import tiny_model_config


@pytest.fixture(scope="module")
def engine() -> Engine:
    torch.manual_seed(0)
    return Engine(Decoder(GPT(tiny_model_config(vocab_size=512, block_size=64)), load_tokenizer("gpt2"), max_batch=2),
                  max_queue=8)


@pytest.fixture
def clock(monkeypatch) -> list[float]:
    """The engine's monotonic clock, set by the test."""
    now = [1000.0]
    monkeypatch.setattr(engine_module.time, "monotonic", lambda: now[0])
    return now


def test_tokens_per_second_counts_the_last_window_and_forgets_older_seconds(engine, clock):
    for _ in range(80):  # 5 tokens a step, 8 steps a second, for 10 s
        engine._count_tokens(5)
        clock[0] += 0.125
    assert engine.tokens_per_second(10) == pytest.approx(36.0)  # the 9 whole seconds before this one
    assert engine.tokens_per_second(5) == pytest.approx(32.0)  # 4 seconds of 40 tokens over 5 s
    clock[0] += THROUGHPUT_HISTORY_S  # a minute without work: the ring's old counts are not counted again
    engine._count_tokens(6)
    assert engine.tokens_per_second(10) == pytest.approx(0.6)
    assert engine.tokens_per_second(THROUGHPUT_HISTORY_S) == pytest.approx(6 / THROUGHPUT_HISTORY_S)


def test_counting_a_burst_of_steps_leaves_no_python_objects_behind(engine, clock):
    engine._count_tokens(1)  # the ring's first use
    before = sys.getallocatedblocks()
    for step in range(2000):  # 20 s of steps of up to 16 tokens
        engine._count_tokens(step % 17)
        clock[0] += 0.01
    # a (time, tokens) tuple per step, kept for a minute, left ~4,000 blocks here
    assert sys.getallocatedblocks() - before < 100
