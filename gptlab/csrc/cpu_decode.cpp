// CPU kernels of a decode step (gptlab.kernels builds this file on first use).
//
// linear: y = x W^T + b for a few rows of x (batched decoding), streaming each weight once at memory speed.
//
// Decoding reads every weight once per step, for a handful of rows: the matmul is bound by memory
// bandwidth, yet library GEMMs (oneDNN, MKL) tile for the large-M case and run ~25% slower than a
// plain read of the weights. Here W is repacked once into panels of 48 output columns, each panel
// one contiguous (K, 48) block: a thread streams its panels front to back while up to 8 rows of x
// accumulate in 24 AVX-512 registers, so each weight byte is loaded once and used 8 times.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

constexpr int64_t kVectors = 3;                // AVX-512 vectors of 16 floats per panel row
constexpr int64_t kPanel = 16 * kVectors;      // output columns per panel
constexpr int64_t kRows = 8;                   // rows of x per register block (24 accumulators)
// software prefetch, in bytes ahead: to L2 4 KiB, to L1 1.5 KiB. The hardware prefetcher alone
// restarts at every 4 KiB page and falls behind once 8 rows of FMAs slow the loop: these two cut the
// 8-row matmuls of a GPT-2 124M step from ~5 ms slower than 1 row to ~2 ms
constexpr int64_t kPrefetchL2 = 4096;
constexpr int64_t kPrefetchL1 = 1536;

// (N, K) -> (ceil(N / 48), K, 48), zero-padded columns, any dtype
at::Tensor pack(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2, "pack: a matrix");
  const int64_t n = weight.size(0), k = weight.size(1), panels = (n + kPanel - 1) / kPanel;
  auto padded = at::zeros({panels * kPanel, k}, weight.options());
  padded.narrow(0, 0, n).copy_(weight);
  return padded.view({panels, kPanel, k}).transpose(1, 2).contiguous();
}

// weight-only int8: round(W / s) with one scale s = max |W[c]| / 127 per output channel c;
// returns the int8 panels and the scales (zero-padded like the panels)
std::tuple<at::Tensor, at::Tensor> pack_int8(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kFloat, "pack_int8: a float32 matrix");
  const auto scales = weight.abs().amax(1).clamp_min(1e-12f) / 127.0f;
  const auto q = at::round(weight / scales.unsqueeze(1)).clamp(-127, 127).to(at::kChar);
  const auto panels = pack(q);
  auto padded_scales = at::zeros({panels.size(0) * kPanel}, weight.options());
  padded_scales.narrow(0, 0, weight.size(0)).copy_(scales);
  return {panels, padded_scales};
}

// e^x, 16 at a time: 2^n e^r with r = x - n ln 2 and Cephes' expf polynomial (rel. error < 2e-7)
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.0f)), _mm512_set1_ps(-88.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  for (const float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

// GPT-2's GELU, 0.5 x (1 + tanh(z)) with z = sqrt(2/pi) (x + 0.044715 x^3), written as x / (1 + e^(-2z))
inline __m512 gelu_tanh16(__m512 x) {
  const __m512 x3 = _mm512_mul_ps(_mm512_mul_ps(x, x), x);
  const __m512 minus_2z = _mm512_mul_ps(_mm512_fmadd_ps(_mm512_set1_ps(0.044715f), x3, x),
                                        _mm512_set1_ps(-2.0f * 0.7978845608f));
  return _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0f), exp16(minus_2z)));
}

// 16 weights of a panel row as floats: float32 as they are, int8 widened (the scale comes at the end)
inline __m512 load16(const float* w) { return _mm512_load_ps(w); }
inline __m512 load16(const int8_t* w) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w))));
}

