"""`fastrl.ops.token_logprobs`: the torch reference and the Triton kernels against float64.

The Triton kernels run under the Triton interpreter on CPU tensors: `TRITON_INTERPRET=1` is set
before triton is imported (Triton decides interpreted vs compiled when a kernel is decorated),
then removed again if this module set it, so that other test modules see the environment they
expect; the tests here set it back with monkeypatch. The dispatcher's tests are here too.
"""

from __future__ import annotations

import os

_SET_INTERPRET = "TRITON_INTERPRET" not in os.environ
os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

pytest.importorskip("triton", reason="triton is not installed: no Triton kernels to test")

import fastrl.triton_kernels  # noqa: E402
from fastrl.triton_kernels import logprobs as lp  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from fastrl import ops  # noqa: E402
from fastrl.ops import ref_logprobs, reference  # noqa: E402

if not isinstance(lp._token_stats_fwd_kernel, InterpretedFunction):
    # Imported earlier without the interpreter (compiled kernels cannot take CPU tensors).
    lp = importlib.reload(lp)
    importlib.reload(fastrl.triton_kernels)
if _SET_INTERPRET:
    del os.environ["TRITON_INTERPRET"]

IGNORE = -100


@pytest.fixture(autouse=True)
def _backends(monkeypatch):
    """`fastrl.ops` on the torch reference unless a test forces another backend; the Triton
    interpreter on, and every buffer the kernels allocate filled with NaN (catches unwritten
    data)."""
    monkeypatch.setenv("FASTRL_BACKEND", "torch")
    monkeypatch.setenv("TRITON_INTERPRET", "1")

    def poisoned(shape, dtype, device):
        return torch.full(shape, math.nan, dtype=dtype, device=device)

    monkeypatch.setattr(lp, "_empty", poisoned)


def naive_token_stats(logits: torch.Tensor, labels: torch.Tensor, temperature: float):
    """Float64 log_softmax reference: logprobs (N,), entropy (N,), probs (N, V)."""
    logp = torch.log_softmax(logits.double() / temperature, dim=-1)  # [N, V]
    valid = labels != IGNORE  # [N]
    label_logp = logp.gather(1, labels.clamp(min=0)[:, None]).squeeze(1)  # [N]
    entropy = -(logp.exp() * logp).sum(dim=-1)  # [N]
    return (
        torch.where(valid, label_logp, 0.0),
        torch.where(valid, entropy, 0.0),
        logp.exp(),
    )


def f64_stats(logits: torch.Tensor, labels: torch.Tensor, temperature: float, control_ids):
    """`naive_token_stats` with the probabilities of `control_ids` only (N, K), or None."""
    logp, entropy, probs = naive_token_stats(logits, labels, temperature)
    return logp, entropy, probs[:, control_ids] if control_ids is not None else None


def make_labels(n: int, vocab: int, gen: torch.Generator, ignore: str = "some", every: int = 4):
    """Random labels with every `every`-th row ignored ("some"), none or all of them."""
    labels = torch.randint(0, vocab, (n,), generator=gen)  # [N]
    if ignore == "all":
        labels.fill_(IGNORE)
    elif ignore == "some":
        labels[1::every] = IGNORE
    return labels


def stats_of(fn, *args, control_ids=None, **kwargs) -> ops.TokenStats:
    """A backend function called as `fastrl.ops` calls it: ids as a tensor, TokenStats back."""
    ids = None if control_ids is None else torch.tensor(control_ids)
    return ops.TokenStats(*fn(*args, control_ids=ids, **kwargs))


def loss_of(stats, w_lp: torch.Tensor | None, w_h: torch.Tensor | None) -> torch.Tensor:
    """A downstream loss mixing logprob and entropy gradients (either may be left out)."""
    loss = 0.0
    if w_lp is not None:
        loss = loss + (stats[0] * w_lp).sum()
    if w_h is not None:
        loss = loss + (stats[1] * w_h).sum()
    return loss


def close(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float = 1e-5) -> None:
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol)


