// Fused CPU ops for small decode steps, where the time goes into dispatching many tiny torch ops
// (a SmolLM2 layer at batch 1 is ~40 ops of a few microseconds each) rather than into arithmetic.
//   add_rms_norm: h += delta; y = weight * (h * rsqrt(mean(h^2) + eps))   (the residual add and the
//                 next RMSNorm of a Llama layer, in HF's order of operations)
//   paged_decode_attention: one query token per sequence against its paged KV context (GQA),
//                 softmax in float32; the cache already holds the new token's k and v.
//   lora_block_apply: the LoRA deltas of a decode batch whose rows are grouped by adapter slot in
//                 one contiguous block (L rows per slot): out += (x A[slot]) B_j[slot] per
//                 sub-projection j, one op per projection instead of a shrink and an expand per
//                 sub-projection (each a batched matmul over strided views).
// float32 only; the Python side (llama.py, attention.py) uses them for float32 tensors on CPU.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& h_in, const at::Tensor& delta_in,
                                                const at::Tensor& weight, double eps) {
  TORCH_CHECK(h_in.scalar_type() == at::kFloat && delta_in.scalar_type() == at::kFloat &&
                  weight.scalar_type() == at::kFloat, "add_rms_norm: float32 tensors only");
  TORCH_CHECK(h_in.dim() == 2 && delta_in.sizes() == h_in.sizes() && weight.dim() == 1 &&
                  weight.size(0) == h_in.size(1), "add_rms_norm: h, delta [T, H] and weight [H]");
  const at::Tensor h0 = h_in.contiguous(), d = delta_in.contiguous(), w = weight.contiguous();
  const int64_t T = h0.size(0), H = h0.size(1);
  at::Tensor h = at::empty_like(h0), y = at::empty_like(h0);
  const float *hp = h0.data_ptr<float>(), *dp = d.data_ptr<float>(), *wp = w.data_ptr<float>();
  float *op = h.data_ptr<float>(), *yp = y.data_ptr<float>();
  const float feps = static_cast<float>(eps);
  at::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; t++) {
      const float* a = hp + t * H;
      const float* b = dp + t * H;
      float* o = op + t * H;
      float ss = 0.f;
#pragma omp simd reduction(+ : ss)
      for (int64_t i = 0; i < H; i++) {
        const float v = a[i] + b[i];
        o[i] = v;
        ss += v * v;
      }
      const float r = 1.0f / std::sqrt(ss / static_cast<float>(H) + feps);
      float* yr = yp + t * H;
#pragma omp simd
      for (int64_t i = 0; i < H; i++) yr[i] = wp[i] * (o[i] * r);
    }
  });
  return {h, y};
}

template <typename IDX>
void decode_attention_impl(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& tables, const at::Tensor& lens, float scale, at::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t BS = k_cache.size(1), KVH = k_cache.size(2), G = H / KVH, W = tables.size(1);
  const float* qp = q.data_ptr<float>();
  const float* kp = k_cache.data_ptr<float>();
  const float* vp = v_cache.data_ptr<float>();
  const IDX* tp = tables.data_ptr<IDX>();
  const int32_t* lp = lens.data_ptr<int32_t>();
  float* outp = out.data_ptr<float>();
  at::parallel_for(0, B * KVH, 1, [&](int64_t w0, int64_t w1) {
    std::vector<float> scores;
    for (int64_t work = w0; work < w1; work++) {
      const int64_t b = work / KVH, kh = work % KVH;
      const int64_t L = std::min<int64_t>(std::max<int32_t>(lp[b], 1), W * BS);  // padding rows: slot 0
      scores.assign(G * L, 0.f);
      for (int64_t t = 0; t < L; t++) {
        const int64_t slot = static_cast<int64_t>(tp[b * W + t / BS]) * BS + t % BS;
        const float* kr = kp + (slot * KVH + kh) * D;
        for (int64_t g = 0; g < G; g++) {
          const float* qr = qp + (b * H + kh * G + g) * D;
          float s = 0.f;
#pragma omp simd reduction(+ : s)
          for (int64_t i = 0; i < D; i++) s += qr[i] * kr[i];
          scores[g * L + t] = s * scale;
        }
      }
      for (int64_t g = 0; g < G; g++) {
        float* sc = scores.data() + g * L;
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t t = 0; t < L; t++) mx = std::max(mx, sc[t]);
        float sum = 0.f;
        for (int64_t t = 0; t < L; t++) {
          sc[t] = std::exp(sc[t] - mx);
          sum += sc[t];
        }
        const float inv = 1.0f / sum;
        for (int64_t t = 0; t < L; t++) sc[t] *= inv;
        float* o = outp + (b * H + kh * G + g) * D;
        std::fill(o, o + D, 0.f);
      }
      for (int64_t t = 0; t < L; t++) {
        const int64_t slot = static_cast<int64_t>(tp[b * W + t / BS]) * BS + t % BS;
        const float* vr = vp + (slot * KVH + kh) * D;
        for (int64_t g = 0; g < G; g++) {
          const float p = scores[g * L + t];
          float* o = outp + (b * H + kh * G + g) * D;
#pragma omp simd
          for (int64_t i = 0; i < D; i++) o[i] += p * vr[i];
        }
      }
    }
  });
}

