"""gptlab's C++ CPU kernels for decoding (`csrc/cpu_decode.cpp`): build, load, and the choice of variant.

Decoding reads every weight and every cached key and value once per step for a handful of rows, so
its speed is that of memory; the library kernels leave 25-50% of it on the table at these shapes:
- `pack` + `linear`: a matmul for 1-256 rows over float32 or int8 weights repacked in
  panels of 3 vectors (24 columns with AVX2, 48 with AVX-512), GELU optionally applied as it stores
  (`layers.CPULinear`, `layers.Int8Linear`). The panel layout is the variant's own: panels come from
  the `pack` of the library that multiplies them;
- `decode_attention`: one new token per row at its own position, written into the KV cache and
  attended over the row's prefix in one pass;
- `decode_blocks`: every block of a decode step in one call, from the tensors `block_layout()` names
  (`decode.FusedDecode`).

One source, one build per variant: `avx2` (AVX2 + FMA, 16 ymm registers: 24-column panels, 4 rows per
register block) and `avx512` (AVX-512 F/BW/VL/DQ: 48 columns, 8 rows). torch.utils.cpp_extension
compiles a variant once per machine (~15-45 s, one line on stderr) and caches the library; each
registers its ops as `torch.ops.gptlab_cpu_<variant>`, so both load into one process. `active_variant()`
is the variant of `torch.backends.cpu.get_cpu_capability()` (which honours ATEN_CPU_CAPABILITY: with
`ATEN_CPU_CAPABILITY=avx2` an AVX-512 machine runs the AVX2 variant); GPTLAB_KERNEL=avx2|avx512|none
forces one (refused if the CPU lacks its instructions), GPTLAB_NO_KERNEL=1 means none. Where no
variant runs (another architecture, no compiler, the build fails) it is None and callers use PyTorch's
own kernels: same results, less speed.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import platform
import sys
import warnings
from pathlib import Path

import torch

from gptlab import device

SOURCE = Path(__file__).with_name("csrc") / "cpu_decode.cpp"

# variant -> (CPU flags it needs as /proc/cpuinfo names them, compiler flags); the capability defines
# and -m flags are those PyTorch compiles its own per-capability kernels with (ATen's Vectorized needs them)
VARIANTS = {
    "avx2": (("avx2", "fma", "f16c"),
             ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"]),
    "avx512": (("avx512f", "avx512bw", "avx512vl", "avx512dq", "fma"),
               ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512", "-mavx512f", "-mavx512bw", "-mavx512vl",
                "-mavx512dq", "-mfma"]),
}


def _capability_variant() -> str | None:
    """The variant of the capability PyTorch runs its own kernels at (honours ATEN_CPU_CAPABILITY)."""
    capability = device.cpu_capability()
    return "avx512" if capability.startswith("AVX512") else "avx2" if capability == "AVX2" else None


def missing_features(variant: str) -> list[str]:
    """The CPU features `variant` needs that this CPU lacks (empty: it can run here)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return [f"x86-64 (this is {platform.machine()})"]
    flags = device.cpu_flags()
    needed = VARIANTS[variant][0]
    if not flags:  # no flag list: trust PyTorch's detection (an AVX-512 CPU also runs AVX2)
        best = _capability_variant()
        return [] if best == variant or best == "avx512" else list(needed)
    return [flag for flag in needed if flag not in flags]


def selected_variant() -> str | None:
    """The variant this process uses: GPTLAB_KERNEL if set, else the CPU capability PyTorch runs at."""
    if os.environ.get("GPTLAB_NO_KERNEL") == "1":
        return None
    forced = os.environ.get("GPTLAB_KERNEL", "").lower()
    if forced == "none":
        return None
    if forced:
        if forced not in VARIANTS:
            raise ValueError(f"GPTLAB_KERNEL={forced!r}: expected one of {', '.join(VARIANTS)}, none")
        if missing := missing_features(forced):
            raise RuntimeError(f"GPTLAB_KERNEL={forced}: this CPU lacks {', '.join(missing)}")
        return forced
    return _capability_variant()


@contextlib.contextmanager
def _this_environments_ninja():
    """cpp_extension runs the first `ninja` on PATH. ninja 1.13 hashes build commands differently from 1.11, so a
    process that finds the system's ninja and one that finds this environment's took each other's build for
    stale and recompiled it (45-100 s, every time they alternated). The ninja that ships with gptlab's
    environment (a dependency) comes first while the kernels build or load."""
    import ninja

    path = os.environ.get("PATH")
    os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, path]) if path else ninja.BIN_DIR
    try:
        yield
    finally:
        if path is None:
            del os.environ["PATH"]
        else:
            os.environ["PATH"] = path


@functools.cache
def load(variant: str):
    """`torch.ops.gptlab_cpu_<variant>` (the ops listed above), built on first use; None if it cannot
    be built. The caller checks `missing_features(variant)` first: running a variant the CPU lacks
    crashes with an illegal instruction."""
    name = f"gptlab_cpu_{variant}"
    try:
        from torch.utils import cpp_extension

        # one build per variant, Python and torch version (the library links against both) and source text,
        # compiled from a copy inside the build directory: checkouts of the same source in other places share
        # the build instead of recompiling it each time another of them loads it (ninja rebuilds on a new path)
        source = SOURCE.read_bytes()
        root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
        build_dir = Path(root) / (f"{name}-py{sys.version_info.major}{sys.version_info.minor}-torch{torch.__version__}"
                                  f"-{hashlib.sha256(source).hexdigest()[:12]}")
        build_dir.mkdir(parents=True, exist_ok=True)
        if not any(build_dir.glob("*.so")):
            print(f"gptlab: building the {variant} decoding kernels (once per machine, ~15-45 s)", file=sys.stderr)
        import fcntl

        with open(build_dir / "gptlab.flock", "w") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)  # the OS releases it even when its holder is killed
            # cpp_extension's own lock file outlives a build that was killed, and every later process
            # would wait for it forever; under our flock no other build runs, so one found here is stale
            (build_dir / "lock").unlink(missing_ok=True)
            copy = build_dir / SOURCE.name
            if not copy.exists() or copy.read_bytes() != source:
                copy.write_bytes(source)
            with _this_environments_ninja():
                cpp_extension.load(name=name, sources=[str(copy)], build_directory=str(build_dir),
                                   extra_cflags=["-O3", "-fopenmp", f"-DGPTLAB_NS={name}", *VARIANTS[variant][1]],
                                   is_python_module=False)
    except Exception as exc:  # noqa: BLE001 - any build failure means: use PyTorch's kernels
        warnings.warn(f"gptlab: the {variant} decoding kernels could not be built, using PyTorch's ({exc})",
                      stacklevel=2)
        return None
    return getattr(torch.ops, name)


def active_variant() -> str | None:
    """The variant this process runs: `selected_variant()` if its library builds, else None (PyTorch's
    kernels serve)."""
    variant = selected_variant()
    return variant if variant is not None and load(variant) is not None else None


def describe() -> dict[str, str]:
    """The CPU capability PyTorch runs at and the kernel variant in use ("none": PyTorch's kernels),
    for benchmark records."""
    return {"cpu_capability": device.cpu_capability(), "kernel": active_variant() or "none"}
