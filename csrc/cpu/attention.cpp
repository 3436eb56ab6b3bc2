// CPU kernels of vtw::varlen_attention and vtw::decode_attention.
//
// Both are a blocked online softmax in float32 (FlashAttention's recurrence): query rows are
// taken in blocks of kBlockQ, keys in tiles of kBlockK (converted to float32 once per tile for
// float16/bfloat16), each row keeps its running (max, sum, accumulator), and the two products
// of a tile are float32 matrix products (at::mm_out on views of the thread's buffers, so the
// CPU BLAS torch was built with does them; vectorised loops when there are few rows). Memory beyond the output is O(tile) per thread,
// never quadratic in the sequence length. Work is spread with at::parallel_for over
// (sequence, query head, query block) for varlen and over (row, KV head, key split) for
// decode, whose splits are merged by a second pass (flash-decoding, as on the GPU).
//
// Grouped-query attention reads KV head h / (Hq / Hkv); K/V are never repeated. A query that
// sees no key (an empty key sequence, or causal with more queries than keys) gets zeros, as in
// FlashAttention-2. Length tensors are read here (they live on the CPU): invalid values raise.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#include "../checks.h"

namespace vtw {
namespace {

constexpr int64_t kBlockQ = 64;   // query rows per work item (varlen)
constexpr int64_t kBlockK = 128;  // keys per tile
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// ---------------------------------------------------------------------------------------------
// Input checks (mirror vtw_kernels/_validate.py message for message).
// ---------------------------------------------------------------------------------------------

// "float32", "int64", ...: the names Python prints, so both sides raise the same message.
inline std::string dtype_name(const at::Tensor& t) {
  return std::string(c10::getDtypeNames(t.scalar_type()).first);
}

inline bool head_dim_supported(int64_t d) { return d >= 64 && d <= 256 && d % 16 == 0; }

void check_attention_common(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const char* op, bool decode) {
  const char* kname = decode ? "k_cache" : "k";
  const char* vname = decode ? "v_cache" : "v";
  const char* kv_layout = decode ? "[B, Hkv, S_cap, D]" : "[Tk, Hkv, D]";
  const int64_t kv_rank = decode ? 4 : 3;
  struct Arg {
    const char* name;
    const at::Tensor* t;
    int64_t rank;
    const char* layout;
  };
  const Arg args[3] = {{"q", &q, 3, decode ? "[B, Hq, D]" : "[T, Hq, D]"},
                       {kname, &k, kv_rank, kv_layout},
                       {vname, &v, kv_rank, kv_layout}};
  for (const Arg& a : args) {
    const at::Tensor& t = *a.t;
    TORCH_CHECK_VALUE(t.dim() == a.rank, op, ": ", a.name, " must be ", a.rank, "-D ", a.layout,
                      ", got ", t.dim(), "-D with shape ", t.sizes());
    check_float_dtype(t, op, a.name);
    check_same_device(t, q, op, a.name, "q");
    TORCH_CHECK_VALUE(t.size(-1) <= 1 || t.stride(-1) == 1, op, ": ", a.name,
                      " must have a contiguous last dimension (stride 1), got strides ", t.strides());
  }
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type(), op, ": ", kname,
                   " must have the dtype of q (", dtype_name(q), "), got ", dtype_name(k));
  TORCH_CHECK_TYPE(v.scalar_type() == q.scalar_type(), op, ": ", vname,
                   " must have the dtype of q (", dtype_name(q), "), got ", dtype_name(v));
  const int64_t D = q.size(-1);
  TORCH_CHECK_VALUE(head_dim_supported(D), op, ": head dim D = ", D,
                    " of q is not supported; expected a multiple of 16 from 64 to 256");
  TORCH_CHECK_VALUE(k.size(-1) == D && v.size(-1) == D, op, ": ", kname, " and ", vname,
                    " must have the head dim of q (", D, "), got ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK_VALUE(k.sizes() == v.sizes(), op, ": ", kname, " and ", vname,
                    " must have the same shape, got ", k.sizes(), " and ", v.sizes());
  const int64_t hq = q.size(-2), hkv = decode ? k.size(1) : k.size(-2);
  TORCH_CHECK_VALUE(hkv != 0 && hq % hkv == 0, op, ": the number of query heads (", hq,
                    ") must be a multiple of the number of KV heads (", hkv, ")");
}

void check_lens(const at::Tensor& t, const char* op, const char* name, int64_t length,
                const at::Tensor& q, const char* what) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kInt, op, ": ", name, " must be int32, got ",
                   dtype_name(t));
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == length, op, ": ", name,
                    " must be 1-D of length ", what, " = ", length, ", got shape ", t.sizes());
  check_same_device(t, q, op, name, "q");
}

