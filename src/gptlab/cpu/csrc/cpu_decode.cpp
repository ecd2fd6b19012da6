// CPU kernels of a decode step (gptlab.cpu.kernels builds this file on first use).
//
// One source for every x86 variant: the code is written over ATen's Vectorized<float> (8 lanes with
// AVX2, 16 with AVX-512) and compiled once per variant with PyTorch's own capability defines and
// flags (CPU_CAPABILITY_AVX2 + -mavx2 -mfma, CPU_CAPABILITY_AVX512 + -mavx512f ...). Each build
// registers its ops in its own namespace, GPTLAB_NS (gptlab_cpu_avx2, gptlab_cpu_avx512), so that
// both variants can load into one process (the tests compare each against PyTorch's ops).
//
// linear: y = x W^T + b for a few rows of x (batched decoding), streaming each weight once at memory speed.
//
// Decoding reads every weight once per step, for a handful of rows: the matmul is bound by memory
// bandwidth, yet library GEMMs (oneDNN, MKL) tile for the large-M case and run ~25% slower than a
// plain read of the weights. Here W is repacked once into panels of kPanel output columns (3
// vectors), each panel one contiguous (K, kPanel) block: a thread streams its panels front to back
// while up to kRows rows of x accumulate in registers, so each weight byte is loaded once and used
// kRows times.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <string>
#include <utility>
#include <vector>

#if !defined(GPTLAB_NS) || !(defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512))
#error "build through gptlab.cpu.kernels: it sets GPTLAB_NS and one CPU_CAPABILITY"
#endif

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = Vec::size();
constexpr int64_t kVectors = 3;                // vectors per panel row
constexpr int64_t kPanel = kLanes * kVectors;  // output columns per panel: 24 (AVX2), 48 (AVX-512)
#if defined(CPU_CAPABILITY_AVX512)
// 8 rows: 24 accumulators, 3 weight vectors and a broadcast x in the 32 zmm registers
constexpr int64_t kRows = 8;
// software prefetch, in bytes ahead: to L2 4 KiB, to L1 1.5 KiB. The hardware prefetcher alone
// restarts at every 4 KiB page and falls behind once 8 rows of FMAs slow the loop: these two cut the
// 8-row matmuls of a GPT-2 124M step from ~5 ms slower than 1 row to ~2 ms
constexpr int64_t kPrefetchL2 = 4096;
constexpr int64_t kPrefetchL1 = 1536;
#else
// 4 rows: 12 accumulators, 3 weight vectors and a broadcast x fill the 16 ymm registers (more rows
// would spill accumulators to the stack inside the inner loop)
constexpr int64_t kRows = 4;
// the AVX-512 distances: on Zen 3 (AVX2), 1-8 KiB to L2 and 0.5-2 KiB to L1 timed the same within noise
// for 1, 4 and 8 rows over a GPT-2 124M step's weights (docs/BENCHMARKS.md)
constexpr int64_t kPrefetchL2 = 4096;
constexpr int64_t kPrefetchL1 = 1536;
#endif

// (N, K) -> (ceil(N / kPanel), K, kPanel), zero-padded columns, any dtype (float32 weights, or the int8
// of gptlab.cpu.layers.quantize_weight, whose scales the caller zero-pads like the panels)
at::Tensor pack(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2, "pack: a matrix");
  const int64_t n = weight.size(0), k = weight.size(1), panels = (n + kPanel - 1) / kPanel;
  auto padded = at::zeros({panels * kPanel, k}, weight.options());
  padded.narrow(0, 0, n).copy_(weight);
  return padded.view({panels, kPanel, k}).transpose(1, 2).contiguous();
}

// GPT-2's GELU, 0.5 x (1 + tanh(z)) with z = sqrt(2/pi) (x + 0.044715 x^3), written as x / (1 + e^(-2z));
// exp_u20 is ATen's own polynomial (relative error ~1e-6), no libm or Sleef call
inline Vec gelu_tanh(const Vec& x) {
  const Vec minus_2z = at::vec::fmadd(Vec(0.044715f), x * x * x, x) * Vec(-2.0f * 0.7978845608f);
  return x / (Vec(1.0f) + minus_2z.exp_u20());
}

