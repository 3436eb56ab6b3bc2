// CPU kernel of vtw::compact_kv_: every (tensor, row, head) stream is walked in increasing token
// order, moving kept token s to slot rank(s) <= s, so no write lands on a token not yet read.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "../checks.h"
#include "../index.h"

namespace vtw {
namespace {

at::Tensor compact_kv_cpu(at::TensorList keys, at::TensorList values,
                          const at::Tensor& visual_mask) {
  check_compact_kv_inputs(keys, values, visual_mask);
  const int64_t B = visual_mask.size(0), S = visual_mask.size(1);
  const at::Tensor mask = visual_mask.contiguous();
  const bool* m = mask.data_ptr<bool>();

  // kept[b * S + r] = position of the r-th kept token of row b.
  std::vector<int64_t> kept(static_cast<size_t>(B * S));
  at::Tensor new_lens = at::empty({B}, mask.options().dtype(at::kInt));
  int32_t* lens = new_lens.data_ptr<int32_t>();
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      int64_t n = 0;
      for (int64_t s = 0; s < S; ++s) {
        if (!m[b * S + s]) kept[b * S + n++] = s;
      }
      lens[b] = static_cast<int32_t>(n);
    }
  });

  std::vector<at::Tensor> tensors;
  tensors.reserve(keys.size() * 2);
  for (const auto& t : keys) tensors.push_back(t);
  for (const auto& t : values) tensors.push_back(t);
  if (tensors.empty() || B == 0) return new_lens;
  const int64_t H = tensors[0].size(1);
  const int64_t streams = static_cast<int64_t>(tensors.size()) * B * H;

  at::parallel_for(0, streams, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const at::Tensor& t = tensors[i / (B * H)];
      const int64_t b = (i / H) % B, h = i % H;
      const int64_t esz = t.element_size();
      const int64_t row_bytes = t.size(3) * esz;
      if (row_bytes == 0) continue;
      char* base = static_cast<char*>(t.data_ptr()) +
                   row_offset4(b, h, 0, t.stride(0), t.stride(1), 0) * esz;
      const int64_t ss = t.stride(2) * esz;
      for (int64_t r = 0; r < lens[b]; ++r) {
        const int64_t s = kept[b * S + r];
        if (s != r) std::memcpy(base + r * ss, base + s * ss, row_bytes);
      }
    }
  });
  return new_lens;
}

}  // namespace

TORCH_LIBRARY_IMPL(vtw, CPU, m) { m.impl("compact_kv_", &compact_kv_cpu); }

}  // namespace vtw