// ---------------------------------------------------------------------------------------------
// The blocked online softmax shared by both ops.
// ---------------------------------------------------------------------------------------------

// Scratch of one thread: K and V tiles converted to float32 (unused for float32 inputs, which
// the GEMMs read in place) and the scores of up to `rows` query rows against one tile.
struct Scratch {
  std::vector<float> kf, vf, s;
  Scratch(int64_t D, int64_t rows) : kf(kBlockK * D), vf(kBlockK * D), s(rows * kBlockK) {}
};

// Running state of up to `rows` query rows: the query (scaled, float32), running max, sum and
// accumulator.
struct RowState {
  std::vector<float> q, m, l, acc;
  RowState(int64_t rows, int64_t D) : q(rows * D), m(rows), l(rows), acc(rows * D) {}
  void reset(int64_t rows, int64_t D) {
    std::fill(m.begin(), m.begin() + rows, kNegInf);
    std::fill(l.begin(), l.begin() + rows, 0.f);
    std::fill(acc.begin(), acc.begin() + rows * D, 0.f);
  }
};

// Loads query row `src` (D elements), scaled, into float row `dst`.
template <typename T>
inline void load_scaled(float* dst, const T* src, int64_t D, float scale) {
  for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<float>(src[d]) * scale;
}

// `nb` rows of D elements, `stride` apart, as float32: in place for float32, else converted.
template <typename T>
inline const float* tile_as_float(const T* src, int64_t stride, int64_t nb, int64_t D, float* buf,
                                  int64_t* ld) {
  if constexpr (std::is_same_v<T, float>) {
    *ld = stride;
    return src;
  } else {
    for (int64_t j = 0; j < nb; ++j)
      for (int64_t d = 0; d < D; ++d) buf[j * D + d] = static_cast<float>(src[j * stride + d]);
    *ld = D;
    return buf;
  }
}

// x[j] = exp(x[j] - mx) for j < n, where x[j] <= mx (the running max). A branch-free
// Cody-Waite reduction and a degree-6 polynomial (relative error below 2e-7, as std::exp up to
// an ulp or two), written so that the compiler vectorises the loop: std::exp is a scalar call
// and would dominate the tile (one exponential per score against 4 * D flops of products).
// Results below 2^-125 flush to 0; a NaN score stays NaN.
inline void exp_shifted(float* __restrict x, int64_t n, float mx) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;  // ln 2 = hi + lo
  for (int64_t j = 0; j < n; ++j) {
    const float t = x[j] - mx;
    int32_t k = static_cast<int32_t>(t * kLog2e - 0.5f);  // round(t / ln 2), as t <= 0
    const int32_t under = k < -125;
    k = under ? -125 : k;
    const float kf = static_cast<float>(k);
    const float r = (t - kf * kLn2Hi) - kf * kLn2Lo;  // |r| <= ln(2) / 2
    float p = 1.f / 720.f;
    p = p * r + 1.f / 120.f;
    p = p * r + 1.f / 24.f;
    p = p * r + 1.f / 6.f;
    p = p * r + 0.5f;
    p = p * r + 1.f;
    p = p * r + 1.f;
    const int32_t bits = ((k + 127) << 23) & (under - 1);  // 2^k, or +0.0f when under
    float scale;
    std::memcpy(&scale, &bits, sizeof(float));
    x[j] = p * scale;
  }
}

