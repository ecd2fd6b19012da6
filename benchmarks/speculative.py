"""Speculative decoding speed: the target alone vs the target with a draft model or prompt lookup (gptlab's
one Decoder), and vs transformers' assisted generation (`assistant_model=`) on the same pair, same run.

    python benchmarks/speculative.py --target RUN --draft RUN     # a trained pair with one tokenizer
    python benchmarks/speculative.py                               # a synthetic pair, see below
    python benchmarks/speculative.py --quick                       # 1 timed run of 32 new tokens

Cases (CPU, batch 1, greedy, no EOS stop, median of 3 timed runs after a warm-up; the runs alternate so
load from other processes hits both alike):
  draft          target + draft (k = --num-draft-tokens) vs the target alone; `identical`: same tokens
  hf-assisted    gptlab target + draft vs transformers' assisted generation of the pair converted to HF
                 (`num_assistant_tokens` = k, constant schedule)
  prompt-lookup  target + prompt lookup vs the target alone on a copy task: a held-out passage, then the
                 instruction to repeat it, then its first words (the output should copy the passage)
Prompts are held-out passages of the bundled Shakespeare plays in the target's tokenizer.
Without --target/--draft the pair is a random-init GPT-2 124M and its first 2 blocks (same embeddings):
it measures the mechanism's cost, not a real acceptance rate; its acceptance says nothing about a trained pair.
Each case prints one JSON line with the acceptance rate and tokens per target pass.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from generate import timed_pair  # benchmarks/generate.py: alternating runs, medians

from gptlab import cpu, hf, loading
from gptlab.cpu import kernels
from gptlab.data import is_shakespeare_val, shakespeare_documents
from gptlab.generate import complete
from gptlab.model import GPT
from gptlab.sampling import SamplingConfig
from gptlab.speculative import SpeculativeConfig, SpecUsage
from gptlab.tokenizer import load as load_tokenizer


def synthetic_pair() -> tuple[GPT, GPT]:
    from transformers import GPT2Config

    torch.manual_seed(0)
    target = GPT(hf.config_from_hf(GPT2Config(n_layer=12, n_head=12, n_embd=768, vocab_size=50257).to_dict()))
    draft = copy.deepcopy(target)
    draft.transformer.h = draft.transformer.h[:2]
    draft.config = dataclasses.replace(target.config, n_layer=2)
    return target, draft


def held_out_passage(tokenizer, tokens: int) -> list[int]:
    text = next(doc.text for doc in shakespeare_documents() if is_shakespeare_val(doc))
    return tokenizer.encode(text[2000:20000])[:tokens]


def hf_model(model: GPT, tokenizer, out: Path):
    from transformers import GPT2LMHeadModel

    hf.save_hf(model, tokenizer, out)
    return GPT2LMHeadModel.from_pretrained(out).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", help="the target model (any path gptlab loads)")
    parser.add_argument("--draft", help="the draft model, same tokenizer")
    parser.add_argument("--num-draft-tokens", type=int, default=4)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cases", default="draft,hf-assisted,prompt-lookup")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    repeats, new_tokens = (1, 32) if args.quick else (3, 128)
    if (args.target is None) != (args.draft is None):
        parser.error("--target and --draft go together")
    if args.target:
        target_loaded, draft_loaded = loading.load(args.target), loading.load(args.draft)
        target, draft, tokenizer = target_loaded.gpt(), draft_loaded.gpt(), target_loaded.tokenizer
        pair = "given"
    else:
        (target, draft), tokenizer, pair = synthetic_pair(), load_tokenizer("gpt2"), "synthetic"
    target, draft = cpu.prepare_inference(target.eval()), cpu.prepare_inference(draft.eval())
    k = args.num_draft_tokens
    cfg = SamplingConfig(max_new_tokens=new_tokens, temperature=0, ignore_eos=True)
    prompt = held_out_passage(tokenizer, 32)
    tmp = Path(tempfile.mkdtemp(prefix="gptlab-spec-"))
    common = {"pair": pair, "target": args.target, "draft": args.draft,
              "target_params": target.num_params(), "draft_params": draft.num_params(), "k": k,
              "new_tokens": new_tokens, "repeats": repeats, "threads": args.threads}

    def run(prompts, speculation):
        return complete(target, tokenizer, prompts, [cfg] * len(prompts), 1, speculation)

    for case in args.cases.split(","):
        prompts, extra = [prompt], {}
        if case == "prompt-lookup":
            passage = held_out_passage(tokenizer, 100)
            prompts = [passage + tokenizer.encode("\n\nRepeat the passage above word for word:\n\n") + passage[:4]]
            spec = SpeculativeConfig(prompt_lookup=True, num_draft_tokens=k)
        else:
            spec = SpeculativeConfig(draft=draft, num_draft_tokens=k)
        if case == "hf-assisted":
            hf_target, hf_draft = hf_model(target, tokenizer, tmp / "target"), hf_model(draft, tokenizer, tmp / "draft")
            hf_draft.generation_config.num_assistant_tokens = k
            hf_draft.generation_config.num_assistant_tokens_schedule = "constant"
            ids = torch.tensor(prompts)

            def peer(ids=ids, hf_target=hf_target, hf_draft=hf_draft):
                with torch.inference_mode():
                    out = hf_target.generate(ids, attention_mask=torch.ones_like(ids), assistant_model=hf_draft,
                                             do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                             pad_token_id=0)
                return out[:, ids.size(1):].tolist()
            extra["peer"] = "transformers assisted generation"
        else:
            def peer(prompts=prompts):
                return [c.token_ids for c in run(prompts, None)]
            extra["peer"] = "gptlab target alone"
        ours_s, peer_s, ours_out, peer_out = timed_pair(lambda p=prompts, s=spec: run(p, s), peer, repeats)
        usage = SpecUsage()
        for c in ours_out:
            usage.add(c.speculation)
        print(json.dumps({
            "bench": "speculative", "case": case, **common, "ours_tok_s": round(new_tokens / ours_s, 1),
            "peer_tok_s": round(new_tokens / peer_s, 1), "speedup": round(peer_s / ours_s, 2),
            "identical": [c.token_ids for c in ours_out] == peer_out, **usage.to_dict(), **extra,
            "load_avg_1m": round(os.getloadavg()[0], 1), **kernels.describe()}), flush=True)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
