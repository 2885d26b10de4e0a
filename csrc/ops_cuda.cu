// CUDA kernels of the fastrl packed-sequence ops (semantics in ops.cpp). Compiled only when
// setup.py builds a CUDAExtension (CUDA torch and nvcc present), which defines FASTRL_WITH_CUDA.
//
// Building blocks, all on the current stream, int64 indexing throughout:
//   scan       at::cumsum of the flattened bool mask (int64, a device-wide CUB scan): the packed
//              index of every set position and, at row ends, cu_seqlens. No host round trip.
//   rows       small kernels that say, for each output row, which input row it copies (-1: zeros):
//              pack by a binary search of the scan (output row i <- first j with scan[j] > i),
//              unpack from cu_seqlens[b] + rank (clamped, as the reference), segment_broadcast and
//              position_ids by a binary search of cu_seqlens (torch.searchsorted right=True).
//   gather     copies whole rows as raw bytes (every dtype), 16/8/4/2/1-byte vectors by alignment,
//              a 2-D block (lanes over a row, several rows per block) so narrow and wide rows
//              both keep the threads busy; every output element is written once (no memset).
//   reduce     segment sums: one block per (segment, column tile), rows split over the block's
//              y threads and combined in shared memory; fp32 accumulation (fp64 for fp64, int64
//              for integers); deterministic (no atomics).
// The only host synchronisations: pack and position_ids read the total once when it is not given.
// Unlike the CPU kernels, nothing here can raise on data (that would need a sync): a count past
// 2^31 - 1 wraps in the int32 cu_seqlens, and inconsistent cu_seqlens are clamped, not reported.
#ifdef FASTRL_WITH_CUDA

#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>

#include "fastrl_ops.h"

namespace fastrl {
namespace {

using at::Tensor;

constexpr int kThreads = 256;

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// Most blocks worth launching for a grid-stride loop: 32 per SM of the current device.
int64_t max_blocks() {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount,
                                        c10::cuda::current_device()));
  return static_cast<int64_t>(sms) * 32;
}

// Grid for a grid-stride loop over n items: enough blocks to fill the device, no more.
unsigned int grid_for(int64_t n, int threads = kThreads) {
  const int64_t wanted = (n + threads - 1) / threads;
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min(wanted, max_blocks())));
}

__device__ __forceinline__ int64_t global_index() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}

__device__ __forceinline__ int64_t global_stride() {
  return static_cast<int64_t>(blockDim.x) * gridDim.x;
}

// Number of entries of the sorted cu_next[0..B) (= cu_seqlens[1..B]) that are <= p.
__device__ __forceinline__ int64_t segment_of(const int64_t* cu_next, int64_t B, int64_t p) {
  int64_t lo = 0, hi = B;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (cu_next[mid] <= p) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

int64_t inner_numel(const Tensor& t, int64_t leading_dims) {
  int64_t n = 1;
  for (int64_t d = leading_dims; d < t.dim(); ++d) n *= t.size(d);
  return n;
}

Tensor plain_contiguous(const Tensor& t) { return t.resolve_conj().resolve_neg().contiguous(); }

// Inclusive int64 scan (B*T,) of the flattened mask, and the mask as contiguous bool.
std::pair<Tensor, Tensor> mask_scan(const Tensor& mask) {
  Tensor m = mask.to(at::kBool).contiguous();  // [B, T]
  Tensor scan = at::cumsum(m.view({-1}), 0, at::kLong);  // [B*T]
  return {m, scan};
}

// ------------------------------------------------------------------------------------------------
// Row maps
// ------------------------------------------------------------------------------------------------

__global__ void cu_seqlens_from_scan_kernel(const int64_t* __restrict__ scan,
                                            int32_t* __restrict__ cu, int64_t B, int64_t T) {
  for (int64_t b = global_index(); b <= B; b += global_stride()) {
    cu[b] = (b == 0 || T == 0) ? 0 : static_cast<int32_t>(scan[b * T - 1]);
  }
}

// Packed row i copies flat position j = first index with scan[j] > i, or nothing (zeros) when
// i is at or past the number of set positions (a `total` larger than the mask's count).
__global__ void pack_rows_kernel(const int64_t* __restrict__ scan, int64_t n,
                                 int64_t* __restrict__ src_row, int64_t rows) {
  for (int64_t i = global_index(); i < rows; i += global_stride()) {
    int64_t lo = 0, hi = n;
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (scan[mid] > i) {
        hi = mid;
      } else {
        lo = mid + 1;
      }
    }
    src_row[i] = lo < n ? lo : -1;
  }
}