// Row-major [rows, cols] float matrix at `p` with leading dimension `ld`, as a tensor view.
inline at::Tensor view2d(const float* p, int64_t rows, int64_t cols, int64_t ld) {
  return at::from_blob(const_cast<float*>(p), {rows, cols}, {ld, 1}, at::TensorOptions().dtype(at::kFloat));
}

// Rows from which a tile's products go to at::mm_out; below, plain loops the compiler
// vectorises (a decode step has only the few query heads of one group, where the per-call cost
// of a matrix product would dominate).
constexpr int64_t kMinRowsForMatmul = 8;

// Folds keys 0 .. max(limit)-1 of one KV head into the state of `nq` rows; row i sees keys
// j < limit[i]. Keys are rows of `k`/`v` `k_stride`/`v_stride` elements apart; nothing at or past
// max(limit) is read.
template <typename T>
void attend(RowState& st, int64_t nq, const int64_t* limit, const T* k, int64_t k_stride,
            const T* v, int64_t v_stride, int64_t D, Scratch& sc) {
  int64_t n_keys = 0;
  for (int64_t i = 0; i < nq; ++i) n_keys = std::max(n_keys, limit[i]);
  if (n_keys == 0) return;
  const bool matmul = nq >= kMinRowsForMatmul;
  float* s = sc.s.data();
  const at::Tensor q_view = matmul ? view2d(st.q.data(), nq, D, D) : at::Tensor();
  at::Tensor acc_view = matmul ? view2d(st.acc.data(), nq, D, D) : at::Tensor();
  for (int64_t j0 = 0; j0 < n_keys; j0 += kBlockK) {
    const int64_t nb = std::min(kBlockK, n_keys - j0);
    int64_t ldv = 0;
    const float* vf = tile_as_float(v + j0 * v_stride, v_stride, nb, D, sc.vf.data(), &ldv);
    // Scores s[i][j] = q_i . k_j.
    if (matmul) {
      int64_t ldk = 0;
      const float* kf = tile_as_float(k + j0 * k_stride, k_stride, nb, D, sc.kf.data(), &ldk);
      at::Tensor s_view = view2d(s, nq, nb, kBlockK);
      at::mm_out(s_view, q_view, view2d(kf, nb, D, ldk).t());
    } else {
      float* kt = sc.kf.data();  // the tile transposed, [D][kBlockK], for loops over keys
      for (int64_t j = 0; j < nb; ++j) {
        const T* kr = k + (j0 + j) * k_stride;
        for (int64_t d = 0; d < D; ++d) kt[d * kBlockK + j] = static_cast<float>(kr[d]);
      }
      for (int64_t i = 0; i < nq; ++i) {
        float* si = s + i * kBlockK;
        const float* qi = st.q.data() + i * D;
        std::fill(si, si + nb, 0.f);
        for (int64_t d = 0; d < D; ++d) {
          const float qd = qi[d];
          const float* ktd = kt + d * kBlockK;
          for (int64_t j = 0; j < nb; ++j) si[j] += qd * ktd[j];
        }
      }
    }
    // Online softmax, row by row; masked scores become probabilities 0.
    for (int64_t i = 0; i < nq; ++i) {
      float* si = s + i * kBlockK;
      const int64_t vis = std::clamp<int64_t>(limit[i] - j0, 0, nb);  // keys of this tile row i sees
      if (vis == 0) {
        std::fill(si, si + nb, 0.f);
        continue;
      }
      float mx = st.m[i];
      for (int64_t j = 0; j < vis; ++j) mx = std::max(mx, si[j]);
      const float alpha = st.m[i] == kNegInf ? 0.f : std::exp(st.m[i] - mx);
      exp_shifted(si, vis, mx);
      float sum = 0.f;
      for (int64_t j = 0; j < vis; ++j) sum += si[j];
      std::fill(si + vis, si + nb, 0.f);
      st.l[i] = st.l[i] * alpha + sum;
      st.m[i] = mx;
      if (alpha != 1.f) {
        float* ai = st.acc.data() + i * D;
        for (int64_t d = 0; d < D; ++d) ai[d] *= alpha;
      }
    }
    // acc[i] += sum_j p[i][j] v_j.
    if (matmul) {
      acc_view.addmm_(view2d(s, nq, nb, kBlockK), view2d(vf, nb, D, ldv));
    } else {
      for (int64_t i = 0; i < nq; ++i) {
        const float* si = s + i * kBlockK;
        float* ai = st.acc.data() + i * D;
        for (int64_t j = 0; j < nb; ++j) {
          const float p = si[j];
          const float* vj = vf + j * ldv;
          for (int64_t d = 0; d < D; ++d) ai[d] += p * vj[d];
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// varlen_attention
// ---------------------------------------------------------------------------------------------

template <typename T>
void varlen_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                   const std::vector<int64_t>& cq, const std::vector<int64_t>& ck, float scale,
                   bool causal) {
  const int64_t Hq = q.size(1), Hkv = k.size(1), D = q.size(2), group = Hq / Hkv;
  const int64_t B = static_cast<int64_t>(cq.size()) - 1;
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const int64_t sq0 = q.stride(0), sq1 = q.stride(1), sk0 = k.stride(0), sk1 = k.stride(1);
  const int64_t sv0 = v.stride(0), sv1 = v.stride(1), so0 = out.stride(0), so1 = out.stride(1);

  // Work items: (sequence, head, first query row of the block).
  struct Item {
    int64_t b, h, r0;
  };
  std::vector<Item> items;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t lq = cq[b + 1] - cq[b];
    for (int64_t h = 0; h < Hq; ++h)
      for (int64_t r0 = 0; r0 < lq; r0 += kBlockQ) items.push_back({b, h, r0});
  }
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t i0, int64_t i1) {
    Scratch sc(D, kBlockQ);
    RowState st(kBlockQ, D);
    int64_t limit[kBlockQ];
    for (int64_t it = i0; it < i1; ++it) {
      const auto [b, h, r0] = items[it];
      const int64_t lq = cq[b + 1] - cq[b], lk = ck[b + 1] - ck[b];
      const int64_t nq = std::min(kBlockQ, lq - r0);
      const int64_t kvh = h / group;
      st.reset(nq, D);
      for (int64_t i = 0; i < nq; ++i) {
        const int64_t row = r0 + i;
        // Causal, aligned bottom right: query row sees keys j <= row + lk - lq.
        limit[i] = causal ? std::clamp<int64_t>(row + lk - lq + 1, 0, lk) : lk;
        load_scaled(st.q.data() + i * D, qp + (cq[b] + row) * sq0 + h * sq1, D, scale);
      }
      attend(st, nq, limit, kp + ck[b] * sk0 + kvh * sk1, sk0, vp + ck[b] * sv0 + kvh * sv1, sv0,
             D, sc);
      for (int64_t i = 0; i < nq; ++i) {
        T* o = op + (cq[b] + r0 + i) * so0 + h * so1;
        const float* a = st.acc.data() + i * D;
        const float inv = st.l[i] > 0.f ? 1.f / st.l[i] : 0.f;  // no visible key: zeros
        for (int64_t d = 0; d < D; ++d) o[d] = static_cast<T>(a[d] * inv);
      }
    }
  });
}

at::Tensor varlen_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                                int64_t max_seqlen_q, int64_t max_seqlen_k,
                                std::optional<double> softmax_scale, bool causal) {
  constexpr const char* op = "vtw.varlen_attention";
  check_attention_common(q, k, v, op, /*decode=*/false);
  TORCH_CHECK_VALUE(cu_seqlens_q.dim() == 1 && cu_seqlens_q.size(0) >= 1, op,
                    ": cu_seqlens_q must be a 1-D int32 tensor of length B+1 >= 1");
  const int64_t nb = cu_seqlens_q.size(0);
  check_lens(cu_seqlens_q, op, "cu_seqlens_q", nb, q, "B+1");
  check_lens(cu_seqlens_k, op, "cu_seqlens_k", nb, q, "B+1 (the length of cu_seqlens_q)");
  TORCH_CHECK_VALUE(max_seqlen_q >= 0, op, ": max_seqlen_q must be >= 0, got ", max_seqlen_q);
  TORCH_CHECK_VALUE(max_seqlen_k >= 0, op, ": max_seqlen_k must be >= 0, got ", max_seqlen_k);

  // The lengths are on the CPU: check their values too (the GPU kernels cannot without a sync).
  const at::Tensor cqt = cu_seqlens_q.contiguous(), ckt = cu_seqlens_k.contiguous();
  const int32_t* cqp = cqt.data_ptr<int32_t>();
  const int32_t* ckp = ckt.data_ptr<int32_t>();
  std::vector<int64_t> cq(cqp, cqp + nb), ck(ckp, ckp + nb);
  const int64_t Tq = q.size(0), Tk = k.size(0);
  for (int which = 0; which < 2; ++which) {
    const std::vector<int64_t>& c = which == 0 ? cq : ck;
    const char* name = which == 0 ? "cu_seqlens_q" : "cu_seqlens_k";
    const char* tname = which == 0 ? "q" : "k";
    const int64_t T = which == 0 ? Tq : Tk, max_len = which == 0 ? max_seqlen_q : max_seqlen_k;
    const char* max_name = which == 0 ? "max_seqlen_q" : "max_seqlen_k";
    TORCH_CHECK_VALUE(c[0] >= 0, op, ": ", name, "[0] must be >= 0, got ", c[0]);
    for (int64_t b = 0; b + 1 < nb; ++b) {
      TORCH_CHECK_VALUE(c[b + 1] >= c[b], op, ": ", name, " must be non-decreasing, got ", name,
                        "[", b, "] = ", c[b], " > ", name, "[", b + 1, "] = ", c[b + 1]);
      TORCH_CHECK_VALUE(c[b + 1] - c[b] <= max_len, op, ": ", max_name, " = ", max_len,
                        " is smaller than the length ", c[b + 1] - c[b], " of sequence ", b,
                        " (", name, ")");
    }
    TORCH_CHECK_VALUE(c[nb - 1] <= T, op, ": ", name, "[-1] = ", c[nb - 1],
                      " exceeds the number of tokens of ", tname, " (", T, ")");
  }

  const int64_t D = q.size(2);
  const float scale = static_cast<float>(softmax_scale.value_or(1.0 / std::sqrt(double(D))));
  // Zeros: tokens of the packed buffer outside every sequence keep a defined value.
  at::Tensor out = at::zeros(q.sizes(), q.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "vtw_varlen_cpu", [&] {
    varlen_kernel<scalar_t>(q, k, v, out, cq, ck, scale, causal);
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// decode_attention
// ---------------------------------------------------------------------------------------------

template <typename T>
void decode_kernel(const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc,
                   at::Tensor& out, const std::vector<int64_t>& lens, float scale) {
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2), Hkv = kc.size(1);
  const int64_t group = Hq / Hkv;
  const T* qp = q.data_ptr<T>();
  const T* kp = kc.data_ptr<T>();
  const T* vp = vc.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const int64_t max_len = *std::max_element(lens.begin(), lens.end());
  // Split the keys when (row, KV head) pairs alone would leave threads idle, in chunks of at
  // least 256 keys.
  const int64_t threads = at::get_num_threads();
  const int64_t want = (2 * threads + B * Hkv - 1) / (B * Hkv);
  const int64_t splits = std::max<int64_t>(1, std::min(want, (max_len + 255) / 256));
  const int64_t chunk = std::max<int64_t>(1, (max_len + splits - 1) / splits);
  // Partials per (row, KV head, split, group row): max, sum, accumulator [D].
  const int64_t part_stride = D + 2;
  std::vector<float> part(splits > 1 ? B * Hkv * splits * group * part_stride : 0);

  at::parallel_for(0, B * Hkv * splits, 1, [&](int64_t i0, int64_t i1) {
    Scratch sc(D, group);
    RowState st(group, D);
    std::vector<int64_t> limit(group);
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t b = it / (Hkv * splits), kvh = (it / splits) % Hkv, sp = it % splits;
      const int64_t j0 = std::min(sp * chunk, lens[b]), j1 = std::min(j0 + chunk, lens[b]);
      st.reset(group, D);
      for (int64_t g = 0; g < group; ++g) {
        limit[g] = j1 - j0;
        load_scaled(st.q.data() + g * D, qp + b * q.stride(0) + (kvh * group + g) * q.stride(1), D,
                    scale);
      }
      const T* kb = kp + b * kc.stride(0) + kvh * kc.stride(1) + j0 * kc.stride(2);
      const T* vb = vp + b * vc.stride(0) + kvh * vc.stride(1) + j0 * vc.stride(2);
      attend(st, group, limit.data(), kb, kc.stride(2), vb, vc.stride(2), D, sc);
      for (int64_t g = 0; g < group; ++g) {
        const float* a = st.acc.data() + g * D;
        if (splits == 1) {
          T* o = op + b * out.stride(0) + (kvh * group + g) * out.stride(1);
          const float inv = st.l[g] > 0.f ? 1.f / st.l[g] : 0.f;  // empty row: zeros
          for (int64_t d = 0; d < D; ++d) o[d] = static_cast<T>(a[d] * inv);
        } else {
          float* p = part.data() + (it * group + g) * part_stride;
          p[0] = st.m[g];
          p[1] = st.l[g];
          std::copy(a, a + D, p + 2);
        }
      }
    }
  });
  if (splits == 1) return;
  // Merge the splits of every (row, query head).
  at::parallel_for(0, B * Hq, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> acc(D);
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t b = it / Hq, h = it % Hq, kvh = h / group, g = h % group;
      const float* first = part.data() + ((b * Hkv + kvh) * splits * group + g) * part_stride;
      const int64_t split_step = group * part_stride;
      float mx = kNegInf;
      for (int64_t sp = 0; sp < splits; ++sp) mx = std::max(mx, first[sp * split_step]);
      std::fill(acc.begin(), acc.end(), 0.f);
      float l = 0.f;
      if (mx != kNegInf) {
        for (int64_t sp = 0; sp < splits; ++sp) {
          const float* p = first + sp * split_step;
          if (p[0] == kNegInf) continue;  // a split that saw no key
          const float w = std::exp(p[0] - mx);
          l += w * p[1];
          for (int64_t d = 0; d < D; ++d) acc[d] += w * p[2 + d];
        }
      }
      const float inv = l > 0.f ? 1.f / l : 0.f;
      T* o = op + b * out.stride(0) + h * out.stride(1);
      for (int64_t d = 0; d < D; ++d) o[d] = static_cast<T>(acc[d] * inv);
    }
  });
}

