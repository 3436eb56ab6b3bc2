// Input validation shared by every C++ backend (CPU and CUDA) of the vtw operators.
// Each failed check names the argument and what was expected (CONTRACT.md).
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include <optional>
#include <string>
#include <vector>

namespace vtw {

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

inline void check_float_dtype(const at::Tensor& t, const char* op, const std::string& name) {
  TORCH_CHECK_TYPE(is_supported_float(t.scalar_type()), op, ": ", name,
                   " must be float32, float16 or bfloat16, got ", t.scalar_type());
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
  check_float_dtype(hidden, op, "hidden");
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
  std::vector<const void*> seen;
  for (int list = 0; list < 2; ++list) {
    at::TensorList ts = list == 0 ? keys : values;
    for (size_t i = 0; i < ts.size(); ++i) {
      const at::Tensor& t = ts[i];
      const std::string name = std::string(list == 0 ? "keys[" : "values[") + std::to_string(i) + "]";
      TORCH_CHECK_VALUE(t.dim() == 4, op, ": ", name, " must be 4-D [B, H, S_cap, Dh], got ",
                        t.dim(), "-D with shape ", t.sizes());
      check_float_dtype(t, op, name);
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
      TORCH_CHECK_VALUE(at::has_internal_overlap(t) != at::MemOverlap::Yes, op, ": ", name,
                        " has elements that share memory (an expanded tensor?); it is written in "
                        "place, so it must not overlap itself");
      if (t.numel() > 0) {
        for (const void* p : seen) {
          TORCH_CHECK_VALUE(p != t.data_ptr(), op, ": ", name,
                            " shares its memory with another cache tensor; each layer's keys and "
                            "values must be distinct tensors");
        }
        seen.push_back(t.data_ptr());
      }
    }
  }
  return S_cap;
}

}  // namespace vtw
