// CPU kernels of the fastrl packed-sequence ops (semantics in ops.cpp).
//
// pack, unpack and segment_broadcast move whole rows of `inner` elements with memcpy, so they
// work for every dtype; the reductions dispatch on the dtype and accumulate in at::acc_type
// (fp64 for fp32/fp64, fp32 for fp16/bf16, int64 for integers). Work is split over the batch
// rows (or packed rows) with at::parallel_for; every output element is written exactly once.
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "fastrl_ops.h"

namespace fastrl {
namespace {

using at::Tensor;

// parallel_for grain (in items) for items that each cost about `work` element operations.
int64_t grain_for(int64_t work) {
  return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(work, 1));
}

// Number of elements in one row of a (rows, ...) or (B, T, ...) tensor.
int64_t inner_numel(const Tensor& t, int64_t leading_dims) {
  int64_t n = 1;
  for (int64_t d = leading_dims; d < t.dim(); ++d) n *= t.size(d);
  return n;
}

// Raw bytes of a contiguous, conjugation- and negation-resolved copy (or view) of t.
Tensor plain_contiguous(const Tensor& t) { return t.resolve_conj().resolve_neg().contiguous(); }

// Prefix sums (B+1,) of the row counts of a contiguous bool mask (B, T).
std::vector<int64_t> mask_prefix_counts(const bool* mask, int64_t B, int64_t T) {
  std::vector<int64_t> cu(B + 1, 0);
  at::parallel_for(0, B, grain_for(T), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const bool* row = mask + b * T;
      int64_t count = 0;
      for (int64_t t = 0; t < T; ++t) count += row[t];
      cu[b + 1] = count;
    }
  });
  for (int64_t b = 0; b < B; ++b) cu[b + 1] += cu[b];
  return cu;
}

Tensor to_int32_tensor(const std::vector<int64_t>& cu, const char* op) {
  TORCH_CHECK(cu.back() <= std::numeric_limits<int32_t>::max(), "fastrl::", op, ": ", cu.back(),
              " set positions do not fit the int32 cu_seqlens");
  Tensor out = at::empty({static_cast<int64_t>(cu.size())}, at::TensorOptions().dtype(at::kInt));
  int32_t* data = out.mutable_data_ptr<int32_t>();
  for (size_t i = 0; i < cu.size(); ++i) data[i] = static_cast<int32_t>(cu[i]);
  return out;
}

// cu_seqlens as a contiguous int64 CPU vector.
std::vector<int64_t> read_cu_seqlens(const Tensor& cu_seqlens) {
  const Tensor cu = cu_seqlens.to(at::kLong).contiguous();
  const int64_t* data = cu.const_data_ptr<int64_t>();
  return std::vector<int64_t>(data, data + cu.numel());
}

// Segment of packed row p: the number of cu[1..B] entries <= p (searchsorted right=True). Loops
// find it once per chunk and then step forward, which assumes cu sorted (as cu_seqlens always is).
int64_t segment_of(const std::vector<int64_t>& cu, int64_t B, int64_t p) {
  return std::upper_bound(cu.begin() + 1, cu.begin() + 1 + B, p) - (cu.begin() + 1);
}

// Rows [lo, hi) of segment b among `rows` packed rows: the rows p with segment_of(p) == b.
std::pair<int64_t, int64_t> segment_bounds(const std::vector<int64_t>& cu, int64_t b,
                                           int64_t rows) {
  const int64_t lo = b == 0 ? 0 : std::clamp<int64_t>(cu[b], 0, rows);
  const int64_t hi = std::clamp<int64_t>(cu[b + 1], 0, rows);
  return {lo, std::max(lo, hi)};
}

// ------------------------------------------------------------------------------------------------
// Packing
// ------------------------------------------------------------------------------------------------

