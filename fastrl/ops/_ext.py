"""Python side of the packed-sequence extension `fastrl._C`: the "cuda" backend of `fastrl.ops`.

Importing this module imports `fastrl._C` (ImportError when it is not built, so that `fastrl.ops`
falls back to the torch references), which registers the ops `torch.ops.fastrl.*` with CPU kernels
(`csrc/ops_cpu.cpp`) and, in a CUDA build, CUDA kernels (`csrc/ops_cuda.cu`). This module adds:

- fake (meta) kernels, so that FakeTensor tracing, `torch.library.opcheck` and `torch.compile`
  work; outputs whose size depends on the data (`pack` and `position_ids` without `total`) get an
  unbacked size from `ctx.new_dynamic_size()`;
- autograd formulas (`torch.library.register_autograd`), written with the ops themselves so that
  double backward works too:
      pack                d x      = unpack(d packed, cu_seqlens, mask)
      unpack              d packed = pack(d out, mask, total=packed rows).packed
      segment_sum         d values = segment_broadcast(d out, cu_seqlens, rows)
      segment_broadcast   d values = segment_sum(d out, cu_seqlens)
  `position_ids` carries no gradient.

The functions below have the names and signatures of the `fastrl.ops` references and the same
results on consistent inputs (see `csrc/ops.cpp` for the exact semantics, edge cases included);
`segment_broadcast`, the adjoint of `segment_sum`, is not a `fastrl.ops` op.
Host synchronisation: none, except on CUDA when `total` is None in `pack` (the count of set mask
positions) and `position_ids` (`cu_seqlens[-1]`), each read once; pass `total` to avoid it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastrl import _C  # noqa: F401  (registers torch.ops.fastrl.*)

__all__ = [
    "has_cuda_kernels",
    "pack",
    "position_ids",
    "segment_broadcast",
    "segment_sum",
    "unpack",
]

_ops = torch.ops.fastrl


def has_cuda_kernels() -> bool:
    """Whether this build of `fastrl._C` has CUDA kernels (a CUDAExtension build)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("fastrl::pack", "CUDA")


# --------------------------------------------------------------------------------------------
# Public functions (the signatures of fastrl.ops)
# --------------------------------------------------------------------------------------------


def pack(x: Tensor, mask: Tensor, total: int | None = None) -> tuple[Tensor, Tensor]:
    """Rows of `x (B, T, ...)` where `mask (B, T)` is nonzero, in row-major order.

    Returns packed `(total, ...)` and int32 `cu_seqlens (B+1,)`. With `total` nothing is read
    back from the device (rows past the mask's count are zeros; a smaller total truncates).
    """
    packed, cu = _ops.pack(x, mask, total)
    return packed, cu


def unpack(packed: Tensor, cu_seqlens: Tensor, mask: Tensor) -> Tensor:
    """Inverse of `pack`: `(total, ...)` to `(B, T, ...)`, zeros where `mask` is unset."""
    return _ops.unpack(packed, cu_seqlens, mask)


def position_ids(cu_seqlens: Tensor, total: int | None = None) -> Tensor:
    """Int64 position of each packed token within its sequence `(total,)`, restarting at 0."""
    return _ops.position_ids(cu_seqlens, total)


def segment_sum(values: Tensor, cu_seqlens: Tensor) -> Tensor:
    """Per-sequence sum of packed `values (total, ...)`: `(B, ...)`, 0 for empty sequences."""
    return _ops.segment_sum(values, cu_seqlens)


def segment_broadcast(values: Tensor, cu_seqlens: Tensor, total: int) -> Tensor:
    """Per-sequence `values (B, ...)` repeated over each sequence's packed rows: `(total, ...)`.

    Rows past `cu_seqlens[-1]` are zeros. The adjoint of `segment_sum`.
    """
    return _ops.segment_broadcast(values, cu_seqlens, total)


# --------------------------------------------------------------------------------------------
# Fake (meta) kernels
# --------------------------------------------------------------------------------------------


def _check_cu_seqlens(cu: Tensor) -> None:
    torch._check(cu.dim() == 1 and cu.shape[0] >= 1, lambda: "cu_seqlens must be (B+1,)")
    torch._check(
        not cu.dtype.is_floating_point and not cu.dtype.is_complex and cu.dtype != torch.bool,
        lambda: f"cu_seqlens must be int32 or int64, got {cu.dtype}",
    )