// kLanes weights of a panel row as floats: float32 as they are, int8 widened (the scale comes at the
// end). The widening is the one per-ISA line: ATen's Vectorized has no int8 -> float32 of this width.
inline Vec load_weights(const float* w) { return Vec::loadu(w); }
inline Vec load_weights(const int8_t* w) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w))));
#else
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w))));
#endif
}

// y[r, 0:cols] = (x[r] . panel) * scale + bias, then GELU if GELU, for ROWS rows of x (row stride k)
// and y (row stride ldy); scale and bias may be null
template <int ROWS, bool GELU, typename W>
void panel_block(const float* x, int64_t k, const W* panel, const float* scale, const float* bias, float* y,
                 int64_t ldy, int64_t cols) {
  constexpr int64_t row_bytes = kPanel * sizeof(W);
  // independent partial sums: with one or two rows, the FMA latency chain through each accumulator,
  // not the memory, would bound the loop (int8 rows are only 24-48 bytes)
  constexpr int kBanks = ROWS == 1 ? 4 : ROWS == 2 ? 2 : 1;
  const char* bytes = reinterpret_cast<const char*>(panel);
  Vec acc[kBanks][ROWS][kVectors];
  for (int bank = 0; bank < kBanks; ++bank)
    for (int r = 0; r < ROWS; ++r)
      for (int v = 0; v < kVectors; ++v) acc[bank][r][v] = Vec(0.0f);
  const auto step = [&](int64_t i, Vec (&sums)[ROWS][kVectors]) {
    for (int64_t line = 0; line < row_bytes; line += 64) {
      _mm_prefetch(bytes + i * row_bytes + kPrefetchL2 + line, _MM_HINT_T1);
      _mm_prefetch(bytes + i * row_bytes + kPrefetchL1 + line, _MM_HINT_T0);
    }
    Vec w[kVectors];
    for (int v = 0; v < kVectors; ++v) w[v] = load_weights(panel + i * kPanel + kLanes * v);
    for (int r = 0; r < ROWS; ++r) {
      const Vec xr(x[r * k + i]);
      for (int v = 0; v < kVectors; ++v) sums[r][v] = at::vec::fmadd(xr, w[v], sums[r][v]);
    }
  };
  int64_t i = 0;
  for (; i + kBanks <= k; i += kBanks)
    for (int bank = 0; bank < kBanks; ++bank) step(i + bank, acc[bank]);
  for (; i < k; ++i) step(i, acc[0]);
  for (int bank = 1; bank < kBanks; ++bank)
    for (int r = 0; r < ROWS; ++r)
      for (int v = 0; v < kVectors; ++v) acc[0][r][v] = acc[0][r][v] + acc[bank][r][v];
  for (int v = 0; v < kVectors; ++v) {  // the last panel is partial: masked stores
    const int64_t left = std::min(kLanes, cols - kLanes * v);
    if (left <= 0) break;
    const Vec s = scale ? Vec::loadu(scale + kLanes * v) : Vec(1.0f);
    const Vec b = bias ? Vec::loadu(bias + kLanes * v) : Vec(0.0f);
    for (int r = 0; r < ROWS; ++r) {
      const Vec out = at::vec::fmadd(acc[0][r][v], s, b);
      (GELU ? gelu_tanh(out) : out).store(y + r * ldy + kLanes * v, left);
    }
  }
}

template <typename W>
using BlockFn = void (*)(const float*, int64_t, const W*, const float*, const float*, float*, int64_t, int64_t);

// panel_block<1..kRows> by row count
template <typename W, bool GELU, size_t... R>
constexpr std::array<BlockFn<W>, kRows> block_table(std::index_sequence<R...>) {
  return {panel_block<R + 1, GELU, W>...};
}
template <typename W, bool GELU>
constexpr auto kBlocks = block_table<W, GELU>(std::make_index_sequence<kRows>());