at::Tensor paged_decode_attention(const at::Tensor& q_in, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& block_tables, const at::Tensor& context_lens, double scale) {
  TORCH_CHECK(q_in.scalar_type() == at::kFloat && k_cache.scalar_type() == at::kFloat &&
                  v_cache.scalar_type() == at::kFloat, "paged_decode_attention: float32 only");
  TORCH_CHECK(q_in.dim() == 3 && k_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.is_contiguous() &&
                  k_cache.sizes() == v_cache.sizes() && k_cache.size(3) == q_in.size(2) &&
                  q_in.size(1) % k_cache.size(2) == 0,
              "paged_decode_attention: q [B, H, D], caches [blocks, block_size, kv_heads, D] with H % kv_heads == 0");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == q_in.size(0) && context_lens.dim() == 1 &&
                  context_lens.size(0) == q_in.size(0) && context_lens.scalar_type() == at::kInt,
              "paged_decode_attention: block_tables [B, W], context_lens int32 [B]");
  const at::Tensor q = q_in.contiguous(), tables = block_tables.contiguous(), lens = context_lens.contiguous();
  at::Tensor out = at::empty(q.sizes(), q.options());
  if (q.size(0) == 0) return out;
  if (tables.scalar_type() == at::kInt) {
    decode_attention_impl<int32_t>(q, k_cache, v_cache, tables, lens, static_cast<float>(scale), out);
  } else {
    TORCH_CHECK(tables.scalar_type() == at::kLong, "paged_decode_attention: block_tables int32 or int64");
    decode_attention_impl<int64_t>(q, k_cache, v_cache, tables, lens, static_cast<float>(scale), out);
  }
  return out;
}

// The LoRA loops keep an [LR rows x CW columns] tile of sums in registers (AVX-512; elsewhere a
// small array the compiler vectorizes) while streaming each weight row once. With the sums in
// memory, their loads and stores over the short rows (16-48 columns) were the limit, not the
// weights: 149 MB of 8 rank-16 adapters took 23.5 ms on one core, now 18.5 (10 GB/s is the floor).

// dst[r, 0:CW] = (add ? dst[r, 0:CW] : 0) + sum_t s[r, t] w[t, 0:CW]   for the LR rows r.
// The shrink is this with s = x, w = A (t over the input features); each expand with s = the
// shrunk columns of its sub-projection, w = B_j (t over the rank), added onto out.
template <int LR, int CW>
inline void tile_update(const float* s, int64_t lds, const float* w, int64_t ldw, int64_t T, float* dst,
                        int64_t ldd, bool add) {
#if defined(__AVX512F__)
  if constexpr (CW % 16 == 0) {
    constexpr int NV = CW / 16;
    __m512 acc[LR][NV];
    for (int r = 0; r < LR; r++)
      for (int v = 0; v < NV; v++) acc[r][v] = add ? _mm512_loadu_ps(dst + r * ldd + 16 * v) : _mm512_setzero_ps();
    for (int64_t t = 0; t < T; t++) {
      const float* row = w + t * ldw;
      __m512 wv[NV];
      for (int v = 0; v < NV; v++) wv[v] = _mm512_loadu_ps(row + 16 * v);
      for (int r = 0; r < LR; r++) {
        const __m512 sv = _mm512_set1_ps(s[r * lds + t]);
        for (int v = 0; v < NV; v++) acc[r][v] = _mm512_fmadd_ps(sv, wv[v], acc[r][v]);
      }
    }
    for (int r = 0; r < LR; r++)
      for (int v = 0; v < NV; v++) _mm512_storeu_ps(dst + r * ldd + 16 * v, acc[r][v]);
    return;
  }
#endif
  float acc[LR][CW];
  for (int r = 0; r < LR; r++)
    for (int c = 0; c < CW; c++) acc[r][c] = add ? dst[r * ldd + c] : 0.f;
  for (int64_t t = 0; t < T; t++) {
    const float* row = w + t * ldw;
    for (int r = 0; r < LR; r++) {
      const float sv = s[r * lds + t];
#pragma omp simd
      for (int c = 0; c < CW; c++) acc[r][c] += sv * row[c];
    }
  }
  for (int r = 0; r < LR; r++)
    for (int c = 0; c < CW; c++) dst[r * ldd + c] = acc[r][c];
}

