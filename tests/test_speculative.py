"""Speculative decoding (gptlab.speculative) in the one Decoder: a draft model and prompt lookup.

Greedy output must be the target's own, token for token; sampling must keep the target's distribution
(a chi-square test of many seeded draws against the exact probabilities the target model gives).
"""

import copy
import dataclasses

import openai
import pytest
import torch
from scipy.stats import chisquare

from gptlab import checkpoint, cpu
from gptlab.config import ConfigError
from gptlab.generate import Decoder, complete
from gptlab.model import GPT
from gptlab.sampling import SamplingConfig, filter_logits
from gptlab.speculative import SpeculativeConfig, lookup
from gptlab.tokenizer import load
from tests.conftest import load_gpt, run_clis, tiny_model_config
from tests.helpers import ServerProcess

GREEDY = dict(temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def tokenizer():
    return load("gpt2")


def first_layers(model: GPT, n: int, noise: float = 0.1) -> GPT:
    """The target's first n blocks, its token embedding (and tied head) plus seeded noise: a draft that agrees
    with the target often, not always (without the noise a block-cut of these models agrees every time)."""
    draft = copy.deepcopy(model)
    draft.transformer.h = draft.transformer.h[:n]
    draft.config = dataclasses.replace(model.config, n_layer=n)
    with torch.no_grad():
        wte = draft.transformer.wte.weight
        wte.add_(noise * torch.randn(wte.shape, generator=torch.Generator().manual_seed(5)))
    return draft


@pytest.fixture(scope="module")
def pair(one_torch_thread):
    """A 3-layer target whose logits are far apart (embedding scaled up, so batched and single-row passes cannot
    flip a greedy pick on float rounding) and a 1-layer draft cut from it (it accepts about a third of them)."""
    torch.manual_seed(0)
    target = GPT(tiny_model_config(vocab_size=50257, block_size=128, n_layer=3))
    with torch.no_grad():
        target.transformer.wte.weight.mul_(10)
    return cpu.prepare_inference(target), cpu.prepare_inference(first_layers(target, 1))


def prompts_of(tokenizer, texts):
    return [tokenizer.encode(t) for t in texts]


TEXTS = ["The king is dead; long live the king.", "To be, or not to be", "O", "Friends, Romans, countrymen",
         "Now is the winter of our discontent made glorious summer"]


@pytest.mark.parametrize("max_batch", [1, 3])
def test_greedy_with_a_draft_is_the_targets_output(pair, tokenizer, max_batch):
    target, draft = pair
    prompts = prompts_of(tokenizer, TEXTS)  # 5 prompts over 3 slots: slots are reused mid-run
    configs = [SamplingConfig(max_new_tokens=n, **GREEDY) for n in (30, 17, 40, 25, 33)]
    alone = complete(target, tokenizer, prompts, configs, max_batch=max_batch)
    spec = SpeculativeConfig(draft=draft, num_draft_tokens=4)
    fast = complete(target, tokenizer, prompts, configs, max_batch=max_batch, speculation=spec)
    assert [c.token_ids for c in fast] == [c.token_ids for c in alone]
    assert [c.text for c in fast] == [c.text for c in alone]
    usage = [c.speculation for c in fast]
    drafted, accepted = sum(u.drafted for u in usage), sum(u.accepted for u in usage)
    assert 0 < accepted < drafted  # both branches ran: guesses kept and guesses rejected
    assert all(u.tokens == c.completion_tokens for u, c in zip(usage, fast, strict=True))
    assert sum(u.target_passes for u in usage) < sum(c.completion_tokens for c in fast)


def test_prompt_lookup_greedy_is_the_targets_output(pair, tokenizer):
    target, _ = pair
    passage = "the quick brown fox jumps over the lazy dog while the cat sleeps by the warm fire"
    prompts = prompts_of(tokenizer, [f"Repeat: {passage}\nAgain: {passage}\nOnce more: the quick", "O"])
    configs = [SamplingConfig(max_new_tokens=40, **GREEDY)] * 2
    alone = complete(target, tokenizer, prompts, configs)
    fast = complete(target, tokenizer, prompts, configs, speculation=SpeculativeConfig(prompt_lookup=True))
    assert [c.token_ids for c in fast] == [c.token_ids for c in alone]
    assert fast[0].speculation.accepted > 0


def test_lookup_copies_what_followed_the_latest_match():
    assert lookup([1, 2, 3, 9, 1, 2, 4, 5, 1, 2], 2, 3) == [4, 5]  # the latest "1 2", not the first
    assert lookup([7, 1, 2, 3, 8, 2, 3], 3, 2) == [8, 2, 3]  # "2 3" matched before "3" alone
    assert lookup([1, 2, 3, 4], 3, 3) == []  # nothing repeats
    assert lookup([5, 6, 5], 4, 3) == [6, 5]  # fewer than k tokens follow


def exact_joint(model: GPT, prompt: list[int], cfg: SamplingConfig, depth: int) -> dict[tuple[int, ...], float]:
    """P(t1..t_depth | prompt) of the model sampled with cfg (temperature, top-k), by enumeration."""
    joint = {(): 1.0}
    for _ in range(depth):
        grown = {}
        for prefix, p in joint.items():
            with torch.inference_mode():
                logits, _ = model(torch.tensor([prompt + list(prefix)]))
            probs = filter_logits(logits[:, -1].float(), cfg).softmax(-1)[0]
            for token in probs.nonzero()[:, 0].tolist():
                grown[(*prefix, token)] = p * float(probs[token])
        joint = grown
    return joint


@pytest.mark.parametrize("method", ["draft", "prompt_lookup"])
def test_sampling_keeps_the_targets_distribution(tokenizer, one_torch_thread, method):
    """2000 draws of (t1, t2, t3): t1 comes from the prefill, t2 and t3 from one verification pass of k = 2 guesses
    (then all of accept, reject and the extra token run). A draft model from another seed guesses from its own,
    different distribution; prompt lookup from a prompt that repeats."""
    torch.manual_seed(1)  # a 512-token vocabulary (GPT-2's first 512 tokens) keeps 2000 draws quick
    target = GPT(tiny_model_config(vocab_size=512, block_size=64))
    torch.manual_seed(2)
    other = GPT(tiny_model_config(vocab_size=512, block_size=64))
    for model in (target, other):
        with torch.no_grad():
            model.transformer.wte.weight.mul_(4)
    cfg = dict(max_new_tokens=4, temperature=1.0, top_k=4, ignore_eos=True)
    prompt = tokenizer.encode(" a b c a b c a b")  # ids 257, 275, 269: inside the 512
    spec = (SpeculativeConfig(draft=other, num_draft_tokens=2) if method == "draft"
            else SpeculativeConfig(prompt_lookup=True, num_draft_tokens=2))
    draws = 2000
    done = complete(target, tokenizer, [prompt] * draws, [SamplingConfig(seed=i, **cfg) for i in range(draws)],
                    max_batch=8, speculation=spec)
    joint = exact_joint(target, prompt, SamplingConfig(**cfg), 3)
    counts = {key: 0 for key in joint}
    for c in done:
        counts[tuple(c.token_ids[:3])] += 1  # a token the target gives no probability fails here (KeyError)
    # cells expected fewer than 5 times are pooled into one (the chi-square approximation needs >= 5)
    small = [key for key, p in joint.items() if p * draws < 5]
    observed = [counts[k] for k in joint if k not in small] + ([sum(counts[k] for k in small)] if small else [])
    expected = [joint[k] for k in joint if k not in small] + ([sum(joint[k] for k in small)] if small else [])
    expected = [e * draws / sum(expected) for e in expected]  # sums to draws exactly, not up to float rounding
    assert len(observed) >= 10 and chisquare(observed, expected).pvalue > 0.001
    usage = [c.speculation for c in done]
    drafted, accepted = sum(u.drafted for u in usage), sum(u.accepted for u in usage)
    assert 0.05 * drafted < accepted < 0.95 * drafted  # guesses were both kept and rejected


def test_step_refuses_a_speculative_decoder_and_bad_configs(pair, tokenizer):
    target, draft = pair
    decoder = Decoder(target, tokenizer, 1, speculation=SpeculativeConfig(prompt_lookup=True))
    with pytest.raises(ValueError, match="step_many"):
        decoder.step()
    with pytest.raises(ConfigError, match="either"):
        SpeculativeConfig(draft=draft, prompt_lookup=True)
    with pytest.raises(ConfigError, match="num_draft_tokens"):
        SpeculativeConfig(prompt_lookup=True, num_draft_tokens=0)
    short = first_layers(target, 1)
    short.config = dataclasses.replace(short.config, block_size=16)
    with pytest.raises(ConfigError, match="context"):
        Decoder(target, tokenizer, 1, speculation=SpeculativeConfig(draft=short))


def test_penalties_and_logprobs_with_a_draft_match_the_target(pair, tokenizer):
    """Penalized sequences decode without guesses (penalties change within a guessed run); logprobs come from
    the verification pass and equal the plain decoder's."""
    target, draft = pair
    prompts = prompts_of(tokenizer, TEXTS[:2])
    configs = [SamplingConfig(max_new_tokens=20, logprobs=2, **GREEDY),
               SamplingConfig(max_new_tokens=20, repetition_penalty=1.3, **GREEDY)]
    alone = complete(target, tokenizer, prompts, configs, max_batch=1)
    fast = complete(target, tokenizer, prompts, configs, max_batch=1, speculation=SpeculativeConfig(draft=draft))
    assert [c.token_ids for c in fast] == [c.token_ids for c in alone]
    assert fast[0].logprobs == pytest.approx(alone[0].logprobs, abs=1e-4)
    assert [[t for t, _ in top] for top in fast[0].top_logprobs] == [[t for t, _ in top] for top in alone[0].top_logprobs]
    assert fast[1].speculation.drafted == 0


# --- the command line and the server ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def draft_ckpt(chat_ckpt, tmp_path_factory):
    """chat_ckpt's first block as a checkpoint of its own: a draft with the same tokenizer."""
    model, tokenizer = load_gpt(chat_ckpt)
    draft = first_layers(model, 1)
    path = tmp_path_factory.mktemp("draft") / "tiny-draft"
    checkpoint.save(path / checkpoint.CKPT_NAME, {"model": draft.state_dict(), "model_config": draft.config.to_dict(),
                                                 "tokenizer": tokenizer.to_dict(), "step": 0})
    return path


def test_cli_generate_with_a_draft_and_prompt_lookup(chat_ckpt, draft_ckpt):
    model, tokenizer = load_gpt(chat_ckpt)
    (plain,) = complete(cpu.prepare_inference(model), tokenizer, [tokenizer.encode("Friends, Romans")],
                        [SamplingConfig(max_new_tokens=24, **GREEDY)])
    args = ["generate", "--ckpt", str(chat_ckpt), "--prompt", "Friends, Romans", "--temperature", "0",
            "--max-new-tokens", "24", "--ignore-eos"]
    methods = ((["--draft", str(draft_ckpt), "--num-draft-tokens", "3"], "draft"), (["--prompt-lookup"], "prompt_lookup"))
    for (_, method), fast in zip(methods, run_clis(*[[*args, *flags] for flags, _ in methods]), strict=True):
        assert fast.returncode == 0, fast.stderr
        assert fast.stdout == "Friends, Romans" + plain.text + "\n"
        assert f"speculative ({method}):" in fast.stderr and "tokens per target pass" in fast.stderr


def test_cli_refuses_bad_speculation_in_one_line(chat_ckpt, draft_ckpt, tmp_path):
    small_vocab = GPT(tiny_model_config(vocab_size=512, block_size=1024))
    other = tmp_path / "other-vocab"  # GPT-2's tokenizer, but a 512-token embedding: not a usable draft
    checkpoint.save(other / checkpoint.CKPT_NAME, {"model": small_vocab.state_dict(), "step": 0,
                                                  "model_config": small_vocab.config.to_dict(),
                                                  "tokenizer": load_gpt(chat_ckpt)[1].to_dict()})
    base = ["generate", "--ckpt", str(chat_ckpt), "--prompt", "x"]
    cases = ((["--draft", str(draft_ckpt), "--num-draft-tokens", "0"], "num_draft_tokens"), (["--draft", str(other)], "vocabulary"))
    for (_, message), result in zip(cases, run_clis(*[[*base, *flags] for flags, _ in cases]), strict=True):
        assert result.returncode == 2, result.stderr
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1 and not result.stdout


def test_serve_with_a_draft_reports_speculation_in_usage(chat_ckpt, draft_ckpt, tmp_path):
    model, tokenizer = load_gpt(chat_ckpt)
    prompts = ["To be, or not", "O Romeo"]
    plain = complete(cpu.prepare_inference(model), tokenizer, [tokenizer.encode(p) for p in prompts],
                     [SamplingConfig(max_new_tokens=20, temperature=0)] * 2)
    with ServerProcess(chat_ckpt, tmp_path / "serve.log", "--draft", str(draft_ckpt), "--threads", "1") as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)
        ask = dict(model=chat_ckpt.name, prompt=prompts, max_tokens=20, temperature=0)
        fast = client.completions.create(**ask)
        assert [c.text for c in fast.choices] == [c.text for c in plain]
        usage = fast.usage.model_extra["speculative"]
        assert usage["method"] == "draft" and usage["drafted_tokens"] >= usage["accepted_tokens"] > 0
        assert usage["tokens_per_target_pass"] > 1
        stream = client.completions.create(**{**ask, "prompt": prompts[0]}, stream=True)
        assert "".join(chunk.choices[0].text for chunk in stream if chunk.choices) == plain[0].text
        with pytest.raises(openai.BadRequestError):  # bad input: 400, and the server keeps serving
            client.completions.create(**{**ask, "temperature": 5})
        again = client.completions.create(**ask)
        assert [c.text for c in again.choices] == [c.text for c in plain]
