"""Perplexity speed: `gptlab eval perplexity` vs transformers on the same random-init GPT-2 124M and text, same run.

    python benchmarks/eval.py              # 2 held-out plays' worth of text (~16k tokens), strides 1024 and 512
    python benchmarks/eval.py --quick      # ~4k tokens, stride 512 only

Both score the same sliding windows (gptlab.eval.perplexity.windows) in float32 on CPU, batch 4, 2 threads, after a
warm-up; transformers the Hugging Face guide's way (labels with -100 on the tokens an earlier window scored, logits
for every position), gptlab with its batched scorer (the LM head only on the scored positions) on the model
`gptlab.load` returns, in --rounds rounds of alternating order. Prints one JSON line per stride: seconds of each,
tokens/s, the speed ratio (total and per round) and the relative difference of the two mean NLLs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path

import torch

from gptlab import hf
from gptlab.data import SHAKESPEARE_VAL_PLAYS, shakespeare_documents
from gptlab.eval.perplexity import Document, perplexity, windows
from gptlab.language_model import LanguageModel
from gptlab.model import GPT
from gptlab.tokenizer import load as load_tokenizer


def transformers_nll(model, ids: list[int], context: int, stride: int, batch_size: int) -> float:
    """Summed NLL over the same windows, batched (right-padded; the padded labels are -100)."""
    spans = list(windows(len(ids), context, stride))
    total = 0.0
    for i in range(0, len(spans), batch_size):
        chunk = spans[i: i + batch_size]
        width = max(end - begin for begin, end, _ in chunk)
        inputs = torch.zeros(len(chunk), width, dtype=torch.long)
        labels = torch.full((len(chunk), width), -100)
        for row, (begin, end, first) in enumerate(chunk):
            inputs[row, : end - begin] = torch.tensor(ids[begin:end])
            labels[row, first - 1: end - begin] = torch.tensor(ids[begin + first: end + 1])
        with torch.inference_mode():
            logits = model(inputs).logits
        total += torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100,
                                                   reduction="sum").item()
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per stride, in alternating order")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = load_tokenizer("gpt2")
    text = "".join(d.text for d in shakespeare_documents() if d.name in SHAKESPEARE_VAL_PLAYS[:2])
    ids = [tokenizer.eot_id, *tokenizer.encode(text)][: 4097 if args.quick else 16385]
    torch.manual_seed(0)
    reference = GPT2LMHeadModel(GPT2Config()).eval()  # GPT-2 124M, random init
    with tempfile.TemporaryDirectory() as tmp:
        reference.save_pretrained(Path(tmp) / "hf")
        gpt, _ = hf.load_hf(Path(tmp) / "hf")
    assert isinstance(gpt, GPT)
    lm = LanguageModel(gpt, tokenizer)
    doc = Document("plays", ids, int(tokenizer.token_bytes[ids[1:]].sum()))
    perplexity(lm, [Document("warm-up", ids[:600], 1)], 512, args.batch_size, progress=False)
    transformers_nll(reference, ids[:600], 1024, 512, args.batch_size)
    n = len(ids) - 1
    for stride in [512] if args.quick else [1024, 512]:
        # rounds in alternating order (ours first, then theirs first, ...): on a shared machine the load drifts,
        # and a drift that slows the second runner of every round would otherwise bias the ratio
        ours_s = theirs_s = 0.0
        ratios = []
        for round_ in range(args.rounds):
            timed = {}
            for runner in (["ours", "theirs"] if round_ % 2 == 0 else ["theirs", "ours"]):
                start = time.perf_counter()
                if runner == "ours":
                    ours = perplexity(lm, [doc], stride, args.batch_size, progress=False)[0].nll_sum
                else:
                    theirs = transformers_nll(reference, ids, 1024, stride, args.batch_size)
                timed[runner] = time.perf_counter() - start
            ours_s += timed["ours"]
            theirs_s += timed["theirs"]
            ratios.append(timed["theirs"] / timed["ours"])
        print(json.dumps({"case": f"perplexity-stride{stride}", "tokens": n, "threads": args.threads,
                          "batch_size": args.batch_size, "rounds": args.rounds, "gptlab_s": round(ours_s, 2),
                          "transformers_s": round(theirs_s, 2), "gptlab_tokens_per_s": round(args.rounds * n / ours_s),
                          "transformers_tokens_per_s": round(args.rounds * n / theirs_s),
                          "speedup": round(theirs_s / ours_s, 2), "speedup_per_round": [round(r, 2) for r in ratios],
                          "perplexity": round(math.exp(ours / n), 2), "nll_rel_diff": abs(ours - theirs) / abs(theirs),
                          "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                          "load_average": os.getloadavg()[0]}), flush=True)

if __name__ == "__main__":
    main()
