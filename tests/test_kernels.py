"""gptlab's C++ decoding kernels against PyTorch's own ops: every variant this machine's CPU can run
(the others skip, naming the CPU feature they lack), and the choice of variant."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from gptlab.config import GPTConfig
from gptlab.cpu import kernels
from gptlab.cpu.layers import quantize_weight
from gptlab.model import KVCache
from tests.conftest import KERNEL_VARIANTS

CLOSE = dict(rtol=1e-4, atol=1e-4)  # float32 sums in another order


@pytest.fixture(scope="module", params=KERNEL_VARIANTS)
def ops(request):
    built = kernels.load(request.param)
    assert built is not None, f"the {request.param} kernels failed to build (see the warning)"
    return built


def test_linear_matches_f_linear_and_gelu(ops):
    gen = torch.Generator().manual_seed(0)
    for n, k in ((97, 40), (48, 768), (5, 3)):  # a partial last panel, exact panels, a tiny matrix
        weight, bias = torch.randn(n, k, generator=gen), torch.randn(n, generator=gen)
        panels = ops.pack(weight)
        padded_bias = F.pad(bias, (0, panels.size(0) * panels.size(2) - n))
        for rows in (1, 3, 4, 8, 9, 17):  # one register block, a partial one, several (4 and 8 rows per block)
            x = torch.randn(rows, k, generator=gen)
            torch.testing.assert_close(ops.linear(x, panels, None, padded_bias, n), F.linear(x, weight, bias), **CLOSE)
            torch.testing.assert_close(ops.linear(x, panels, None, None, n), x @ weight.T, **CLOSE)
            torch.testing.assert_close(ops.linear(x, panels, None, padded_bias, n, True),  # GELU folded in
                                       F.gelu(F.linear(x, weight, bias), approximate="tanh"), **CLOSE)
    with pytest.raises(RuntimeError, match="width"):
        ops.linear(torch.randn(2, 4), ops.pack(torch.randn(3, 5)), None, None, 3)


def test_int8_linear_is_the_dequantized_matmul(ops):
    gen = torch.Generator().manual_seed(5)
    for n, k in ((97, 40), (50, 768)):
        weight, bias = torch.randn(n, k, generator=gen), torch.randn(n, generator=gen)
        qweight, scales = quantize_weight(weight)
        assert qweight.dtype == torch.int8 and qweight.abs().max() == 127
        # one scale per output channel: max |w| / 127, and every weight within half a step of its int8 value
        torch.testing.assert_close(scales, weight.abs().amax(1) / 127)
        dequantized = qweight.float() * scales[:, None]
        assert ((dequantized - weight).abs() <= scales[:, None] / 2 + 1e-6).all()
        panels = ops.pack(qweight)
        assert panels.dtype == torch.int8
        padding = panels.size(0) * panels.size(2) - n
        padded_scales, padded_bias = F.pad(scales, (0, padding)), F.pad(bias, (0, padding))
        for rows in (1, 4, 8, 11):
            x = torch.randn(rows, k, generator=gen)
            got = ops.linear(x, panels, padded_scales, padded_bias, n)
            torch.testing.assert_close(got, F.linear(x, dequantized, bias), **CLOSE)
            torch.testing.assert_close(ops.linear(x, panels, padded_scales, padded_bias, n, True),
                                       F.gelu(got, approximate="tanh"), **CLOSE)
    with pytest.raises(RuntimeError, match="scales"):
        ops.linear(torch.randn(2, k), panels, None, None, n)


@pytest.mark.parametrize("head_dim", [16, 64, 80])
def test_decode_attention_matches_masked_sdpa_and_writes_the_cache(ops, head_dim):
    gen = torch.Generator().manual_seed(1)
    rows, heads, max_len = 5, 3, 40
    positions = torch.tensor([0, 7, 39, 12, 12])  # first and last slot, rows sharing a position
    k_cache, v_cache = (torch.randn(rows + 2, heads, max_len, head_dim, generator=gen) for _ in range(2))
    qkv = torch.randn(rows, 1, 3, heads, head_dim, generator=gen).permute(2, 0, 3, 1, 4)  # views, as c_attn's
    q, k, v = qkv.unbind(0)
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    expected_k[torch.arange(rows), :, positions] = k[:, :, 0]
    expected_v[torch.arange(rows), :, positions] = v[:, :, 0]
    mask = (torch.arange(max_len) <= positions[:, None])[:, None, None]
    expected = F.scaled_dot_product_attention(q, expected_k[:rows], expected_v[:rows], attn_mask=mask)
    got = ops.decode_attention(q, k, v, k_cache[:rows], v_cache[:rows], positions)
    torch.testing.assert_close(got, expected, **CLOSE)
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)  # rows past B untouched
    assert got.transpose(1, 2).is_contiguous()  # merging the heads is free
    with pytest.raises(RuntimeError, match="position"):
        ops.decode_attention(q, k, v, k_cache[:rows], v_cache[:rows], positions + 1)


def test_decode_attention_equals_the_kv_cache_pass(ops):
    """One decode pass of a KVCache (PyTorch's write + masked SDPA) against the kernel on the same
    cache layout (a layer's rows, as decode_blocks passes them)."""
    config = GPTConfig(vocab_size=64, block_size=32, n_layer=1, n_head=2, n_embd=32)
    starts = [3, 9, 0, 30]
    outputs = []
    for fused in (True, False):
        cache = KVCache(config, batch_size=4)
        torch.manual_seed(3)
        cache.k.normal_(), cache.v.normal_()
        q, k, v = torch.randn(3, 4, 2, 1, 16, generator=torch.Generator().manual_seed(4)).unbind(0)
        with torch.inference_mode():
            cache.plan(slice(0, 4), starts, 1, prefill=False)
            if fused:
                y = ops.decode_attention(q, k, v, cache.k[0, cache.rows], cache.v[0, cache.rows], cache.positions[:, 0])
            else:
                y = cache.attend(0, q, k, v)
            outputs.append((y, cache.k.clone(), cache.v.clone()))
    for fused_part, reference_part in zip(*outputs, strict=True):
        torch.testing.assert_close(fused_part, reference_part, **CLOSE)


def test_block_layout_names_every_tensor_once(ops):
    layout = ops.block_layout()
    assert len(layout) == len(set(layout)) == 16 and {"ln_1.weight", "mlp.c_fc.panels", "mlp.c_proj.bias"} <= set(layout)


def test_first_use_builds_once_and_says_so(ops, tmp_path):
    """On a fresh machine a variant builds, with one line on stderr, even past the lock file that a killed
    build leaves behind (which made every later process wait forever); the next process loads the cached
    library silently, whichever ninja comes first on its PATH."""
    variant = ops.name.removeprefix("gptlab_cpu_")
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    source_hash = hashlib.sha256(kernels.SOURCE.read_bytes()).hexdigest()[:12]
    build_dir = tmp_path / (f"gptlab_cpu_{variant}-py{sys.version_info.major}{sys.version_info.minor}"
                            f"-torch{torch.__version__}-{source_hash}")
    build_dir.mkdir()
    (build_dir / "lock").touch()  # what a build killed mid-way leaves
    code = f"from gptlab.cpu import kernels; assert kernels.load({variant!r}) is not None"
    first = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    assert first.stderr.count(f"building the {variant} decoding kernels") == 1
    assert [p.name for p in tmp_path.iterdir()] == [build_dir.name]
    # another ninja first on PATH (a system one of another version hashes commands differently and took the
    # build for stale): the kernels build and load with the ninja of gptlab's environment, never that one
    other = tmp_path / "other-bin"
    other.mkdir()
    (other / "ninja").write_text(f"#!/bin/sh\ntouch {other / 'ran'}\nexit 1\n")
    (other / "ninja").chmod(0o755)
    env["PATH"] = f"{other}{os.pathsep}{env.get('PATH', '')}"
    second = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0 and "building" not in second.stderr, second.stderr
    assert not (other / "ran").exists()


# --- which variant runs ------------------------------------------------------------------------------

def selected_in_subprocess(**env) -> subprocess.Popen:
    """A started process that prints the variant it selects (read it with `.communicate()`)."""
    code = "from gptlab.cpu import kernels; print(kernels.selected_variant())"
    clean = {k: v for k, v in os.environ.items() if k not in ("GPTLAB_KERNEL", "GPTLAB_NO_KERNEL", "ATEN_CPU_CAPABILITY")}
    return subprocess.Popen([sys.executable, "-c", code], env={**clean, **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_the_variant_follows_the_cpu_capability():
    capability = torch.backends.cpu.get_cpu_capability()
    expected = "avx512" if capability.startswith("AVX512") else "avx2" if capability == "AVX2" else "None"
    checks = []  # (process, the variant it must print): the processes run at once, each importing torch
    if os.environ.get("ATEN_CPU_CAPABILITY") is None:
        checks.append((selected_in_subprocess(), expected))
    if not kernels.missing_features("avx2"):  # an AVX-512 machine told to run at AVX2 picks the AVX2 variant
        checks.append((selected_in_subprocess(ATEN_CPU_CAPABILITY="avx2"), "avx2"))
    checks.append((selected_in_subprocess(ATEN_CPU_CAPABILITY="default"), "None"))
    try:
        for process, variant in checks:
            assert process.communicate(timeout=120)[0].strip() == variant
    finally:
        for process, _ in checks:
            process.kill()
            process.wait()


def test_forcing_a_variant(monkeypatch):
    monkeypatch.delenv("GPTLAB_NO_KERNEL", raising=False)
    for variant in kernels.VARIANTS:
        monkeypatch.setenv("GPTLAB_KERNEL", variant)
        if missing := kernels.missing_features(variant):
            with pytest.raises(RuntimeError, match=f"lacks {missing[0]}"):  # refused: it would crash
                kernels.selected_variant()
        else:
            assert kernels.selected_variant() == variant
    monkeypatch.setenv("GPTLAB_KERNEL", "none")
    assert kernels.selected_variant() is None
    monkeypatch.setenv("GPTLAB_KERNEL", "sse2")
    with pytest.raises(ValueError, match="avx2, avx512, none"):
        kernels.selected_variant()
    monkeypatch.delenv("GPTLAB_KERNEL")
    monkeypatch.setenv("GPTLAB_NO_KERNEL", "1")
    assert kernels.selected_variant() is None
