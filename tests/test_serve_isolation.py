"""No request can hurt another: random sampling parameters thrown at the server's real engine (in-process, a
tiny model, so thousands of cases fit) while a reference stream runs; the reference always completes with
exactly the tokens it gets alone. `make test` runs 300 cases (the "quick" Hypothesis profile, tests/conftest.py);
thousands:

    HYPOTHESIS_PROFILE=thorough python -m pytest tests/test_serve_isolation.py -k random
"""

from __future__ import annotations

import asyncio
import math
import queue
import threading
import time

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from gptlab.config import ConfigError
from gptlab.generate import Decoder, SequenceError, TokenEvent
from gptlab.language_model import LanguageModel
from gptlab.model import GPT
from gptlab.sampling import SamplingConfig
from gptlab.serve.engine import Engine, GenerationJob
from gptlab.serve.protocol import APIError
from gptlab.tokenizer import load as load_tokenizer
from tests.conftest import tiny_model_config

REFERENCE = ([40, 263, 318, 257], SamplingConfig(max_new_tokens=8, temperature=1.0, top_p=0.95, seed=7))
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def lm() -> LanguageModel:
    """A random model over 512 of GPT-2's tokens (so stop strings are real text)."""
    torch.manual_seed(0)
    model = GPT(tiny_model_config(vocab_size=512, block_size=64))
    return LanguageModel(model, load_tokenizer("gpt2"))


@pytest.fixture(scope="module")
def engine(lm):
    engine = Engine(Decoder(lm.model, lm.tokenizer, max_batch=4), max_queue=64)
    engine.start()
    yield engine
    engine.stop()


def run(engine: Engine, jobs: list[tuple[list[int], SamplingConfig]]) -> list[list[int] | Exception]:
    """Submit the jobs together; each one's token ids, or the error that ended it. The engine thread collects
    the events and wakes this thread once, when every job has ended: a wake-up per token made the two threads
    hand the GIL back and forth at every token."""
    results: list[list[int] | Exception] = [[] for _ in jobs]
    open_ = set(range(len(jobs)))
    lock, done = threading.Lock(), threading.Event()

    def deliver(i: int, item: TokenEvent | Exception) -> None:  # on the engine thread
        with lock:
            if i not in open_:
                return
            if isinstance(item, Exception):
                results[i] = item
            else:
                results[i].append(item.token_id)
                if item.finish_reason is None:
                    return
            open_.discard(i)
            if not open_:
                done.set()

    engine.submit([GenerationJob(i, ids, cfg, lambda item, i=i: deliver(i, item)) for i, (ids, cfg) in enumerate(jobs)])
    assert done.wait(timeout=60), f"jobs {sorted(open_)} did not end within 60 s"
    return results


@pytest.fixture(scope="module")
def expected(engine) -> list[int]:
    (tokens,) = run(engine, [REFERENCE])
    assert len(tokens) == 8 and len(set(tokens)) > 2  # a varied stream (seeded sampling)
    return tokens


# finite, huge, tiny, subnormal, the reproductions' values, NaN and infinities
WILD = st.one_of(st.floats(), st.sampled_from([0.0, 1e-40, 1e-39, 5e-324, 1e-38, 1e-2, 2.0, -1.0, 1e38, math.inf,
                                               -math.inf, math.nan]))


def number(low: float, high: float) -> st.SearchStrategy:
    return st.one_of(st.none(), st.floats(low, high))


# in range (each case may then get one wild value, `wild` below, to check the refusals)
PARAMS = st.fixed_dictionaries({
    "temperature": st.one_of(st.just(0.0), number(0.01, 2)), "min_p": number(0, 1),
    "top_p": st.one_of(st.none(), st.floats(0, 1, exclude_min=True)),  # subnormals too: 5e-324 is 0 in float32
    "repetition_penalty": number(0.01, 100), "presence_penalty": number(-2, 2), "frequency_penalty": number(-2, 2),
    "top_k": st.one_of(st.none(), st.integers(1, 10**9), st.integers(1, 600)),
    "seed": st.one_of(st.none(), st.integers(-(2**63), 2**64 - 1)),
    "stop": st.lists(st.text(min_size=1, max_size=4), max_size=3),
    "logprobs": st.one_of(st.none(), st.integers(0, 20)),
    "max_new_tokens": st.integers(1, 4),
})
FLOATS = ["temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"]
WILD_VALUE = st.one_of(
    st.tuples(st.sampled_from(FLOATS), WILD),
    st.tuples(st.sampled_from(["top_k", "max_new_tokens"]), st.integers(-3, 0)),
    st.tuples(st.just("logprobs"), st.integers(-3, -1)),
    st.tuples(st.just("seed"), st.one_of(st.integers(max_value=-(2**63) - 1), st.integers(min_value=2**64))),
    st.tuples(st.just("stop"), st.lists(st.text(max_size=2)).map(lambda stop: [*stop, ""])))


@settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture],
          database=None)
@given(params=PARAMS, prompt=st.lists(st.integers(0, 511), min_size=1, max_size=8),
       wild=st.one_of(st.none(), st.none(), st.none(), WILD_VALUE),
       bypass=st.one_of(st.none(), st.tuples(st.sampled_from(["temperature", "repetition_penalty"]),
                                            st.sampled_from([1e-40, 1e-39, 5e-324, math.nan, math.inf]))))