template <typename W>
void run_panels(const float* x, int64_t rows, int64_t k, const W* panels, int64_t num_panels, const float* scale,
                const float* bias, float* y, int64_t n, bool gelu) {
  const auto& blocks = gelu ? kBlocks<W, true> : kBlocks<W, false>;
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

// x (..., K) float32; panels from pack() of float32 or int8 weights (int8: with their padded scales); bias: None
// or zero-padded like the panels; returns (..., n), GELU applied if gelu
at::Tensor linear(const at::Tensor& x, const at::Tensor& panels, const std::optional<at::Tensor>& scales,
                  const std::optional<at::Tensor>& bias, int64_t n, bool gelu) {
  const int64_t k = panels.size(1), num_panels = panels.size(0), padded = num_panels * kPanel;
  const bool int8 = panels.scalar_type() == at::kChar;
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.size(-1) == k, "linear: float32 input of width ", k);
  TORCH_CHECK(panels.is_contiguous() && panels.dim() == 3 && panels.size(2) == kPanel && n <= padded &&
              (int8 || panels.scalar_type() == at::kFloat), "linear: float32 or int8 panels from this library's pack()");
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
// D must be a multiple of 16 on every variant, so that callers have one rule.
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
  const int64_t vectors = dim / kLanes;
  constexpr int64_t kOut = 64 / kLanes;  // head sizes up to 64 accumulate in registers; larger ones in passes
  at::parallel_for(0, rows * heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores((max_len + kLanes - 1) / kLanes * kLanes);
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
        // the rows' caches were evicted by a whole step of weights: fetch keys ahead, values too
        for (int64_t line = 0; line < dim; line += 16) {
          _mm_prefetch(reinterpret_cast<const char*>(keys + (j + 8) * dim + line), _MM_HINT_T0);
          _mm_prefetch(reinterpret_cast<const char*>(values + j * dim + line), _MM_HINT_T1);
        }
        Vec acc(0.0f);
        for (int64_t c = 0; c < vectors; ++c)
          acc = at::vec::fmadd(Vec::loadu(qp + kLanes * c), Vec::loadu(keys + j * dim + kLanes * c), acc);
        scores[j] = acc.reduce_add() * scale;
        best = std::max(best, scores[j]);
      }
      // softmax in whole vectors: the slots past `last` hold -inf, whose exp_u20 is exactly 0
      std::fill(scores.begin() + last + 1, scores.begin() + (last + kLanes) / kLanes * kLanes, -INFINITY);
      Vec sums(0.0f);
      for (int64_t j = 0; j <= last; j += kLanes) {
        const Vec e = (Vec::loadu(scores.data() + j) - Vec(best)).exp_u20();
        e.store(scores.data() + j);
        sums = sums + e;
      }
      const Vec norm(1.0f / sums.reduce_add());
      Vec out[kOut];
      float* yp = y.data_ptr<float>() + (b * heads + h) * dim;
      for (int64_t c0 = 0; c0 < vectors; c0 += kOut) {
        const int64_t width = std::min(kOut, vectors - c0);
        for (int64_t c = 0; c < width; ++c) out[c] = Vec(0.0f);
        for (int64_t j = 0; j <= last; ++j) {
          const Vec weight(scores[j]);
          for (int64_t c = 0; c < width; ++c)
            out[c] = at::vec::fmadd(weight, Vec::loadu(values + j * dim + kLanes * (c0 + c)), out[c]);
        }
        for (int64_t c = 0; c < width; ++c) (out[c] * norm).store(yp + kLanes * (c0 + c));
      }
    }
  });
  return y.transpose(1, 2);
}