// y[r, 0:cols] = (x[r] . panel) * scale + bias, then GELU if GELU, for ROWS rows of x (row stride k)
// and y (row stride ldy); scale and bias may be null
template <int ROWS, bool GELU, typename W>
void panel_block(const float* x, int64_t k, const W* panel, const float* scale, const float* bias, float* y,
                 int64_t ldy, int64_t cols) {
  constexpr int64_t row_bytes = kPanel * sizeof(W);
  // independent partial sums: with one or two rows, the FMA latency chain through each accumulator,
  // not the memory, would bound the loop (int8 rows are only 48 bytes)
  constexpr int kBanks = ROWS == 1 ? 4 : ROWS == 2 ? 2 : 1;
  const char* bytes = reinterpret_cast<const char*>(panel);
  __m512 acc[kBanks][ROWS][kVectors];
  for (int bank = 0; bank < kBanks; ++bank)
    for (int r = 0; r < ROWS; ++r)
      for (int v = 0; v < kVectors; ++v) acc[bank][r][v] = _mm512_setzero_ps();
  const auto step = [&](int64_t i, __m512 (&sums)[ROWS][kVectors]) {
    for (int64_t line = 0; line < row_bytes; line += 64) {
      _mm_prefetch(bytes + i * row_bytes + kPrefetchL2 + line, _MM_HINT_T1);
      _mm_prefetch(bytes + i * row_bytes + kPrefetchL1 + line, _MM_HINT_T0);
    }
    __m512 w[kVectors];
    for (int v = 0; v < kVectors; ++v) w[v] = load16(panel + i * kPanel + 16 * v);
    for (int r = 0; r < ROWS; ++r) {
      const __m512 xr = _mm512_set1_ps(x[r * k + i]);
      for (int v = 0; v < kVectors; ++v) sums[r][v] = _mm512_fmadd_ps(xr, w[v], sums[r][v]);
    }
  };
  int64_t i = 0;
  for (; i + kBanks <= k; i += kBanks)
    for (int bank = 0; bank < kBanks; ++bank) step(i + bank, acc[bank]);
  for (; i < k; ++i) step(i, acc[0]);
  for (int bank = 1; bank < kBanks; ++bank)
    for (int r = 0; r < ROWS; ++r)
      for (int v = 0; v < kVectors; ++v) acc[0][r][v] = _mm512_add_ps(acc[0][r][v], acc[bank][r][v]);
  for (int v = 0; v < kVectors; ++v) {  // the last panel is partial: masked stores
    const int64_t left = cols - 16 * v;
    const __mmask16 mask = left >= 16 ? 0xFFFF : left <= 0 ? 0 : (1u << left) - 1;
    const __m512 s = scale ? _mm512_loadu_ps(scale + 16 * v) : _mm512_set1_ps(1.0f);
    const __m512 b = bias ? _mm512_loadu_ps(bias + 16 * v) : _mm512_setzero_ps();
    for (int r = 0; r < ROWS; ++r) {
      const __m512 out = _mm512_fmadd_ps(acc[0][r][v], s, b);
      _mm512_mask_storeu_ps(y + r * ldy + 16 * v, mask, GELU ? gelu_tanh16(out) : out);
    }
  }
}

template <typename W>
using BlockFn = void (*)(const float*, int64_t, const W*, const float*, const float*, float*, int64_t, int64_t);

template <typename W, bool GELU>
constexpr BlockFn<W> kBlocks[kRows] = {panel_block<1, GELU, W>, panel_block<2, GELU, W>, panel_block<3, GELU, W>,
                                       panel_block<4, GELU, W>, panel_block<5, GELU, W>, panel_block<6, GELU, W>,
                                       panel_block<7, GELU, W>, panel_block<8, GELU, W>};

template <typename W>
void run_panels(const float* x, int64_t rows, int64_t k, const W* panels, int64_t num_panels, const float* scale,
                const float* bias, float* y, int64_t n, bool gelu) {
  const BlockFn<W>* blocks = gelu ? kBlocks<W, true> : kBlocks<W, false>;
  // threads split the panels: each streams its own contiguous part of the weights
  at::parallel_for(0, num_panels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t col = p * kPanel, cols = std::min(kPanel, n - col);
      for (int64_t r = 0; r < rows; r += kRows) {  // later row blocks find the panel in cache
        const int64_t block = std::min(kRows, rows - r);
        blocks[block - 1](x + r * k, k, panels + p * k * kPanel, scale ? scale + col : nullptr,
                          bias ? bias + col : nullptr, y + r * n + col, n, cols);
      }
    }
  });
}

