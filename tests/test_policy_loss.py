"""`fastrl.ops.policy_loss`: the torch reference and the fused Triton kernel against float64.

The Triton kernel runs under the Triton interpreter on CPU tensors (see tests/test_logprobs.py for
how `TRITON_INTERPRET` is set around its import). On a CUDA machine the same kernels run compiled;
one test compiles them for sm_90 in a subprocess (no GPU needed).
"""

import os

_SET_INTERPRET = "TRITON_INTERPRET" not in os.environ
os.environ.setdefault("TRITON_INTERPRET", "1")

import contextlib  # noqa: E402
import importlib  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="the triton package is not installed")

import fastrl.triton_kernels  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from fastrl import ops  # noqa: E402
from fastrl.ops import reference  # noqa: E402

# By module name: once the package re-exports the function, `fastrl.triton_kernels.policy_loss`
# as an attribute is the function, not this module.
tk = importlib.import_module("fastrl.triton_kernels.policy_loss")
if not isinstance(tk._policy_loss_rows_kernel, InterpretedFunction):
    # Imported earlier without the interpreter (compiled kernels cannot take CPU tensors).
    tk = importlib.reload(tk)
    importlib.reload(fastrl.triton_kernels)
if _SET_INTERPRET:
    del os.environ["TRITON_INTERPRET"]

AGGS = reference.LOSS_AGGREGATIONS
F32_TOL = {"rtol": 1e-5, "atol": 1e-6}
F64_TOL = {"rtol": 1e-10, "atol": 1e-12}
BF16_TOL = {"rtol": 2e-2, "atol": 2e-3}


@pytest.fixture(autouse=True)
def _torch_backend(monkeypatch):
    """`fastrl.ops` on the torch reference unless a test forces another backend."""
    monkeypatch.setenv("FASTRL_BACKEND", "torch")


# --------------------------------------------------------------------------------------------
# Torch reference (through fastrl.ops)
# --------------------------------------------------------------------------------------------


def naive_policy_loss(
    logp,
    old,
    adv,
    mask,
    ref,
    ent,
    clip_low,
    clip_high,
    dual_clip,
    kl_coef,
    est,
    ent_coef,
    agg,
    norm_len,
):
    """Element-by-element float64 re-implementation of the policy loss."""
    n_rows, n_cols = logp.shape
    rows = []
    for b in range(n_rows):
        terms = []
        for t in range(n_cols):
            if not mask[b, t]:
                continue
            a = adv[b] if adv.dim() == 1 else adv[b, t]
            r = torch.exp(logp[b, t] - old[b, t])
            pg = torch.maximum(-a * r, -a * torch.clamp(r, 1 - clip_low, 1 + clip_high))
            if dual_clip is not None and a < 0:
                pg = torch.minimum(pg, -a * dual_clip)
            d = ref[b, t] - logp[b, t]
            kl = {"k1": -d, "k2": d * d / 2, "k3": torch.exp(d) - d - 1}[est]
            terms.append(pg + kl_coef * kl - ent_coef * ent[b, t])
        rows.append(terms)
    nonempty = [torch.stack(terms) for terms in rows if terms]
    if agg == "token-mean":
        return torch.cat(nonempty).mean()
    if agg == "seq-mean-token-mean":
        return torch.stack([x.mean() for x in nonempty]).mean()
    if agg == "seq-mean-token-sum":
        return torch.stack([x.sum() for x in nonempty]).mean()
    return torch.stack([x.sum() / (norm_len or n_cols) for x in nonempty]).mean()