def test_random_parameters_never_disturb_the_reference_stream(engine, expected, params, prompt, wild, bypass):
    """Parameters SamplingConfig accepts always generate; numbers forced past its checks (`bypass`, what a
    bug or a future field could let through) end that request alone with an error; either way the reference
    stream beside it gets exactly its tokens."""
    given = {k: v for k, v in params.items() if v is not None}
    if wild:
        given[wild[0]] = wild[1]
    try:
        cfg = SamplingConfig(**given)
    except ConfigError:
        event("refused by SamplingConfig (the server's 400)")
        return  # nothing reaches the engine
    event("forced past the checks" if bypass else "valid: reached the engine")
    assert not wild or (wild[0] in FLOATS and _sound(*wild)), f"{wild} was accepted"
    if bypass:
        setattr(cfg, *bypass)
    reference, other = run(engine, [REFERENCE, (prompt, cfg)])
    assert reference == expected
    if isinstance(other, Exception):
        assert bypass and isinstance(other, APIError) and other.code == "generation_failed", other
    else:
        assert 1 <= len(other) <= cfg.max_new_tokens and all(0 <= t < 512 for t in other)
    assert engine.stats.active == 0


def _sound(field: str, value: float) -> bool:
    """Where float32 sampling arithmetic stays finite (the bounds SamplingConfig enforces)."""
    low, high = {"temperature": (0.01, 2), "top_p": (math.ulp(0.0), 1), "min_p": (0, 1), "repetition_penalty": (0.01, 100),
                 "presence_penalty": (-2, 2), "frequency_penalty": (-2, 2)}[field]
    return low <= value <= high or (field == "temperature" and value == 0)


def test_the_reproductions_values_are_refused_with_the_parameter_named():
    for field, value in [("temperature", 1e-40), ("temperature", 1e-39), ("temperature", 5e-324),
                         ("repetition_penalty", 1e-39), ("seed", 2**64)]:
        with pytest.raises(ConfigError, match=field):
            SamplingConfig(**{field: value})
    SamplingConfig(temperature=0.01, repetition_penalty=0.01)  # the smallest allowed are sound


def test_one_bad_row_fails_alone_in_the_python_api(lm):
    """`LanguageModel.complete` (the same Decoder) raises a one-line error for the bad prompt's row only when
    it is asked for; a batch of good configs runs as before."""
    bad = SamplingConfig(max_new_tokens=3, temperature=1.0)
    bad.temperature = 1e-40
    with pytest.raises(SequenceError, match="not finite"):
        lm.complete([[1, 2, 3]], bad)
    assert len(lm.complete([[1, 2, 3], [4, 5]], SamplingConfig(max_new_tokens=3, temperature=0.5, seed=1))) == 2


def test_health_does_not_count_a_failed_batch_as_active(lm):
    """A step that raises (a decoder bug) fails the batch's requests and leaves no sequence counted as running."""
    engine = Engine(Decoder(lm.model, lm.tokenizer, max_batch=2), max_queue=8)
    broken = engine.scheduler.step

    def step_then_fail():
        raise RuntimeError("simulated decoder bug")

    engine.scheduler.step = step_then_fail
    engine.start()
    try:
        results = run(engine, [([1, 2], SamplingConfig(max_new_tokens=3)), ([3], SamplingConfig(max_new_tokens=3))])
        assert all(isinstance(r, APIError) and r.status == 500 for r in results)
        assert engine.stats.active == 0 and engine.stats.failed == 2
        engine.scheduler.step = broken  # the engine serves on
        assert len(run(engine, [([1, 2], SamplingConfig(max_new_tokens=2, temperature=0))])[0]) == 2
    finally:
        engine.stop()


def test_engine_refuses_new_work_while_draining_and_aborts_the_rest(lm):
    engine = Engine(Decoder(lm.model, lm.tokenizer, max_batch=1), max_queue=8)
    step = engine.scheduler.step
    engine.scheduler.step = lambda: (time.sleep(0.05), step())[1]  # 60 tokens take 3 s: still running below
    engine.start()
    try:
        inbox: queue.Queue = queue.Queue()
        long = SamplingConfig(max_new_tokens=60, temperature=0, ignore_eos=True)
        engine.submit([GenerationJob(0, [1], long, inbox.put), GenerationJob(1, [2], long, inbox.put)])
        assert isinstance(inbox.get(timeout=30), TokenEvent)  # the first is running, the second waits
        engine.drain()
        with pytest.raises(APIError) as refused:
            engine.submit([GenerationJob(2, [3], long, inbox.put)])
        assert refused.value.status == 503
        with pytest.raises(APIError):
            asyncio.run(engine.run(lambda: None))
        engine.abort_all(APIError(503, "shut down", code="shutting_down"))
        items = []
        while len([i for i in items if isinstance(i, Exception)]) < 2:
            items.append(inbox.get(timeout=30))
        assert [i.code for i in items if isinstance(i, Exception)] == ["shutting_down"] * 2
        assert engine.stats.active == 0 and engine.stats.waiting == 0
    finally:
        engine.stop()