@torch.library.register_fake("fastrl::pack")
def _pack_fake(x: Tensor, mask: Tensor, total: int | None = None) -> tuple[Tensor, Tensor]:
    torch._check(mask.dim() == 2, lambda: f"mask must be (B, T), got {tuple(mask.shape)}")
    torch._check(
        x.dim() >= 2 and x.shape[:2] == mask.shape,
        lambda: f"x {tuple(x.shape)} does not start with mask's shape {tuple(mask.shape)}",
    )
    if total is None:
        total = torch.library.get_ctx().new_dynamic_size()
    packed = x.new_empty((total, *x.shape[2:]))  # [total, ...]
    cu = mask.new_empty((mask.shape[0] + 1,), dtype=torch.int32)  # [B+1]
    return packed, cu


@torch.library.register_fake("fastrl::unpack")
def _unpack_fake(packed: Tensor, cu_seqlens: Tensor, mask: Tensor) -> Tensor:
    torch._check(mask.dim() == 2, lambda: f"mask must be (B, T), got {tuple(mask.shape)}")
    torch._check(packed.dim() >= 1, lambda: "packed must be (total, ...)")
    _check_cu_seqlens(cu_seqlens)
    torch._check(
        cu_seqlens.shape[0] == mask.shape[0] + 1, lambda: "cu_seqlens must have B+1 entries"
    )
    return packed.new_empty((*mask.shape, *packed.shape[1:]))  # [B, T, ...]


@torch.library.register_fake("fastrl::position_ids")
def _position_ids_fake(cu_seqlens: Tensor, total: int | None = None) -> Tensor:
    _check_cu_seqlens(cu_seqlens)
    if total is None:
        total = torch.library.get_ctx().new_dynamic_size()
    return cu_seqlens.new_empty((total,), dtype=torch.int64)  # [total]


@torch.library.register_fake("fastrl::segment_sum")
def _segment_sum_fake(values: Tensor, cu_seqlens: Tensor) -> Tensor:
    torch._check(values.dim() >= 1, lambda: "values must be (rows, ...)")
    _check_cu_seqlens(cu_seqlens)
    return values.new_empty((cu_seqlens.shape[0] - 1, *values.shape[1:]))  # [B, ...]


@torch.library.register_fake("fastrl::segment_broadcast")
def _segment_broadcast_fake(values: Tensor, cu_seqlens: Tensor, total: int) -> Tensor:
    torch._check(values.dim() >= 1, lambda: "values must be (B, ...)")
    _check_cu_seqlens(cu_seqlens)
    torch._check(values.shape[0] == cu_seqlens.shape[0] - 1, lambda: "values must have B rows")
    return values.new_empty((total, *values.shape[1:]))  # [total, ...]


# --------------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------------


def _pack_setup_context(ctx, inputs, output) -> None:
    _, mask, _ = inputs
    _, cu = output
    ctx.save_for_backward(mask, cu)


def _pack_backward(ctx, grad_packed: Tensor, _grad_cu: Tensor | None):
    mask, cu = ctx.saved_tensors
    return _ops.unpack(grad_packed, cu, mask), None, None


def _unpack_setup_context(ctx, inputs, output) -> None:
    packed, cu, mask = inputs
    ctx.rows = packed.shape[0]
    ctx.save_for_backward(cu, mask)


def _unpack_backward(ctx, grad: Tensor):
    _, mask = ctx.saved_tensors
    grad_packed, _ = _ops.pack(grad, mask, ctx.rows)
    return grad_packed, None, None


def _segment_sum_setup_context(ctx, inputs, output) -> None:
    values, cu = inputs
    ctx.rows = values.shape[0]
    ctx.save_for_backward(cu)


def _segment_sum_backward(ctx, grad: Tensor):
    (cu,) = ctx.saved_tensors
    return _ops.segment_broadcast(grad, cu, ctx.rows), None


def _segment_broadcast_setup_context(ctx, inputs, output) -> None:
    _, cu, _ = inputs
    ctx.save_for_backward(cu)


def _segment_broadcast_backward(ctx, grad: Tensor):
    (cu,) = ctx.saved_tensors
    return _ops.segment_sum(grad, cu), None, None


torch.library.register_autograd("fastrl::pack", _pack_backward, setup_context=_pack_setup_context)
torch.library.register_autograd(
    "fastrl::unpack", _unpack_backward, setup_context=_unpack_setup_context
)
torch.library.register_autograd(
    "fastrl::segment_sum", _segment_sum_backward, setup_context=_segment_sum_setup_context
)
torch.library.register_autograd(
    "fastrl::segment_broadcast",
    _segment_broadcast_backward,
    setup_context=_segment_broadcast_setup_context,
)
