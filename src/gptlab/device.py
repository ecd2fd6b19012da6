"""Where a model runs and in which precision, chosen from what the machine can do.

bf16 is only fast where the hardware multiplies in it: CUDA GPUs from Ampere on, and CPUs with
AVX512_BF16 or AMX. Elsewhere PyTorch emulates it: on an AVX2 CPU a bf16 matmul runs ~18x slower than
fp32 (0.3 against 99 GFLOP/s on a 2048² matmul, AMD EPYC Zen 3), so "auto" picks fp32 there. Every
command that picks a precision (train, finetune, eval, generate, serve) goes through `resolve_precision`.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import sys
from pathlib import Path
from typing import Literal

import torch

Precision = Literal["auto", "fp32", "bf16-mixed", "fp16-mixed"]
PRECISIONS = ("auto", "fp32", "bf16-mixed", "fp16-mixed")


def select_device(name: str = "auto") -> torch.device:
    """The best available device; under torchrun each process takes the GPU of its local rank."""
    if name != "auto":
        device = torch.device(name)
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    elif torch.backends.mps.is_available():
        device = torch.device("mps")
    else:
        device = torch.device("cpu")
    local_rank = os.environ.get("LOCAL_RANK")  # set by torchrun (and gptlab's own spawner) for every worker
    if device.type == "cuda" and device.index is None and local_rank is not None:
        device = torch.device("cuda", int(local_rank))
    return device


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux reports them in /proc/cpuinfo (empty where it lists none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):  # x86 / aarch64
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_capability() -> str:
    """PyTorch's CPU kernel class ("AVX512", "AVX2", "DEFAULT", ...), which ATEN_CPU_CAPABILITY can lower."""
    return torch.backends.cpu.get_cpu_capability()


def cpu_has_native_bf16() -> bool:
    """True where this CPU multiplies bf16 in hardware and PyTorch uses it: x86 with AVX512_BF16 or AMX
    (and PyTorch's kernels not lowered below AVX-512 by ATEN_CPU_CAPABILITY), aarch64 with BF16."""
    flags = cpu_flags()
    if platform.machine().lower() in ("aarch64", "arm64"):
        return "bf16" in flags
    return cpu_capability().startswith("AVX512") and bool({"avx512_bf16", "amx_bf16"} & flags)


def native_bf16(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return cpu_has_native_bf16()
    return False


def resolve_precision(requested: str, device: torch.device) -> tuple[str, str]:
    """The precision to run in and why, for `requested` (auto or explicit) on `device`.

    auto: bf16-mixed where bf16 is native, fp16-mixed on a CUDA GPU without bf16, fp32 otherwise. An explicit
    choice is kept; bf16-mixed where bf16 is emulated gets a warning on stderr (it is correct, only slow)."""
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {requested!r}")
    native = native_bf16(device)
    where = f"this CPU ({cpu_capability()})" if device.type == "cpu" else f"this {device.type} device"
    if requested != "auto":
        if requested == "bf16-mixed" and not native and device.type == "cpu":
            print(f"gptlab: warning: bf16-mixed is emulated on {where}, which has no native bf16: expect it to run "
                  "~10-20x slower than --precision fp32", file=sys.stderr)
        return requested, "as asked"
    if native:
        return "bf16-mixed", f"{where} has native bf16"
    if device.type == "cuda":
        return "fp16-mixed", "this GPU has no native bf16"
    return "fp32", f"{where} has no native bf16"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The autocast context of a resolved precision (fp32: none)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "auto":
        raise ValueError("resolve 'auto' with resolve_precision before autocasting")
    dtype = torch.bfloat16 if precision == "bf16-mixed" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)
