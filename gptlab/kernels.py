"""gptlab's C++ CPU kernels for decoding (`csrc/cpu_decode.cpp`), built on first use.

Decoding reads every weight and every cached key and value once per step for a handful of rows, so
its speed is that of memory; the library kernels leave 25-50% of it on the table at these shapes:
- `pack` / `pack_int8` + `linear`: a matmul for 1-256 rows over float32 or int8 weights repacked in
  48-column panels, GELU optionally applied as it stores (`quantize.CPULinear`, `quantize.Int8Linear`);
- `decode_attention`: one new token per row at its own position, written into the KV cache and
  attended over the row's prefix in one pass (`model.KVCache`);
- `decode_blocks`: every block of a decode step in one call (`model.GPT.block_tensors`).
torch.utils.cpp_extension compiles the file once per machine (~10 s) and caches the library. Where
that cannot happen (a CPU without AVX-512, no C++ compiler) or with GPTLAB_NO_KERNEL=1, `cpu_kernels()`
is None and callers use PyTorch's own kernels: same results, less speed.
"""

from __future__ import annotations

import functools
import os
import sys
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("csrc") / "cpu_decode.cpp"


@functools.cache
def cpu_kernels():
    """`torch.ops.gptlab_cpu` (the ops listed above), or None where they cannot run."""
    if os.environ.get("GPTLAB_NO_KERNEL") == "1" or not torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        return None
    try:
        from torch.utils import cpp_extension

        # one build per Python and torch version (the library links against both)
        root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
        build_dir = Path(root) / f"gptlab_cpu-py{sys.version_info.major}{sys.version_info.minor}-torch{torch.__version__}"
        build_dir.mkdir(parents=True, exist_ok=True)
        if not any(build_dir.glob("*.so")):
            print("gptlab: building the AVX-512 decoding kernels (once per machine, ~10 s)", file=sys.stderr)
        cpp_extension.load(name="gptlab_cpu", sources=[str(SOURCE)], build_directory=str(build_dir),
                           extra_cflags=["-O3", "-mavx512f", "-mfma", "-fopenmp"], is_python_module=False)
    except Exception as exc:  # noqa: BLE001 - any build failure means: use PyTorch's kernels
        warnings.warn(f"gptlab: the AVX-512 decoding kernels could not be built, using PyTorch's ({exc})",
                      stacklevel=2)
        return None
    return torch.ops.gptlab_cpu