std::tuple<Tensor, Tensor> pack_cpu(const Tensor& x, const Tensor& mask,
                                    std::optional<int64_t> total) {
  check_pack_inputs(x, mask);
  const int64_t B = mask.size(0), T = mask.size(1);
  const Tensor m = mask.to(at::kBool).contiguous();  // [B, T]
  const bool* m_data = m.const_data_ptr<bool>();
  const std::vector<int64_t> cu = mask_prefix_counts(m_data, B, T);
  const int64_t rows = total.value_or(cu[B]);
  TORCH_CHECK(rows >= 0, "fastrl::pack: total must be >= 0, got ", rows);

  const Tensor xc = plain_contiguous(x);  // [B, T, ...]
  Tensor packed = at::empty(with_leading({rows}, x.sizes().slice(2)), x.options());  // [rows, ...]
  const int64_t row_bytes = inner_numel(xc, 2) * static_cast<int64_t>(xc.element_size());
  if (rows > 0 && row_bytes > 0) {
    const char* src = static_cast<const char*>(xc.const_data_ptr());
    char* dst = static_cast<char*>(packed.mutable_data_ptr());
    at::parallel_for(0, B, grain_for(T + (cu[B] / std::max<int64_t>(B, 1)) * row_bytes),
                     [&](int64_t b0, int64_t b1) {
                       for (int64_t b = b0; b < b1; ++b) {
                         int64_t out = cu[b];
                         for (int64_t t = 0; t < T && out < rows; ++t) {
                           if (!m_data[b * T + t]) continue;
                           std::memcpy(dst + out * row_bytes, src + (b * T + t) * row_bytes,
                                       row_bytes);
                           ++out;
                         }
                       }
                     });
    if (rows > cu[B]) {  // a total past the mask's count pads with zero rows
      std::memset(dst + cu[B] * row_bytes, 0, (rows - cu[B]) * row_bytes);
    }
  }
  return {packed, to_int32_tensor(cu, "pack")};
}

Tensor unpack_cpu(const Tensor& packed, const Tensor& cu_seqlens, const Tensor& mask) {
  check_unpack_inputs(packed, cu_seqlens, mask);
  const int64_t B = mask.size(0), T = mask.size(1), rows = packed.size(0);
  const Tensor m = mask.to(at::kBool).contiguous();  // [B, T]
  const bool* m_data = m.const_data_ptr<bool>();
  const std::vector<int64_t> cu = read_cu_seqlens(cu_seqlens);
  const Tensor pc = plain_contiguous(packed);  // [rows, ...]
  // One zero fill (a single streaming pass over fresh pages), then only the set positions are
  // copied; zeroing position by position interleaved with the copies was twice as slow.
  Tensor out = at::zeros(with_leading({B, T}, packed.sizes().slice(1)), packed.options());
  const int64_t row_bytes = inner_numel(pc, 1) * static_cast<int64_t>(pc.element_size());
  if (out.numel() == 0 || rows == 0) return out;
  const char* src = static_cast<const char*>(pc.const_data_ptr());
  char* dst = static_cast<char*>(out.mutable_data_ptr());
  at::parallel_for(0, B, grain_for(T * row_bytes), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      int64_t rank = 0;  // set positions before t in row b
      for (int64_t t = 0; t < T; ++t) {
        if (!m_data[b * T + t]) continue;
        const int64_t index = std::clamp<int64_t>(cu[b] + rank, 0, rows - 1);
        std::memcpy(dst + (b * T + t) * row_bytes, src + index * row_bytes, row_bytes);
        ++rank;
      }
    }
  });
  return out;
}

Tensor position_ids_cpu(const Tensor& cu_seqlens, std::optional<int64_t> total) {
  check_cu_seqlens(cu_seqlens, cu_seqlens, "position_ids");
  const std::vector<int64_t> cu = read_cu_seqlens(cu_seqlens);
  const int64_t B = static_cast<int64_t>(cu.size()) - 1;
  const int64_t rows = total.value_or(cu[B]);
  TORCH_CHECK(rows >= 0, "fastrl::position_ids: total must be >= 0, got ", rows);
  Tensor out = at::empty({rows}, cu_seqlens.options().dtype(at::kLong));  // [rows]
  int64_t* data = out.mutable_data_ptr<int64_t>();
  at::parallel_for(0, rows, grain_for(1), [&](int64_t p0, int64_t p1) {
    int64_t seg = segment_of(cu, B, p0);
    for (int64_t p = p0; p < p1; ++p) {
      while (seg < B && cu[seg + 1] <= p) ++seg;
      data[p] = p - cu[seg];
    }
  });
  return out;
}

