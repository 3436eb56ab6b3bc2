// CUDA kernel of vtw::withdraw: one fused launch computes each kept token's destination slot
// (a block-wide prefix sum over the mask row) and copies the hidden vectors with the widest
// aligned vector loads and stores (16 bytes where alignment allows), writing keep_index and
// keep_lens on the way.
//
// Work split: block (b, c) owns output slots [c*T, (c+1)*T) of row b (T <= kMaxSlots, chosen
// on the host so that a small batch still spreads over every SM). Each block recounts its row's
// mask (a few hundred bytes, from L2) instead of communicating with the other blocks, so one
// launch is enough and no block waits for another.
//
// num_keep smaller than a row's kept count (the "overflow" of that row): the kernel never
// writes outside [0, num_keep) and never truncates silently. The row's keep_lens entry holds
// its true count (> num_keep, so `keep_lens.max() > out.shape[1]` detects it on the device,
// and vtw_kernels.Withdrawn.check() raises the CPU path's error after one synchronisation),
// and the row is poisoned: every keep_index slot -1 and every element of out a quiet NaN, so a
// model fed with it yields NaN instead of a plausible answer built from a truncated prompt.
// Without num_keep, the output length is max(keep_lens), computed by a first small launch and
// read back (one synchronisation, unavoidable to size the output); overflow cannot happen.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <optional>
#include <tuple>

#include "../checks.h"
#include "../index.h"
#include "common.cuh"

namespace vtw {
namespace cuda_detail {
namespace {

constexpr int kThreads = 256;              // threads per block
constexpr int kItems = 4;                  // consecutive tokens per thread in a scan tile
constexpr int kTile = kThreads * kItems;   // tokens per scan tile
constexpr int kMaxSlots = 64;              // output slots per block, at most
constexpr int kUnroll = 4;                 // vectors in flight per thread
static_assert(kMaxSlots <= kThreads, "one thread per slot initialises the slot table");

struct WithdrawParams {
  const char* hidden;   // [B, S, D], last dimension contiguous
  int64_t hs0, hs1;     // byte strides of hidden's dims 0 and 1
  const uint8_t* mask;  // visual_mask as bytes (0 = keep)
  int64_t ms0, ms1;     // element strides of visual_mask
  char* out;            // [B, S_keep, D], contiguous
  int64_t* keep_index;  // [B, S_keep], contiguous
  int32_t* keep_lens;   // [B]
  int64_t S, S_keep;
  int64_t row_bytes;        // D * element size
  int64_t slots_per_block;  // T
  int64_t blocks_per_row;   // ceil(S_keep / T), at least 1 so keep_lens is always written
  uint64_t nan_word;        // quiet-NaN bits of the dtype (64 bits), for overflowing rows
  bool pad_left;
};

__device__ __forceinline__ bool kept_at(const WithdrawParams& p, int64_t b, int64_t s) {
  return s < p.S && p.mask[b * p.ms0 + s * p.ms1] == 0;
}

// One block per row: keep_lens[b] = number of kept tokens.
__global__ void __launch_bounds__(kThreads)
    count_kept_kernel(const uint8_t* mask, int64_t ms0, int64_t ms1, int64_t S, int32_t* lens) {
  __shared__ int smem[kThreads / 32 + 1];
  const int64_t b = blockIdx.x;
  int n = 0;
  for (int64_t s = threadIdx.x; s < S; s += kThreads) n += mask[b * ms0 + s * ms1] == 0;
  int total;
  block_exclusive_scan<kThreads>(n, smem, &total);
  if (threadIdx.x == 0) lens[b] = total;
}

template <typename V>
__global__ void __launch_bounds__(kThreads) withdraw_kernel(const __grid_constant__ WithdrawParams p) {
  __shared__ int scan_smem[kThreads / 32 + 1];
  __shared__ int64_t src[kMaxSlots];  // source token of each of this block's slots, -1: padding

  const int64_t b = blockIdx.x / p.blocks_per_row;
  const int64_t j0 = (blockIdx.x % p.blocks_per_row) * p.slots_per_block;
  const int64_t j1 = min(p.S_keep, j0 + p.slots_per_block);
  const int nslots = j1 > j0 ? static_cast<int>(j1 - j0) : 0;

  // Pass 1: the row's kept count (coalesced, strided over the block).
  int mine = 0;
  for (int64_t s = threadIdx.x; s < p.S; s += kThreads) mine += kept_at(p, b, s);
  int len;
  block_exclusive_scan<kThreads>(mine, scan_smem, &len);
  if (j0 == 0 && threadIdx.x == 0) p.keep_lens[b] = len;  // the true count, even on overflow
  const bool overflow = len > p.S_keep;

  if (threadIdx.x < nslots) src[threadIdx.x] = -1;
  __syncthreads();

  // Pass 2: ranks of the kept tokens, tile by tile, until every rank this block needs is seen.
  // Slot of rank r: keep_slot(r, len, S_keep, pad_left); this block needs ranks
  // [j0 - first, j1 - first) where first = first_kept_slot(len, S_keep, pad_left).
  if (!overflow && nslots > 0) {
    const int64_t first = first_kept_slot(len, p.S_keep, p.pad_left);
    const int64_t rank_end = min(static_cast<int64_t>(len), j1 - first);
    int run = 0;  // kept tokens before the current tile; identical in every thread
    for (int64_t t0 = 0; t0 < p.S && run < rank_end; t0 += kTile) {
      const int64_t s_first = t0 + static_cast<int64_t>(threadIdx.x) * kItems;
      unsigned bits = 0;
#pragma unroll
      for (int i = 0; i < kItems; ++i) bits |= static_cast<unsigned>(kept_at(p, b, s_first + i)) << i;
      int tile_total;
      int rank = run + block_exclusive_scan<kThreads>(__popc(bits), scan_smem, &tile_total);
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        if (bits >> i & 1u) {
          const int64_t slot = keep_slot(rank, len, p.S_keep, p.pad_left);
          if (slot >= j0 && slot < j1) src[slot - j0] = s_first + i;
          ++rank;
        }
      }
      run += tile_total;
    }
  }
  __syncthreads();

