// y = x @ W^T for W stored in llama.cpp's GGUF block formats, without dequantizing W to memory.
//
// Small-batch CPU decode is bound by reading the weights: an fp32 copy of a Q4_1 model is 6.4x
// the bytes of the blocks it came from. These kernels read the blocks (rows may be permuted and
// concatenated, a block never is) with each block's fp16 scales widened to float32 beside the
// quants (block_weights.py repacks them: broadcasting a float from memory costs no shuffle, and
// converting fp16 per block made the shuffle port the bottleneck), dequantize each block in registers
// with gguf's own float32 arithmetic (Q4_1: w = (d * q) + m, q in 0..15; Q8_0: w = d * q, q int8;
// built with -ffp-contract=off so no FMA changes a rounding) and multiply-accumulate against x.
// The weights are therefore exactly the fp32 path's; only the summation order differs.
// Built at install time by workers/engine/kernels/build.py; used only for a few rows (decode).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#if defined(__AVX512F__)
#include <immintrin.h>
#define SY_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define SY_AVX2 1
#endif

namespace {

constexpr int64_t QK = 32;            // weights per block (both formats)
// Per block: quant bytes in `qs` and float32 scales in `sc` (Q4_1: d, m; Q8_0: d).
template <bool HAS_MIN> constexpr int64_t QBYTES = HAS_MIN ? 16 : 32;
template <bool HAS_MIN> constexpr int64_t NSCALES = HAS_MIN ? 2 : 1;
constexpr int64_t ROWS = 4;           // activation rows per pass (accumulators stay in registers)
constexpr int64_t TILE = 16;          // output rows whose blocks are reused across row passes

#if defined(SY_AVX2)
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

// The 32 weights of one block, dequantized in registers exactly as gguf does it in float32:
// (d * q) + m for Q4_1 (no fused multiply-add: the same roundings), d * q for Q8_0.
#if defined(SY_AVX512)
template <bool HAS_MIN>
inline void dequant(const uint8_t* blk, const float* sc, __m512& w0, __m512& w1) {
  const __m512 vd = _mm512_set1_ps(sc[0]);
  if constexpr (HAS_MIN) {
    const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk)));
    const __m512 vm = _mm512_set1_ps(sc[1]);
    w0 = _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(0x0f))), vd), vm);
    w1 = _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4)), vd), vm);   // high nibbles
  } else {
    w0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk)))), vd);
    w1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 16)))), vd);
  }
}
#elif defined(SY_AVX2)
template <bool HAS_MIN>
inline void dequant(const uint8_t* blk, const float* sc, __m256 w[4]) {
  const __m256 vd = _mm256_set1_ps(sc[0]);
  __m256i q[4];
  if constexpr (HAS_MIN) {
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk));
    const __m128i lo = _mm_and_si128(raw, _mm_set1_epi8(0x0f));
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), _mm_set1_epi8(0x0f));
    q[0] = _mm256_cvtepu8_epi32(lo);
    q[1] = _mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8));
    q[2] = _mm256_cvtepu8_epi32(hi);
    q[3] = _mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8));
    const __m256 vm = _mm256_set1_ps(sc[1]);
    for (int i = 0; i < 4; i++) w[i] = _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(q[i]), vd), vm);
  } else {
    const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk));
    const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 16));
    q[0] = _mm256_cvtepi8_epi32(a);
    q[1] = _mm256_cvtepi8_epi32(_mm_srli_si128(a, 8));
    q[2] = _mm256_cvtepi8_epi32(c);
    q[3] = _mm256_cvtepi8_epi32(_mm_srli_si128(c, 8));
    for (int i = 0; i < 4; i++) w[i] = _mm256_mul_ps(_mm256_cvtepi32_ps(q[i]), vd);
  }
}
#endif

// One output row (its nb blocks) against R activation rows. Several independent accumulators per
// activation row keep the FMA latency chain off the critical path.
template <int R, bool HAS_MIN>
void block_row(const float* x, int64_t ldx, int64_t nb, const uint8_t* qrow, const float* srow,
               float* y, int64_t ldy) {
  constexpr int64_t QB = QBYTES<HAS_MIN>, NS = NSCALES<HAS_MIN>;
#if defined(SY_AVX512)
  __m512 a0[R], a1[R], a2[R], a3[R];
  for (int r = 0; r < R; r++) a0[r] = a1[r] = a2[r] = a3[r] = _mm512_setzero_ps();
  int64_t b = 0;
  for (; b + 1 < nb; b += 2) {
    __m512 w0, w1, w2, w3;
    dequant<HAS_MIN>(qrow + b * QB, srow + b * NS, w0, w1);
    dequant<HAS_MIN>(qrow + (b + 1) * QB, srow + (b + 1) * NS, w2, w3);
    for (int r = 0; r < R; r++) {
      const float* xr = x + r * ldx + b * QK;
      a0[r] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xr), a0[r]);
      a1[r] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xr + 16), a1[r]);
      a2[r] = _mm512_fmadd_ps(w2, _mm512_loadu_ps(xr + 32), a2[r]);
      a3[r] = _mm512_fmadd_ps(w3, _mm512_loadu_ps(xr + 48), a3[r]);
    }
  }
  if (b < nb) {
    __m512 w0, w1;
    dequant<HAS_MIN>(qrow + b * QB, srow + b * NS, w0, w1);
    for (int r = 0; r < R; r++) {
      const float* xr = x + r * ldx + b * QK;
      a0[r] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xr), a0[r]);
      a1[r] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xr + 16), a1[r]);
    }
  }
  for (int r = 0; r < R; r++)
    y[r * ldy] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0[r], a1[r]), _mm512_add_ps(a2[r], a3[r])));
