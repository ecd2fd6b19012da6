// y = x W^T + b for a few rows of x (batched decoding), streaming each weight once at memory speed.
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

namespace {

constexpr int64_t kVectors = 3;                // AVX-512 vectors of 16 floats per panel row
constexpr int64_t kPanel = 16 * kVectors;      // output columns per panel
constexpr int64_t kRows = 8;                   // rows of x per register block (24 accumulators)
constexpr int64_t kPrefetch = 64 * 32 / kPanel;  // panel rows ahead: ~2 KiB in flight per thread

// (N, K) -> (ceil(N / 48), K, 48), zero-padded columns
at::Tensor pack(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kFloat, "pack: a float32 matrix");
  const int64_t n = weight.size(0), k = weight.size(1), panels = (n + kPanel - 1) / kPanel;
  auto padded = at::zeros({panels * kPanel, k}, weight.options());
  padded.narrow(0, 0, n).copy_(weight);
  return padded.view({panels, kPanel, k}).transpose(1, 2).contiguous();
}

// y[r, 0:cols] = x[r] . panel (+ bias) for ROWS rows of x (row stride k) and y (row stride ldy)
template <int ROWS>
void panel_block(const float* x, int64_t k, const float* panel, const float* bias, float* y,
                 int64_t ldy, int64_t cols) {
  __m512 acc[ROWS][kVectors];
  for (int v = 0; v < kVectors; ++v) {
    const __m512 b = bias ? _mm512_loadu_ps(bias + 16 * v) : _mm512_setzero_ps();
    for (int r = 0; r < ROWS; ++r) acc[r][v] = b;
  }
  for (int64_t i = 0; i < k; ++i) {
    __m512 w[kVectors];
    for (int v = 0; v < kVectors; ++v) {
      // the hardware prefetcher restarts at every 4 KiB page; asking ahead keeps the stream full
      _mm_prefetch(reinterpret_cast<const char*>(panel + (i + kPrefetch) * kPanel + 16 * v), _MM_HINT_T2);
      w[v] = _mm512_load_ps(panel + i * kPanel + 16 * v);
    }
    for (int r = 0; r < ROWS; ++r) {
      const __m512 xr = _mm512_set1_ps(x[r * k + i]);
      for (int v = 0; v < kVectors; ++v) acc[r][v] = _mm512_fmadd_ps(xr, w[v], acc[r][v]);
    }
  }
  for (int v = 0; v < kVectors; ++v) {  // the last panel is partial: masked stores
    const int64_t left = cols - 16 * v;
    const __mmask16 mask = left >= 16 ? 0xFFFF : left <= 0 ? 0 : (1u << left) - 1;
    for (int r = 0; r < ROWS; ++r) _mm512_mask_storeu_ps(y + r * ldy + 16 * v, mask, acc[r][v]);
  }
}

using BlockFn = void (*)(const float*, int64_t, const float*, const float*, float*, int64_t, int64_t);
constexpr BlockFn kBlocks[kRows] = {panel_block<1>, panel_block<2>, panel_block<3>, panel_block<4>,
                                    panel_block<5>, panel_block<6>, panel_block<7>, panel_block<8>};

// x (..., K) float32, panels from pack(), bias: None or (panels * 48) zero-padded; returns (..., n)
at::Tensor linear(const at::Tensor& x, const at::Tensor& panels, const std::optional<at::Tensor>& bias,
                  int64_t n) {
  const int64_t k = panels.size(1), num_panels = panels.size(0);
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.size(-1) == k, "linear: float32 input of width ", k);
  TORCH_CHECK(panels.is_contiguous() && n <= num_panels * kPanel, "linear: panels from pack()");
  TORCH_CHECK(!bias || (bias->is_contiguous() && bias->numel() == num_panels * kPanel), "linear: padded bias");
  const auto rows_x = x.reshape({-1, k}).contiguous();
  const int64_t rows = rows_x.size(0);
  auto sizes = x.sizes().vec();
  sizes.back() = n;
  auto y = at::empty({rows, n}, x.options());
  const float* xp = rows_x.data_ptr<float>();
  const float* wp = panels.data_ptr<float>();
  const float* bp = bias ? bias->data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  // threads split the panels: each streams its own contiguous part of the weights
  at::parallel_for(0, num_panels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t col = p * kPanel, cols = std::min(kPanel, n - col);
      for (int64_t r = 0; r < rows; r += kRows) {  // later row blocks find the panel in cache
        const int64_t block = std::min(kRows, rows - r);
        kBlocks[block - 1](xp + r * k, k, wp + p * k * kPanel, bp ? bp + col : nullptr, yp + r * n + col, n, cols);
      }
    }
  });
  return y.view(sizes);
}

}  // namespace

TORCH_LIBRARY(gptlab_cpu, m) {
  m.def("pack(Tensor weight) -> Tensor", &pack);
  m.def("linear(Tensor x, Tensor panels, Tensor? bias, int n) -> Tensor", &linear);
}
