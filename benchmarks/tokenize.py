"""Encode throughput (MB/s) of gptlab vs transformers' GPT2TokenizerFast vs tiktoken, on GPT-2's own files.

Usage: python benchmarks/tokenize.py [--mb 8] [--repeats 3]
Prints one JSON line per tokenizer and a final JSON line with all figures and ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from transformers import GPT2TokenizerFast

from gptlab import tokenizer as tok
from gptlab.data import shakespeare_documents


def corpus(megabytes: float) -> list[str]:
    """Shakespeare plus a Chinese/emoji/code mix, cut into ~4 KiB documents (a realistic batch workload)."""
    mixed = "机器学习模型需要大量的数据。🎉 def f(x): return {'k': x ** 2}\n"
    text = "".join(d.text for d in shakespeare_documents()) + mixed * 2000
    while len(text.encode()) < megabytes * 1e6:
        text += text
    text = text.encode()[: int(megabytes * 1e6)].decode("utf-8", errors="ignore")
    return [text[i: i + 4096] for i in range(0, len(text), 4096)]


def median_times(contenders: dict, repeats: int) -> dict[str, float]:
    """Interleave the contenders round by round, so load changes on a shared machine hit all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mb", type=float, default=8.0, help="megabytes of text to encode")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    docs = corpus(args.mb)
    n_bytes = sum(len(d.encode()) for d in docs)
    files = tok.gpt2_files_dir()
    ours = tok.load("gpt2")
    with tempfile.TemporaryDirectory() as hf_dir:
        shutil.copy(files / "encoder.json", f"{hf_dir}/vocab.json")
        shutil.copy(files / "vocab.bpe", f"{hf_dir}/merges.txt")
        hf = GPT2TokenizerFast.from_pretrained(hf_dir)
    ranks = data_gym_to_mergeable_bpe_ranks(str(files / "vocab.bpe"), str(files / "encoder.json"))
    tt = tiktoken.Encoding("gpt2-files", pat_str=tok.GPT2_PATTERN, mergeable_ranks=ranks,
                           special_tokens={tok.EOT: 50256})

    reference = ours.encode_batch(docs)
    assert hf(docs)["input_ids"] == reference, "transformers disagrees with gptlab"
    assert tt.encode_batch(docs, allowed_special="all") == reference, "tiktoken disagrees with gptlab"

    threads = os.cpu_count() or 1
    contenders = {
        "gptlab": lambda: ours.encode_batch(docs),
        "transformers": lambda: hf(docs)["input_ids"],  # the Rust backend parallelises batches itself
        "tiktoken": lambda: tt.encode_batch(docs, num_threads=threads, allowed_special="all"),
    }
    for fn in contenders.values():
        fn()  # warm-up
    results = {name: n_bytes / 1e6 / t for name, t in median_times(contenders, args.repeats).items()}
    for name, mb_s in results.items():
        print(json.dumps({"bench": "tokenize", "tokenizer": name, "mb_s": round(mb_s, 2)}))
    print(json.dumps({"bench": "tokenize", "mb": round(n_bytes / 1e6, 2), "threads": threads,
                      **{f"{k}_mb_s": round(v, 2) for k, v in results.items()},
                      "ratio_vs_transformers": round(results["gptlab"] / results["transformers"], 2),
                      "ratio_vs_tiktoken": round(results["gptlab"] / results["tiktoken"], 2)}))


if __name__ == "__main__":
    main()