// Columns [0, width) in tiles of 64, then one of 48/32/16, then single columns.
template <typename Tile1>
inline void over_columns(int64_t width, Tile1&& tile) {
  int64_t c0 = 0;
  for (; c0 + 64 <= width; c0 += 64) tile(std::integral_constant<int, 64>{}, c0);
  const int64_t rest = width - c0;
  if (rest >= 48) { tile(std::integral_constant<int, 48>{}, c0); c0 += 48; }
  else if (rest >= 32) { tile(std::integral_constant<int, 32>{}, c0); c0 += 32; }
  else if (rest >= 16) { tile(std::integral_constant<int, 16>{}, c0); c0 += 16; }
  for (; c0 < width; c0++) tile(std::integral_constant<int, 1>{}, c0);
}

template <int LR>
void lora_rows(const float* x, int64_t ldx, float* out, int64_t ldo, const float* a, int64_t in, int64_t nR,
               const std::vector<const float*>& bs, const std::vector<int64_t>& bw, at::IntArrayRef offsets, int64_t R,
               float* xa) {
  over_columns(nR, [&](auto cw, int64_t c0) {   // shrink: xa = x A
    tile_update<LR, decltype(cw)::value>(x, ldx, a + c0, nR, in, xa + c0, nR, false);
  });
  for (size_t j = 0; j < bs.size(); j++) {       // expand: out[:, off_j:] += xa[:, jR:(j+1)R] B_j
    const int64_t w = bw[j];
    float* o = out + offsets[j];
    over_columns(w, [&](auto cw, int64_t c0) {
      tile_update<LR, decltype(cw)::value>(xa + j * R, nR, bs[j] + c0, w, R, o + c0, ldo, true);
    });
  }
}

void lora_block_apply(const at::Tensor& x, at::Tensor& out, const at::Tensor& A, at::TensorList Bs,
                      at::IntArrayRef offsets, int64_t s0, int64_t n, int64_t L, int64_t R) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && out.scalar_type() == at::kFloat && A.scalar_type() == at::kFloat,
              "lora_block_apply: float32 only");
  TORCH_CHECK(x.dim() == 2 && out.dim() == 2 && x.size(0) == n * L && out.size(0) == n * L && x.stride(1) == 1 &&
                  out.stride(1) == 1, "lora_block_apply: x [n*L, in] and out [n*L, out] with unit column stride");
  TORCH_CHECK(A.dim() == 3 && A.is_contiguous() && A.size(1) == x.size(1) && A.size(2) == R * (int64_t)Bs.size() &&
                  s0 >= 0 && s0 + n <= A.size(0), "lora_block_apply: A [slots, in, n_sub * R] covering the slots");
  TORCH_CHECK(offsets.size() == Bs.size(), "lora_block_apply: one column offset per B");
  for (size_t j = 0; j < Bs.size(); j++)
    TORCH_CHECK(Bs[j].scalar_type() == at::kFloat && Bs[j].dim() == 3 && Bs[j].is_contiguous() &&
                    Bs[j].size(0) == A.size(0) && Bs[j].size(1) == R && offsets[j] + Bs[j].size(2) <= out.size(1),
                "lora_block_apply: B [slots, R, out_j] inside out's columns");
  const int64_t in = x.size(1), nR = A.size(2), ldx = x.stride(0), ldo = out.stride(0);
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float* ap = A.data_ptr<float>();
  at::parallel_for(0, n, 1, [&](int64_t g0, int64_t g1) {
    std::vector<float> xa(4 * nR);
    for (int64_t g = g0; g < g1; g++) {
      std::vector<const float*> bs;
      std::vector<int64_t> bw;
      for (const auto& b : Bs) {
        bs.push_back(b.data_ptr<float>() + (s0 + g) * R * b.size(2));
        bw.push_back(b.size(2));
      }
      const float* a = ap + (s0 + g) * in * nR;
      for (int64_t r0 = 0; r0 < L; r0 += 4) {   // rows of this slot, up to 4 at a time
        const float* xr = xp + (g * L + r0) * ldx;
        float* orow = op + (g * L + r0) * ldo;
        switch (std::min<int64_t>(4, L - r0)) {
          case 1: lora_rows<1>(xr, ldx, orow, ldo, a, in, nR, bs, bw, offsets, R, xa.data()); break;
          case 2: lora_rows<2>(xr, ldx, orow, ldo, a, in, nR, bs, bw, offsets, R, xa.data()); break;
          case 3: lora_rows<3>(xr, ldx, orow, ldo, a, in, nR, bs, bw, offsets, R, xa.data()); break;
          default: lora_rows<4>(xr, ldx, orow, ldo, a, in, nR, bs, bw, offsets, R, xa.data()); break;
        }
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(switchyard, m) {
  m.def("add_rms_norm(Tensor h, Tensor delta, Tensor weight, float eps) -> (Tensor, Tensor)", &add_rms_norm);
  m.def("paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
        "Tensor context_lens, float scale) -> Tensor", &paged_decode_attention);
  m.def("lora_block_apply(Tensor x, Tensor(a!) out, Tensor A, Tensor[] Bs, int[] offsets, int s0, int n, int L, "
        "int R) -> ()", &lora_block_apply);
}