// Output position j = (b, t) copies packed row clamp(cu[b] + rank, 0, rows-1) where the mask is
// set (rank = set positions before t in row b), nothing (zeros) elsewhere.
__global__ void unpack_rows_kernel(const bool* __restrict__ mask, const int64_t* __restrict__ scan,
                                   const int64_t* __restrict__ cu, int64_t T, int64_t n,
                                   int64_t rows, int64_t* __restrict__ src_row) {
  for (int64_t j = global_index(); j < n; j += global_stride()) {
    if (!mask[j] || rows == 0) {
      src_row[j] = -1;
      continue;
    }
    const int64_t b = j / T;
    const int64_t before_row = b == 0 ? 0 : scan[b * T - 1];
    const int64_t index = cu[b] + (scan[j] - before_row - 1);
    src_row[j] = index < 0 ? 0 : (index >= rows ? rows - 1 : index);
  }
}

// Packed row p copies segment row s(p), or nothing (zeros) when s(p) == B (past cu_seqlens[-1]).
__global__ void segment_rows_kernel(const int64_t* __restrict__ cu, int64_t B, int64_t rows,
                                    int64_t* __restrict__ src_row) {
  for (int64_t p = global_index(); p < rows; p += global_stride()) {
    const int64_t seg = segment_of(cu + 1, B, p);
    src_row[p] = seg < B ? seg : -1;
  }
}

__global__ void position_ids_kernel(const int64_t* __restrict__ cu, int64_t B, int64_t rows,
                                    int64_t* __restrict__ out) {
  for (int64_t p = global_index(); p < rows; p += global_stride()) {
    out[p] = p - cu[segment_of(cu + 1, B, p)];
  }
}

// ------------------------------------------------------------------------------------------------
// Row gather: dst[r] = src[src_row[r]] (or zeros when src_row[r] < 0), rows of `vecs` vec_t
// ------------------------------------------------------------------------------------------------

template <typename vec_t>
__global__ void gather_rows_kernel(const vec_t* __restrict__ src, vec_t* __restrict__ dst,
                                   const int64_t* __restrict__ src_row, int64_t rows,
                                   int64_t vecs) {
  const int64_t row_step = static_cast<int64_t>(blockDim.y) * gridDim.x;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; r < rows;
       r += row_step) {
    const int64_t s = src_row[r];
    vec_t* out = dst + r * vecs;
    if (s >= 0) {
      const vec_t* in = src + s * vecs;
      for (int64_t v = threadIdx.x; v < vecs; v += blockDim.x) out[v] = in[v];
    } else {
      for (int64_t v = threadIdx.x; v < vecs; v += blockDim.x) out[v] = vec_t{};
    }
  }
}