# --------------------------------------------------------------------------------------------
# Torch reference (through fastrl.ops)
# --------------------------------------------------------------------------------------------

# (dtype, atol, rtol) of forward statistics and of the logits gradient. Outputs are fp32 whatever
# the input dtype, and the reference is computed from the same (upcast) input values, so only
# the bf16 gradient, which is rounded to bf16, needs a looser tolerance.
DTYPES = [
    (torch.float32, 2e-5, 1e-5, 1e-6, 1e-4),
    (torch.bfloat16, 2e-5, 1e-5, 1e-3, 1e-2),
]


@pytest.mark.parametrize("shape", [(1, 7), (5, 33), (17, 1000), (64, 257)])
@pytest.mark.parametrize(("dtype", "atol", "rtol", "grad_atol", "grad_rtol"), DTYPES)
@pytest.mark.parametrize("temperature", [0.7, 1.3])
def test_token_logprobs_matches_float64(
    monkeypatch, shape, dtype, atol, rtol, grad_atol, grad_rtol, temperature
):
    n, vocab = shape
    # about three rows per chunk, so chunk boundaries are crossed whenever N > 3
    monkeypatch.setattr(ref_logprobs, "FP32_CHUNK_BYTES", 3 * vocab * 4)
    gen = torch.Generator().manual_seed(n * vocab)
    logits = (torch.randn(n, vocab, generator=gen) * 4).to(dtype).requires_grad_()  # [N, V]
    labels = make_labels(n, vocab, gen)  # [N]
    control_ids = [0, vocab // 2, vocab - 1]

    stats = ops.token_logprobs(
        logits, labels, temperature=temperature, control_ids=control_ids, ignore_index=IGNORE
    )

    exact = logits.detach().double().requires_grad_()  # [N, V]
    ref_logp, ref_ent, ref_probs = naive_token_stats(exact, labels, temperature)
    assert stats.logprobs.dtype == stats.entropy.dtype == torch.float32
    torch.testing.assert_close(stats.logprobs.double(), ref_logp, atol=atol, rtol=rtol)
    torch.testing.assert_close(stats.entropy.double(), ref_ent, atol=atol, rtol=rtol)
    torch.testing.assert_close(
        stats.control_probs.double(), ref_probs[:, control_ids], atol=1e-6, rtol=1e-5
    )
    assert not stats.control_probs.requires_grad

    w_logp = torch.randn(n, generator=gen, dtype=torch.float64)  # [N]
    w_ent = torch.randn(n, generator=gen, dtype=torch.float64)  # [N]
    ((stats.logprobs * w_logp.float()).sum() + (stats.entropy * w_ent.float()).sum()).backward()
    ((ref_logp * w_logp).sum() + (ref_ent * w_ent).sum()).backward()
    assert logits.grad.dtype == dtype
    torch.testing.assert_close(logits.grad.double(), exact.grad, atol=grad_atol, rtol=grad_rtol)
    ignored = labels == IGNORE  # [N]
    assert torch.all(logits.grad[ignored] == 0)


def test_token_logprobs_all_rows_ignored():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 11, generator=gen).requires_grad_()  # [N, V]
    labels = torch.full((6,), IGNORE)  # [N]
    stats = ops.token_logprobs(logits, labels)
    assert torch.all(stats.logprobs == 0) and torch.all(stats.entropy == 0)
    (stats.logprobs.sum() + stats.entropy.sum()).backward()
    assert torch.all(logits.grad == 0)


