"""Generation: KV cache, batching, sampling controls, stops, streaming, beam search, int8, CLI.

The reference is real: a random-init transformers GPT2LMHeadModel converted to gptlab, so greedy and
beam search must give its exact tokens, and cached logits must equal a full forward pass.
"""

import copy
import math

import pytest
import torch

from gptlab import checkpoint, cli, hf
from gptlab.beam import beam_search
from gptlab.cli.inference import unescape
from gptlab.config import ConfigError, GPTConfig
from gptlab.cpu import layers, prepare_inference
from gptlab.cpu.layers import CPULinear, Int8Linear
from gptlab.errors import ContextLengthError
from gptlab.generate import Decoder, _Sequence, _TextReleaser, complete, prompt_logprobs
from gptlab.language_model import LanguageModel
from gptlab.model import GPT, KVCache
from gptlab.sampling import SamplingConfig, filter_logits
from gptlab.tokenizer import load
from tests.conftest import KERNEL_VARIANTS, run_clis, tiny_model_config
from tests.helpers import hf_generate

GREEDY = dict(temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def tokenizer():
    return load("gpt2")


@pytest.fixture(scope="module")
def lm(tokenizer):
    torch.manual_seed(0)
    return LanguageModel(GPT(tiny_model_config(vocab_size=50257, block_size=64)), tokenizer)


@pytest.fixture(scope="module")
def peer():
    """A random-init transformers GPT-2 and the same weights in gptlab. The init scale is raised
    (0.02 -> 0.1) so the next-token argmax is decisive: two correct implementations differ in the
    last float bits, which must not decide a near tie."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=50257, n_positions=128, n_embd=64, n_layer=2, n_head=4, initializer_range=0.1)
    model = GPT2LMHeadModel(config).eval()
    ours = GPT(hf.config_from_hf(config.to_dict()))
    checkpoint.load_weights(ours, hf.state_from_hf(model.state_dict()))
    return model, ours


def random_prompts(lengths, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 50257, (n,), generator=gen).tolist() for n in lengths]


# --- parity with transformers ----------------------------------------------------------------------

def test_greedy_is_token_identical_to_transformers(peer, tokenizer):
    model, ours = peer
    lm = LanguageModel(ours, tokenizer, max_batch=3)
    prompts = random_prompts([1, 7, 40, 23])
    cfg = SamplingConfig(max_new_tokens=24, **GREEDY)
    for prompt in prompts[:3]:  # batch 1, several prompt lengths
        assert lm.complete([prompt], cfg)[0].token_ids == hf_generate(model, [prompt], 24)[0]
    # batched: 4 prompts of different lengths through 3 slots (the 4th takes the first free slot)
    assert [c.token_ids for c in lm.complete(prompts, cfg)] == hf_generate(model, prompts, 24)


def test_beam_search_matches_transformers(peer):
    model, ours = peer
    for prompt, beams, penalty in zip(random_prompts([5, 12], seed=1), (3, 4), (1.0, 0.5), strict=True):
        expected = hf_generate(model, [prompt], 8, num_beams=beams, length_penalty=penalty)[0]
        assert beam_search(ours, prompt, beams, 8, penalty) == expected
    # an EOS token ends hypotheses: make the greedy 3rd token an EOS, transformers agrees on the result
    prompt = random_prompts([6], seed=2)[0]
    eos = hf_generate(model, [prompt], 3)[0][2]
    width = len(prompt)
    out = model.generate(torch.tensor([prompt]), max_new_tokens=8, num_beams=3, do_sample=False,
                         eos_token_id=eos, pad_token_id=eos)[0, width:].tolist()
    assert beam_search(ours, prompt, 3, 8, 1.0, [eos]) == out


# --- the KV cache ----------------------------------------------------------------------------------

def test_cached_decoding_gives_the_full_forward_logits(peer):
    _check_cached_decoding(peer[1])


def test_cached_decoding_gives_the_full_forward_logits_past_gpt2():
    """The faster-learning switches (rotary positions, which a cached pass takes per row, QK-norm, ReLU^2, an
    untied head) decode from the cache exactly as the full forward pass computes."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50257, block_size=128, n_layer=2, n_head=4, n_embd=64, pos_encoding="rotary",
                          qk_norm=True, activation="relu2", tie_embeddings=False)).eval()
    torch.nn.init.normal_(model.lm_head.weight, std=0.1)  # zero-initialised: every logit would tie
    _check_cached_decoding(model)
    # the CPU fast path keeps such a model on its own blocks (the fused decode kernel is GPT-2's)
    prepared = prepare_inference(copy.deepcopy(model))
    assert prepared.decode_step is None
    _check_cached_decoding(prepared)


