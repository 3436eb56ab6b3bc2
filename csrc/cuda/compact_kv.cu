// CUDA kernel of vtw::compact_kv_: in place over every layer's key and value tensors, in ONE
// launch. Block i walks stream (tensor t, row b, head h) = unravel(i, [N, B, H]) alone, in
// increasing token order, in windows of W <= 32 tokens:
//   - every warp loads the window's mask bytes and ballots them (no shared memory, no barrier:
//     each warp computes the same bits), so the k-th kept token of the window is at position
//     s0 + nth_set_bit(bits, k) and goes to slot done + k, where done counts the kept tokens
//     before the window;
//   - the block loads every vector of the window's moving tokens into registers, passes a
//     barrier, then stores them.
// Correct by construction: a kept token's slot is <= its position, so a window writes only
// positions < its end, all of them already read (earlier windows, or this window before the
// barrier); later windows read positions >= their start, never written before. Positions >= S
// are never read nor written. Streams are disjoint (the checks refuse tensors that overlap
// themselves or share memory), so blocks never touch each other's data.
//
// The tensors (base pointer, byte strides, row bytes, vector width each) travel as a kernel
// parameter for up to kInlineStreams tensors (40 layers of keys and values: no copy, and the
// launch can be captured in a CUDA graph), else as a device array copied from pinned memory
// without blocking the host.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstring>
#include <limits>
#include <vector>

#include "../checks.h"
#include "../index.h"
#include "common.cuh"

