// Device helpers shared by the CUDA kernels of withdraw and compact_kv_: byte vectors for
// exact copies, a warp-shuffle block scan, and the choice of vector width.
#pragma once

#include <ATen/ATen.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>

namespace vtw {
namespace cuda_detail {

// A plain-old-data vector of N bytes: the unit of every load and store. The kernels never look
// at the values, so every copy is bit-exact whatever the dtype.
template <int N>
struct VecOf;
template <>
struct VecOf<16> {
  using type = uint4;
};
template <>
struct VecOf<8> {
  using type = uint2;
};
template <>
struct VecOf<4> {
  using type = uint32_t;
};
template <>
struct VecOf<2> {
  using type = uint16_t;
};

// `word` (64 bits, little-endian) repeated over a vector; for a 4- or 2-byte vector, its low
// 32 or 16 bits (only dtypes of at most that size use those widths).
__device__ __forceinline__ void splat(uint4& v, uint64_t w) {
  const uint32_t lo = static_cast<uint32_t>(w), hi = static_cast<uint32_t>(w >> 32);
  v = make_uint4(lo, hi, lo, hi);
}
__device__ __forceinline__ void splat(uint2& v, uint64_t w) {
  v = make_uint2(static_cast<uint32_t>(w), static_cast<uint32_t>(w >> 32));
}
__device__ __forceinline__ void splat(uint32_t& v, uint64_t w) { v = static_cast<uint32_t>(w); }
__device__ __forceinline__ void splat(uint16_t& v, uint64_t w) { v = static_cast<uint16_t>(w); }

// The widest of 16, 8, 4 and 2 bytes dividing every quantity (addresses and byte strides, byte
// lengths): the vector width at which every access is aligned. Float64/32/16/bf16 data is at
// least element-aligned, so the answer is >= the element size.
inline int pick_vec_bytes(std::initializer_list<int64_t> quantities) {
  for (int v : {16, 8, 4, 2}) {
    bool ok = true;
    for (int64_t q : quantities) ok = ok && (q % v == 0);
    if (ok) return v;
  }
  return 1;
}

// Calls f.template operator()<V>() with V the vector type of `vec_bytes` (16, 8, 4 or 2).
template <typename F>
inline void dispatch_vec(int vec_bytes, F&& f) {
  switch (vec_bytes) {
    case 16:
      f.template operator()<uint4>();
      break;
    case 8:
      f.template operator()<uint2>();
      break;
    case 4:
      f.template operator()<uint32_t>();
      break;
    case 2:
      f.template operator()<uint16_t>();
      break;
    default:
      TORCH_CHECK(false, "vtw: internal error: no vector type of ", vec_bytes, " bytes");
  }
}

// Bit pattern of a quiet NaN of `dtype` repeated over 64 bits (one float64, two float32, four
// float16/bfloat16): the value withdraw writes into the rows it refuses to truncate (see
// withdraw.cu).
inline uint64_t quiet_nan_word(at::ScalarType dtype) {
  switch (dtype) {
    case at::kDouble:
      return 0x7FF8000000000000ull;
    case at::kFloat:
      return 0x7FC000007FC00000ull;
    case at::kHalf:
      return 0x7E007E007E007E00ull;
    case at::kBFloat16:
      return 0x7FC07FC07FC07FC0ull;
    default:
      TORCH_CHECK(false, "vtw: internal error: no NaN pattern for ", dtype);
  }
}

// Inclusive prefix sum over the 32 lanes of a warp (every lane must call).
__device__ __forceinline__ int warp_inclusive_scan(int x) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int y = __shfl_up_sync(0xffffffffu, x, o);
    if (lane >= o) x += y;
  }
  return x;
}

// Block-wide exclusive prefix sum of one int per thread; every thread of the block must call
// it (it synchronises the block). `smem` holds kThreads / 32 + 1 ints; `*total` receives the
// sum over the block. The last barrier lets the caller reuse `smem` at once.
template <int kThreads>
__device__ __forceinline__ int block_exclusive_scan(int x, int* smem, int* total) {
  static_assert(kThreads % 32 == 0 && kThreads <= 1024, "block size must be whole warps");
  constexpr int kWarps = kThreads / 32;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int inclusive = warp_inclusive_scan(x);
  if (lane == 31) smem[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {
    const int w = lane < kWarps ? smem[lane] : 0;
    const int w_inclusive = warp_inclusive_scan(w);
    if (lane < kWarps) smem[lane] = w_inclusive - w;
    if (lane == kWarps - 1) smem[kWarps] = w_inclusive;
  }
  __syncthreads();
  const int result = smem[warp] + inclusive - x;
  *total = smem[kWarps];
  __syncthreads();
  return result;
}

// Writes keep_lens[b] = the number of False entries of visual_mask row b (one block per row).
// Defined in withdraw.cu; compact_kv.cu uses it when there is no cache stream to walk.
void launch_count_kept(const at::Tensor& visual_mask, at::Tensor& keep_lens, cudaStream_t stream);

}  // namespace cuda_detail
}  // namespace vtw