// ------------------------------------------------------------------------------------------------
// Segment sums and their adjoint
// ------------------------------------------------------------------------------------------------

template <typename scalar_t>
void segment_sum_kernel(const scalar_t* values, scalar_t* out, const std::vector<int64_t>& cu,
                        int64_t B, int64_t rows, int64_t inner) {
  using acc_t = at::acc_type<scalar_t, /*is_cuda=*/false>;
  at::parallel_for(0, B, grain_for(std::max<int64_t>(rows / std::max<int64_t>(B, 1), 1) * inner),
                   [&](int64_t b0, int64_t b1) {
                     std::vector<acc_t> acc(inner);
                     for (int64_t b = b0; b < b1; ++b) {
                       const auto [lo, hi] = segment_bounds(cu, b, rows);
                       std::fill(acc.begin(), acc.end(), acc_t(0));
                       for (int64_t p = lo; p < hi; ++p) {
                         const scalar_t* row = values + p * inner;
                         for (int64_t i = 0; i < inner; ++i) acc[i] += static_cast<acc_t>(row[i]);
                       }
                       for (int64_t i = 0; i < inner; ++i) {
                         out[b * inner + i] = static_cast<scalar_t>(acc[i]);
                       }
                     }
                   });
}

Tensor segment_sum_cpu(const Tensor& values, const Tensor& cu_seqlens) {
  check_segment_inputs(values, cu_seqlens, "segment_sum");
  const std::vector<int64_t> cu = read_cu_seqlens(cu_seqlens);
  const int64_t B = static_cast<int64_t>(cu.size()) - 1;
  const Tensor vc = plain_contiguous(values);  // [rows, ...]
  const int64_t rows = vc.size(0), inner = inner_numel(vc, 1);
  Tensor out = at::empty(with_leading({B}, values.sizes().slice(1)), values.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_ALL_TYPES_AND2(
      at::kHalf, at::kBFloat16, values.scalar_type(), "fastrl::segment_sum", [&] {
        segment_sum_kernel<scalar_t>(vc.const_data_ptr<scalar_t>(),
                                     out.mutable_data_ptr<scalar_t>(), cu, B, rows, inner);
      });
  return out;
}

Tensor segment_broadcast_cpu(const Tensor& values, const Tensor& cu_seqlens, int64_t total) {
  check_segment_inputs(values, cu_seqlens, "segment_broadcast");
  const std::vector<int64_t> cu = read_cu_seqlens(cu_seqlens);
  const int64_t B = static_cast<int64_t>(cu.size()) - 1;
  TORCH_CHECK(values.size(0) == B, "fastrl::segment_broadcast: values has ", values.size(0),
              " rows but cu_seqlens describes ", B, " segments");
  TORCH_CHECK(total >= 0, "fastrl::segment_broadcast: total must be >= 0, got ", total);
  const Tensor vc = plain_contiguous(values);  // [B, ...]
  Tensor out = at::empty(with_leading({total}, values.sizes().slice(1)), values.options());
  const int64_t row_bytes = inner_numel(vc, 1) * static_cast<int64_t>(vc.element_size());
  if (out.numel() == 0) return out;
  const char* src = static_cast<const char*>(vc.const_data_ptr());
  char* dst = static_cast<char*>(out.mutable_data_ptr());
  at::parallel_for(0, total, grain_for(row_bytes), [&](int64_t p0, int64_t p1) {
    int64_t seg = segment_of(cu, B, p0);
    for (int64_t p = p0; p < p1; ++p) {
      while (seg < B && cu[seg + 1] <= p) ++seg;
      if (seg < B) {
        std::memcpy(dst + p * row_bytes, src + seg * row_bytes, row_bytes);
      } else {
        std::memset(dst + p * row_bytes, 0, row_bytes);
      }
    }
  });
  return out;
}

}  // namespace
}  // namespace fastrl

TORCH_LIBRARY_IMPL(fastrl, CPU, m) {
  m.impl("pack", &fastrl::pack_cpu);
  m.impl("unpack", &fastrl::unpack_cpu);
  m.impl("position_ids", &fastrl::position_ids_cpu);
  m.impl("segment_sum", &fastrl::segment_sum_cpu);
  m.impl("segment_broadcast", &fastrl::segment_broadcast_cpu);
}