namespace vtw {
namespace cuda_detail {
namespace {

constexpr int kThreads = 128;                 // threads per block (one stream)
constexpr int kUnroll = 4;                    // vectors per thread per round
constexpr int kRoundItems = kThreads * kUnroll;  // vectors held in registers by a round
constexpr int kInlineStreams = 80;            // tensors passed as a kernel parameter

struct CacheDesc {
  char* base;             // element [0, 0, 0, 0]
  int64_t sb, sh, ss;     // byte strides of dims 0 (batch), 1 (head), 2 (token)
  int64_t row_bytes;      // Dh * element size
  int64_t vec;            // bytes per access: 16, 8, 4 or 2
};
static_assert(sizeof(CacheDesc) == 48, "CacheDesc layout");

template <int N>
struct InlineDescs {
  CacheDesc d[N];
};
struct GlobalDescs {
  const CacheDesc* d;
};

struct CompactParams {
  const uint8_t* mask;  // visual_mask as bytes (0 = keep)
  int64_t ms0, ms1;     // element strides of visual_mask
  int32_t* new_lens;    // [B]
  int64_t B, H, S;
};
static_assert(sizeof(InlineDescs<kInlineStreams>) + sizeof(CompactParams) <= 4096,
              "kernel parameters must fit the classic 4 KiB limit");

template <typename V>
__device__ __forceinline__ void compact_stream(const CacheDesc& d, const CompactParams& p, int64_t b,
                                               int64_t h, bool write_len) {
  const int lane = threadIdx.x & 31;
  const uint32_t nvec = static_cast<uint32_t>(d.row_bytes / static_cast<int64_t>(sizeof(V)));
  // Tokens per window: as many whole tokens as one round holds in registers, 1 to 32.
  const int W = nvec == 0 ? 32 : static_cast<int>(min(32u, max(1u, kRoundItems / nvec)));
  int64_t done = 0;  // kept tokens before the window (identical in every thread)
  for (int64_t s0 = 0; s0 < p.S; s0 += W) {
    const int64_t s = s0 + lane;
    const bool kept = lane < W && s < p.S && p.mask[b * p.ms0 + s * p.ms1] == 0;
    const uint32_t bits = __ballot_sync(0xffffffffu, kept);
    const int n = __popc(bits);
    // Nothing moves when no token before the window was withdrawn and the window's kept tokens
    // are its first n: then every slot equals its position.
    const bool in_place = done == s0 && bits == (n == 32 ? 0xffffffffu : (1u << n) - 1u);
    if (n > 0 && nvec > 0 && !in_place) {
      // n * nvec <= kRoundItems unless W == 1; then one token's vectors go in several rounds,
      // which is safe because its source and destination rows are distinct.
      const uint32_t items = static_cast<uint32_t>(n) * nvec;
      for (uint32_t i0 = 0; i0 < items; i0 += kRoundItems) {
        V v[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const uint32_t it = i0 + threadIdx.x + u * kThreads;
          if (it < items) {
            const uint32_t k = it / nvec, e = it - k * nvec;
            const int64_t src = s0 + nth_set_bit(bits, static_cast<int>(k));
            const int64_t dst = done + k;
            if (src != dst) {
              v[u] = *reinterpret_cast<const V*>(d.base + row_offset4(b, h, src, d.sb, d.sh, d.ss) +
                                                 int64_t{e} * sizeof(V));
            }
          }
        }
        __syncthreads();  // every read of this round happens before any of its writes
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const uint32_t it = i0 + threadIdx.x + u * kThreads;
          if (it < items) {
            const uint32_t k = it / nvec, e = it - k * nvec;
            const int64_t src = s0 + nth_set_bit(bits, static_cast<int>(k));
            const int64_t dst = done + k;
            if (src != dst) {
              *reinterpret_cast<V*>(d.base + row_offset4(b, h, dst, d.sb, d.sh, d.ss) + int64_t{e} * sizeof(V)) =
                  v[u];
            }
          }
        }
      }
    }
    done += n;
  }
  if (write_len && threadIdx.x == 0) p.new_lens[b] = static_cast<int32_t>(done);
}

template <typename Descs>
__global__ void __launch_bounds__(kThreads)
    compact_kv_kernel(const __grid_constant__ Descs descs, const __grid_constant__ CompactParams p) {
  const int64_t per_tensor = p.B * p.H;
  const int64_t t = blockIdx.x / per_tensor;
  const int64_t bh = blockIdx.x - t * per_tensor;
  const int64_t b = bh / p.H, h = bh - b * p.H;
  const CacheDesc d = descs.d[t];
  const bool write_len = t == 0 && h == 0;  // one block per row reports new_lens[b]
  switch (d.vec) {
    case 16:
      compact_stream<uint4>(d, p, b, h, write_len);
      break;
    case 8:
      compact_stream<uint2>(d, p, b, h, write_len);
      break;
    case 4:
      compact_stream<uint32_t>(d, p, b, h, write_len);
      break;
    default:
      compact_stream<uint16_t>(d, p, b, h, write_len);
      break;
  }
}

at::Tensor compact_kv_cuda(at::TensorList keys, at::TensorList values, const at::Tensor& visual_mask) {
  check_compact_kv_inputs(keys, values, visual_mask);
  TORCH_CHECK_VALUE(visual_mask.is_cuda(), "vtw.compact_kv_: the CUDA kernel needs CUDA tensors, got "
                    "visual_mask on ", visual_mask.device());
  const c10::cuda::CUDAGuard guard(visual_mask.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t B = visual_mask.size(0), S = visual_mask.size(1);
  TORCH_CHECK_VALUE(S <= std::numeric_limits<int32_t>::max(), "vtw.compact_kv_: visual_mask must have at "
                    "most 2^31 - 1 tokens per row (new_lens is int32), got S = ", S);
  at::Tensor new_lens = at::empty({B}, visual_mask.options().dtype(at::kInt));
  if (B == 0) return new_lens;

  std::vector<CacheDesc> descs;
  descs.reserve(keys.size() + values.size());
  for (int list = 0; list < 2; ++list) {
    for (const at::Tensor& t : list == 0 ? keys : values) {
      const int64_t esz = t.element_size();
      CacheDesc d;
      d.base = static_cast<char*>(t.data_ptr());
      d.sb = t.stride(0) * esz;
      d.sh = t.stride(1) * esz;
      d.ss = t.stride(2) * esz;
      d.row_bytes = t.size(3) * esz;
      TORCH_CHECK_VALUE(d.row_bytes < (int64_t{1} << 31), "vtw.compact_kv_: head dim Dh = ", t.size(3),
                        " is too large for the CUDA kernel (a token's row must be under 2 GiB)");
      d.vec = d.row_bytes == 0 ? 16
                               : pick_vec_bytes({reinterpret_cast<int64_t>(d.base), d.sb, d.sh, d.ss, d.row_bytes});
      TORCH_INTERNAL_ASSERT(d.row_bytes == 0 || d.vec >= esz, "vtw.compact_kv_: cache tensor not element-aligned");
      descs.push_back(d);
    }
  }
  const int64_t N = static_cast<int64_t>(descs.size());
  const int64_t H = N > 0 ? keys[0].size(1) : 0;
  if (N == 0 || H == 0) {  // no stream to walk: only the lengths
    launch_count_kept(visual_mask, new_lens, stream);
    return new_lens;
  }
  const int64_t blocks = N * B * H;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "vtw.compact_kv_: ", N, " tensors x B = ", B,
              " x H = ", H, " streams exceed the CUDA grid limit");

  CompactParams p;
  p.mask = reinterpret_cast<const uint8_t*>(visual_mask.data_ptr<bool>());
  p.ms0 = visual_mask.stride(0);
  p.ms1 = visual_mask.stride(1);
  p.new_lens = new_lens.data_ptr<int32_t>();
  p.B = B;
  p.H = H;
  p.S = S;
  const dim3 grid(static_cast<unsigned>(blocks));
  if (N <= kInlineStreams) {
    InlineDescs<kInlineStreams> inline_descs;
    std::memset(&inline_descs, 0, sizeof(inline_descs));
    std::copy(descs.begin(), descs.end(), inline_descs.d);
    compact_kv_kernel<InlineDescs<kInlineStreams>><<<grid, kThreads, 0, stream>>>(inline_descs, p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    // More tensors than a kernel parameter holds: a device array, copied from pinned memory on
    // the current stream (the caching host allocator keeps the pinned block until the copy ends).
    const int64_t bytes = N * static_cast<int64_t>(sizeof(CacheDesc));
    at::Tensor host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
    std::memcpy(host.data_ptr(), descs.data(), bytes);
    at::Tensor dev = at::empty({bytes}, visual_mask.options().dtype(at::kByte));
    dev.copy_(host, /*non_blocking=*/true);
    const GlobalDescs global_descs{reinterpret_cast<const CacheDesc*>(dev.data_ptr())};
    compact_kv_kernel<GlobalDescs><<<grid, kThreads, 0, stream>>>(global_descs, p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return new_lens;
}

}  // namespace
}  // namespace cuda_detail

TORCH_LIBRARY_IMPL(vtw, CUDA, m) { m.impl("compact_kv_", &cuda_detail::compact_kv_cuda); }

}  // namespace vtw
