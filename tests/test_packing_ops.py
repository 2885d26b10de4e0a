"""Packing: `fastrl.ops.pack/unpack/position_ids/segment_sum` on the torch reference, and the
packed-sequence extension `fastrl._C` (through `fastrl.ops._ext`) against the torch references.

The extension's tests are skipped when it is not built (`pip install --no-build-isolation -e .`
builds it). Its CPU kernels are checked here: results against `fastrl.ops.reference`,
`torch.library.opcheck` (schema, fake kernels, autograd registration, AOT dispatch with dynamic
shapes), float64 gradcheck and a torch.compile trace. The CUDA kernels
are compared with the CPU kernels when a GPU and a CUDA build are present; `make cuda-check`
compiles them for sm_90a and sm_80.

That the CUDA kernels never synchronise with the host when `total` is given cannot be observed on
a CPU; it holds by construction (see csrc/ops_cuda.cu: the only `.item()` calls sit behind
`total` being None).
"""

from __future__ import annotations

import pytest
import torch

from fastrl import ops
from fastrl.ops import reference

try:
    from fastrl.ops import _ext

    _EXT_MISSING = ""
except ImportError as error:  # the extension is optional; fastrl.ops falls back to torch
    _ext = None
    _EXT_MISSING = (
        f"fastrl._C is not built ({error}); build it with `pip install --no-build-isolation -e .`"
    )

needs_ext = pytest.mark.skipif(_ext is None, reason=_EXT_MISSING)


# --------------------------------------------------------------------------------------------
# fastrl.ops on the torch reference
# --------------------------------------------------------------------------------------------


@pytest.fixture
def torch_backend(monkeypatch):
    """`fastrl.ops` on the torch reference."""
    monkeypatch.setenv("FASTRL_BACKEND", "torch")


