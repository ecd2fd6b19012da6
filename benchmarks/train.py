"""Training-step throughput and peak memory: gptlab's GPT vs transformers' GPT2LMHeadModel.

Both models get the same architecture, batch, optimizer (fused AdamW, decay on matrices only),
precision and thread count. One step is forward + backward + AdamW + zero_grad. Every measurement
runs in a fresh process, so the peak resident memory (ru_maxrss) of one case cannot leak into another;
ours and the peer's processes alternate, and each side keeps its best repeat (a shared CPU is noisy).

    python benchmarks/train.py                      # both cases, fp32 and bf16-mixed
    python benchmarks/train.py --cases tiny --precisions fp32 --repeats 1

Prints one JSON line per case and precision:
{"bench":"train","case":"30m","precision":"fp32","ours_tok_s":..,"peer_tok_s":..,"ratio":..,"ours_peak_mb":..,"peer_peak_mb":..,...}
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

CASES = {
    # per-step overhead dominates: small matrices, many kernels
    "tiny": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, vocab_size=4096),
    # the (B*T) x vocab logits dominate memory: 2048 x 50304
    "30m": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=8, vocab_size=50304),
}
STEPS = {"tiny": (5, 30), "30m": (2, 6)}  # (warm-up steps, timed steps)


def build(impl: str, case: dict):
    """The model (dropout off, so both do the same arithmetic) and a step function computing the loss."""
    import torch

    if impl == "ours":
        from gptlab.config import GPTConfig
        from gptlab.model import GPT

        model = GPT(GPTConfig(vocab_size=case["vocab_size"], block_size=case["block_size"], n_layer=case["n_layer"],
                              n_head=case["n_head"], n_embd=case["n_embd"], dropout=0.0))

        def loss_of(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return model(x, y)[1]
    else:
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(vocab_size=case["vocab_size"], n_positions=case["block_size"], n_layer=case["n_layer"],
                            n_head=case["n_head"], n_embd=case["n_embd"], resid_pdrop=0.0, embd_pdrop=0.0,
                            attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, attn_implementation="sdpa")
        model = GPT2LMHeadModel(config)

        def loss_of(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return model(input_ids=x, labels=x).loss  # shifts the labels itself
    return model, loss_of


def child(impl: str, case_name: str, precision: str, threads: int) -> dict:
    import torch
    import transformers  # noqa: F401  (both sides import both libraries: the same baseline memory)

    from gptlab.config import TrainConfig
    from gptlab.train import autocast, make_optimizer

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    case = CASES[case_name]
    model, loss_of = build(impl, case)
    model.train()
    device = torch.device("cpu")
    optimizer = make_optimizer(model, TrainConfig(), device)  # fused AdamW, decay on matrices only
    tokens = torch.randint(0, case["vocab_size"], (case["batch_size"], case["block_size"] + 1),
                           generator=torch.Generator().manual_seed(0))
    x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    warmup, timed = STEPS[case_name]
    times = []
    for i in range(warmup + timed):
        started = time.perf_counter()
        with autocast(device, precision):
            loss = loss_of(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - started)
    return {"tok_s": x.numel() / statistics.median(times), "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "loss": loss.item()}


def measure(impl: str, case: str, precision: str, threads: int) -> dict:
    command = [sys.executable, __file__, "--child", impl, "--cases", case, "--precisions", precision,
               "--threads", str(threads)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"{impl} {case} {precision} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default="tiny,30m")
    parser.add_argument("--precisions", default="fp32,bf16-mixed")
    parser.add_argument("--repeats", type=int, default=2, help="fresh processes per side (best one kept)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--child", choices=["ours", "peer"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.cases, args.precisions, args.threads)))
        return
    for case in args.cases.split(","):
        for precision in args.precisions.split(","):
            runs: dict[str, list[dict]] = {"ours": [], "peer": []}
            for _ in range(args.repeats):
                for impl in ("ours", "peer"):  # alternate, so a burst of load hits both sides alike
                    runs[impl].append(measure(impl, case, precision, args.threads))
            ours = max(runs["ours"], key=lambda r: r["tok_s"])
            peer = max(runs["peer"], key=lambda r: r["tok_s"])
            ours_peak = min(r["peak_mb"] for r in runs["ours"])
            peer_peak = min(r["peak_mb"] for r in runs["peer"])
            print(json.dumps({
                "bench": "train", "case": case, "precision": precision,
                "ours_tok_s": round(ours["tok_s"], 1), "peer_tok_s": round(peer["tok_s"], 1),
                "ratio": round(ours["tok_s"] / peer["tok_s"], 3),
                "ours_peak_mb": round(ours_peak), "peer_peak_mb": round(peer_peak),
                "peak_ratio": round(ours_peak / peer_peak, 3),
                "threads": args.threads, "repeats": args.repeats, **CASES[case],
            }), flush=True)


if __name__ == "__main__":
    main()