template <typename vec_t>
void launch_gather_rows(const void* src, void* dst, const Tensor& src_row, int64_t row_bytes) {
  const int64_t rows = src_row.numel();
  const int64_t vecs = row_bytes / static_cast<int64_t>(sizeof(vec_t));
  unsigned int lanes = 1;
  while (lanes < 32 * 8 && lanes < vecs) lanes *= 2;  // power of two in [1, 256]
  const dim3 block(lanes, kThreads / lanes);
  const int64_t blocks = (rows + block.y - 1) / block.y;
  const dim3 grid(static_cast<unsigned int>(std::max<int64_t>(1, std::min(blocks, max_blocks()))));
  gather_rows_kernel<vec_t><<<grid, block, 0, stream()>>>(
      static_cast<const vec_t*>(src), static_cast<vec_t*>(dst), src_row.const_data_ptr<int64_t>(),
      rows, vecs);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Copies rows of `row_bytes` bytes from `src` to the rows of `dst` as `src_row` says.
void gather_rows(const Tensor& src, Tensor& dst, const Tensor& src_row, int64_t row_bytes) {
  if (src_row.numel() == 0 || row_bytes == 0) return;
  const void* in = src.const_data_ptr();  // may be null when src has no rows (all src_row < 0)
  void* out = dst.mutable_data_ptr();
  const auto bits = reinterpret_cast<uintptr_t>(in) | reinterpret_cast<uintptr_t>(out) |
                    static_cast<uintptr_t>(row_bytes);
  if (bits % 16 == 0) {
    launch_gather_rows<uint4>(in, out, src_row, row_bytes);
  } else if (bits % 8 == 0) {
    launch_gather_rows<uint2>(in, out, src_row, row_bytes);
  } else if (bits % 4 == 0) {
    launch_gather_rows<uint32_t>(in, out, src_row, row_bytes);
  } else if (bits % 2 == 0) {
    launch_gather_rows<uint16_t>(in, out, src_row, row_bytes);
  } else {
    launch_gather_rows<uint8_t>(in, out, src_row, row_bytes);
  }
}

Tensor cu_seqlens_from_scan(const Tensor& scan, const Tensor& mask) {
  const int64_t B = mask.size(0), T = mask.size(1);
  Tensor cu = at::empty({B + 1}, mask.options().dtype(at::kInt));  // [B+1]
  cu_seqlens_from_scan_kernel<<<grid_for(B + 1), kThreads, 0, stream()>>>(
      scan.const_data_ptr<int64_t>(), cu.mutable_data_ptr<int32_t>(), B, T);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return cu;
}

// ------------------------------------------------------------------------------------------------
// Ops
// ------------------------------------------------------------------------------------------------

std::tuple<Tensor, Tensor> pack_cuda(const Tensor& x, const Tensor& mask,
                                     std::optional<int64_t> total) {
  check_pack_inputs(x, mask);
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  const auto [m, scan] = mask_scan(mask);  // [B, T], [B*T]
  const int64_t n = scan.numel();
  // The one allowed host synchronisation: the number of set positions, only without `total`.
  const int64_t rows = total.has_value() ? *total : (n == 0 ? 0 : scan[n - 1].item<int64_t>());
  TORCH_CHECK(rows >= 0, "fastrl::pack: total must be >= 0, got ", rows);

  const Tensor xc = plain_contiguous(x);  // [B, T, ...]
  Tensor packed = at::empty(with_leading({rows}, x.sizes().slice(2)), x.options());  // [rows, ...]
  if (rows > 0) {
    Tensor src_row = at::empty({rows}, scan.options());  // [rows]
    pack_rows_kernel<<<grid_for(rows), kThreads, 0, stream()>>>(
        scan.const_data_ptr<int64_t>(), n, src_row.mutable_data_ptr<int64_t>(), rows);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    gather_rows(xc, packed, src_row, inner_numel(xc, 2) * static_cast<int64_t>(xc.element_size()));
  }
  return {packed, cu_seqlens_from_scan(scan, m)};
}

Tensor unpack_cuda(const Tensor& packed, const Tensor& cu_seqlens, const Tensor& mask) {
  check_unpack_inputs(packed, cu_seqlens, mask);
  const c10::cuda::OptionalCUDAGuard guard(packed.device());
  const int64_t T = mask.size(1), rows = packed.size(0);
  const auto [m, scan] = mask_scan(mask);  // [B, T], [B*T]
  const int64_t n = scan.numel();
  const Tensor cu = cu_seqlens.to(at::kLong).contiguous();  // [B+1]
  const Tensor pc = plain_contiguous(packed);  // [rows, ...]
  Tensor out = at::empty(with_leading({mask.size(0), T}, packed.sizes().slice(1)),
                         packed.options());  // [B, T, ...]
  if (n > 0) {
    Tensor src_row = at::empty({n}, scan.options());  // [B*T]
    unpack_rows_kernel<<<grid_for(n), kThreads, 0, stream()>>>(
        m.const_data_ptr<bool>(), scan.const_data_ptr<int64_t>(), cu.const_data_ptr<int64_t>(), T,
        n, rows, src_row.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    gather_rows(pc, out, src_row, inner_numel(pc, 1) * static_cast<int64_t>(pc.element_size()));
  }
  return out;
}

Tensor position_ids_cuda(const Tensor& cu_seqlens, std::optional<int64_t> total) {
  check_cu_seqlens(cu_seqlens, cu_seqlens, "position_ids");
  const c10::cuda::OptionalCUDAGuard guard(cu_seqlens.device());
  const Tensor cu = cu_seqlens.to(at::kLong).contiguous();  // [B+1]
  const int64_t B = cu.numel() - 1;
  // The one allowed host synchronisation: cu_seqlens[-1], only without `total`.
  const int64_t rows = total.has_value() ? *total : cu[B].item<int64_t>();
  TORCH_CHECK(rows >= 0, "fastrl::position_ids: total must be >= 0, got ", rows);
  Tensor out = at::empty({rows}, cu.options());  // [rows]
  if (rows > 0) {
    position_ids_kernel<<<grid_for(rows), kThreads, 0, stream()>>>(
        cu.const_data_ptr<int64_t>(), B, rows, out.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out;
}

template <typename scalar_t>
__global__ void segment_sum_kernel(const scalar_t* __restrict__ values,
                                   scalar_t* __restrict__ out, const int64_t* __restrict__ cu,
                                   int64_t B, int64_t rows, int64_t inner) {
  using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
  extern __shared__ unsigned char shared_bytes[];
  acc_t* partial = reinterpret_cast<acc_t*>(shared_bytes);  // [blockDim.y, blockDim.x]
  const int tx = threadIdx.x, ty = threadIdx.y, lanes = blockDim.x;
  // Every thread of the block runs the same trip counts, so the barriers below are uniform.
  for (int64_t b = blockIdx.x; b < B; b += gridDim.x) {
    const int64_t lo = b == 0 ? 0 : min(max(cu[b], int64_t{0}), rows);
    const int64_t hi = max(lo, min(max(cu[b + 1], int64_t{0}), rows));
    for (int64_t c0 = static_cast<int64_t>(blockIdx.y) * lanes; c0 < inner;
         c0 += static_cast<int64_t>(gridDim.y) * lanes) {
      const int64_t col = c0 + tx;
      acc_t acc = acc_t(0);
      if (col < inner) {
        for (int64_t p = lo + ty; p < hi; p += blockDim.y) {
          acc += static_cast<acc_t>(values[p * inner + col]);
        }
      }
      partial[ty * lanes + tx] = acc;
      __syncthreads();
      for (int half = blockDim.y / 2; half > 0; half /= 2) {
        if (ty < half) partial[ty * lanes + tx] += partial[(ty + half) * lanes + tx];
        __syncthreads();
      }
      if (ty == 0 && col < inner) out[b * inner + col] = static_cast<scalar_t>(partial[tx]);
      __syncthreads();  // `partial` is reused by the next tile
    }
  }
}

template <typename scalar_t>
void launch_segment_sum(const Tensor& values, Tensor& out, const Tensor& cu, int64_t B,
                        int64_t inner) {
  using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
  unsigned int lanes = 1;
  while (lanes < 32 && lanes < inner) lanes *= 2;  // columns per block: power of two in [1, 32]
  const dim3 block(lanes, kThreads / lanes);
  const int64_t tiles = (inner + lanes - 1) / lanes;
  const dim3 grid(static_cast<unsigned int>(std::min<int64_t>(B, 0x7fffffff)),
                  static_cast<unsigned int>(std::min<int64_t>(tiles, 65535)));
  const size_t shared = sizeof(acc_t) * block.x * block.y;
  segment_sum_kernel<scalar_t><<<grid, block, shared, stream()>>>(
      values.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
      cu.const_data_ptr<int64_t>(), B, values.size(0), inner);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

Tensor segment_sum_cuda(const Tensor& values, const Tensor& cu_seqlens) {
  check_segment_inputs(values, cu_seqlens, "segment_sum");
  const c10::cuda::OptionalCUDAGuard guard(values.device());
  const Tensor cu = cu_seqlens.to(at::kLong).contiguous();  // [B+1]
  const int64_t B = cu.numel() - 1;
  const Tensor vc = plain_contiguous(values);  // [rows, ...]
  const int64_t inner = inner_numel(vc, 1);
  Tensor out = at::empty(with_leading({B}, values.sizes().slice(1)), values.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_ALL_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "fastrl::segment_sum",
                             [&] { launch_segment_sum<scalar_t>(vc, out, cu, B, inner); });
  return out;
}

Tensor segment_broadcast_cuda(const Tensor& values, const Tensor& cu_seqlens, int64_t total) {
  check_segment_inputs(values, cu_seqlens, "segment_broadcast");
  const c10::cuda::OptionalCUDAGuard guard(values.device());
  const Tensor cu = cu_seqlens.to(at::kLong).contiguous();  // [B+1]
  const int64_t B = cu.numel() - 1;
  TORCH_CHECK(values.size(0) == B, "fastrl::segment_broadcast: values has ", values.size(0),
              " rows but cu_seqlens describes ", B, " segments");
  TORCH_CHECK(total >= 0, "fastrl::segment_broadcast: total must be >= 0, got ", total);
  const Tensor vc = plain_contiguous(values);  // [B, ...]
  Tensor out = at::empty(with_leading({total}, values.sizes().slice(1)), values.options());
  if (total > 0) {
    Tensor src_row = at::empty({total}, cu.options());  // [total]
    segment_rows_kernel<<<grid_for(total), kThreads, 0, stream()>>>(
        cu.const_data_ptr<int64_t>(), B, total, src_row.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    gather_rows(vc, out, src_row, inner_numel(vc, 1) * static_cast<int64_t>(vc.element_size()));
  }
  return out;
}

}  // namespace
}  // namespace fastrl

TORCH_LIBRARY_IMPL(fastrl, CUDA, m) {
  m.impl("pack", &fastrl::pack_cuda);
  m.impl("unpack", &fastrl::unpack_cuda);
  m.impl("position_ids", &fastrl::position_ids_cuda);
  m.impl("segment_sum", &fastrl::segment_sum_cuda);
  m.impl("segment_broadcast", &fastrl::segment_broadcast_cuda);
}

#endif  // FASTRL_WITH_CUDA