def test_token_logprobs_without_entropy():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(9, 31, generator=gen).requires_grad_()  # [N, V]
    labels = make_labels(9, 31, gen)  # [N]
    stats = ops.token_logprobs(logits, labels, with_entropy=False, temperature=1.3)
    assert stats.entropy is None and stats.control_probs is None
    exact = logits.detach().double().requires_grad_()
    ref_logp, _, _ = naive_token_stats(exact, labels, 1.3)
    stats.logprobs.sum().backward()
    ref_logp.sum().backward()
    torch.testing.assert_close(stats.logprobs.double(), ref_logp, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(logits.grad.double(), exact.grad, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("scale", [50.0, 1e3, 1e4])
def test_token_logprobs_large_logits(scale):
    gen = torch.Generator().manual_seed(3)
    logits = (torch.randn(12, 129, generator=gen) * scale).requires_grad_()  # [N, V]
    labels = make_labels(12, 129, gen)  # [N]
    stats = ops.token_logprobs(logits, labels, temperature=0.7)
    exact = logits.detach().double().requires_grad_()
    ref_logp, ref_ent, _ = naive_token_stats(exact, labels, 0.7)
    (stats.logprobs.sum() + stats.entropy.sum()).backward()
    (ref_logp.sum() + ref_ent.sum()).backward()
    # fp32 logits of magnitude `scale` carry an absolute rounding error of about scale * 6e-8
    tol = scale * 1e-6
    torch.testing.assert_close(stats.logprobs.double(), ref_logp, atol=tol, rtol=1e-6)
    torch.testing.assert_close(stats.entropy.double(), ref_ent, atol=tol, rtol=1e-5)
    assert torch.isfinite(logits.grad).all()
    torch.testing.assert_close(logits.grad.double(), exact.grad, atol=tol, rtol=1e-4)


def test_token_logprobs_masked_vocabulary_is_finite():
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(5, 17, generator=gen)  # [N, V]
    logits[:, 3:9] = float("-inf")
    logits.requires_grad_()
    labels = torch.tensor([0, 1, 2, 9, 16])  # [N]
    stats = ops.token_logprobs(logits, labels)
    (stats.logprobs.sum() + stats.entropy.sum()).backward()
    kept = torch.cat([logits.detach()[:, :3], logits.detach()[:, 9:]], dim=1)  # [N, V - 6]
    ref_logp, ref_ent, _ = naive_token_stats(kept, torch.tensor([0, 1, 2, 3, 10]), 1.0)
    torch.testing.assert_close(stats.logprobs.double(), ref_logp, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(stats.entropy.double(), ref_ent, atol=2e-6, rtol=1e-5)
    assert torch.isfinite(logits.grad).all() and torch.all(logits.grad[:, 3:9] == 0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_entropy_gradient_at_minus_inf_logits_is_zero_for_any_weight(backend, monkeypatch):
    """A loss weighting the entropy by more than 1 (here 2) once gave NaN at -inf logits on the
    torch backend; the gradient there is 0, and elsewhere the float64 one."""
    monkeypatch.setenv("FASTRL_BACKEND", backend)
    logits = torch.tensor([[0.0, float("-inf"), 1.0], [0.3, -0.7, float("-inf")]])  # [N, V]
    labels = torch.tensor([0, 1])  # [N]
    logits.requires_grad_()
    stats = ops.token_logprobs(logits, labels)
    (2.0 * stats.entropy.sum() - 3.0 * stats.logprobs.sum()).backward()
    exact = logits.detach().double().clone()
    kept = torch.isfinite(exact)
    z = torch.where(kept, exact, 0.0).requires_grad_()
    logp = torch.log_softmax(z.masked_fill(~kept, float("-inf")), dim=-1)  # [N, V]
    entropy = -(logp.exp() * torch.where(kept, logp, 0.0)).sum(dim=-1)  # [N]
    (2.0 * entropy.sum() - 3.0 * logp.gather(1, labels[:, None]).sum()).backward()
    assert torch.isfinite(logits.grad).all()
    torch.testing.assert_close(logits.grad.double(), torch.where(kept, z.grad, 0.0), atol=1e-5,
                               rtol=1e-5)  # fmt: skip
    assert logits.grad[0, 1] == 0 and logits.grad[1, 2] == 0


def test_token_logprobs_never_allocates_full_fp32_logits(monkeypatch):
    n, vocab = 4096, 8192
    full_fp32_bytes = n * vocab * 4
    monkeypatch.setattr(ref_logprobs, "FP32_CHUNK_BYTES", 8 * 2**20)  # chunks of 256 rows
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(n, vocab, generator=gen, dtype=torch.bfloat16).requires_grad_()
    labels = make_labels(n, vocab, gen)  # [N]
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as forward:
        stats = ops.token_logprobs(logits, labels, control_ids=[7])
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as backward:
        (stats.logprobs.sum() + stats.entropy.sum()).backward()
    # an fp32 copy of the logits would be one allocation of `full_fp32_bytes`; the backward's
    # largest allocation is the bf16 gradient itself
    assert 0 < max(event.cpu_memory_usage for event in forward.events()) < full_fp32_bytes // 4
    assert max(event.cpu_memory_usage for event in backward.events()) <= n * vocab * 2
    rows = slice(0, 600)  # spans three chunks
    exact = logits.detach()[rows].double().requires_grad_()
    ref_logp, ref_ent, ref_probs = naive_token_stats(exact, labels[rows], 1.0)
    (ref_logp.sum() + ref_ent.sum()).backward()
    torch.testing.assert_close(stats.logprobs[rows].double(), ref_logp, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(stats.entropy[rows].double(), ref_ent, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(
        stats.control_probs[rows].double(), ref_probs[:, [7]], atol=1e-7, rtol=1e-5
    )
    torch.testing.assert_close(logits.grad[rows].double(), exact.grad, atol=1e-3, rtol=1e-2)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_token_logprobs_rejects_bad_inputs(backend, monkeypatch):
    monkeypatch.setenv("FASTRL_BACKEND", backend)
    logits, labels = torch.randn(3, 50), torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match="logits must have shape"):
        ops.token_logprobs(logits[0], labels)
    with pytest.raises(ValueError, match="labels must have shape"):
        ops.token_logprobs(logits, labels[:2])
    with pytest.raises(ValueError, match="temperature"):
        ops.token_logprobs(logits, labels, temperature=0.0)
    with pytest.raises(IndexError, match="control_ids"):
        ops.token_logprobs(logits, labels, control_ids=[0, 50])


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------

TOKEN_CASES = {
    # name: (rows, vocab, dtype, temperature, scale, ignore)
    "prime-vocab": (13, 997, torch.float32, 1.0, 4.0, "some"),
    "single-row-large": (1, 997, torch.float32, 0.7, 30.0, "none"),
    "bf16-large": (9, 997, torch.bfloat16, 0.7, 30.0, "some"),
    "all-ignored": (5, 300, torch.float32, 1.3, 3.0, "all"),
    "vocab-below-block": (4, 100, torch.float32, 1.0, 1.0, "none"),
}


@pytest.mark.parametrize("case", list(TOKEN_CASES))
def test_triton_token_logprobs_forward_backward(case):
    n, vocab, dtype, temperature, scale, ignore = TOKEN_CASES[case]
    gen = torch.Generator().manual_seed(list(TOKEN_CASES).index(case))
    logits = (torch.randn(n, vocab, generator=gen) * scale).clamp(-scale, scale).to(dtype)
    labels = make_labels(n, vocab, gen, ignore, every=3)
    label0 = 7 if ignore == "all" else int(labels[0])
    control_ids = [0, label0, vocab - 1]
    w_lp, w_h = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    kw = dict(temperature=temperature, control_ids=control_ids)

    x = logits.clone().requires_grad_()
    out = stats_of(lp.token_logprobs, x, labels, **kw)
    assert out.logprobs.dtype == out.entropy.dtype == out.control_probs.dtype == torch.float32
    assert out.control_probs.shape == (n, 3) and not out.control_probs.requires_grad
    loss_of((out.logprobs, out.entropy), w_lp, w_h).backward()
    assert x.grad.dtype == dtype

    x64 = logits.double().requires_grad_()
    exp_lp, exp_h, exp_ctrl = f64_stats(x64, labels, temperature, control_ids)
    loss_of((exp_lp, exp_h), w_lp, w_h).backward()
    close(out.logprobs, exp_lp, atol=1e-4)
    close(out.entropy, exp_h, atol=1e-4)
    close(out.control_probs, exp_ctrl, atol=1e-6)
    grad_rtol = 1e-5 if dtype == torch.float32 else 1e-2  # the gradient is stored in bf16
    close(x.grad, x64.grad, atol=1e-5, rtol=grad_rtol)

    xr = logits.clone().requires_grad_()
    ref = stats_of(reference.token_logprobs, xr, labels, **kw)
    loss_of((ref.logprobs, ref.entropy), w_lp, w_h).backward()
    close(out.logprobs, ref.logprobs, atol=2e-5)
    close(out.entropy, ref.entropy, atol=2e-5)
    close(out.control_probs, ref.control_probs, atol=1e-7)
    close(x.grad, xr.grad, atol=1e-5, rtol=grad_rtol)

    ignored = labels == IGNORE
    assert torch.all(out.logprobs[ignored] == 0) and torch.all(out.entropy[ignored] == 0)
    assert torch.all(x.grad[ignored] == 0)
    assert torch.isfinite(out.control_probs).all()


@pytest.mark.parametrize("which", ["logprobs-only", "entropy-only", "no-entropy"])
def test_triton_token_logprobs_partial_gradients(which):
    gen = torch.Generator().manual_seed(1)
    n, vocab, temperature = 6, 997, 0.7
    logits = torch.randn(n, vocab, generator=gen) * 5  # [N, V]
    labels = make_labels(n, vocab, gen, "some", every=3)
    w = torch.randn(n, generator=gen)
    with_entropy = which != "no-entropy"
    w_lp = None if which == "entropy-only" else w
    w_h = w if which == "entropy-only" else None

    x = logits.clone().requires_grad_()
    out = stats_of(lp.token_logprobs, x, labels, temperature=temperature, with_entropy=with_entropy)
    assert (out.entropy is None) == (not with_entropy) and out.control_probs is None
    loss_of((out.logprobs, out.entropy), w_lp, w_h).backward()

    x64 = logits.double().requires_grad_()
    exp_lp, exp_h, _ = f64_stats(x64, labels, temperature, None)
    loss_of((exp_lp, exp_h), w_lp, w_h).backward()
    close(out.logprobs, exp_lp, atol=1e-4)
    close(x.grad, x64.grad, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_token_logprobs_inplace_backward(dtype):
    gen = torch.Generator().manual_seed(2)
    n, vocab = 7, 997
    leaf = (torch.randn(n, vocab, generator=gen) * 8).to(dtype).requires_grad_()
    labels = make_labels(n, vocab, gen, "some", every=3)
    w_lp, w_h = torch.randn(n, generator=gen), torch.randn(n, generator=gen)

    expected = stats_of(reference.token_logprobs, leaf, labels, temperature=0.7)
    loss_of((expected.logprobs, expected.entropy), w_lp, w_h).backward()
    expected_grad, leaf.grad = leaf.grad.clone(), None

    logits = leaf * 1  # an intermediate: its buffer receives the gradient
    out = stats_of(lp.token_logprobs, logits, labels, temperature=0.7, inplace_backward=True)
    loss_of((out.logprobs, out.entropy), w_lp, w_h).backward()
    rtol = 1e-5 if dtype == torch.float32 else 1e-2
    close(leaf.grad, expected_grad, atol=1e-5, rtol=rtol)
    assert torch.equal(logits.detach(), leaf.grad)  # written in place

    # A later user of the overwritten logits fails loudly instead of reading the gradient.
    scaled = leaf.detach().clone().requires_grad_() * 1
    squared = (scaled * scaled).sum()  # saves `scaled` for its backward
    out = stats_of(lp.token_logprobs, scaled, labels, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (out.logprobs.sum() + squared).backward()


def test_triton_block_size_leaves_tails():
    cpu = torch.device("cpu")
    assert lp.block_size(997, cpu) < 997 and 997 % lp.block_size(997, cpu)
    assert lp.block_size(100, cpu) == 128
    assert lp.block_size(151_936, torch.device("cuda")) == lp.GPU_BLOCK_V


def test_triton_token_logprobs_strided_logits():
    gen = torch.Generator().manual_seed(4)
    n, vocab = 5, 997
    wide = torch.randn(n, vocab + 50, generator=gen) * 4  # rows of a wider buffer
    labels = make_labels(n, vocab, gen, "some", every=3)
    column_major = wide[:, :vocab].T.contiguous().T  # non-unit column stride: copied by the op
    for layout in (wide[:, :vocab], column_major):
        out = stats_of(lp.token_logprobs, layout, labels, control_ids=[5])
        exp_lp, exp_h, exp_ctrl = f64_stats(layout, labels, 1.0, [5])
        close(out.logprobs, exp_lp, atol=1e-4)
        close(out.entropy, exp_h, atol=1e-4)
        close(out.control_probs, exp_ctrl, atol=1e-6)
    x = wide.clone().requires_grad_()
    lp.token_logprobs(x[:, :vocab], labels)[0].sum().backward()
    x64 = wide.double().requires_grad_()
    f64_stats(x64[:, :vocab], labels, 1.0, None)[0].sum().backward()
    close(x.grad, x64.grad, atol=1e-5)


def test_triton_token_logprobs_empty_input():
    logprobs, entropy, _ = lp.token_logprobs(torch.randn(0, 50), torch.zeros(0, dtype=torch.long))
    assert logprobs.shape == entropy.shape == (0,)


# --------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------


def test_dispatch_picks_torch_and_logs_once(monkeypatch, caplog):
    ops._choose.cache_clear()
    monkeypatch.setenv("FASTRL_BACKEND", "auto")
    with caplog.at_level(logging.INFO, logger="fastrl.ops"):
        assert ops.select_backend("token_logprobs", "cpu") == "torch"
        assert ops.select_backend("token_logprobs", "cpu") == "torch"
    assert len([r for r in caplog.records if "token_logprobs" in r.getMessage()]) == 1


def test_dispatch_forced_unavailable_backend_raises(monkeypatch):
    ops._choose.cache_clear()
    monkeypatch.setenv("FASTRL_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="FASTRL_BACKEND=triton"):
        ops.token_logprobs(torch.randn(2, 3), torch.zeros(2, dtype=torch.long))
    monkeypatch.setenv("FASTRL_BACKEND", "tpu")
    with pytest.raises(ValueError, match="FASTRL_BACKEND"):
        ops.select_backend("pack")


def test_dispatch_to_triton(monkeypatch):
    assert callable(getattr(fastrl.triton_kernels, "token_logprobs", None)), (
        "fastrl.triton_kernels must export token_logprobs (triton_kernels/__init__.py)"
    )
    monkeypatch.setenv("FASTRL_BACKEND", "triton")
    calls = []
    impl = fastrl.triton_kernels.token_logprobs

    def spy(*args, **kwargs):
        calls.append("token_logprobs")
        return impl(*args, **kwargs)

    monkeypatch.setattr(fastrl.triton_kernels, "token_logprobs", spy)
    ops._choose.cache_clear()
    try:
        assert ops.select_backend("token_logprobs", "cpu") == "triton"
        gen = torch.Generator().manual_seed(3)
        logits = torch.randn(3, 8, generator=gen) @ torch.randn(40, 8, generator=gen).T
        labels = torch.tensor([1, IGNORE, 39])
        stats = ops.token_logprobs(logits, labels, control_ids=[1])
        expected = stats_of(reference.token_logprobs, logits, labels, control_ids=[1])
        close(stats.logprobs, expected.logprobs, atol=1e-5)
        close(stats.entropy, expected.entropy, atol=1e-5)
        close(stats.control_probs, expected.control_probs, atol=1e-7)
    finally:
        ops._choose.cache_clear()
    assert calls == ["token_logprobs"]


# --------------------------------------------------------------------------------------------
# Lowering to sm_90 machine code (no GPU needed) and compiled kernels on a GPU. Both run in a
# fresh process: the kernels of this one are interpreted.
# --------------------------------------------------------------------------------------------

COMPILE_SM90 = r"""
import importlib
import sys

try:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    importlib.import_module("triton.backends.nvidia")
except ImportError as error:
    print(f"no CUDA compiler in triton: {error}")
    sys.exit(3)
lp = importlib.import_module("fastrl.triton_kernels.logprobs")

FWD = dict(labels_ptr="*i64", lse_ptr="*fp32", logprobs_ptr="*fp32", entropy_ptr="*fp32",
           control_ids_ptr="*i64", control_ptr="*fp32")
BWD = dict(labels_ptr="*i64", lse_ptr="*fp32", entropy_ptr="*fp32", grad_logprobs_ptr="*fp32",
           grad_entropy_ptr="*fp32")


def compile(kernel, logits, pointers, consts):
    sig = {}
    for p in kernel.params:
        if p.is_constexpr:
            sig[p.name] = "constexpr"
        elif p.name.endswith("_ptr"):
            sig[p.name] = pointers.get(p.name, logits)
        else:
            sig[p.name] = "fp32" if p.name == "inv_temp" else "i64"
    src = ASTSource(kernel, sig, consts)
    triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})


for logits, flag in (("*bf16", True), ("*fp32", False), ("*fp16", True)):
    compile(lp._token_stats_fwd_kernel, logits, FWD, dict(
        WITH_ENTROPY=flag, HAS_CONTROL=flag, BLOCK_V=lp.GPU_BLOCK_V, BLOCK_K=4))
    compile(lp._token_stats_bwd_kernel, logits, BWD, dict(
        HAS_GRAD_LOGPROBS=True, HAS_GRAD_ENTROPY=flag, BLOCK_V=lp.GPU_BLOCK_V))
print("ok")
"""


def test_kernels_compile_for_sm90():
    """Forward and backward kernels lower to sm_90 cubins for bf16/fp16/fp32 logits."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    result = subprocess.run(
        [sys.executable, "-c", COMPILE_SM90], env=env, capture_output=True, text=True, timeout=300
    )
    if result.returncode == 3:
        pytest.skip(result.stdout.strip())
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


CUDA_CHECK = r"""
import sys

import torch

from fastrl.ops import reference
from fastrl.triton_kernels.logprobs import token_logprobs

device, n, vocab = sys.argv[1], *map(int, sys.argv[2:4])
gen = torch.Generator(device).manual_seed(0)


def check(name, actual, expected, rel):
    err = (actual.double() - expected.double()).abs().max().item()
    bound = rel * max(expected.double().abs().max().item(), 1.0)
    assert err <= bound, f"{name}: max error {err:.3g} > {bound:.3g}"


labels = torch.randint(0, vocab, (n,), device=device, generator=gen)
labels[::5] = -100
ids = torch.tensor([0, 1, vocab - 1], device=device)
w_lp, w_h = torch.randn(2, n, device=device, generator=gen)
for dtype, rel in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
    logits = (torch.randn(n, vocab, device=device, generator=gen) * 4).to(dtype)
    for inplace in (False, True):
        x = logits.clone().requires_grad_()
        xr = logits.clone().requires_grad_()
        lp, h, ctrl = token_logprobs(x * 1, labels, temperature=0.7, control_ids=ids,
                                     inplace_backward=inplace)
        lp_r, h_r, ctrl_r = reference.token_logprobs(xr, labels, temperature=0.7, control_ids=ids)
        ((lp * w_lp).sum() + (h * w_h).sum()).backward()
        ((lp_r * w_lp).sum() + (h_r * w_h).sum()).backward()
        check("logprobs", lp, lp_r, 1e-5)
        check("entropy", h, h_r, 1e-5)
        check("control", ctrl, ctrl_r, 1e-5)
        check(f"grad {dtype} inplace={inplace}", x.grad, xr.grad, rel)
print("ok")
"""


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_kernels_on_cuda():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", CUDA_CHECK, "cuda", "1024", "151936"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0 and "ok" in result.stdout, result.stdout + result.stderr