  if (threadIdx.x < nslots) p.keep_index[b * p.S_keep + j0 + threadIdx.x] = src[threadIdx.x];

  // Copy: vector k of slot j, flattened over the block; kUnroll loads in flight per thread.
  V fill;
  splat(fill, overflow ? p.nan_word : uint64_t{0});
  const uint32_t nvec = static_cast<uint32_t>(p.row_bytes / static_cast<int64_t>(sizeof(V)));
  const uint32_t items = static_cast<uint32_t>(nslots) * nvec;  // host checks it fits
  const char* h_row0 = p.hidden + b * p.hs0;
  char* o_base = p.out + (b * p.S_keep + j0) * p.row_bytes;
  for (uint32_t i0 = threadIdx.x; i0 < items; i0 += kThreads * kUnroll) {
    V v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const uint32_t it = i0 + u * kThreads;
      if (it < items) {
        const uint32_t j = it / nvec, k = it - j * nvec;
        const int64_t s = src[j];
        v[u] = s >= 0 ? *reinterpret_cast<const V*>(h_row0 + s * p.hs1 + int64_t{k} * sizeof(V)) : fill;
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const uint32_t it = i0 + u * kThreads;
      if (it < items) {
        const uint32_t j = it / nvec, k = it - j * nvec;
        *reinterpret_cast<V*>(o_base + int64_t{j} * p.row_bytes + int64_t{k} * sizeof(V)) = v[u];
      }
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> withdraw_cuda(const at::Tensor& hidden,
                                                             const at::Tensor& visual_mask,
                                                             std::optional<int64_t> num_keep,
                                                             bool pad_left) {
  check_withdraw_inputs(hidden, visual_mask, num_keep);
  TORCH_CHECK_VALUE(hidden.is_cuda(), "vtw.withdraw: the CUDA kernel needs CUDA tensors, got hidden on ",
                    hidden.device());
  const c10::cuda::CUDAGuard guard(hidden.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t B = hidden.size(0), S = hidden.size(1), D = hidden.size(2);
  TORCH_CHECK_VALUE(S <= std::numeric_limits<int32_t>::max(), "vtw.withdraw: visual_mask must have at "
                    "most 2^31 - 1 tokens per row (keep_lens is int32), got S = ", S);
  const int64_t esz = hidden.element_size();
  const int64_t row_bytes = D * esz;

  at::Tensor keep_lens = at::empty({B}, hidden.options().dtype(at::kInt));
  int64_t S_keep = 0;
  if (num_keep.has_value()) {
    S_keep = *num_keep;  // no host synchronisation on this path
  } else if (B > 0) {
    launch_count_kept(visual_mask, keep_lens, stream);
    S_keep = keep_lens.max().item<int64_t>();  // the one synchronisation: sizes the output
  }
  at::Tensor keep_index = at::empty({B, S_keep}, hidden.options().dtype(at::kLong));
  at::Tensor out = at::empty({B, S_keep, D}, hidden.options());
  if (B == 0) return {out, keep_index, keep_lens};

  // Slots per block: enough blocks for ~4 per SM, at most kMaxSlots slots and ~64 KiB per block.
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  int64_t T = (B * S_keep + 4 * sms - 1) / (4 * sms);
  T = std::clamp<int64_t>(T, 1, kMaxSlots);
  T = std::min<int64_t>(T, std::max<int64_t>(1, (int64_t{64} << 10) / std::max<int64_t>(row_bytes, 1)));
  const int64_t blocks_per_row = std::max<int64_t>(1, (S_keep + T - 1) / T);
  TORCH_CHECK(B * blocks_per_row <= std::numeric_limits<int32_t>::max(), "vtw.withdraw: B * ceil(S_keep / ",
              T, ") = ", B * blocks_per_row, " blocks exceed the CUDA grid limit");

  const int vec = D == 0 ? 16
                         : pick_vec_bytes({reinterpret_cast<int64_t>(hidden.data_ptr()), hidden.stride(0) * esz,
                                           hidden.stride(1) * esz, row_bytes});
  TORCH_INTERNAL_ASSERT(vec >= esz, "vtw.withdraw: hidden is not element-aligned");
  TORCH_CHECK(T * (row_bytes / vec) <= std::numeric_limits<uint32_t>::max() - kThreads * kUnroll, "vtw.withdraw: hidden's last "
              "dimension D = ", D, " is too large for this kernel (at most 2^32 ", vec, "-byte vectors per token)");

  WithdrawParams p;
  p.hidden = static_cast<const char*>(hidden.data_ptr());
  p.hs0 = hidden.stride(0) * esz;
  p.hs1 = hidden.stride(1) * esz;
  p.mask = reinterpret_cast<const uint8_t*>(visual_mask.data_ptr<bool>());
  p.ms0 = visual_mask.stride(0);
  p.ms1 = visual_mask.stride(1);
  p.out = static_cast<char*>(out.data_ptr());
  p.keep_index = keep_index.data_ptr<int64_t>();
  p.keep_lens = keep_lens.data_ptr<int32_t>();
  p.S = S;
  p.S_keep = S_keep;
  p.row_bytes = row_bytes;
  p.slots_per_block = T;
  p.blocks_per_row = blocks_per_row;
  p.nan_word = quiet_nan_word(hidden.scalar_type());
  p.pad_left = pad_left;
  const dim3 grid(static_cast<unsigned>(B * blocks_per_row));
  dispatch_vec(vec, [&]<typename V>() {
    withdraw_kernel<V><<<grid, kThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, keep_index, keep_lens};
}

}  // namespace

void launch_count_kept(const at::Tensor& visual_mask, at::Tensor& keep_lens, cudaStream_t stream) {
  const int64_t B = visual_mask.size(0);
  if (B == 0) return;
  TORCH_CHECK(B <= std::numeric_limits<int32_t>::max(), "vtw: batch size ", B, " exceeds the CUDA grid limit");
  count_kept_kernel<<<static_cast<unsigned>(B), kThreads, 0, stream>>>(
      reinterpret_cast<const uint8_t*>(visual_mask.data_ptr<bool>()), visual_mask.stride(0),
      visual_mask.stride(1), visual_mask.size(1), keep_lens.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda_detail

TORCH_LIBRARY_IMPL(vtw, CUDA, m) { m.impl("withdraw", &cuda_detail::withdraw_cuda); }

}  // namespace vtw