// x (..., K) float32; panels from pack() (float32) or pack_int8() (int8, with its scales); bias: None
// or zero-padded like the panels; returns (..., n), GELU applied if gelu
at::Tensor linear(const at::Tensor& x, const at::Tensor& panels, const std::optional<at::Tensor>& scales,
                  const std::optional<at::Tensor>& bias, int64_t n, bool gelu) {
  const int64_t k = panels.size(1), num_panels = panels.size(0), padded = num_panels * kPanel;
  const bool int8 = panels.scalar_type() == at::kChar;
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.size(-1) == k, "linear: float32 input of width ", k);
  TORCH_CHECK(panels.is_contiguous() && panels.dim() == 3 && panels.size(2) == kPanel && n <= padded &&
              (int8 || panels.scalar_type() == at::kFloat), "linear: panels from pack() or pack_int8()");
  TORCH_CHECK(int8 == scales.has_value() && (!scales || (scales->is_contiguous() && scales->numel() == padded)),
              "linear: int8 panels take their padded scales, float32 panels none");
  TORCH_CHECK(!bias || (bias->is_contiguous() && bias->numel() == padded), "linear: padded bias");
  const auto rows_x = x.reshape({-1, k}).contiguous();
  const int64_t rows = rows_x.size(0);
  auto sizes = x.sizes().vec();
  sizes.back() = n;
  auto y = at::empty({rows, n}, x.options());
  const float* bp = bias ? bias->data_ptr<float>() : nullptr;
  if (int8)
    run_panels(rows_x.data_ptr<float>(), rows, k, panels.data_ptr<int8_t>(), num_panels,
               scales->data_ptr<float>(), bp, y.data_ptr<float>(), n, gelu);
  else
    run_panels(rows_x.data_ptr<float>(), rows, k, panels.data_ptr<float>(), num_panels, nullptr, bp,
               y.data_ptr<float>(), n, gelu);
  return y.view(sizes);
}

// decode_attention: one new token per row, every row at its own position. For row b and head h it
// writes the token's key and value at positions[b] of the cache, then attends from its query over
// cache positions 0..positions[b]. One pass over the cached keys and values, no mask tensor, no
// gather of the rows' prefixes: SDPA's fused CPU kernel takes ~2x the time of that read.
// q, k, v: (B, H, 1, D) with unit stride along D (views of c_attn's output); caches: (>= B, H, L, D)
// contiguous; returns (B, H, 1, D), laid out as (B, 1, H * D) so that merging the heads is free.
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor k_cache,
                            at::Tensor v_cache, const at::Tensor& positions) {
  const int64_t rows = q.size(0), heads = q.size(1), dim = q.size(3), max_len = k_cache.size(2);
  TORCH_CHECK(q.scalar_type() == at::kFloat && k_cache.scalar_type() == at::kFloat && q.size(2) == 1,
              "decode_attention: float32, one new token per row");
  TORCH_CHECK(dim % 16 == 0 && q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1,
              "decode_attention: head size a multiple of 16, unit stride");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.size(0) >= rows &&
              k_cache.size(1) == heads && k_cache.size(3) == dim, "decode_attention: contiguous caches");
  const auto pos = positions.to(at::kLong).contiguous();
  const int64_t* pos_p = pos.data_ptr<int64_t>();
  for (int64_t b = 0; b < rows; ++b) TORCH_CHECK(0 <= pos_p[b] && pos_p[b] < max_len, "decode_attention: position");
  auto y = at::empty({rows, 1, heads, dim}, q.options());
  const float scale = 1.0f / std::sqrt(static_cast<float>(dim));
  const int64_t vectors = dim / 16;
  at::parallel_for(0, rows * heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(max_len);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / heads, h = task % heads, last = pos_p[b];
      const float* qp = q.data_ptr<float>() + b * q.stride(0) + h * q.stride(1);
      const float* kp = k.data_ptr<float>() + b * k.stride(0) + h * k.stride(1);
      const float* vp = v.data_ptr<float>() + b * v.stride(0) + h * v.stride(1);
      float* keys = k_cache.data_ptr<float>() + (b * heads + h) * max_len * dim;
      float* values = v_cache.data_ptr<float>() + (b * heads + h) * max_len * dim;
      std::copy(kp, kp + dim, keys + last * dim);
      std::copy(vp, vp + dim, values + last * dim);
      float best = -INFINITY;
      for (int64_t j = 0; j <= last; ++j) {
        __m512 acc = _mm512_setzero_ps();
        for (int64_t c = 0; c < vectors; ++c) {
          // the rows' caches were evicted by a whole step of weights: fetch keys ahead, values too
          _mm_prefetch(reinterpret_cast<const char*>(keys + (j + 8) * dim + 16 * c), _MM_HINT_T0);
          _mm_prefetch(reinterpret_cast<const char*>(values + j * dim + 16 * c), _MM_HINT_T1);
          acc = _mm512_fmadd_ps(_mm512_loadu_ps(qp + 16 * c), _mm512_loadu_ps(keys + j * dim + 16 * c), acc);
        }
        scores[j] = _mm512_reduce_add_ps(acc) * scale;
        best = std::max(best, scores[j]);
      }
      __m512 sums = _mm512_setzero_ps();
      for (int64_t j = 0; j <= last; j += 16) {
        const __mmask16 mask = last - j >= 15 ? 0xFFFF : (1u << (last - j + 1)) - 1;
        const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, scores.data() + j), _mm512_set1_ps(best)));
        _mm512_mask_storeu_ps(scores.data() + j, mask, e);
        sums = _mm512_mask_add_ps(sums, mask, sums, e);
      }
      const float total = _mm512_reduce_add_ps(sums);
      __m512 out[4];  // head sizes up to 64 in registers; larger ones in passes of 64
      float* yp = y.data_ptr<float>() + (b * heads + h) * dim;
      for (int64_t c0 = 0; c0 < vectors; c0 += 4) {
        const int64_t width = std::min<int64_t>(4, vectors - c0);
        for (int64_t c = 0; c < width; ++c) out[c] = _mm512_setzero_ps();
        for (int64_t j = 0; j <= last; ++j) {
          const __m512 weight = _mm512_set1_ps(scores[j]);
          for (int64_t c = 0; c < width; ++c)
            out[c] = _mm512_fmadd_ps(weight, _mm512_loadu_ps(values + j * dim + 16 * (c0 + c)), out[c]);
        }
        const __m512 norm = _mm512_set1_ps(1.0f / total);
        for (int64_t c = 0; c < width; ++c) _mm512_storeu_ps(yp + 16 * (c0 + c), _mm512_mul_ps(out[c], norm));
      }
    }
  });
  return y.transpose(1, 2);
}