def policy_inputs(batch: int, length: int, seed: int, per_token_adv: bool):
    gen = torch.Generator().manual_seed(seed)
    kw = {"generator": gen, "dtype": torch.float64}
    logp = (-torch.rand(batch, length, **kw) * 3 - 0.05).requires_grad_()  # [B, T]
    old = logp.detach() + torch.randn(batch, length, **kw) * 0.4  # [B, T]
    ref = logp.detach() + torch.randn(batch, length, **kw) * 0.3  # [B, T]
    ent = (torch.rand(batch, length, **kw) * 2 + 0.1).requires_grad_()  # [B, T]
    adv_shape = (batch, length) if per_token_adv else (batch,)
    adv = torch.randn(*adv_shape, **kw)
    mask = torch.rand(batch, length, generator=gen) < 0.7  # [B, T]
    mask[2] = False  # an empty row
    mask[0, 0] = True
    return logp, old, adv, mask, ref, ent


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("per_token_adv", [False, True])
@pytest.mark.parametrize("est", ["k1", "k2", "k3"])
@pytest.mark.parametrize("dual_clip", [None, 3.0])
def test_policy_loss_matches_float64(agg, per_token_adv, est, dual_clip):
    logp, old, adv, mask, ref, ent = policy_inputs(5, 9, seed=11, per_token_adv=per_token_adv)
    kw = {
        "clip_low": 0.2,
        "clip_high": 0.28,
        "dual_clip": dual_clip,
        "kl_coef": 0.1,
        "kl_estimator": est,
        "entropy_coef": 0.01,
        "loss_agg": agg,
        "norm_len": 12 if agg == "seq-mean-token-sum-norm" else None,
    }
    loss, stats = ops.policy_loss(logp, old, adv, mask, ref_logprobs=ref, entropy=ent, **kw)
    expected = naive_policy_loss(
        logp,
        old,
        adv,
        mask,
        ref,
        ent,
        kw["clip_low"],
        kw["clip_high"],
        dual_clip,
        kw["kl_coef"],
        est,
        kw["entropy_coef"],
        agg,
        kw["norm_len"],
    )
    torch.testing.assert_close(loss, expected, atol=1e-12, rtol=1e-10)
    got = torch.autograd.grad(loss, (logp, ent))
    want = torch.autograd.grad(expected, (logp, ent))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=1e-10)
    for key in (
        "clip_frac",
        "clip_frac_low",
        "clip_frac_high",
        "kl",
        "ratio_mean",
        "pg_loss",
        "entropy",
    ):
        assert stats[key].dim() == 0 and not stats[key].requires_grad
    assert ("dual_clip_frac" in stats) == (dual_clip is not None)


