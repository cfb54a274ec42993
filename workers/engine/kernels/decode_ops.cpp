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

#include <algorithm>
#include <cmath>
#include <limits>
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
  std::vector<const float*> bp;
  std::vector<int64_t> bw;
  for (const auto& b : Bs) { bp.push_back(b.data_ptr<float>()); bw.push_back(b.size(2)); }
  at::parallel_for(0, n, 1, [&](int64_t g0, int64_t g1) {
    std::vector<float> xa(L * nR);
    for (int64_t g = g0; g < g1; g++) {
      const float* a = ap + (s0 + g) * in * nR;
      std::fill(xa.begin(), xa.end(), 0.f);
      for (int64_t i = 0; i < in; i++) {         // shrink: xa[r] = x[r] A (A's rows read once for L rows)
        const float* arow = a + i * nR;
        for (int64_t r = 0; r < L; r++) {
          const float xv = xp[(g * L + r) * ldx + i];
          float* dst = xa.data() + r * nR;
#pragma omp simd
          for (int64_t c = 0; c < nR; c++) dst[c] += xv * arow[c];
        }
      }
      for (size_t j = 0; j < bp.size(); j++) {    // expand: out[r, off_j:] += xa[r, jR:(j+1)R] B_j
        const int64_t w = bw[j];
        const float* b = bp[j] + (s0 + g) * R * w;
        for (int64_t k = 0; k < R; k++) {
          const float* brow = b + k * w;
          for (int64_t r = 0; r < L; r++) {
            const float coef = xa[r * nR + j * R + k];
            float* orow = op + (g * L + r) * ldo + offsets[j];
#pragma omp simd
            for (int64_t c = 0; c < w; c++) orow[c] += coef * brow[c];
          }
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