at::Tensor decode_attention_cpu(const at::Tensor& q, const at::Tensor& k_cache,
                                const at::Tensor& v_cache, const at::Tensor& cache_seqlens,
                                std::optional<double> softmax_scale) {
  constexpr const char* op = "vtw.decode_attention";
  check_attention_common(q, k_cache, v_cache, op, /*decode=*/true);
  TORCH_CHECK_VALUE(k_cache.size(0) == q.size(0), op, ": k_cache must have the batch size of q (",
                    q.size(0), "), got shape ", k_cache.sizes());
  check_lens(cache_seqlens, op, "cache_seqlens", q.size(0), q, "B");
  const int64_t B = q.size(0), S_cap = k_cache.size(2);
  const at::Tensor lt = cache_seqlens.contiguous();
  const int32_t* lp = lt.data_ptr<int32_t>();
  std::vector<int64_t> lens(lp, lp + B);
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK_VALUE(lens[b] >= 0 && lens[b] <= S_cap, op, ": cache_seqlens[", b, "] = ", lens[b],
                      " is outside [0, S_cap = ", S_cap, "] (S_cap is k_cache.shape[2])");
  }
  const int64_t D = q.size(2);
  const float scale = static_cast<float>(softmax_scale.value_or(1.0 / std::sqrt(double(D))));
  at::Tensor out = at::empty(q.sizes(), q.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "vtw_decode_cpu", [&] {
    decode_kernel<scalar_t>(q, k_cache, v_cache, out, lens, scale);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(vtw, CPU, m) {
  m.impl("varlen_attention", &varlen_attention_cpu);
  m.impl("decode_attention", &decode_attention_cpu);
}

}  // namespace vtw
