// Index arithmetic shared by the CPU kernels and their CUDA twins.
//
// Every function here is `__host__ __device__` under nvcc and plain inline under a host
// compiler, so the CPU tests exercise exactly the arithmetic the GPU kernels run.
// All offsets are int64: a product of sizes can pass 2^31.
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define VTW_HD __host__ __device__ __forceinline__
#else
#define VTW_HD inline
#endif

namespace vtw {

// Slot in the output row of the `rank`-th kept token (0-based) of a row that keeps `len`
// tokens, when the output has `s_keep` slots. Left-aligned unless `pad_left`.
VTW_HD int64_t keep_slot(int64_t rank, int64_t len, int64_t s_keep, bool pad_left) {
  return pad_left ? s_keep - len + rank : rank;
}

// First slot holding a kept token, and one past the last, in an output row.
VTW_HD int64_t first_kept_slot(int64_t len, int64_t s_keep, bool pad_left) {
  return pad_left ? s_keep - len : 0;
}
VTW_HD int64_t end_kept_slot(int64_t len, int64_t s_keep, bool pad_left) {
  return pad_left ? s_keep : len;
}

// Element offset of [i0, i1, i2] in a tensor with strides s0, s1, s2.
VTW_HD int64_t offset3(int64_t i0, int64_t i1, int64_t i2, int64_t s0, int64_t s1, int64_t s2) {
  return i0 * s0 + i1 * s1 + i2 * s2;
}

// Element offset of [i0, i1, i2, 0] (the start of an inner, contiguous vector).
VTW_HD int64_t row_offset4(int64_t b, int64_t h, int64_t s, int64_t sb, int64_t sh, int64_t ss) {
  return b * sb + h * sh + s * ss;
}

// Number of set bits of a 32-bit word.
VTW_HD int popcount32(uint32_t x) {
#if defined(__CUDA_ARCH__)
  return __popc(x);
#else
  x = x - ((x >> 1) & 0x55555555u);
  x = (x & 0x33333333u) + ((x >> 2) & 0x33333333u);
  return static_cast<int>((((x + (x >> 4)) & 0x0F0F0F0Fu) * 0x01010101u) >> 24);
#endif
}

// Position (0..31) of the k-th set bit (0-based, from the least significant end) of `bits`;
// requires 0 <= k < popcount32(bits). A five-step binary search over popcounts: the CUDA
// compact_kv_ kernel maps the k-th kept token of a 32-token window (a warp ballot) to its
// position with it.
VTW_HD int nth_set_bit(uint32_t bits, int k) {
  int pos = 0;
  for (int width = 16; width >= 1; width >>= 1) {
    const int low = popcount32(bits & ((1u << width) - 1u));
    if (k >= low) {
      bits >>= width;
      k -= low;
      pos += width;
    }
  }
  return pos;
}

}  // namespace vtw
