"""Decode-step matmuls: gptlab's panel kernel vs oneDNN and MKL, same run, same weights.

    python benchmarks/linear.py              # rows 1, 8, 16, 32, 64, 256, 512; median of 9
    python benchmarks/linear.py --quick

The weights are those of one GPT-2 124M decode step (12 layers of qkv, proj, fc, fc-proj, then the
50257-row LM head: 124M floats, 497 MB). Each line times all of them for `rows` rows of input:
`ours_ms` (gptlab.cpu.layers.CPULinear with its kernel: the variant of the CPU capability, or
GPTLAB_KERNEL's), `ours_int8_ms` (Int8Linear, the same kernel over int8 weights), `onednn_ms`
(oneDNN-packed weights, the previous path), `mkl_ms` (F.linear, MKL's GEMM/GEMV) and `read_ms`, a
plain read of the float32 weights (the memory-bandwidth floor of ours_ms; int8's is a quarter).
This is what sets layers.PANEL_MAX_ROWS. Each line also names the CPU capability and kernel variant.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptlab.cpu import kernels
from gptlab.cpu.layers import CPULinear, Int8Linear

SHAPES = [(768, 2304), (768, 768), (768, 3072), (3072, 768)]  # (in, out) of one GPT-2 124M block


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", default="1,8,16,32,64,256,512")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    variant = kernels.active_variant()
    if variant is None:
        raise SystemExit(f"no panel kernel here ({kernels.describe()})")
    repeats = 3 if args.quick else 9
    torch.manual_seed(0)
    linears = [nn.Linear(i, o) for _ in range(12) for i, o in SHAPES] + [nn.Linear(768, 50257, bias=False)]
    ours = [CPULinear.from_linear(linear, variant).eval() for linear in linears]
    ours_int8 = [Int8Linear(linear, variant) for linear in linears]
    onednn = [torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 8) for linear in linears]
    weights = [linear.weight.detach() for linear in linears]
    biases = [None if linear.bias is None else linear.bias.detach() for linear in linears]
    candidates = {
        "ours_ms": lambda xs: [layer(x) for layer, x in zip(ours, xs, strict=True)],
        "ours_int8_ms": lambda xs: [layer(x) for layer, x in zip(ours_int8, xs, strict=True)],
        "onednn_ms": lambda xs: [torch.ops.mkldnn._linear_pointwise(x, p, b, "none", [], "")
                                 for x, p, b in zip(xs, onednn, biases, strict=True)],
        "mkl_ms": lambda xs: [F.linear(x, w, b) for x, w, b in zip(xs, weights, biases, strict=True)],
        "read_ms": lambda xs: [w.sum() for w in weights],
    }
    with torch.inference_mode():
        for rows in map(int, args.rows.split(",")):
            inputs = {width: torch.randn(rows, width) for width in (768, 3072)}
            xs = [inputs[w.size(1)] for w in weights]
            for layer, x in zip(ours, xs, strict=True):  # correctness first: every result against F.linear
                torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-4, atol=1e-4)
            times = {name: median_ms(lambda fn=fn, xs=xs: fn(xs), repeats) for name, fn in candidates.items()}
            print(json.dumps({"bench": "linear", "rows": rows, **{k: round(v, 2) for k, v in times.items()},
                              "vs_onednn": round(times["onednn_ms"] / times["ours_ms"], 2),
                              "vs_mkl": round(times["mkl_ms"] / times["ours_ms"], 2),
                              "threads": args.threads, **kernels.describe()}), flush=True)


if __name__ == "__main__":
    main()