def random_mask(batch: int, length: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(batch, length, generator=gen) < 0.6  # [B, T]
    mask[1] = False
    mask[-1] = True
    return mask


@pytest.mark.usefixtures("torch_backend")
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pack_unpack_round_trip(seed):
    mask = random_mask(6, 11, seed)  # [B, T]
    x = torch.randn(6, 11, 3).requires_grad_()  # [B, T, D]
    packed, cu_seqlens = ops.pack(x, mask)
    assert cu_seqlens.dtype == torch.int32 and cu_seqlens.shape == (7,)
    torch.testing.assert_close(packed, x[mask])
    lengths = mask.sum(dim=1)
    torch.testing.assert_close(cu_seqlens[1:] - cu_seqlens[:-1], lengths.int())
    packed_static, cu_static = ops.pack(x, mask, total=int(mask.sum()))
    torch.testing.assert_close(packed_static, packed)
    torch.testing.assert_close(cu_static, cu_seqlens)

    restored = ops.unpack(packed, cu_seqlens, mask)  # [B, T, D]
    torch.testing.assert_close(restored, x * mask[..., None])
    restored.sum().backward()
    torch.testing.assert_close(x.grad, mask[..., None].float().expand_as(x))


@pytest.mark.usefixtures("torch_backend")
def test_pack_empty_mask():
    mask = torch.zeros(3, 5, dtype=torch.bool)
    x = torch.randn(3, 5)
    packed, cu_seqlens = ops.pack(x, mask)
    assert packed.shape == (0,) and cu_seqlens.tolist() == [0, 0, 0, 0]
    assert torch.all(ops.unpack(packed, cu_seqlens, mask) == 0)


@pytest.mark.usefixtures("torch_backend")
def test_position_ids_and_segment_sum():
    mask = random_mask(5, 8, seed=3)  # [B, T]
    _, cu_seqlens = ops.pack(torch.zeros(5, 8), mask)
    lengths = mask.sum(dim=1).tolist()
    expected = torch.cat([torch.arange(n) for n in lengths])
    torch.testing.assert_close(ops.position_ids(cu_seqlens), expected)
    torch.testing.assert_close(ops.position_ids(cu_seqlens, total=sum(lengths)), expected)

    values = torch.randn(sum(lengths), dtype=torch.float64)  # [total]
    sums = ops.segment_sum(values, cu_seqlens)  # [B]
    expected_sums = torch.stack([chunk.sum() for chunk in values.split(lengths)])
    torch.testing.assert_close(sums, expected_sums)
    assert sums[1] == 0


# --------------------------------------------------------------------------------------------
# The extension
# --------------------------------------------------------------------------------------------

MASK_KINDS = ("holes", "left_pad", "empty_rows", "all_empty", "full", "one_row")


def make_mask(kind: str, seed: int = 0, batch: int = 5, length: int = 9) -> torch.Tensor:
    """Bool `(B, T)` masks with holes, left padding, empty rows, one row, all or nothing set."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "one_row":
        batch = 1
    mask = torch.rand(batch, length, generator=gen) < 0.6  # [B, T]
    if kind == "left_pad":
        lengths = torch.randint(0, length + 1, (batch,), generator=gen)  # [B]
        mask = torch.arange(length)[None, :] >= (length - lengths)[:, None]
    elif kind == "empty_rows":
        mask[0] = False
        mask[batch // 2] = False
        mask[-1] = False
    elif kind == "all_empty":
        mask[:] = False
    elif kind == "full":
        mask[:] = True
    return mask


def cu_seqlens_of(mask: torch.Tensor) -> torch.Tensor:
    """Int32 `(B+1,)` cu_seqlens of `mask (B, T)`, from the torch reference."""
    return reference.pack(torch.zeros(mask.shape), mask)[1]


def random_values(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen).to(dtype)
    return torch.randint(-1000, 1000, shape, generator=gen).to(dtype)


# --------------------------------------------------------------------------------------------
# Against the references
# --------------------------------------------------------------------------------------------


@needs_ext
@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64])
@pytest.mark.parametrize("trailing", [(), (3,), (2, 3)])
def test_pack_unpack_match_reference(kind, dtype, trailing):
    mask = make_mask(kind)  # [B, T]
    x = random_values((*mask.shape, *trailing), dtype)  # [B, T, ...]
    expected, expected_cu = reference.pack(x, mask)
    packed, cu = _ext.pack(x, mask)
    assert packed.dtype == dtype and cu.dtype == torch.int32
    assert torch.equal(packed, expected) and torch.equal(cu, expected_cu)
    packed_static, cu_static = _ext.pack(x, mask, total=int(mask.sum()))
    assert torch.equal(packed_static, expected) and torch.equal(cu_static, expected_cu)

    restored = _ext.unpack(packed, cu, mask)  # [B, T, ...]
    assert torch.equal(restored, reference.unpack(expected, expected_cu, mask))
    keep = mask.reshape(*mask.shape, *([1] * len(trailing)))
    assert torch.equal(restored, torch.where(keep, x, 0))


@needs_ext
@pytest.mark.parametrize("mask_dtype", [torch.int64, torch.float32, torch.uint8])
def test_non_bool_masks_and_strided_inputs(mask_dtype):
    mask = make_mask("holes", seed=4)
    x = random_values((mask.shape[1], mask.shape[0], 4), torch.float32).transpose(0, 1)
    packed, cu = _ext.pack(x, mask.to(mask_dtype))
    expected, expected_cu = reference.pack(x, mask)
    assert torch.equal(packed, expected) and torch.equal(cu, expected_cu)
    assert torch.equal(_ext.unpack(packed, cu.long(), mask.to(mask_dtype)), x * mask[..., None])


@needs_ext
def test_pack_total_pads_or_truncates():
    mask = make_mask("holes", seed=2)
    x = random_values((*mask.shape, 2), torch.float32)
    count = int(mask.sum())
    padded, _ = _ext.pack(x, mask, total=count + 3)
    assert torch.equal(padded[:count], x[mask]) and torch.all(padded[count:] == 0)
    truncated, _ = _ext.pack(x, mask, total=count - 2)
    assert torch.equal(truncated, reference.pack(x, mask, total=count - 2)[0])


@needs_ext
@pytest.mark.parametrize("kind", MASK_KINDS)
def test_position_ids_match_reference(kind):
    mask = make_mask(kind, seed=1)
    cu = cu_seqlens_of(mask)
    total = int(mask.sum())
    for given in (None, total, total + 4):
        expected = reference.position_ids(cu, given)
        assert torch.equal(_ext.position_ids(cu, given), expected)
        assert torch.equal(_ext.position_ids(cu.long(), given), expected)


@needs_ext
@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize(
    "dtype, atol, rtol",
    [(torch.float64, 1e-12, 1e-12), (torch.float32, 1e-5, 1e-5), (torch.bfloat16, 2e-2, 2e-2)],
)
@pytest.mark.parametrize("trailing", [(), (3,)])
def test_segment_sum_and_broadcast_match_reference(kind, dtype, atol, rtol, trailing):
    mask = make_mask(kind, seed=3)
    cu = cu_seqlens_of(mask)
    lengths = (cu[1:] - cu[:-1]).long()  # [B]
    values = random_values((int(mask.sum()), *trailing), dtype, seed=5)  # [total, ...]
    exact = reference.segment_sum(values.double(), cu)  # [B, ...]
    sums = _ext.segment_sum(values, cu)
    assert sums.dtype == dtype
    torch.testing.assert_close(sums.double(), exact, atol=atol, rtol=rtol)
    if dtype == torch.float64:
        torch.testing.assert_close(sums, reference.segment_sum(values, cu))
    assert torch.all(sums[lengths == 0] == 0)

    per_row = random_values((mask.shape[0], *trailing), dtype, seed=6)  # [B, ...]
    spread = _ext.segment_broadcast(per_row, cu, values.shape[0])  # [total, ...]
    assert torch.equal(spread, per_row.repeat_interleave(lengths, dim=0))


@needs_ext
def test_segment_sum_integers():
    mask = make_mask("holes", seed=7)
    cu = cu_seqlens_of(mask)
    values = random_values((int(mask.sum()), 2), torch.int64)
    assert torch.equal(_ext.segment_sum(values, cu), reference.segment_sum(values, cu))


@needs_ext
def test_input_errors():
    mask = make_mask("holes")
    with pytest.raises(RuntimeError, match="does not start with mask's shape"):
        _ext.pack(torch.zeros(2, 3), mask)
    with pytest.raises(RuntimeError, match=r"mask must be \(B, T\)"):
        _ext.pack(torch.zeros(5, 9), mask[0])
    with pytest.raises(RuntimeError, match="B\\+1"):
        _ext.unpack(torch.zeros(3), torch.zeros(3, dtype=torch.int32), mask)
    with pytest.raises(RuntimeError, match="int32 or int64"):
        _ext.segment_sum(torch.zeros(3), torch.zeros(3))


# --------------------------------------------------------------------------------------------
# opcheck, gradients, torch.compile
# --------------------------------------------------------------------------------------------


def opcheck_cases() -> list[tuple[str, tuple]]:
    mask = make_mask("empty_rows", seed=10)
    total = int(mask.sum())
    cu = cu_seqlens_of(mask)
    x = random_values((*mask.shape, 3), torch.float32).requires_grad_()
    packed = random_values((total, 3), torch.float32).requires_grad_()
    values = random_values((total, 2), torch.float32).requires_grad_()
    per_row = random_values((mask.shape[0], 2), torch.float32).requires_grad_()
    return [
        ("pack", (x, mask, None)),
        ("pack", (x, mask, total)),
        ("unpack", (packed, cu, mask)),
        ("position_ids", (cu, None)),
        ("position_ids", (cu, total)),
        ("segment_sum", (values, cu)),
        ("segment_broadcast", (per_row, cu, total)),
    ]


N_OPCHECK_CASES = len(opcheck_cases())


@needs_ext
@pytest.mark.parametrize("case", range(N_OPCHECK_CASES))
def test_opcheck(case):
    name, args = opcheck_cases()[case]
    torch.library.opcheck(getattr(torch.ops.fastrl, name).default, args)


@needs_ext
def test_gradcheck_float64():
    mask = make_mask("empty_rows", seed=11, batch=4, length=6)
    cu = cu_seqlens_of(mask)
    total = int(mask.sum())
    x = torch.randn(*mask.shape, 2, dtype=torch.float64, requires_grad=True)
    packed = torch.randn(total, 2, dtype=torch.float64, requires_grad=True)
    per_row = torch.randn(mask.shape[0], 2, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda x: _ext.pack(x, mask)[0], (x,))
    torch.autograd.gradcheck(lambda p: _ext.unpack(p, cu, mask), (packed,))
    torch.autograd.gradcheck(lambda v: _ext.segment_sum(v, cu), (packed,))
    torch.autograd.gradcheck(lambda v: _ext.segment_broadcast(v, cu, total), (per_row,))
    torch.autograd.gradgradcheck(lambda x: _ext.unpack(_ext.pack(x, mask)[0] ** 2, cu, mask), (x,))
    torch.autograd.gradgradcheck(lambda v: _ext.segment_sum(v**2, cu), (packed,))


@needs_ext
def test_gradients_match_reference():
    mask = make_mask("holes", seed=12)
    x = torch.randn(*mask.shape, 3, requires_grad=True)
    ref_x = x.detach().clone().requires_grad_()
    weights = torch.randn(mask.shape[0], 3)
    loss = (_ext.segment_sum(*_ext.pack(x, mask)) * weights).sum()
    loss.backward()
    ref_loss = (reference.segment_sum(*reference.pack(ref_x, mask)) * weights).sum()
    ref_loss.backward()
    torch.testing.assert_close(x.grad, ref_x.grad)


@needs_ext
def test_torch_compile_traces_data_dependent_sizes():
    def per_sequence_sum(x, mask):
        packed, cu = torch.ops.fastrl.pack(x, mask)
        return torch.ops.fastrl.segment_sum(packed * 2, cu)

    compiled = torch.compile(per_sequence_sum, backend="aot_eager", fullgraph=True)
    mask = make_mask("empty_rows", seed=13)
    x = torch.randn(*mask.shape, 4)
    torch.testing.assert_close(compiled(x, mask), per_sequence_sum(x, mask))


# --------------------------------------------------------------------------------------------
# CUDA kernels against the CPU kernels (GPU machines with a CUDA build only)
# --------------------------------------------------------------------------------------------


needs_cuda_build = pytest.mark.skipif(
    not (torch.cuda.is_available() and _ext is not None and _ext.has_cuda_kernels()),
    reason="needs a CUDA device and a CUDA build of fastrl._C",
)


@pytest.mark.gpu
@needs_cuda_build
@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64])
def test_cuda_matches_cpu(kind, dtype):
    for trailing in [(), (3,), (8,), (5, 7)]:
        check_cuda_matches_cpu(kind, dtype, trailing)


@pytest.mark.gpu
@needs_cuda_build
def test_cuda_large_and_wide():
    check_cuda_matches_cpu("holes", torch.float32, (7,), batch=64, length=4096)
    check_cuda_matches_cpu("left_pad", torch.bfloat16, (1024,), batch=8, length=512)


@pytest.mark.gpu
@needs_cuda_build
@pytest.mark.parametrize("case", range(N_OPCHECK_CASES))
def test_opcheck_cuda(case):
    name, args = opcheck_cases()[case]

    def to_cuda(a):
        if not isinstance(a, torch.Tensor):
            return a
        return a.detach().cuda().requires_grad_(a.requires_grad)

    torch.library.opcheck(getattr(torch.ops.fastrl, name).default, tuple(map(to_cuda, args)))


def check_cuda_matches_cpu(
    kind: str, dtype: torch.dtype, trailing: tuple[int, ...], batch: int = 7, length: int = 33
) -> None:
    mask = make_mask(kind, seed=14, batch=batch, length=length)
    x = random_values((*mask.shape, *trailing), dtype)
    total = int(mask.sum())
    dev = torch.device("cuda")
    packed, cu = _ext.pack(x, mask)
    for given in (None, total, total + 5):
        got, got_cu = _ext.pack(x.to(dev), mask.to(dev), given)
        expected = _ext.pack(x, mask, given)[0]
        assert torch.equal(got.cpu(), expected) and torch.equal(got_cu.cpu(), cu)
    assert torch.equal(
        _ext.unpack(packed.to(dev), cu.to(dev), mask.to(dev)).cpu(), _ext.unpack(packed, cu, mask)
    )
    for given in (None, total, total + 5):
        assert torch.equal(_ext.position_ids(cu.to(dev), given).cpu(), _ext.position_ids(cu, given))
    per_row = random_values((mask.shape[0], *trailing), dtype, seed=2)
    assert torch.equal(
        _ext.segment_broadcast(per_row.to(dev), cu.to(dev), total).cpu(),
        _ext.segment_broadcast(per_row, cu, total),
    )
    tol = {"atol": 2e-2, "rtol": 2e-2} if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(
        _ext.segment_sum(packed.to(dev), cu.to(dev)).cpu(), _ext.segment_sum(packed, cu), **tol
    )
