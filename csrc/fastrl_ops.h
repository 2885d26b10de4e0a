// Shared declarations of the fastrl packed-sequence extension (`fastrl._C`).
//
// The ops are declared once with TORCH_LIBRARY in ops.cpp; ops_cpu.cpp registers the CPU kernels
// and ops_cuda.cu (CUDA builds only) the CUDA kernels. Both kernel files validate their inputs
// with the checks below so that the CPU and CUDA paths raise the same messages.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace fastrl {

// x (B, T, ...) and mask (B, T) on one device.
void check_pack_inputs(const at::Tensor& x, const at::Tensor& mask);
// A 1-D integer cu_seqlens with at least one entry, on the device of `like`.
void check_cu_seqlens(const at::Tensor& cu_seqlens, const at::Tensor& like, const char* op);
// packed (total, ...), cu_seqlens (B+1,), mask (B, T) on one device.
void check_unpack_inputs(const at::Tensor& packed, const at::Tensor& cu_seqlens,
                         const at::Tensor& mask);
// values (rows, ...) and cu_seqlens (B+1,) on one device.
void check_segment_inputs(const at::Tensor& values, const at::Tensor& cu_seqlens, const char* op);

// The shape (leading, rest...).
std::vector<int64_t> with_leading(std::vector<int64_t> leading, at::IntArrayRef rest);

}  // namespace fastrl