def _check_cached_decoding(model: GPT) -> None:
    prompts = random_prompts([9, 4, 15], seed=3)
    continuations = random_prompts([6, 6, 6], seed=4)
    cache = KVCache(model.config, batch_size=4, max_len=32)
    rows = torch.tensor([0, 1, 3])  # any rows for prefill; row 2 stays empty
    width = max(map(len, prompts))
    idx = torch.zeros(3, width, dtype=torch.long)
    for r, p in enumerate(prompts):
        idx[r, : len(p)] = torch.tensor(p)  # right padding
    lengths = torch.tensor([len(p) for p in prompts])
    with torch.no_grad():
        logits = model.forward_cached(idx, cache, rows, [0, 0, 0], prefill=True, last=lengths - 1)
        for r, p in enumerate(prompts):
            full = model(torch.tensor([p]))[0][0, -1]
            assert (logits[r] - full).abs().max() <= 1e-4
        for step in range(6):  # decode rows 0..3 together, each at its own position (row 2: dummy)
            tokens = torch.tensor([continuations[0][step], continuations[1][step], 0, continuations[2][step]])
            starts = [len(prompts[0]) + step, len(prompts[1]) + step, 0, len(prompts[2]) + step]
            logits = model.forward_cached(tokens[:, None], cache, slice(0, 4), starts, prefill=False)
            for r, row in enumerate((0, 1, 3)):
                seq = prompts[r] + continuations[r][: step + 1]
                full = model(torch.tensor([seq]))[0][0, -1]
                assert (logits[row] - full).abs().max() <= 1e-4
        # several new tokens per row at once (masked causally within them), rows 0..1 only
        more = torch.tensor(random_prompts([3, 3], seed=6))
        starts = [len(prompts[r]) + 6 for r in (0, 1)]
        logits = model.forward_cached(more, cache, slice(0, 2), starts, prefill=False)
        for r in (0, 1):
            full = model(torch.tensor([prompts[r] + continuations[r] + more[r].tolist()]))[0][0, -1]
            assert (logits[r] - full).abs().max() <= 1e-4


def test_batched_generation_equals_each_prompt_alone(lm):
    prompts = ["Hello", "The quick brown fox jumps", "1 2 3", "A"]
    cfg = dict(max_new_tokens=10, **GREEDY)
    alone = [lm.generate(p, **cfg)[0] for p in prompts]
    assert lm.generate(prompts, **cfg) == alone
    small = LanguageModel(lm.model, lm.tokenizer, max_batch=2)  # continuous batching refills slots
    assert small.generate(prompts, **cfg) == alone


# --- sampling ----------------------------------------------------------------------------------------

def test_same_seed_same_text(lm):
    a = lm.generate(["Hello", "The"], max_new_tokens=12, temperature=1.0, seed=7)
    b = lm.generate(["Hello", "The"], max_new_tokens=12, temperature=1.0, seed=7)
    c = lm.generate(["Hello", "The"], max_new_tokens=12, temperature=1.0, seed=8)
    assert a == b and a != c and len(a) == 2