#elif defined(SY_AVX2)
  __m256 acc[R][4];
  for (int r = 0; r < R; r++)
    for (int i = 0; i < 4; i++) acc[r][i] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; b++) {
    __m256 w[4];
    dequant<HAS_MIN>(qrow + b * QB, srow + b * NS, w);
    for (int r = 0; r < R; r++) {
      const float* xr = x + r * ldx + b * QK;
      for (int i = 0; i < 4; i++) acc[r][i] = _mm256_fmadd_ps(w[i], _mm256_loadu_ps(xr + 8 * i), acc[r][i]);
    }
  }
  for (int r = 0; r < R; r++)
    y[r * ldy] = hsum(_mm256_add_ps(_mm256_add_ps(acc[r][0], acc[r][1]), _mm256_add_ps(acc[r][2], acc[r][3])));
#else
  float acc[R];
  for (int r = 0; r < R; r++) acc[r] = 0.f;
  float w[QK];
  for (int64_t b = 0; b < nb; b++) {
    const uint8_t* blk = qrow + b * QB;
    const float d = srow[b * NS];
    if constexpr (HAS_MIN) {
      const float m = srow[b * NS + 1];
      for (int j = 0; j < 16; j++) {
        w[j] = d * float(blk[j] & 0x0f) + m;
        w[j + 16] = d * float(blk[j] >> 4) + m;
      }
    } else {
      for (int j = 0; j < QK; j++) w[j] = d * float(static_cast<int8_t>(blk[j]));
    }
    for (int r = 0; r < R; r++) {
      const float* xr = x + r * ldx + b * QK;
      float t = 0.f;
      for (int j = 0; j < QK; j++) t += w[j] * xr[j];
      acc[r] += t;
    }
  }
  for (int r = 0; r < R; r++) y[r * ldy] = acc[r];
#endif
}

template <bool HAS_MIN>
at::Tensor block_linear(const at::Tensor& x_in, const at::Tensor& qs, const at::Tensor& sc) {
  constexpr int64_t QB = QBYTES<HAS_MIN>, NS = NSCALES<HAS_MIN>;
  TORCH_CHECK(x_in.device().is_cpu() && qs.device().is_cpu() && sc.device().is_cpu(), "block_linear: CPU tensors only");
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && x_in.dim() == 2, "block_linear: x must be float32 [M, K]");
  TORCH_CHECK(qs.scalar_type() == at::kByte && qs.dim() == 2 && qs.is_contiguous(),
              "block_linear: qs must be contiguous uint8 [N, K / 32 * ", QB, "]");
  TORCH_CHECK(sc.scalar_type() == at::kFloat && sc.is_contiguous() && sc.numel() == qs.size(0) * (qs.size(1) / QB) * NS,
              "block_linear: scales must be contiguous float32 with ", NS, " per block");
  const at::Tensor x = x_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = qs.size(0);
  TORCH_CHECK(K % QK == 0 && qs.size(1) == (K / QK) * QB,
              "block_linear: K=", K, " does not match the weight's ", qs.size(1), " quant bytes per row");
  const int64_t nb = K / QK;
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  const float* xp = x.data_ptr<float>();
  const uint8_t* qp = qs.data_ptr<uint8_t>();
  const float* sp = sc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, 32, [&](int64_t n0, int64_t n1) {
    // Tiles of output rows: a tile's blocks (a few KB) stay in L1 while every chunk of activation
    // rows passes over them, so the weights are read from memory once per call, not once per chunk.
    for (int64_t t0 = n0; t0 < n1; t0 += TILE) {
      const int64_t t1 = std::min(n1, t0 + TILE);
      for (int64_t r0 = 0; r0 < M; r0 += ROWS) {
        const int64_t rows = std::min<int64_t>(ROWS, M - r0);
        const float* xr = xp + r0 * K;
        for (int64_t n = t0; n < t1; n++) {
          const uint8_t* qrow = qp + n * nb * QB;
          const float* srow = sp + n * nb * NS;
          float* yr = yp + r0 * N + n;
          switch (rows) {
            case 1: block_row<1, HAS_MIN>(xr, K, nb, qrow, srow, yr, N); break;
            case 2: block_row<2, HAS_MIN>(xr, K, nb, qrow, srow, yr, N); break;
            case 3: block_row<3, HAS_MIN>(xr, K, nb, qrow, srow, yr, N); break;
            default: block_row<4, HAS_MIN>(xr, K, nb, qrow, srow, yr, N); break;
          }
        }
      }
    }
  });
  return y;
}

at::Tensor q4_1_linear(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& sc) {
  return block_linear<true>(x, qs, sc);
}
at::Tensor q8_0_linear(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& sc) {
  return block_linear<false>(x, qs, sc);
}

bool simd() {
#if defined(SY_AVX512) || defined(SY_AVX2)
  return true;
#else
  return false;
#endif
}

}  // namespace

TORCH_LIBRARY(switchyard, m) {
  m.def("q4_1_linear(Tensor x, Tensor qs, Tensor scales) -> Tensor", &q4_1_linear);
  m.def("q8_0_linear(Tensor x, Tensor qs, Tensor scales) -> Tensor", &q8_0_linear);
  m.def("block_linear_simd() -> bool", &simd);
}
