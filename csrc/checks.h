// Input validation shared by every C++ backend (CPU and CUDA) of the vtw operators.
// Each failed check names the argument and what was expected (CONTRACT.md).
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace vtw {

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

// The attention ops compute (float32 softmax): float32, float16, bfloat16.
inline void check_float_dtype(const at::Tensor& t, const char* op, const std::string& name) {
  TORCH_CHECK_TYPE(is_supported_float(t.scalar_type()), op, ": ", name,
                   " must be float32, float16 or bfloat16, got ", t.scalar_type());
}

// The data-moving ops (withdraw, compact_kv_) only copy bytes, so they also take float64
// (double-precision references of a withdrawn model).
inline bool is_supported_data_float(at::ScalarType t) {
  return is_supported_float(t) || t == at::kDouble;
}

inline void check_data_dtype(const at::Tensor& t, const char* op, const std::string& name) {
  TORCH_CHECK_TYPE(is_supported_data_float(t.scalar_type()), op, ": ", name,
                   " must be float32, float16, bfloat16 or float64, got ", t.scalar_type());
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* op,
                              const std::string& name, const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " must be on the device of ", ref_name,
              " (", ref.device(), "), got ", t.device());
}

inline void check_mask(const at::Tensor& visual_mask, const char* op) {
  TORCH_CHECK_VALUE(visual_mask.dim() == 2, op, ": visual_mask must be 2-D [B, S], got ",
                    visual_mask.dim(), "-D with shape ", visual_mask.sizes());
  TORCH_CHECK_TYPE(visual_mask.scalar_type() == at::kBool, op,
                   ": visual_mask must be a bool tensor, got ", visual_mask.scalar_type());
}

inline void check_withdraw_inputs(const at::Tensor& hidden, const at::Tensor& visual_mask,
                                  std::optional<int64_t> num_keep) {
  constexpr const char* op = "vtw.withdraw";
  TORCH_CHECK_VALUE(hidden.dim() == 3, op, ": hidden must be 3-D [B, S, D], got ", hidden.dim(),
                    "-D with shape ", hidden.sizes());
  check_data_dtype(hidden, op, "hidden");
  check_mask(visual_mask, op);
  check_same_device(visual_mask, hidden, op, "visual_mask", "hidden");
  TORCH_CHECK_VALUE(visual_mask.size(0) == hidden.size(0) && visual_mask.size(1) == hidden.size(1),
                    op, ": visual_mask must have shape [B, S] = [", hidden.size(0), ", ",
                    hidden.size(1), "] to match hidden, got ", visual_mask.sizes());
  TORCH_CHECK_VALUE(hidden.size(2) <= 1 || hidden.stride(2) == 1, op,
                    ": hidden must have a contiguous last dimension (stride 1), got strides ",
                    hidden.strides());
  if (num_keep.has_value()) {
    TORCH_CHECK_VALUE(*num_keep >= 0, op, ": num_keep must be >= 0, got ", *num_keep);
  }
}

// Where a cache tensor's bytes lie, for the overlap checks of compact_kv_ (the same as
// vtw_kernels/_validate.py): its rows (the contiguous last dimension, `row` bytes each) start at
// base + sum(i_d * stride_d) over the dimensions of size > 1 (`dims`: {byte stride, size} in
// increasing stride order); every byte is in [base, end). Pointer and stride arithmetic only:
// nothing is read, nothing synchronises with a device.
struct CacheLayout {
  std::string name;
  size_t index;  // position in keys, then values
  int64_t base, end, row;
  std::vector<std::pair<int64_t, int64_t>> dims;
};

inline CacheLayout cache_layout(const at::Tensor& t, const std::string& name, size_t index) {
  const int64_t esz = static_cast<int64_t>(t.element_size());
  CacheLayout l;
  l.name = name;
  l.index = index;
  l.base = static_cast<int64_t>(reinterpret_cast<intptr_t>(t.data_ptr()));
  l.row = t.size(3) * esz;
  for (int d = 0; d < 3; ++d) {
    if (t.size(d) > 1) l.dims.emplace_back(t.stride(d) * esz, t.size(d));
  }
  std::sort(l.dims.begin(), l.dims.end());
  l.end = l.base + l.row;
  for (const auto& [st, n] : l.dims) l.end += (n - 1) * st;
  return l;
}

// Whether rows laid out by `dims` may share a byte: true unless, from the smallest stride up,
// every stride reaches past everything the dimensions inside it span.
inline bool overlaps_itself(const CacheLayout& l) {
  int64_t extent = l.row;
  for (const auto& [st, n] : l.dims) {
    if (st < extent) return true;
    extent += (n - 1) * st;
  }
  return false;
}