def test_policy_loss_hand_example():
    ratios = torch.tensor([[1.5, 0.5, 1.1, 0.5, 5.0, 9.0]], dtype=torch.float64)
    old = torch.full_like(ratios, -1.0)
    logp = (old + ratios.log()).requires_grad_()  # [1, T]
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0, -1.0, 2.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])  # the last token is padding
    loss, stats = ops.policy_loss(logp, old, adv, mask, dual_clip=3.0)
    # pg: −A·clip → −1.2; unclipped −0.5; 1.1; clipped low 0.8; max(5, 0.8) then dual clip 3
    torch.testing.assert_close(loss, torch.tensor((-1.2 - 0.5 + 1.1 + 0.8 + 3.0) / 5).double())
    torch.testing.assert_close(stats["clip_frac_high"], torch.tensor(0.2).double())
    torch.testing.assert_close(stats["clip_frac_low"], torch.tensor(0.2).double())
    torch.testing.assert_close(stats["clip_frac"], torch.tensor(0.4).double())
    torch.testing.assert_close(stats["dual_clip_frac"], torch.tensor(0.2).double())
    torch.testing.assert_close(stats["ratio_mean"], torch.tensor(8.6 / 5).double())
    torch.testing.assert_close(stats["kl"], torch.tensor(0.0).double())
    (grad,) = torch.autograd.grad(loss, logp)
    # only tokens 1 (unclipped, A = 1) and 2 (unclipped, A = −1) carry gradient: −A·r / 5
    expected = torch.tensor([[0.0, -0.5 / 5, 1.1 / 5, 0.0, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(grad, expected)


@pytest.mark.parametrize("agg", AGGS)
def test_policy_loss_skips_empty_rows(agg):
    logp, old, adv, mask, ref, ent = policy_inputs(5, 9, seed=12, per_token_adv=False)
    kw = {
        "ref_logprobs": ref,
        "entropy": ent,
        "kl_coef": 0.05,
        "entropy_coef": 0.02,
        "loss_agg": agg,
        "norm_len": 9,
    }
    loss, _ = ops.policy_loss(logp, old, adv, mask, **kw)
    keep = torch.tensor([0, 1, 3, 4])
    kept = {k: (v[keep] if torch.is_tensor(v) else v) for k, v in kw.items()}
    loss_kept, _ = ops.policy_loss(logp[keep], old[keep], adv[keep], mask[keep], **kept)
    torch.testing.assert_close(loss, loss_kept, atol=1e-12, rtol=1e-12)


def test_seq_mean_token_sum_norm_counts_only_rows_with_loss_tokens():
    """B in Σℓm / (B · norm_len) is the rows that have a loss token (verl), not every row."""
    logp = torch.zeros(3, 4, dtype=torch.float64, requires_grad=True)  # r = 1: pg = -A
    adv = torch.tensor([1.0, 2.0, 5.0], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)  # row 1 empty
    loss, _ = ops.policy_loss(logp, logp.detach(), adv, mask, loss_agg="seq-mean-token-sum-norm",
                              norm_len=4)  # fmt: skip
    # (-1·2 - 5·3) / (2 rows · 4); dividing by all 3 rows would give -17/12
    assert loss.item() == pytest.approx(-17 / 8)


@pytest.mark.parametrize("agg", AGGS)
def test_policy_loss_all_empty_mask(agg):
    logp, old, adv, _, ref, ent = policy_inputs(3, 4, seed=13, per_token_adv=True)
    old = old.clone()
    old[0, 0] = -1e4  # padding garbage must not leak into the loss or its gradient
    mask = torch.zeros(3, 4, dtype=torch.bool)
    loss, stats = ops.policy_loss(
        logp, old, adv, mask, ref_logprobs=ref, entropy=ent, kl_coef=0.1, loss_agg=agg
    )
    assert loss.item() == 0.0
    (grad,) = torch.autograd.grad(loss, logp)
    assert torch.all(grad == 0)
    assert all(torch.isfinite(v) for v in stats.values())


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_policy_loss_rejects_bad_options(backend, monkeypatch):
    monkeypatch.setenv("FASTRL_BACKEND", backend)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    logp, old, adv, mask, ref, _ = policy_inputs(3, 4, seed=14, per_token_adv=False)
    with pytest.raises(ValueError, match="seq-mean-token-mean"):
        ops.policy_loss(logp, old, adv, mask, loss_agg="sum")
    with pytest.raises(ValueError, match="k3"):
        ops.policy_loss(logp, old, adv, mask, ref_logprobs=ref, kl_estimator="k4")
    with pytest.raises(ValueError, match="ref_logprobs"):
        ops.policy_loss(logp, old, adv, mask, kl_coef=0.1)
    with pytest.raises(ValueError, match="dual_clip"):
        ops.policy_loss(logp, old, adv, mask, dual_clip=0.5)
    with pytest.raises(ValueError, match="advantages"):
        ops.policy_loss(logp, old, adv[:2], mask)
    with pytest.raises(ValueError, match="mask"):
        ops.policy_loss(logp, old, adv, mask[:, :2])
    with pytest.raises(RuntimeError, match="same device"):
        ops.policy_loss(logp, old.to("meta"), adv, mask)


# --------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------


def make_inputs(
    batch: int,
    length: int,
    seed: int,
    *,
    per_token_adv: bool = False,
    dtype: torch.dtype = torch.float32,
    spread: float = 0.4,
    empty_rows: tuple[int, ...] = (),
):
    """Random non-zero `(logp, old, adv, mask, ref, ent)` with `logp` and `ent` requiring grad."""
    gen = torch.Generator().manual_seed(seed)
    kw = {"generator": gen, "dtype": torch.float64}
    logp = -torch.rand(batch, length, **kw) * 3 - 0.05  # [B, T]
    old = logp + torch.randn(batch, length, **kw) * spread  # [B, T]
    ref = logp + torch.randn(batch, length, **kw) * 0.3  # [B, T]
    ent = torch.rand(batch, length, **kw) * 2 + 0.1  # [B, T]
    adv = torch.randn(*((batch, length) if per_token_adv else (batch,)), **kw)
    mask = torch.rand(batch, length, generator=gen) < 0.7  # [B, T]
    mask[:, :1] = True
    for row in empty_rows:
        mask[row] = False
    old[~mask] = -1e4  # padding garbage must not leak into anything
    logp, ent = (x.to(dtype).requires_grad_() for x in (logp, ent))
    old, ref, adv = (x.to(dtype) for x in (old, ref, adv))
    return logp, old, adv, mask, ref, ent


@contextlib.contextmanager
def poisoned_allocations():
    """Fill every `torch.empty` buffer with NaN (or 123) so unwritten outputs cannot pass."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        return out.fill_(float("nan") if out.is_floating_point() else 123)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "empty", empty)
        yield


def run_loss(fn, logp, old, adv, mask, ref, ent, kw):
    """Loss, stats and the gradients w.r.t. (logp, ent) (None where not in the graph)."""
    loss, stats = fn(logp, old, adv, mask, ref_logprobs=ref, entropy=ent, **kw)
    inputs = [x for x in (logp, ent) if x is not None and x.requires_grad]
    grads = torch.autograd.grad(loss, inputs, allow_unused=True) if loss.requires_grad else ()
    return loss, stats, list(grads)


def leaf64(x):
    return None if x is None else x.detach().double().requires_grad_(x.requires_grad)


def check_against_float64(logp, old, adv, mask, ref, ent, kw, tol=F32_TOL):
    """Run the Triton loss on poisoned buffers and compare it with the float64 reference."""
    with poisoned_allocations():
        loss, stats, grads = run_loss(tk.policy_loss, logp, old, adv, mask, ref, ent, kw)
    args64 = [leaf64(logp), leaf64(old), leaf64(adv), mask, leaf64(ref), leaf64(ent)]
    want_loss, want_stats, want_grads = run_loss(reference.policy_loss, *args64, kw)
    torch.testing.assert_close(loss.double(), want_loss, **tol)
    assert list(stats) == list(want_stats)
    for key, value in stats.items():
        assert value.dim() == 0 and not value.requires_grad, key
        torch.testing.assert_close(value.double(), want_stats[key], **tol, msg=key)
    assert len(grads) == len(want_grads)
    for got, want in zip(grads, want_grads):
        assert (got is None) == (want is None)
        if got is not None:
            assert torch.isfinite(got).all()
            torch.testing.assert_close(got.double(), want, **tol)
    return loss, stats, grads


def options(agg: str = "token-mean", **overrides):
    kw = {
        "clip_low": 0.2,
        "clip_high": 0.28,
        "dual_clip": None,
        "kl_coef": 0.1,
        "kl_estimator": "k3",
        "entropy_coef": 0.01,
        "loss_agg": agg,
        "norm_len": 40 if agg == "seq-mean-token-sum-norm" else None,
    }
    kw.update(overrides)
    return kw


# --------------------------------------------------------------------------------------------
# Values and gradients
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("est", reference.KL_ESTIMATORS)
@pytest.mark.parametrize("dual_clip", [None, 3.0])
def test_triton_matches_float64_reference(agg, est, dual_clip):
    per_token = est != "k2"
    inputs = make_inputs(5, 37, seed=1, per_token_adv=per_token, empty_rows=(2,))
    kw = options(agg, kl_estimator=est, dual_clip=dual_clip)
    _, stats, grads = check_against_float64(*inputs, kw)
    assert ("dual_clip_frac" in stats) == (dual_clip is not None)
    assert len(grads) == 2 and stats["kl"] != 0
    assert torch.all(grads[0][~inputs[3]] == 0) and torch.all(grads[1][~inputs[3]] == 0)


@pytest.mark.parametrize("agg", AGGS)
def test_triton_no_reference_no_entropy(agg):
    logp, old, adv, mask, _, _ = make_inputs(4, 37, seed=2, empty_rows=(1,))
    kw = options(agg, kl_coef=0.0, entropy_coef=0.0)
    _, stats, _ = check_against_float64(logp, old, adv, mask, None, None, kw)
    assert stats["kl"] == 0 and "entropy" not in stats


def test_triton_zero_coefficients_keep_kl_and_entropy_out_of_the_graph():
    logp, old, adv, mask, ref, ent = make_inputs(3, 37, seed=3)
    kw = options("seq-mean-token-mean", kl_coef=0.0, entropy_coef=0.0)
    _, stats, grads = check_against_float64(logp, old, adv, mask, ref, ent, kw)
    assert grads[1] is None  # entropy requires grad but is not part of the loss
    assert stats["kl"] > 0 and stats["entropy"] > 0


@pytest.mark.parametrize("agg", AGGS)
def test_triton_empty_rows_single_row_odd_length(agg):
    kw = options(agg, dual_clip=2.5)
    check_against_float64(*make_inputs(1, 37, seed=4, per_token_adv=True), kw)
    check_against_float64(*make_inputs(4, 37, seed=5, empty_rows=(1, 3)), kw)


@pytest.mark.parametrize("agg", AGGS)
def test_triton_rows_spanning_several_blocks(agg, monkeypatch):
    monkeypatch.setitem(tk.MAX_BLOCK_T, torch.float32, 16)  # T = 37: three loop steps per row
    kw = options(agg, dual_clip=3.0, kl_estimator="k2")
    check_against_float64(*make_inputs(3, 37, seed=17, per_token_adv=True, empty_rows=(1,)), kw)


def test_triton_long_rows_and_degenerate_shapes():
    length = tk.MAX_BLOCK_T[torch.float32] + 77
    kw = options("seq-mean-token-mean", dual_clip=3.0)
    check_against_float64(*make_inputs(2, length, seed=18, empty_rows=(1,)), kw)
    for batch, length in ((0, 5), (3, 0)):
        logp, old, adv, mask, ref, ent = make_inputs(batch, length, seed=19)
        check_against_float64(logp, old, adv, mask, ref, ent, kw)


@pytest.mark.parametrize("agg", AGGS)
def test_triton_all_empty_mask(agg):
    logp, old, adv, mask, ref, ent = make_inputs(3, 5, seed=6, per_token_adv=True)
    mask = torch.zeros_like(mask)
    kw = options(agg, dual_clip=3.0)
    loss, stats, grads = check_against_float64(logp, old, adv, mask, ref, ent, kw)
    assert loss.item() == 0.0
    assert all(torch.all(g == 0) for g in grads)
    assert all(torch.isfinite(v) for v in stats.values())


def test_triton_float64_inputs_match_tightly():
    for agg in AGGS:
        inputs = make_inputs(4, 37, seed=7, dtype=torch.float64, empty_rows=(3,))
        check_against_float64(*inputs, options(agg, dual_clip=3.0), tol=F64_TOL)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_triton_bf16_inputs(agg):
    inputs = make_inputs(4, 37, seed=8, dtype=torch.bfloat16, per_token_adv=True)
    loss, stats, grads = check_against_float64(*inputs, options(agg, dual_clip=3.0), BF16_TOL)
    assert loss.dtype == torch.bfloat16 and grads[0].dtype == torch.bfloat16
    assert all(v.dtype == torch.bfloat16 for v in stats.values())


@pytest.mark.parametrize("dual_clip", [None, 2.0])
def test_triton_ratios_far_outside_the_clip_range(dual_clip):
    logp, old, adv, mask, _, ent = make_inputs(
        6, 37, seed=9, per_token_adv=True, spread=1.5, empty_rows=(4,)
    )
    kw = options(
        "seq-mean-token-sum", clip_low=0.1, clip_high=0.3, dual_clip=dual_clip, kl_coef=0.0
    )
    _, stats, grads = check_against_float64(logp, old, adv, mask, None, ent, kw)
    assert 0 < stats["clip_frac"] < 1
    assert stats["clip_frac_low"] > 0 and stats["clip_frac_high"] > 0
    if dual_clip is not None:
        assert stats["dual_clip_frac"] > 0
    # without a KL term, clipped tokens get no gradient at all
    assert 0 < torch.count_nonzero(grads[0]) < torch.count_nonzero(mask)


def test_triton_hand_example_ties_and_clipping():
    """The hand example above: in-range ratios (u == c) keep the full gradient."""
    ratios = torch.tensor([[1.5, 0.5, 1.1, 0.5, 5.0, 9.0]], dtype=torch.float64)
    old = torch.full_like(ratios, -1.0)
    logp = (old + ratios.log()).requires_grad_()  # [1, T]
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0, -1.0, 2.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])
    kw = options(dual_clip=3.0, clip_high=0.2, kl_coef=0.0, entropy_coef=0.0)
    _, stats, (grad,) = check_against_float64(logp, old, adv, mask, None, None, kw, F64_TOL)
    expected = torch.tensor([[0.0, -0.5 / 5, 1.1 / 5, 0.0, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(grad, expected)
    torch.testing.assert_close(stats["clip_frac"], torch.tensor(0.4).double())
    torch.testing.assert_close(stats["dual_clip_frac"], torch.tensor(0.2).double())


@pytest.mark.parametrize("mask_dtype", [torch.int64, torch.float32, torch.uint8])
def test_triton_mask_dtypes_and_strided_inputs(mask_dtype):
    logp, old, adv, mask, ref, ent = make_inputs(7, 5, seed=10, per_token_adv=True)
    # (T, B) storage seen as (B, T): every input strided along both dimensions
    logp_t, ent_t = (x.detach().T.contiguous().T.requires_grad_() for x in (logp, ent))
    old_t, ref_t, adv_t = (x.T.contiguous().T for x in (old, ref, adv))
    mask_t = mask.to(mask_dtype).T.contiguous().T
    assert logp_t.stride() == (1, 7)
    check_against_float64(
        logp_t, old_t, adv_t, mask_t, ref_t, ent_t, options("seq-mean-token-mean")
    )


def test_triton_output_dtypes_and_keys_match_the_reference():
    cases = [
        (torch.bfloat16, torch.bfloat16, torch.bfloat16),
        (torch.float32, torch.bfloat16, torch.bfloat16),
        (torch.bfloat16, torch.float32, torch.float32),
    ]
    for lp_dtype, old_dtype, ent_dtype in cases:
        logp, old, adv, mask, ref, ent = make_inputs(2, 7, seed=11)
        logp = logp.detach().to(lp_dtype).requires_grad_()
        ent = ent.detach().to(ent_dtype).requires_grad_()
        old, ref = old.to(old_dtype), ref.to(old_dtype)
        kw = options(dual_clip=3.0)
        got = run_loss(tk.policy_loss, logp, old, adv, mask, ref, ent, kw)
        want = run_loss(reference.policy_loss, logp, old, adv, mask, ref, ent, kw)
        assert got[0].dtype == want[0].dtype
        assert {k: v.dtype for k, v in got[1].items()} == {k: v.dtype for k, v in want[1].items()}
        assert [g.dtype for g in got[2]] == [g.dtype for g in want[2]]


def test_triton_no_grad_and_detached_inputs():
    logp, old, adv, mask, ref, ent = make_inputs(3, 9, seed=12)
    with torch.no_grad():
        loss, stats = tk.policy_loss(logp, old, adv, mask, ref_logprobs=ref, entropy=ent)
    assert not loss.requires_grad and not any(v.requires_grad for v in stats.values())
    want, _ = reference.policy_loss(logp, old, adv, mask, ref_logprobs=ref, entropy=ent)
    torch.testing.assert_close(loss, want.detach(), **F32_TOL)


def test_triton_gradient_to_entropy_only_or_logprobs_only():
    logp, old, adv, mask, ref, ent = make_inputs(3, 9, seed=20, empty_rows=(0,))
    _, _, grads = check_against_float64(logp.detach(), old, adv, mask, ref, ent, options())
    assert len(grads) == 1 and grads[0].shape == ent.shape
    _, _, grads = check_against_float64(logp, old, adv, mask, ref, ent.detach(), options())
    assert len(grads) == 1 and grads[0].shape == logp.shape


def test_triton_falls_back_to_reference_for_gradients_of_other_inputs(monkeypatch):
    """`fastrl.ops` gives the gradient w.r.t. `old_logprobs` with the reference, not the kernel."""
    monkeypatch.setenv("FASTRL_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    calls = []

    def spy(*args, **kwargs):
        calls.append(1)
        return tk.policy_loss(*args, **kwargs)

    monkeypatch.setattr(fastrl.triton_kernels, "policy_loss", spy)
    logp, old, adv, mask, ref, _ = make_inputs(3, 9, seed=13)
    ops._choose.cache_clear()
    try:
        assert ops.select_backend("policy_loss", "cpu") == "triton"
        loss, _ = ops.policy_loss(logp, old, adv, mask, ref_logprobs=ref, kl_coef=0.1)
        assert calls == [1]  # old_logprobs without a gradient: the kernel
        old = old.clone().requires_grad_()
        loss, _ = ops.policy_loss(logp, old, adv, mask, ref_logprobs=ref, kl_coef=0.1)
        assert calls == [1]
        want, _ = reference.policy_loss(logp, old, adv, mask, ref_logprobs=ref, kl_coef=0.1)
    finally:
        ops._choose.cache_clear()
    got = torch.autograd.grad(loss, (logp, old))
    for g, w in zip(got, torch.autograd.grad(want, (logp, old))):
        torch.testing.assert_close(g, w)


def test_triton_backward_twice_with_retained_graph():
    logp, old, adv, mask, ref, ent = make_inputs(3, 9, seed=14)
    loss, _ = tk.policy_loss(logp, old, adv, mask, ref_logprobs=ref, kl_coef=0.1)
    (2.0 * loss).backward(retain_graph=True)
    first = logp.grad.clone()
    loss.backward()
    torch.testing.assert_close(logp.grad, 1.5 * first)


# --------------------------------------------------------------------------------------------
# Dispatch and compilation
# --------------------------------------------------------------------------------------------


@pytest.fixture
def fresh_dispatch():
    ops._choose.cache_clear()
    yield
    ops._choose.cache_clear()


def test_ops_dispatches_to_triton(monkeypatch, fresh_dispatch):
    package = fastrl.triton_kernels
    monkeypatch.setenv("FASTRL_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert getattr(package, "policy_loss", None) is tk.policy_loss, (
        "fastrl/triton_kernels/__init__.py must re-export policy_loss "
        "(from fastrl.triton_kernels.policy_loss import policy_loss)"
    )
    assert ops.select_backend("policy_loss", "cpu") == "triton"
    calls = []

    def spy(*args, **kwargs):
        calls.append(1)
        return tk.policy_loss(*args, **kwargs)

    monkeypatch.setattr(package, "policy_loss", spy)
    logp, old, adv, mask, ref, ent = make_inputs(2, 5, seed=16)
    loss, _ = ops.policy_loss(logp, old, adv, mask, ref_logprobs=ref, entropy=ent)
    assert calls == [1]
    want, _ = reference.policy_loss(logp, old, adv, mask, ref_logprobs=ref, entropy=ent)
    torch.testing.assert_close(loss, want, **F32_TOL)


_COMPILE_SM90 = """
import importlib, sys
try:
    import triton, triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    importlib.import_module("triton.backends.nvidia")
except ImportError as error:
    print(f"no CUDA compiler in triton: {error}"); sys.exit(3)
import torch
m = importlib.import_module("fastrl.triton_kernels.policy_loss")

def compile(kernel, pointers, consts):
    sig = {}
    for p in kernel.params:
        if p.is_constexpr:
            sig[p.name] = "constexpr"
        elif p.name.endswith("_ptr"):
            sig[p.name] = pointers.get(p.name, pointers["default"])
        else:
            sig[p.name] = p.annotation_type or "i32"
    src = ASTSource(kernel, sig, consts)
    triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})

for dtype, lp in ((torch.float32, "*bf16"), (torch.float64, "*fp64")):
    acc = tl.float64 if dtype == torch.float64 else tl.float32
    ptrs = {"default": "*fp64" if acc == tl.float64 else "*fp32", "lp_ptr": lp, "mask_ptr": "*u8"}
    compile(m._policy_loss_rows_kernel, ptrs, dict(
        ACC=acc, HAS_DUAL=True, HAS_REF=True, USE_KL=True, KL_EST=3, HAS_ENT=True, USE_ENT=True,
        ROW_MEAN=True, ROW_NORM=False, WRITE_GRAD_LP=True, WRITE_GRAD_ENT=True,
        N_TERMS=13 if acc == tl.float64 else 7, NP=m.N_PARTIALS, BLOCK_T=m.MAX_BLOCK_T[dtype]))
    compile(m._policy_loss_finalize_kernel, ptrs | {"loss_ptr": "*bf16"}, dict(
        ACC=acc, TOKEN_MEAN=False, NP=m.N_PARTIALS, BLOCK_B=m.MAX_BLOCK_B))
print("ok")
"""


def test_kernels_compile_for_sm90():
    """Both kernels lower to sm_90 machine code (fp32 and fp64 accumulation); no GPU needed."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    result = subprocess.run(
        [sys.executable, "-c", _COMPILE_SM90], env=env, capture_output=True, text=True, timeout=300
    )
    if result.returncode == 3:
        pytest.skip(result.stdout.strip())
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


