"""gptlab's C++ decoding kernels against PyTorch's own ops, on this machine's CPU."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from gptlab import kernels
from gptlab.config import GPTConfig
from gptlab.model import KVCache

CLOSE = dict(rtol=1e-4, atol=1e-4)  # float32 sums in another order


@pytest.fixture(scope="module")
def ops():
    built = kernels.cpu_kernels()
    if not torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        assert built is None
        pytest.skip("no AVX-512 on this CPU: PyTorch's kernels serve instead")
    assert built is not None, "the AVX-512 kernels failed to build (see the warning)"
    return built


def test_linear_matches_f_linear_and_gelu(ops):
    gen = torch.Generator().manual_seed(0)
    for n, k in ((97, 40), (48, 768), (5, 3)):  # a partial last panel, exact panels, a tiny matrix
        weight, bias = torch.randn(n, k, generator=gen), torch.randn(n, generator=gen)
        panels = ops.pack(weight)
        padded_bias = F.pad(bias, (0, panels.size(0) * panels.size(2) - n))
        for rows in (1, 3, 8, 9, 17):  # one register block, a partial one, several
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
        panels, scales = ops.pack_int8(weight)
        assert panels.dtype == torch.int8 and panels.abs().max() == 127
        # one scale per output channel: max |w| / 127, and every weight within half a step of its int8 value
        torch.testing.assert_close(scales[:n], weight.abs().amax(1) / 127)
        dequantized = (panels.float() * scales.view(panels.size(0), 1, -1)).transpose(1, 2).reshape(-1, k)[:n]
        assert ((dequantized - weight).abs() <= scales[:n, None] / 2 + 1e-6).all()
        padded_bias = F.pad(bias, (0, scales.numel() - n))
        for rows in (1, 8, 11):
            x = torch.randn(rows, k, generator=gen)
            got = ops.linear(x, panels, scales, padded_bias, n)
            torch.testing.assert_close(got, F.linear(x, dequantized, bias), **CLOSE)
            torch.testing.assert_close(ops.linear(x, panels, scales, padded_bias, n, True),
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


def test_kv_cache_decodes_the_same_with_and_without_the_kernel(ops, monkeypatch):
    """A cached decode pass through KVCache: the fused kernel against PyTorch's write + SDPA."""
    config = GPTConfig(vocab_size=64, block_size=32, n_layer=1, n_head=2, n_embd=32)
    starts = [3, 9, 0, 30]
    outputs = []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(kernels, "cpu_kernels", lambda: None)
        cache = KVCache(config, batch_size=4)
        torch.manual_seed(3)
        cache.k.normal_(), cache.v.normal_()
        q, k, v = torch.randn(3, 4, 2, 1, 16, generator=torch.Generator().manual_seed(4)).unbind(0)
        with torch.inference_mode():
            cache.plan(slice(0, 4), starts, 1, prefill=False)
            outputs.append((cache.attend(0, q, k, v), cache.k.clone(), cache.v.clone()))
    for fused_part, reference_part in zip(*outputs, strict=True):
        torch.testing.assert_close(fused_part, reference_part, **CLOSE)


def test_first_use_builds_once_and_says_so(ops, tmp_path):
    """On a fresh machine (an empty extensions directory) the kernels build, with one line on stderr;
    the next process loads the cached library silently."""
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    code = "from gptlab import kernels; assert kernels.cpu_kernels() is not None"
    first = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    assert first.stderr.count("building the AVX-512 decoding kernels") == 1
    second = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0 and "building" not in second.stderr, second.stderr