// Whether two tensors whose byte ranges intersect (lo starting first) share no byte: with the
// same strides, they are the union of a pair dimension of stride delta = hi.base - lo.base with
// their common dimensions, disjoint when that union nests as in overlaps_itself. Other layouts
// whose ranges intersect count as overlapping.
inline bool provably_disjoint(const CacheLayout& lo, const CacheLayout& hi) {
  if (lo.dims != hi.dims) return false;
  const int64_t delta = hi.base - lo.base;
  int64_t e_lo = lo.row, e_hi = hi.row;
  bool placed = false;
  for (size_t i = 0; i <= lo.dims.size(); ++i) {
    const bool last = i == lo.dims.size();
    if (!placed && (last || delta <= lo.dims[i].first)) {
      if (delta < e_lo) return false;
      e_lo = e_hi = delta + e_hi;
      placed = true;
    }
    if (!last) {
      const auto [st, n] = lo.dims[i];
      if (st < std::max(e_lo, e_hi)) return false;
      e_lo += (n - 1) * st;
      e_hi += (n - 1) * st;
    }
  }
  return true;
}

// Raises naming the first two arguments (keys, then values order) that share memory: a sweep
// over the byte ranges, comparing only tensors whose ranges intersect.
inline void check_no_overlap(std::vector<CacheLayout> layouts, const char* op) {
  std::sort(layouts.begin(), layouts.end(), [](const CacheLayout& a, const CacheLayout& b) {
    return a.base != b.base ? a.base < b.base : a.index < b.index;
  });
  std::vector<const CacheLayout*> active;
  for (const CacheLayout& cur : layouts) {
    active.erase(std::remove_if(active.begin(), active.end(),
                                [&](const CacheLayout* a) { return a->end <= cur.base; }),
                 active.end());
    for (const CacheLayout* a : active) {
      if (!provably_disjoint(*a, cur)) {
        const CacheLayout& first = a->index < cur.index ? *a : cur;
        const CacheLayout& second = a->index < cur.index ? cur : *a;
        TORCH_CHECK_VALUE(false, op, ": ", first.name, " and ", second.name,
                          " overlap in memory; compact_kv_ moves tokens in place in every cache "
                          "tensor, so no two of them may share any byte");
      }
    }
    active.push_back(&cur);
  }
}

// Validates keys/values of compact_kv_; returns S_cap (or -1 when there are no tensors).
inline int64_t check_compact_kv_inputs(at::TensorList keys, at::TensorList values,
                                       const at::Tensor& visual_mask) {
  constexpr const char* op = "vtw.compact_kv_";
  check_mask(visual_mask, op);
  TORCH_CHECK_VALUE(keys.size() == values.size(), op,
                    ": keys and values must hold one tensor per layer each, got ", keys.size(),
                    " keys and ", values.size(), " values");
  const int64_t B = visual_mask.size(0), S = visual_mask.size(1);
  int64_t H = -1, S_cap = -1;
  std::vector<CacheLayout> layouts;
  for (int list = 0; list < 2; ++list) {
    at::TensorList ts = list == 0 ? keys : values;
    for (size_t i = 0; i < ts.size(); ++i) {
      const at::Tensor& t = ts[i];
      const std::string name = std::string(list == 0 ? "keys[" : "values[") + std::to_string(i) + "]";
      TORCH_CHECK_VALUE(t.dim() == 4, op, ": ", name, " must be 4-D [B, H, S_cap, Dh], got ",
                        t.dim(), "-D with shape ", t.sizes());
      check_data_dtype(t, op, name);
      check_same_device(t, visual_mask, op, name, "visual_mask");
      TORCH_CHECK_VALUE(t.size(0) == B, op, ": ", name, " must have batch size B = ", B,
                        " (visual_mask is ", visual_mask.sizes(), "), got shape ", t.sizes());
      if (H < 0) {
        H = t.size(1);
        S_cap = t.size(2);
      }
      TORCH_CHECK_VALUE(t.size(1) == H && t.size(2) == S_cap, op, ": ", name,
                        " must share H and S_cap with keys[0] ([", H, ", ", S_cap, "]), got shape ",
                        t.sizes());
      TORCH_CHECK_VALUE(t.size(2) >= S, op, ": ", name, " must have S_cap >= S = ", S,
                        " (the length of visual_mask), got S_cap = ", t.size(2));
      TORCH_CHECK_VALUE(t.size(3) <= 1 || t.stride(3) == 1, op, ": ", name,
                        " must have a contiguous last dimension (stride 1), got strides ",
                        t.strides());
      if (t.numel() == 0) continue;
      CacheLayout layout = cache_layout(t, name, list == 0 ? i : keys.size() + i);
      TORCH_CHECK_VALUE(at::has_internal_overlap(t) != at::MemOverlap::Yes && !overlaps_itself(layout), op,
                        ": ", name, " has elements that share memory (an expanded tensor, or strides that "
                        "make rows overlap: strides ", t.strides(), " for shape ", t.sizes(),
                        "); it is written in place, so it must not overlap itself");
      layouts.push_back(std::move(layout));
    }
  }
  check_no_overlap(std::move(layouts), op);
  return S_cap;
}

}  // namespace vtw
