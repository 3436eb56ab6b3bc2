// CPU kernel of vtw::withdraw: per-row ranks of the kept tokens, then one parallel pass that
// copies every output slot (a kept hidden vector, or zeros for a padding slot).
//
// Speed notes (bench/test_bench_cpu.py, bench/RESULTS.md):
// - The mask passes are O(B * S) bytes, microseconds: they only go parallel for very large
//   batches. Every OpenMP region costs a fork/join, and on a loaded machine a join can wait a
//   whole scheduler time slice for a descheduled worker, so the op opens at most one region
//   for the usual shapes.
// - Consecutive kept tokens (the text before and after an image) are copied as one run: one
//   memcpy per run of adjacent source rows instead of one per token.
// - The copy is split across threads only in chunks of >= 2 MiB: below that, two threads
//   measured no faster than one here (memory-bound copy; the fork/join costs as much).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <tuple>

#include "../checks.h"
#include "../index.h"

namespace vtw {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> withdraw_cpu(const at::Tensor& hidden,
                                                            const at::Tensor& visual_mask,
                                                            std::optional<int64_t> num_keep,
                                                            bool pad_left) {
  check_withdraw_inputs(hidden, visual_mask, num_keep);
  const int64_t B = hidden.size(0), S = hidden.size(1), D = hidden.size(2);
  const at::Tensor mask = visual_mask.contiguous();
  const bool* m = mask.data_ptr<bool>();

  at::Tensor keep_lens = at::empty({B}, hidden.options().dtype(at::kInt));
  int32_t* lens = keep_lens.data_ptr<int32_t>();
  // Rows per task of the mask passes: ~256 KiB of mask each.
  const int64_t mask_grain = std::max<int64_t>(1, (int64_t{1} << 18) / std::max<int64_t>(S, 1));
  at::parallel_for(0, B, mask_grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      int32_t n = 0;
      for (int64_t s = 0; s < S; ++s) n += m[b * S + s] ? 0 : 1;
      lens[b] = n;
    }
  });
  int64_t max_len = 0, argmax = 0;
  for (int64_t b = 0; b < B; ++b) {
    if (lens[b] > max_len) {
      max_len = lens[b];
      argmax = b;
    }
  }
  const int64_t S_keep = num_keep.has_value() ? *num_keep : max_len;
  TORCH_CHECK_VALUE(S_keep >= max_len, "vtw.withdraw: num_keep must be >= the number of kept "
                    "tokens of every row; got num_keep = ", S_keep, " but row ", argmax, " keeps ",
                    max_len, " tokens (withdraw never truncates)");

  at::Tensor keep_index = at::empty({B, S_keep}, hidden.options().dtype(at::kLong));
  at::Tensor out = at::empty({B, S_keep, D}, hidden.options());
  int64_t* idx = keep_index.data_ptr<int64_t>();
  at::parallel_for(0, B, mask_grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      int64_t* row = idx + b * S_keep;
      const int64_t first = first_kept_slot(lens[b], S_keep, pad_left);
      const int64_t end = end_kept_slot(lens[b], S_keep, pad_left);
      for (int64_t j = 0; j < first; ++j) row[j] = -1;
      for (int64_t j = end; j < S_keep; ++j) row[j] = -1;
      int64_t rank = 0;
      for (int64_t s = 0; s < S; ++s) {
        if (!m[b * S + s]) row[keep_slot(rank++, lens[b], S_keep, pad_left)] = s;
      }
    }
  });

  // Bit-exact copy: whole vectors moved as bytes, whatever the dtype.
  const int64_t row_bytes = D * static_cast<int64_t>(hidden.element_size());
  const char* src = static_cast<const char*>(hidden.data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  const int64_t esz = hidden.element_size();
  const int64_t hs0 = hidden.stride(0), hs1 = hidden.stride(1);
  // Whole runs of source rows can be copied at once when rows are adjacent in memory.
  const bool rows_adjacent = hs1 == D;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 21) / std::max<int64_t>(row_bytes, 1));
  at::parallel_for(0, B * S_keep, grain, [&](int64_t i0, int64_t i1) {
    int64_t i = i0;
    while (i < i1) {
      const int64_t b = i / S_keep;
      const int64_t row_end = std::min(i1, (b + 1) * S_keep);  // a run stays in one batch row
      const int64_t s = idx[i];
      int64_t n = 1;
      char* d = dst + i * row_bytes;
      if (s >= 0) {
        if (rows_adjacent) {
          while (i + n < row_end && idx[i + n] == s + n) ++n;
        }
        std::memcpy(d, src + offset3(b, s, 0, hs0, hs1, 1) * esz, n * row_bytes);
      } else {
        while (i + n < row_end && idx[i + n] < 0) ++n;
        std::memset(d, 0, n * row_bytes);
      }
      i += n;
    }
  });
  return {out, keep_index, keep_lens};
}

}  // namespace

TORCH_LIBRARY_IMPL(vtw, CPU, m) { m.impl("withdraw", &withdraw_cpu); }

}  // namespace vtw