def test_a_seeded_batch_gives_every_prompt_its_own_seed(lm):
    """Prompt i samples with seed + i: the same prompt twice in one seeded batch gives two different texts,
    each the text that prompt gives alone with its own seed."""
    sampled = dict(max_new_tokens=12, temperature=1.0)
    twice = lm.generate(["ROMEO:", "ROMEO:"], seed=7, **sampled)
    assert twice[0] != twice[1]
    assert twice == [lm.generate("ROMEO:", seed=7, **sampled)[0], lm.generate("ROMEO:", seed=8, **sampled)[0]]
    assert SamplingConfig(seed=None).for_sequence(3).seed is None


def test_per_slot_sampling_configs_in_one_batch(lm):
    """Slots with different temperatures and seeds in one batch give what each gives alone."""
    prompt = lm.tokenizer.encode("Once upon a time")
    configs = [SamplingConfig(max_new_tokens=8, temperature=0.0, ignore_eos=True),
               SamplingConfig(max_new_tokens=8, temperature=1.5, seed=1, ignore_eos=True),
               SamplingConfig(max_new_tokens=5, temperature=0.7, top_k=20, seed=2, ignore_eos=True)]

    def run(decoder, cfgs):
        slots = [decoder.add(prompt, c) for c in cfgs]
        tokens = {s: [] for s in slots}
        while decoder.active:
            for slot, event in decoder.step().items():
                tokens[slot].append(event.token_id)
        return [tokens[s] for s in slots]

    together = run(Decoder(lm.model, lm.tokenizer, max_batch=3), configs)
    alone = [run(Decoder(lm.model, lm.tokenizer, max_batch=1), [c])[0] for c in configs]
    assert together == alone and len(together[2]) == 5 and together[0] != together[1]


def test_top_k_top_p_min_p_filters():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    kept = filter_logits(logits, SamplingConfig(temperature=1.0, top_k=2)).isfinite()
    assert kept.tolist() == [[True, True, False, False]]
    probs = logits.softmax(-1)[0]  # ~0.64, 0.24, 0.09, 0.03
    kept = filter_logits(logits, SamplingConfig(temperature=1.0, top_p=0.7)).isfinite()
    assert kept.tolist() == [[True, True, False, False]] and probs[0] < 0.7
    kept = filter_logits(logits, SamplingConfig(temperature=1.0, top_p=0.5)).isfinite()
    assert kept.tolist() == [[True, False, False, False]]
    kept = filter_logits(logits, SamplingConfig(temperature=1.0, min_p=0.1)).isfinite()  # keep p >= 0.064
    assert kept.tolist() == [[True, True, True, False]]