// decode_blocks: one decode step through every block of a pre-LayerNorm GPT (GPT-2), one new token per
// row: model.Block.forward with the kernels above, in one call, so no Python runs per layer (that
// costs ~2 ms of a 12-layer step). 16 tensors per block, empty where absent: ln_1 weight, bias;
// c_attn panels, scales, bias; attn c_proj panels, scales, bias; ln_2 weight, bias; c_fc panels,
// scales, bias (GELU folded in); mlp c_proj panels, scales, bias. x: (B, C); caches: (layers, B, H, L, D).
constexpr size_t kBlockTensors = 16;

at::Tensor decode_blocks(const at::Tensor& embeddings, const std::vector<at::Tensor>& params,
                         const at::Tensor& k_caches, const at::Tensor& v_caches, const at::Tensor& positions,
                         int64_t heads, double eps) {
  TORCH_CHECK(params.size() % kBlockTensors == 0 && params.size() / kBlockTensors == size_t(k_caches.size(0)),
              "decode_blocks: 16 tensors per layer of the cache");
  const auto given = [](const at::Tensor& t) { return t.numel() ? std::optional<at::Tensor>(t) : std::nullopt; };
  at::Tensor x = embeddings.contiguous();
  const int64_t rows = x.size(0), width = x.size(1);
  for (int64_t layer = 0; layer < k_caches.size(0); ++layer) {
    const at::Tensor* p = params.data() + layer * kBlockTensors;
    auto h = at::layer_norm(x, {width}, given(p[0]), given(p[1]), eps);
    const auto qkv = linear(h, p[2], given(p[3]), given(p[4]), 3 * width, false)
                         .view({rows, 1, 3, heads, width / heads}).permute({2, 0, 3, 1, 4});
    const auto y = decode_attention(qkv[0], qkv[1], qkv[2], k_caches[layer], v_caches[layer], positions);
    x = x + linear(y.transpose(1, 2).reshape({rows, width}), p[5], given(p[6]), given(p[7]), width, false);
    h = at::layer_norm(x, {width}, given(p[8]), given(p[9]), eps);
    h = linear(h, p[10], given(p[11]), given(p[12]), p[13].size(1), true);
    x = x + linear(h, p[13], given(p[14]), given(p[15]), width, false);
  }
  return x;
}

}  // namespace

TORCH_LIBRARY(gptlab_cpu, m) {
  m.def("pack(Tensor weight) -> Tensor", &pack);
  m.def("pack_int8(Tensor weight) -> (Tensor, Tensor)", &pack_int8);
  m.def("linear(Tensor x, Tensor panels, Tensor? scales, Tensor? bias, int n, bool gelu=False) -> Tensor", &linear);
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor positions)"
        " -> Tensor", &decode_attention);
  m.def("decode_blocks(Tensor x, Tensor[] params, Tensor(a!) k_caches, Tensor(b!) v_caches, Tensor positions,"
        " int heads, float eps) -> Tensor", &decode_blocks);
}
