// fastrl._C: the packed-sequence ops, registered with the PyTorch dispatcher as torch.ops.fastrl.*.
//
// Importing the module registers the schemas below and the kernels of ops_cpu.cpp (and, in a CUDA
// build, ops_cuda.cu). The fake (meta) kernels and the autograd formulas live in Python, in
// `fastrl.ops._ext` (named here with set_python_module so that torch finds them), which also
// exposes the functions that `fastrl.ops` dispatches to.
//
// Semantics (identical to the torch references in fastrl/ops/ref_packing.py on consistent inputs):
//   pack(x (B,T,...), mask (B,T), total?)  -> packed (total, ...), cu_seqlens int32 (B+1,)
//       the rows of x where mask != 0, in row-major order. With `total` given, nothing is read
//       back from the device; rows past the mask's count are zeros, and a smaller total keeps the
//       first `total` rows. Without it the CUDA kernel reads the count once (its only sync).
//   unpack(packed, cu_seqlens, mask)       -> (B, T, ...): packed[cu_seqlens[b] + rank] where mask
//       is set (rank = set positions before t in row b; index clamped to the packed rows, as the
//       reference does), zeros elsewhere.
//   position_ids(cu_seqlens, total?)       -> int64 (total,): p - cu_seqlens[s(p)], s(p) = number
//       of cu_seqlens[1:] entries <= p (torch.searchsorted(..., right=True)); total defaults to
//       cu_seqlens[-1] (read once from the device on CUDA).
//   segment_sum(values (rows,...), cu)     -> (B, ...): sum of rows with s(p) = b, accumulated in
//       fp32 (fp64 on CPU for fp32/fp64, int64 for integers), 0 for empty segments. Rows past
//       cu_seqlens[-1] belong to no segment and are ignored.
//   segment_broadcast(values (B,...), cu, total) -> (total, ...): values[s(p)], 0 when s(p) = B.
//       The adjoint of segment_sum (and per-sequence values, e.g. advantages, spread to tokens).
#include <Python.h>

#include <torch/library.h>

#include "fastrl_ops.h"

namespace fastrl {
namespace {

// mask (B, T).
void check_mask(const at::Tensor& mask, const char* op) {
  TORCH_CHECK(mask.dim() == 2, "fastrl::", op, ": mask must be (B, T), got shape ", mask.sizes());
}

}  // namespace

void check_pack_inputs(const at::Tensor& x, const at::Tensor& mask) {
  check_mask(mask, "pack");
  TORCH_CHECK(x.dim() >= 2 && x.size(0) == mask.size(0) && x.size(1) == mask.size(1),
              "fastrl::pack: x ", x.sizes(), " does not start with mask's shape ", mask.sizes());
  TORCH_CHECK(x.device() == mask.device(), "fastrl::pack: x is on ", x.device(),
              " but mask is on ", mask.device());
}

void check_cu_seqlens(const at::Tensor& cu_seqlens, const at::Tensor& like, const char* op) {
  TORCH_CHECK(cu_seqlens.dim() == 1 && cu_seqlens.numel() >= 1, "fastrl::", op,
              ": cu_seqlens must be (B+1,), got shape ", cu_seqlens.sizes());
  TORCH_CHECK(at::isIntegralType(cu_seqlens.scalar_type(), /*includeBool=*/false), "fastrl::", op,
              ": cu_seqlens must be int32 or int64, got ", cu_seqlens.scalar_type());
  TORCH_CHECK(cu_seqlens.device() == like.device(), "fastrl::", op, ": cu_seqlens is on ",
              cu_seqlens.device(), " but the other inputs are on ", like.device());
}

void check_unpack_inputs(const at::Tensor& packed, const at::Tensor& cu_seqlens,
                         const at::Tensor& mask) {
  check_mask(mask, "unpack");
  TORCH_CHECK(packed.dim() >= 1, "fastrl::unpack: packed must be (total, ...), got a 0-d tensor");
  check_cu_seqlens(cu_seqlens, packed, "unpack");
  TORCH_CHECK(cu_seqlens.size(0) == mask.size(0) + 1, "fastrl::unpack: cu_seqlens has ",
              cu_seqlens.size(0), " entries but mask has ", mask.size(0), " rows (needs B+1)");
  TORCH_CHECK(mask.device() == packed.device(), "fastrl::unpack: mask is on ", mask.device(),
              " but packed is on ", packed.device());
}

void check_segment_inputs(const at::Tensor& values, const at::Tensor& cu_seqlens, const char* op) {
  TORCH_CHECK(values.dim() >= 1, "fastrl::", op, ": values must be (rows, ...), got a 0-d tensor");
  check_cu_seqlens(cu_seqlens, values, op);
}

std::vector<int64_t> with_leading(std::vector<int64_t> leading, at::IntArrayRef rest) {
  leading.insert(leading.end(), rest.begin(), rest.end());
  return leading;
}

}  // namespace fastrl

TORCH_LIBRARY(fastrl, m) {
  m.set_python_module("fastrl.ops._ext");
  const std::vector<at::Tag> tags = {at::Tag::pt2_compliant_tag};
  m.def("pack(Tensor x, Tensor mask, SymInt? total=None) -> (Tensor packed, Tensor cu_seqlens)",
        tags);
  m.def("unpack(Tensor packed, Tensor cu_seqlens, Tensor mask) -> Tensor", tags);
  m.def("position_ids(Tensor cu_seqlens, SymInt? total=None) -> Tensor", tags);
  m.def("segment_sum(Tensor values, Tensor cu_seqlens) -> Tensor", tags);
  m.def("segment_broadcast(Tensor values, Tensor cu_seqlens, SymInt total) -> Tensor", tags);
}

// A plain extension module: importing it runs the registrations above (no pybind11 needed).
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {
      PyModuleDef_HEAD_INIT,
      "_C",
      "fastrl packed-sequence ops; importing registers torch.ops.fastrl.*",
      -1,
      nullptr,
      nullptr,
      nullptr,
      nullptr,
      nullptr};
  return PyModule_Create(&module);
}