def test_penalties(lm):
    cfg = SamplingConfig(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    seq = _Sequence([1, 2], cfg, set(), vocab=5, device=torch.device("cpu"))
    seq.record(2)
    seq.record(3)
    seq.record(3)
    logits = torch.tensor([1.0, 1.0, 1.0, -1.0, 1.0])
    # token 1: prompt only -> /2; token 2: prompt and once in the output -> /2 - 0.5 - 0.25;
    # token 3: twice in the output -> *2 - 0.5 - 0.5; tokens 0 and 4: untouched
    assert seq.penalize(logits).tolist() == pytest.approx([1.0, 0.5, -0.25, -3.0, 1.0])
    # greedy with a strong repetition penalty never repeats a token, nor uses one of the prompt
    prompt = lm.tokenizer.encode("Hello there")
    out = lm.complete([prompt], SamplingConfig(max_new_tokens=15, repetition_penalty=100.0, **GREEDY))[0]
    assert len(set(out.token_ids)) == 15 and not set(out.token_ids) & set(prompt)
    plain = lm.complete([prompt], SamplingConfig(max_new_tokens=15, **GREEDY))[0]
    assert len(set(plain.token_ids)) < 15  # the random model does repeat itself without it


def test_logprobs_and_score_match_the_full_forward(lm):
    prompt = lm.tokenizer.encode("The meaning of life is")
    out = lm.complete([prompt], SamplingConfig(max_new_tokens=5, temperature=0.8, seed=3, logprobs=3,
                                               ignore_eos=True))[0]
    with torch.no_grad():
        full = lm.model(torch.tensor([prompt + out.token_ids]))[0][0].log_softmax(-1)
    for i, (token, logprob, top) in enumerate(zip(out.token_ids, out.logprobs, out.top_logprobs, strict=True)):
        row = full[len(prompt) - 1 + i]
        assert logprob == pytest.approx(row[token].item(), abs=1e-4)
        assert [t for t, _ in top] == row.topk(3).indices.tolist()
    scored, _ = prompt_logprobs(lm.model, prompt + out.token_ids)
    assert scored[0] is None and scored[len(prompt):] == pytest.approx(out.logprobs, abs=1e-4)
    greedy = lm.complete([prompt], SamplingConfig(max_new_tokens=2, logprobs=0, **GREEDY))[0]
    assert greedy.top_logprobs == [[], []] and math.exp(greedy.logprobs[0]) <= 1


# --- stops and text ----------------------------------------------------------------------------------

def test_text_releaser_withholds_stop_strings_and_partial_characters():
    releaser = _TextReleaser(["END", "好!"])
    assert releaser.push(b"abc E") == ("abc ", False)  # "E" may start "END"
    assert releaser.push(b"Nx") == ("ENx", False)
    data = "好".encode()
    assert releaser.push(data[:2]) == ("", False)  # half a character is never released
    assert releaser.push(data[2:]) == ("", False)  # "好" may start "好!"
    assert releaser.push(b"!tail") == ("", True)  # stop found: its text and what follows are dropped
    releaser = _TextReleaser([])
    assert releaser.push(b"ab" + data[:1]) == ("ab", False)
    assert releaser.push(data[1:]) == ("好", False)


def test_stop_strings_and_stop_tokens(lm):
    prompt = "It was a dark and stormy night"
    full = lm.complete([prompt], SamplingConfig(max_new_tokens=12, **GREEDY))[0]
    text = full.text
    stop = text[5:9]  # a stop string that may span tokens
    out = lm.complete([prompt], SamplingConfig(max_new_tokens=12, stop=[stop], **GREEDY))[0]
    assert out.finish_reason == "stop" and out.text == text[: text.index(stop)]
    pieces = list(lm.stream(prompt, max_new_tokens=12, stop=[stop], **GREEDY))
    assert "".join(pieces) == out.text
    stop_id = full.token_ids[3]
    out = lm.complete([prompt], SamplingConfig(max_new_tokens=12, stop_token_ids=[stop_id], **GREEDY))[0]
    first = full.token_ids.index(stop_id)
    assert out.finish_reason == "stop" and out.token_ids == full.token_ids[: first + 1]
    assert out.text == lm.tokenizer.decode(full.token_ids[:first])
    assert full.finish_reason == "length" and full.completion_tokens == 12 == len(full.token_ids)


def test_stream_yields_the_same_text(lm):
    pieces = list(lm.stream("你好", max_new_tokens=20, temperature=1.0, seed=3))
    assert "".join(pieces) == lm.generate("你好", max_new_tokens=20, temperature=1.0, seed=3)[0]
    assert all(pieces)


# --- the Decoder's bookkeeping and errors -------------------------------------------------------------

def test_decoder_slots_cancel_and_refusals(lm):
    decoder = Decoder(lm.model, lm.tokenizer, max_batch=2)
    cfg = SamplingConfig(max_new_tokens=3, **GREEDY)
    a = decoder.add([1, 2, 3], cfg)
    b = decoder.add([4], cfg)
    assert (a, b, decoder.free_slots, decoder.active) == (0, 1, 0, 2)
    with pytest.raises(ValueError, match="no free slot"):
        decoder.add([5], cfg)
    assert set(decoder.step()) == {a, b}
    decoder.cancel(a)
    assert decoder.free_slots == 1 and decoder.add([7, 8], cfg) == a
    finished = {}
    while decoder.active:
        finished.update({s: e for s, e in decoder.step().items() if e.finish_reason})
    assert {s: e.finish_reason for s, e in finished.items()} == {a: "length", b: "length"}
    with pytest.raises(ValueError, match="empty"):
        decoder.add([], cfg)
    with pytest.raises(ValueError, match="context"):
        decoder.add([1] * 60, SamplingConfig(max_new_tokens=10))
    with pytest.raises(ValueError, match="token ids"):
        decoder.add([50257], cfg)


@pytest.mark.parametrize("bad", [dict(top_p=0.0), dict(top_p=1.5), dict(temperature=-1.0), dict(temperature=2.5), dict(max_new_tokens=0),
                                 dict(top_k=0), dict(min_p=2.0), dict(repetition_penalty=0.0),
                                 dict(presence_penalty=3.0), dict(stop=[""]), dict(logprobs=-1)])
def test_bad_sampling_parameters_raise(lm, bad):
    with pytest.raises(ValueError):
        lm.generate("hi", **{"max_new_tokens": 3, **bad})


def test_prompt_longer_than_context_raises(lm):
    with pytest.raises(ValueError, match="context"):
        lm.generate("word " * 100, max_new_tokens=2)
    with pytest.raises(ValueError, match="no prompts"):
        lm.generate([], max_new_tokens=2)
    with pytest.raises(ValueError, match="num_beams"):
        lm.generate("hi", num_beams=0)


def test_beam_search_refuses_the_sampling_settings_it_would_ignore(lm):
    with pytest.raises(ConfigError, match="does not use --temperature, --top-k: drop them"):
        lm.generate("hi", num_beams=4, temperature=0.8, top_k=5, max_new_tokens=4)
    with pytest.raises(ConfigError, match="does not use --stop: drop it"):
        lm.generate("hi", num_beams=2, stop=["x"], max_new_tokens=4)
    with pytest.raises(ConfigError, match="--slide-context"):
        lm.generate("hi", num_beams=2, slide=True, max_new_tokens=4)
    # greedy (temperature 0), the length and the end-of-text settings are beam search's own
    assert len(lm.generate("hi", num_beams=2, temperature=0, max_new_tokens=4, ignore_eos=True)) == 1


def _sliding_greedy(model, prompt: list[int], new_tokens: int, context: int) -> list[int]:
    """The sliding context spelled out with full forward passes: once prompt + output overflow the
    context, the window restarts from its newest half."""
    ids, start = list(prompt), 0
    with torch.no_grad():
        for _ in range(new_tokens):
            if len(ids) - start > context:
                start = len(ids) - context // 2
            ids.append(int(model(torch.tensor([ids[start:]]))[0][0, -1].argmax()))
    return ids[len(prompt):]


def test_sliding_context_generates_past_the_context(peer, tokenizer):
    """Opt-in: 140 tokens after a 12-token prompt from a 128-token model, each the greedy token of the window
    the slide keeps (batched with another prompt, and streamed); without it the request is refused."""
    _, model = peer
    lm = LanguageModel(model, tokenizer)
    prompt = random_prompts([12], seed=3)[0]
    cfg = SamplingConfig(max_new_tokens=140, **GREEDY)
    with pytest.raises(ContextLengthError):
        lm.complete([prompt], cfg)
    out = lm.complete([prompt, prompt[:2]], cfg, slide=True)[0]
    assert out.completion_tokens == 140 and out.finish_reason == "length"
    assert out.token_ids == _sliding_greedy(lm.model, prompt, 140, lm.model.config.block_size)
    assert "".join(lm.stream(prompt, slide=True, max_new_tokens=140, **GREEDY)) == out.text


def test_sliding_context_keeps_the_prompt_embeddings_in_view(peer, tokenizer):
    """A prompt given as input embeddings (as images are) slides like its tokens: with the tokens' own
    embeddings, the rows prefilled again read the part of the prompt still in view and give the same tokens
    (a 16-token window over a 12-token prompt and 30 new tokens)."""
    _, model = peer
    prompt = random_prompts([12], seed=3)[0]
    cfg = SamplingConfig(max_new_tokens=30, **GREEDY)
    with torch.no_grad():
        embeds = model.transformer.wte(torch.tensor(prompt))

    def run(**given) -> list[int]:
        decoder = Decoder(model, tokenizer, max_batch=1, max_len=16, slide=True)
        slot = decoder.add(prompt, cfg, **given)
        tokens = []
        while decoder.active:
            tokens.append(decoder.step()[slot].token_id)
        return tokens
    assert run(embeds=embeds) == run() and len(run()) == 30


# --- CPU weight formats ----------------------------------------------------------------------------------------------

def plain_model(peer) -> GPT:
    """The peer's weights in a fresh gptlab GPT: plain nn.Linear layers (LanguageModel prepares the
    fixture's own model in place)."""
    hf_model, _ = peer
    model = GPT(hf.config_from_hf(hf_model.config.to_dict()))
    checkpoint.load_weights(model, hf.state_from_hf(hf_model.state_dict()))
    return model.eval()


# each kernel variant this CPU can run, and PyTorch's kernels alone (as without a compiler or with GPTLAB_NO_KERNEL=1)
KERNEL_PATHS = [*KERNEL_VARIANTS, pytest.param(None, id="library")]


@pytest.mark.parametrize("kernel", KERNEL_PATHS)
def test_cpu_linear_layouts_give_the_same_results(peer, kernel):
    model = plain_model(peer)
    prepared = prepare_inference(copy.deepcopy(model), kernel=kernel)
    assert isinstance(prepared.lm_head, CPULinear) and prepared.lm_head.weight is prepared.transformer.wte.weight
    assert prepared.lm_head.variant == kernel
    assert prepared.state_dict().keys() == model.state_dict().keys()
    beyond = [100] * (layers.PANEL_MAX_ROWS // 100 + 1)  # more rows than the panel kernel takes
    for lengths in ([1], [20], beyond):  # one row, several, beyond the panel kernel's range
        tokens = torch.tensor(random_prompts(lengths, seed=7))
        with torch.inference_mode():
            assert (prepared(tokens)[0] - model(tokens)[0]).abs().max() <= 1e-4
    prepared.train()  # training falls back to F.linear, gradients flow
    prepared(tokens, tokens)[1].backward()
    assert prepared.lm_head.weight.grad is not None


@pytest.mark.parametrize("int8", [False, True], ids=["float32", "int8"])
@pytest.mark.parametrize("kernel", KERNEL_VARIANTS)
def test_fused_decode_step_equals_the_blocks_one_by_one(peer, kernel, int8):
    """prepare_inference's decode_step: all blocks of a decode step in one kernel call, against the
    same prepared model running its blocks in Python, rows at different positions."""
    model = plain_model(peer)
    prepared = prepare_inference(copy.deepcopy(model), quantize="int8" if int8 else None, kernel=kernel)
    fused = prepared.decode_step
    assert fused is not None and len(fused.block_tensors) == 16 * prepared.config.n_layer
    prompts = random_prompts([5, 9, 2], seed=11)
    offered = []

    def counted(x, cache):  # the fused step, noting which passes the model offers it
        offered.append("prefill" if cache.prefill else "decode")
        return fused(x, cache)

    logits = []
    for decode_step in (counted, None):
        cache = KVCache(prepared.config, batch_size=3, max_len=32)
        prepared.decode_step = decode_step
        with torch.inference_mode():
            width = max(map(len, prompts))
            idx = torch.tensor([p + [0] * (width - len(p)) for p in prompts])
            last = torch.tensor([len(p) - 1 for p in prompts])
            prepared.forward_cached(idx, cache, slice(0, 3), [0, 0, 0], prefill=True, last=last)
            step = torch.tensor([[1], [2], [3]])
            logits.append(prepared.forward_cached(step, cache, slice(0, 3), [len(p) for p in prompts], prefill=False))
    assert offered == ["prefill", "decode"]  # it declines the prefill: the blocks run that one
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kernel", KERNEL_PATHS)
def test_int8_model_stays_close_to_float(peer, tokenizer, kernel):
    """Weight-only int8 on every path: the same numbers with any kernel variant and without one."""
    model = plain_model(peer)
    quantized = prepare_inference(copy.deepcopy(model), quantize="int8", kernel=kernel)
    library = prepare_inference(copy.deepcopy(model), quantize="int8", kernel=None)
    assert isinstance(quantized.lm_head, Int8Linear) and quantized.lm_head.variant == kernel
    tokens = torch.tensor(random_prompts([48], seed=5))
    with torch.no_grad():
        exact, approx = model(tokens)[0], quantized(tokens)[0]
        torch.testing.assert_close(approx, library(tokens)[0], rtol=1e-4, atol=1e-4)
    # relative RMS error of weight-only int8: 1.5%
    assert (approx - exact).pow(2).mean().sqrt() <= 0.025 * exact.pow(2).mean().sqrt()
    assert (approx.argmax(-1) == exact.argmax(-1)).float().mean() >= 0.85
    head = quantized.lm_head
    # beyond the panel kernel's rows the weight is dequantized block by block: the same numbers,
    # which are those of the dequantized matrix
    rows = torch.randn(layers.PANEL_MAX_ROWS + 1, head.in_features)
    qweight, scales = layers.quantize_weight(model.lm_head.weight.detach())
    with torch.no_grad():
        torch.testing.assert_close(head(rows)[:3], head(rows[:3]), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(head(rows), rows @ (qweight.float() * scales[:, None]).T, rtol=1e-4, atol=1e-4)
    with torch.no_grad():  # the loss path (perplexity): same as cross-entropy of the int8 logits
        loss = quantized(tokens[:, :-1], tokens[:, 1:])[1]
        expected = torch.nn.functional.cross_entropy(quantized(tokens[:, :-1])[0][0], tokens[0, 1:])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    text = LanguageModel(quantized, tokenizer).generate("Hello", max_new_tokens=5, **GREEDY)[0]
    assert len(tokenizer.encode(text)) >= 4


# --- the command line -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ckpt(lm, tmp_path_factory):
    path = tmp_path_factory.mktemp("gen") / "model.pt"
    checkpoint.save(path, {"model": lm.model.state_dict(), "model_config": lm.model.config.to_dict(),
                           "tokenizer": lm.tokenizer.to_dict(), "step": 0})
    return path


def test_cli_generate_stream_beams_int8(ckpt, lm):
    common = ["generate", "--ckpt", str(ckpt), "--max-new-tokens", "8", "--temperature", "0", "--ignore-eos"]
    expected = lm.generate(["Hello", "The"], max_new_tokens=8, **GREEDY)
    plain, streamed, beams = run_clis([*common, "--prompt", "Hello", "--prompt", "The"],  # three processes at once
                                      [*common, "--prompt", "Hello", "--stream", "--stop", expected[0][3:6]],
                                      [*common, "--prompt", "Hello", "--num-beams", "3", "--quantize", "int8"])
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout == f"Hello{expected[0]}\n\nThe{expected[1]}\n"
    assert streamed.returncode == 0 and streamed.stdout == "Hello" + expected[0][: expected[0].index(expected[0][3:6])] + "\n"
    int8_beams = LanguageModel.load(ckpt, quantize="int8").generate("Hello", num_beams=3, max_new_tokens=8,
                                                                     ignore_eos=True)
    assert beams.returncode == 0 and beams.stdout == f"Hello{int8_beams[0]}\n", beams.stderr


@pytest.mark.parametrize("flags,needle", [
    (["--top-p", "1.5"], "top_p"), (["--quantize", "int4"], "invalid choice"), (["--stream", "--num-beams", "2"], "--stream"),
    (["--num-beams", "4", "--temperature", "0.8", "--top-k", "5"], "does not use --temperature, --top-k: drop them"),
    (["--stop", "\\x4"], "bad escape sequence"),
    (["--prompt-lookup", "--slide-context"], "--slide-context"),
])
def test_cli_bad_generation_flags_exit_2(ckpt, capsys, flags, needle):
    """Bad values, and flags that would be ignored or misread, are refused before the model loads: one
    `gptlab: error:` line, exit 2 (in process: a bug would raise its own exception here, not SystemExit)."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["generate", "--ckpt", str(ckpt), "--prompt", "hi", *flags])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1 and lines[0].startswith("gptlab: error:")
    assert needle in lines[0], lines[0]


def test_cli_stop_strings_take_escape_sequences(ckpt, lm, capsys):
    """`--stop` reads like a Python string literal: "\\n\\n" is a blank line, and a stop written as \\uXXXX
    escapes stops generation at that text."""
    assert unescape("\\n\\n") == "\n\n" and unescape("a\\\\nb") == "a\\nb" and unescape("é日\\t") == "é日\t"
    expected = lm.generate("Hello", max_new_tokens=8, **GREEDY)[0]
    stop = expected[3:6]
    escaped = "".join(f"\\u{ord(c):04x}" for c in stop)
    cli.main(["generate", "--ckpt", str(ckpt), "--max-new-tokens", "8", "--temperature", "0", "--ignore-eos",
              "--prompt", "Hello", "--stop", escaped])
    assert capsys.readouterr().out == "Hello" + expected[: expected.index(stop)] + "\n"


def test_cli_slide_context(ckpt, lm, capsys):
    """--slide-context generates past the 64-token context what the library's slide gives; without it: exit 2."""
    flags = ["generate", "--ckpt", str(ckpt), "--max-new-tokens", "80", "--temperature", "0", "--ignore-eos",
             "--prompt", "Hello"]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(flags)
    assert exit_info.value.code == 2 and "maximum context length is 64" in capsys.readouterr().err
    cli.main([*flags, "--slide-context"])
    assert capsys.readouterr().out == "Hello" + lm.generate("Hello", max_new_tokens=80, slide=True, **GREEDY)[0] + "\n"


def _greedy_one_by_one(model, prompt: list[int], new_tokens: int) -> list[int]:
    """The plainest greedy decoder: a full forward pass per new token."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(new_tokens):
            ids.append(int(model(torch.tensor([ids]))[0][0, -1].argmax()))
    return ids[len(prompt):]


def test_complete_batches_ragged_prompts_like_one_by_one_greedy_decoding_and_stops():
    """`complete` (what evaluation and LanguageModel run) against the plainest decoder, prompts of mixed
    lengths in one continuous batch of 2 slots, one stop token."""
    torch.manual_seed(0)
    model = GPT(tiny_model_config(vocab_size=64, block_size=24)).eval()
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 64, (n,), generator=generator).tolist() for n in (3, 5, 3, 8, 5, 3)]
    reference = [_greedy_one_by_one(model, p, 6) for p in prompts]
    stop = reference[0][2]  # a token the model does emit, so at least one row stops early
    cfg = SamplingConfig(max_new_tokens=6, temperature=0, stop_token_ids=[stop], ignore_eos=True)
    batched = [c.token_ids for c in complete(model, load("gpt2"), prompts, [cfg] * len(prompts), max_batch=2)]
    expected = [r[: r.index(stop) + 1] if stop in r else r for r in reference]  # the stop token included
    assert batched == expected
    assert len(batched[0]) == 3
    with pytest.raises(ContextLengthError, match="context"):
        complete(model, load("gpt2"), [[1] * 24], [SamplingConfig(max_new_tokens=1)])
