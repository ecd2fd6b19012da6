"""Training-step throughput and peak memory: gptlab's GPT vs transformers' GPT2LMHeadModel.

Both models get the same architecture, batch, optimizer (fused AdamW, decay on matrices only),
precision and thread count. One step is forward + backward + AdamW + zero_grad.

* Throughput: both models live in one fresh process and their steps alternate (ours, peer, peer,
  ours, ...), so bursts of load from other programs on a shared CPU hit both sides alike; each side's
  median step time gives its tokens/s. Also reported: tokens per CPU-second of the process (median),
  which time spent waiting for a busy CPU does not inflate (with --threads 1 it is the speed an idle core
  would give; with more threads it also counts OpenMP threads spinning while they wait for each other).
* Peak memory: one fresh process per side running a few steps, so one model's peak resident memory
  (ru_maxrss) cannot leak into the other's. Both processes import both libraries (same baseline).

    python benchmarks/train.py                      # both cases, fp32 and bf16-mixed
    python benchmarks/train.py --cases tiny --precisions fp32

Prints one JSON line per case and precision, with the CPU capability PyTorch runs at and gptlab's
decoding kernel variant (not used in training; recorded so that figures name the machine class):
{"bench":"train","case":"30m","precision":"fp32","ours_tok_s":..,"peer_tok_s":..,"ratio":..,"ours_peak_mb":..,"peer_peak_mb":..,
 ...,"cpu_capability":"AVX2","kernel":"avx2"}
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
STEPS = {"tiny": (6, 40), "30m": (2, 8)}  # (warm-up steps, timed steps) per side


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


def prepare(impl: str, case_name: str, precision: str):
    """A ready-to-run training step (forward, backward, AdamW, zero_grad) on a fixed random batch."""
    import torch

    from gptlab.config import TrainConfig
    from gptlab.device import autocast
    from gptlab.train import make_optimizer

    torch.manual_seed(0)
    case = CASES[case_name]
    model, loss_of = build(impl, case)
    model.train()
    device = torch.device("cpu")
    optimizer = make_optimizer(model, TrainConfig(lr=1e-3), device)
    # a new random batch every step, the same sequence for both sides: repeating one batch would let the
    # models memorise it, and the extreme logits that follow make float denormals that slow the CPU down
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, case["vocab_size"], (case["batch_size"], case["block_size"] + 1), generator=generator)
               for _ in range(sum(STEPS[case_name]) + 3)]
    calls = [0]

    def step() -> tuple[float, float]:
        """(wall seconds, CPU seconds of this process) of one step."""
        tokens = batches[calls[0] % len(batches)]
        calls[0] += 1
        x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
        wall, cpu = time.perf_counter(), time.process_time()
        with autocast(device, precision):
            loss = loss_of(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - wall, time.process_time() - cpu

    return step, case["batch_size"] * case["block_size"]


def speed(case: str, precision: str) -> dict[str, float]:
    """Median tokens per wall second and per CPU second of each side, steps alternating."""
    steps = {impl: prepare(impl, case, precision) for impl in ("ours", "peer")}
    warmup, timed = STEPS[case]
    times: dict[str, list[tuple[float, float]]] = {"ours": [], "peer": []}
    for i in range(warmup + timed):
        for impl in (("ours", "peer") if i % 2 == 0 else ("peer", "ours")):
            seconds = steps[impl][0]()
            if i >= warmup:
                times[impl].append(seconds)
    result = {}
    for impl, samples in times.items():
        tokens = steps[impl][1]
        result[impl] = tokens / statistics.median(wall for wall, _ in samples)
        result[f"{impl}_cpu"] = tokens / statistics.median(cpu for _, cpu in samples)
    return result


def memory(impl: str, case: str, precision: str) -> dict[str, float]:
    import transformers  # noqa: F401  (both sides import both libraries: the same baseline memory)

    step, _ = prepare(impl, case, precision)
    for _ in range(3):
        step()
    return {"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_child(*args: str) -> dict:
    result = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"benchmark process {args} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default="tiny,30m")
    parser.add_argument("--precisions", default="fp32,bf16-mixed")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--child", choices=["speed", "ours", "peer"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        if args.child == "speed":
            result = speed(args.cases, args.precisions)
        else:
            result = memory(args.child, args.cases, args.precisions)
        print(json.dumps(result))
        return
    from gptlab.cpu import kernels

    machine = kernels.describe()  # CPU capability and kernel variant: what a figure was measured on
    for case in args.cases.split(","):
        for precision in args.precisions.split(","):
            common = ["--cases", case, "--precisions", precision, "--threads", str(args.threads)]
            tok_s = run_child("--child", "speed", *common)
            peak = {impl: run_child("--child", impl, *common)["peak_mb"] for impl in ("ours", "peer")}
            print(json.dumps({
                "bench": "train", "case": case, "precision": precision,
                "ours_tok_s": round(tok_s["ours"], 1), "peer_tok_s": round(tok_s["peer"], 1),
                "ratio": round(tok_s["ours"] / tok_s["peer"], 3),
                # tokens per CPU-second of the process: immune to time spent waiting for a shared CPU
                "ours_cpu_tok_s": round(tok_s["ours_cpu"], 1), "peer_cpu_tok_s": round(tok_s["peer_cpu"], 1),
                "cpu_ratio": round(tok_s["ours_cpu"] / tok_s["peer_cpu"], 3),
                "ours_peak_mb": round(peak["ours"]), "peer_peak_mb": round(peak["peer"]),
                "peak_ratio": round(peak["ours"] / peak["peer"], 3),
                "threads": args.threads, "timed_steps": STEPS[case][1], **CASES[case], **machine,
            }), flush=True)


if __name__ == "__main__":
    main()