_CUDA_CHECK = r"""
import torch

from fastrl.ops import reference
from fastrl.triton_kernels import policy_loss

gen = torch.Generator().manual_seed(0)
b, t = 64, 3000  # rows span several blocks; T not a power of two
for agg in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"):
    for est in ("k1", "k2", "k3"):
        logp = -torch.rand(b, t, generator=gen, dtype=torch.float64) * 3 - 0.05
        old = logp + torch.randn(b, t, generator=gen, dtype=torch.float64) * 0.4
        ref = logp + torch.randn(b, t, generator=gen, dtype=torch.float64) * 0.3
        ent = torch.rand(b, t, generator=gen, dtype=torch.float64) * 2 + 0.1
        adv = torch.randn(b, generator=gen, dtype=torch.float64)
        mask = torch.rand(b, t, generator=gen) < 0.7
        mask[3] = False  # an empty row
        kw = dict(ref_logprobs=None, clip_low=0.2, clip_high=0.28, dual_clip=3.0, kl_coef=0.05,
                  kl_estimator=est, entropy_coef=0.01, loss_agg=agg)
        x64 = [x.clone().requires_grad_() for x in (logp, ent)]
        want, _ = reference.policy_loss(x64[0], old, adv, mask, **{**kw, "ref_logprobs": ref},
                                        entropy=x64[1])
        want.backward()
        x32 = [x.float().cuda().requires_grad_() for x in (logp, ent)]
        got, stats = policy_loss(x32[0], old.float().cuda(), adv.float().cuda(), mask.cuda(),
                                 **{**kw, "ref_logprobs": ref.float().cuda()}, entropy=x32[1])
        got.backward()
        for name, a, e in (("loss", got, want), ("d logp", x32[0].grad, x64[0].grad),
                           ("d entropy", x32[1].grad, x64[1].grad)):
            err = (a.double().cpu() - e).norm() / e.norm().clamp_min(1e-30)
            assert err < 1e-5, f"{agg} {est} {name}: relative error {err:.3g}"
print("ok")
"""


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_kernel_on_cuda_matches_float64():
    """The compiled kernels on a GPU against the float64 reference on the CPU, forward and
    backward, every aggregation and KL estimator (a fresh process: this one interprets)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", _CUDA_CHECK], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0 and "ok" in result.stdout, result.stdout + result.stderr[-3000:]