// decode_blocks: one decode step through every block of a pre-LayerNorm GPT (GPT-2), one new token per
// row: model.Block.forward with the kernels above, in one call, so no Python runs per layer (that
// costs ~2 ms of a 12-layer step). Each block comes as kBlockTensors tensors in the order of
// BlockTensor, empty where absent (no bias); gptlab.cpu.decode gathers them by the names that
// block_layout() returns, so this enum is the one definition of the layout.
// x: (B, C); caches: (layers, B, H, L, D).
enum BlockTensor {
  kLn1Weight, kLn1Bias,
  kQkvPanels, kQkvScales, kQkvBias,      // attn.c_attn (scales: int8 panels only)
  kProjPanels, kProjScales, kProjBias,   // attn.c_proj
  kLn2Weight, kLn2Bias,
  kFcPanels, kFcScales, kFcBias,         // mlp.c_fc, GELU folded in
  kOutPanels, kOutScales, kOutBias,      // mlp.c_proj
  kBlockTensors
};
const std::array<std::string, kBlockTensors> kBlockTensorNames = {
  "ln_1.weight", "ln_1.bias",
  "attn.c_attn.panels", "attn.c_attn.scales", "attn.c_attn.bias",
  "attn.c_proj.panels", "attn.c_proj.scales", "attn.c_proj.bias",
  "ln_2.weight", "ln_2.bias",
  "mlp.c_fc.panels", "mlp.c_fc.scales", "mlp.c_fc.bias",
  "mlp.c_proj.panels", "mlp.c_proj.scales", "mlp.c_proj.bias"};

std::vector<std::string> block_layout() { return {kBlockTensorNames.begin(), kBlockTensorNames.end()}; }

at::Tensor decode_blocks(const at::Tensor& embeddings, const std::vector<at::Tensor>& params,
                         const at::Tensor& k_caches, const at::Tensor& v_caches, const at::Tensor& positions,
                         int64_t heads, double eps) {
  TORCH_CHECK(params.size() % kBlockTensors == 0 && params.size() / kBlockTensors == size_t(k_caches.size(0)),
              "decode_blocks: ", int(kBlockTensors), " tensors per layer of the cache");
  const auto given = [](const at::Tensor& t) { return t.numel() ? std::optional<at::Tensor>(t) : std::nullopt; };
  at::Tensor x = embeddings.contiguous();
  const int64_t rows = x.size(0), width = x.size(1);
  for (int64_t layer = 0; layer < k_caches.size(0); ++layer) {
    const at::Tensor* p = params.data() + layer * kBlockTensors;
    auto h = at::layer_norm(x, {width}, given(p[kLn1Weight]), given(p[kLn1Bias]), eps);
    const auto qkv = linear(h, p[kQkvPanels], given(p[kQkvScales]), given(p[kQkvBias]), 3 * width, false)
                         .view({rows, 1, 3, heads, width / heads}).permute({2, 0, 3, 1, 4});
    const auto y = decode_attention(qkv[0], qkv[1], qkv[2], k_caches[layer], v_caches[layer], positions);
    x = x + linear(y.transpose(1, 2).reshape({rows, width}), p[kProjPanels], given(p[kProjScales]),
                   given(p[kProjBias]), width, false);
    h = at::layer_norm(x, {width}, given(p[kLn2Weight]), given(p[kLn2Bias]), eps);
    h = linear(h, p[kFcPanels], given(p[kFcScales]), given(p[kFcBias]), p[kOutPanels].size(1), true);
    x = x + linear(h, p[kOutPanels], given(p[kOutScales]), given(p[kOutBias]), width, false);
  }
  return x;
}

}  // namespace

// TORCH_LIBRARY pastes its namespace argument as written: one more macro level expands GPTLAB_NS first
#define GPTLAB_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)

GPTLAB_LIBRARY(GPTLAB_NS, m) {
  m.def("pack(Tensor weight) -> Tensor", &pack);
  m.def("linear(Tensor x, Tensor panels, Tensor? scales, Tensor? bias, int n, bool gelu=False) -> Tensor", &linear);
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor positions)"
        " -> Tensor", &decode_attention);
  m.def("block_layout() -> str[]", &block_layout);
  m.def("decode_blocks(Tensor x, Tensor[] params, Tensor(a!) k_caches, Tensor(b!) v_caches, Tensor positions,"
        " int heads, float eps) -> Tensor", &decode_blocks);
}
