"""Generation speed: gptlab vs Hugging Face transformers on the same random-init GPT-2 124M, same run.

    python benchmarks/generate.py            # median of 3 timed runs per case, 128 new tokens
    python benchmarks/generate.py --quick    # the same cases, 1 timed run of 32 new tokens

Cases (CPU, 2 threads, greedy, after a warm-up run, no EOS stop):
  b1       batch 1, 32-token prompt, both float32
  b8       batch 8, prompts of mixed lengths (16..32 tokens), both float32
  b1-int8  gptlab with int8 weights vs transformers float32, batch 1; also prints the perplexity of
           both gptlab models on the bundled validation text (the held-out Shakespeare plays)
  ct2-b1, ct2-b8, ct2-b1-int8, ct2-b8-int8
           the peer is CTranslate2 (the same model converted in-process by its TransformersConverter;
           int8: gptlab's weight-only int8 vs CTranslate2's int8), 2 intra-op threads; float32 cases
           check that the tokens are identical
Each case prints one JSON line, with the CPU capability PyTorch runs at and gptlab's kernel variant
(GPTLAB_KERNEL=avx2|avx512|none picks one; ATEN_CPU_CAPABILITY=avx2 makes an AVX-512 machine run as an
AVX2 one); `floor_ms_per_step` is the memory-bandwidth floor of a decode step
(bytes of weights and KV cache read per step / measured read bandwidth), `identical` whether our
greedy tokens equal transformers' (float32 cases). Add `--ckpt RUN` to also measure the int8
perplexity change of a trained gptlab checkpoint.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from gptlab import checkpoint, hf, loading
from gptlab.cpu import kernels, prepare_inference
from gptlab.cpu.layers import Int8Linear
from gptlab.data import TokenData, prepare
from gptlab.language_model import LanguageModel
from gptlab.model import GPT
from gptlab.sampling import SamplingConfig
from gptlab.tokenizer import Tokenizer
from gptlab.tokenizer import load as load_tokenizer
from gptlab.train import evaluate_lm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: tests.helpers
from tests.helpers import hf_generate  # noqa: E402

B8_LENGTHS = [32, 17, 25, 30, 16, 28, 21, 32]


def read_bandwidth() -> float:
    """Bytes per second of a streaming read of 1 GiB (best of 3)."""
    data = torch.ones(2**28)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - start)
    return data.numel() * data.element_size() / best


def decode_bytes(model: GPT) -> int:
    """Bytes of parameters a decode step reads: every matrix and norm once (the tied head reads the
    token embedding; embedding lookups read single rows, so the tables do not count otherwise)."""
    tensors, total = {}, 0
    for name, module in model.named_modules():
        if name.endswith(("wte", "wpe")):
            continue
        if isinstance(module, Int8Linear):  # int8 weights, float32 bias and scales
            total += module.in_features * module.out_features + 8 * module.out_features
        for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            tensors[t.data_ptr()] = t.numel() * t.element_size()
    return total + sum(tensors.values())


def kv_bytes_per_step(model: GPT, lengths: list[int], new_tokens: int) -> float:
    cfg = model.config
    mean_len = sum(lengths) / len(lengths) + new_tokens / 2
    return 2 * cfg.n_layer * cfg.n_embd * 4 * mean_len * len(lengths)


def timed_pair(ours, peer, repeats: int) -> tuple[float, float, object, object]:
    """Median seconds of each after a warm-up; the runs alternate, so load from other processes on a
    shared machine hits both alike."""
    times: tuple[list[float], list[float]] = ([], [])
    results = [None, None]
    for i in range(repeats + 1):
        for j, fn in enumerate((ours, peer)):
            start = time.perf_counter()
            results[j] = fn()
            if i:  # the first round is the warm-up
                times[j].append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1]), results[0], results[1]


def int8_perplexity_change(model: GPT, tokenizer: Tokenizer, windows: int, tmp: Path) -> dict:
    """Validation perplexity of `model` in float32 and int8 on the bundled corpus' held-out plays
    (`gptlab prepare` with the model's tokenizer, then train.evaluate_lm over `windows` full contexts)."""
    tokenizer.save(tmp / "tokenizer")
    prepare(None, str(tmp / "tokenizer"), tmp / "data")
    data = TokenData(tmp / "data")
    ppl = {}
    for name, candidate in (("fp32", model), ("int8", prepare_inference(copy.deepcopy(model), quantize="int8"))):
        with torch.inference_mode():
            ppl[name] = evaluate_lm(candidate, data, 1, torch.device("cpu"), "fp32", max_batches=windows)["val_ppl"]
    return {"ppl_fp32": round(ppl["fp32"], 3), "ppl_int8": round(ppl["int8"], 3),
            "ppl_change_pct": round(100 * (ppl["int8"] / ppl["fp32"] - 1), 3),
            "ppl_tokens": windows * model.config.block_size}


def ct2_peer(model: GPT, tokenizer: Tokenizer, tmp: Path, quantization: str, threads: int):
    """(prompts -> new token ids) of CTranslate2 decoding `model` greedily: exported as a transformers GPT-2
    directory with its tokenizer (`gptlab.hf.save_hf`), converted with `quantization` ("float32" or "int8")."""
    import ctranslate2
    from ctranslate2.converters import TransformersConverter

    hf_dir, out = tmp / "hf", tmp / f"ct2-{quantization}"
    if not hf_dir.exists():
        hf.save_hf(model, tokenizer, hf_dir)
    TransformersConverter(str(hf_dir)).convert(str(out), quantization=quantization, force=True)
    vocab = json.loads((out / "vocabulary.json").read_text())
    generator = ctranslate2.Generator(str(out), device="cpu", intra_threads=threads, inter_threads=1)

    def generate(prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        results = generator.generate_batch([[vocab[i] for i in p] for p in prompts], max_length=new_tokens,
                                           min_length=new_tokens, sampling_topk=1, include_prompt_in_result=False)
        return [r.sequences_ids[0] for r in results]
    return generate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 timed run of 32 new tokens per case")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cases", default="b1,b8,b1-int8", help="also: ct2-b1,ct2-b8,ct2-b1-int8,ct2-b8-int8")
    parser.add_argument("--ckpt", help="a trained gptlab checkpoint: also report its int8 perplexity change")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    repeats, new_tokens, ppl_windows = (1, 32, 2) if args.quick else (3, 128, 8)
    tmp = Path(tempfile.mkdtemp(prefix="gptlab-bench-"))

    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    peer = GPT2LMHeadModel(GPT2Config(n_layer=12, n_head=12, n_embd=768, vocab_size=50257)).eval()
    ours_model = GPT(hf.config_from_hf(peer.config.to_dict()))
    checkpoint.load_weights(ours_model, hf.state_from_hf(peer.state_dict()))
    tokenizer = load_tokenizer("gpt2")
    bandwidth = read_bandwidth()
    gen = torch.Generator().manual_seed(1)
    cfg = SamplingConfig(max_new_tokens=new_tokens, temperature=0, ignore_eos=True)

    for case in args.cases.split(","):
        lengths = B8_LENGTHS if "b8" in case else [32]
        prompts = [torch.randint(0, 50257, (n,), generator=gen).tolist() for n in lengths]
        model, extra, int8 = ours_model, {}, case.endswith("int8")
        if int8:
            model = prepare_inference(copy.deepcopy(ours_model), quantize="int8")
        if case == "b1-int8":
            extra = int8_perplexity_change(ours_model, tokenizer, ppl_windows, tmp / case)
        if case.startswith("ct2-"):
            run_peer = ct2_peer(ours_model, tokenizer, tmp, "int8" if int8 else "float32", args.threads)
            extra["peer"] = "ctranslate2"
        else:
            run_peer = lambda p, n: hf_generate(peer, p, n)  # noqa: E731
            extra["peer"] = "transformers"
        lm = LanguageModel(model, tokenizer, max_batch=len(prompts))
        ours_s, peer_s, ours_out, peer_out = timed_pair(lambda lm=lm, p=prompts: lm.complete(p, cfg),
                                                        lambda p=prompts, f=run_peer: f(p, new_tokens), repeats)
        if not int8 or case.startswith("ct2-"):
            extra["identical"] = [c.token_ids for c in ours_out] == peer_out
        floor_s = (decode_bytes(model) + kv_bytes_per_step(model, lengths, new_tokens)) / bandwidth
        tokens = len(prompts) * new_tokens
        print(json.dumps({
            "bench": "generate", "case": case, "ours_tok_s": round(tokens / ours_s, 1),
            "peer_tok_s": round(tokens / peer_s, 1), "ratio": round(peer_s / ours_s, 2),
            "ours_ms_per_step": round(1000 * ours_s / new_tokens, 1),
            "peer_ms_per_step": round(1000 * peer_s / new_tokens, 1),
            "floor_ms_per_step": round(1000 * floor_s, 1), "bandwidth_gb_s": round(bandwidth / 1e9, 1),
            "new_tokens": new_tokens, "repeats": repeats, "threads": args.threads,
            "load_avg_1m": round(os.getloadavg()[0], 1), **kernels.describe(), **extra}), flush=True)

    if args.ckpt:
        loaded = loading.load(args.ckpt)
        model, tokenizer = loaded.gpt(), loaded.tokenizer
        windows = 64 if not args.quick else 8  # a small model's context is short: more windows, same cost
        print(json.dumps({"bench": "generate", "case": "int8-ppl", "ckpt": args.ckpt,
                          **int8_perplexity_change(model.eval(), tokenizer, windows, tmp / "ckpt")}), flush=True)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
