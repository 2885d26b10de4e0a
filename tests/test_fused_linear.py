"""`fastrl.ops.fused_linear_token_logprobs`: the torch reference and the Triton kernels against
float64 and against the unfused head.

The Triton kernels run under the Triton interpreter on CPU tensors (see tests/test_logprobs.py for
how `TRITON_INTERPRET` is set around their import).
"""

from __future__ import annotations

import os

_SET_INTERPRET = "TRITON_INTERPRET" not in os.environ
os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib  # noqa: E402
import math  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="triton is not installed: no Triton kernels to test")

import fastrl.triton_kernels  # noqa: E402
from fastrl.triton_kernels import fused_linear as fl  # noqa: E402
from fastrl.triton_kernels import logprobs as lp  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from fastrl import ops  # noqa: E402
from fastrl.ops import reference  # noqa: E402

if not isinstance(lp._token_stats_fwd_kernel, InterpretedFunction):
    # Imported earlier without the interpreter (compiled kernels cannot take CPU tensors).
    lp = importlib.reload(lp)
    fl = importlib.reload(fl)
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
    monkeypatch.setattr(fl, "_empty", poisoned)


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


@pytest.mark.parametrize("chunk_size", [4, None])
@pytest.mark.parametrize("with_entropy", [True, False])
def test_fused_linear_matches_float64(chunk_size, with_entropy):
    n, hidden_size, vocab = 13, 24, 101
    gen = torch.Generator().manual_seed(6)
    hidden = torch.randn(n, hidden_size, generator=gen).requires_grad_()  # [N, H]
    weight = (torch.randn(vocab, hidden_size, generator=gen) * 0.5).requires_grad_()  # [V, H]
    labels = make_labels(n, vocab, gen, every=5)  # [N]
    control_ids = torch.tensor([3, 50])

    stats = ops.fused_linear_token_logprobs(
        hidden,
        weight,
        labels,
        temperature=0.7,
        with_entropy=with_entropy,
        control_ids=control_ids,
        chunk_size=chunk_size,
    )

    h64 = hidden.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    ref_logp, ref_ent, ref_probs = naive_token_stats(h64 @ w64.T, labels, 0.7)
    g_logp = torch.randn(n, generator=gen)  # [N]
    g_ent = torch.randn(n, generator=gen)  # [N]
    loss = (stats.logprobs * g_logp).sum()
    ref_loss = (ref_logp * g_logp.double()).sum()
    if with_entropy:
        torch.testing.assert_close(stats.entropy.double(), ref_ent, atol=2e-5, rtol=1e-5)
        loss = loss + (stats.entropy * g_ent).sum()
        ref_loss = ref_loss + (ref_ent * g_ent.double()).sum()
    else:
        assert stats.entropy is None
    torch.testing.assert_close(stats.logprobs.double(), ref_logp, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(
        stats.control_probs.double(), ref_probs[:, [3, 50]], atol=1e-6, rtol=1e-5
    )
    loss.backward()
    ref_loss.backward()
    torch.testing.assert_close(hidden.grad.double(), h64.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(weight.grad.double(), w64.grad, atol=1e-5, rtol=1e-4)


def test_fused_linear_bf16_matches_unfused():
    n, hidden_size, vocab = 13, 24, 101
    gen = torch.Generator().manual_seed(7)
    hidden = torch.randn(n, hidden_size, generator=gen).bfloat16().requires_grad_()  # [N, H]
    weight = torch.randn(vocab, hidden_size, generator=gen).bfloat16().requires_grad_()  # [V, H]
    labels = make_labels(n, vocab, gen)  # [N]
    fused = ops.fused_linear_token_logprobs(hidden, weight, labels, chunk_size=5)
    (fused.logprobs.sum() + fused.entropy.sum()).backward()

    h2 = hidden.detach().clone().requires_grad_()
    w2 = weight.detach().clone().requires_grad_()
    unfused = ops.token_logprobs(h2 @ w2.T, labels)  # same bf16-rounded logits
    (unfused.logprobs.sum() + unfused.entropy.sum()).backward()
    torch.testing.assert_close(fused.logprobs, unfused.logprobs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused.entropy, unfused.entropy, atol=1e-5, rtol=1e-5)
    assert hidden.grad.dtype == weight.grad.dtype == torch.bfloat16
    # the fused weight gradient accumulates in fp32, the unfused one in a bf16 matmul
    torch.testing.assert_close(hidden.grad.float(), h2.grad.float(), atol=5e-2, rtol=2e-2)
    torch.testing.assert_close(weight.grad.float(), w2.grad.float(), atol=5e-2, rtol=2e-2)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fused_linear_rejects_bad_shapes(backend, monkeypatch):
    monkeypatch.setenv("FASTRL_BACKEND", backend)
    with pytest.raises(ValueError, match="hidden"):
        ops.fused_linear_token_logprobs(
            torch.randn(3, 4), torch.randn(5, 6), torch.zeros(3, dtype=torch.long)
        )
    with pytest.raises(ValueError, match="chunk_size"):
        ops.fused_linear_token_logprobs(
            torch.randn(3, 4), torch.randn(5, 4), torch.zeros(3, dtype=torch.long), chunk_size=0
        )


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------

FUSED_CASES = {
    # name: (rows, hidden, vocab, dtype, temperature, ignore, chunk_size, train_weight)
    "fp32-chunked": (37, 32, 997, torch.float32, 0.7, "some", 16, True),
    "single-row": (1, 16, 997, torch.float32, 1.0, "none", None, True),
    "bf16-frozen-weight": (20, 16, 997, torch.bfloat16, 1.0, "some", 8, False),
    "all-ignored": (6, 16, 300, torch.float32, 1.0, "all", 4, True),
}


@pytest.mark.parametrize("case", list(FUSED_CASES))
def test_triton_fused_linear_forward_backward(case):
    n, hdim, vocab, dtype, temperature, ignore, chunk, train_weight = FUSED_CASES[case]
    gen = torch.Generator().manual_seed(list(FUSED_CASES).index(case))
    hidden = torch.randn(n, hdim, generator=gen).to(dtype)
    weight = (torch.randn(vocab, hdim, generator=gen) * 0.5).to(dtype)
    labels = make_labels(n, vocab, gen, ignore, every=3)
    control_ids = [3, 7 if ignore == "all" else int(labels[0]), vocab - 1]
    w_lp, w_h = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    kw = dict(temperature=temperature, control_ids=control_ids, chunk_size=chunk)

    def run(fn, h_dtype):
        h = hidden.to(h_dtype, copy=True).requires_grad_()
        w = weight.to(h_dtype, copy=True).requires_grad_(train_weight)
        out = fn(h, w, labels)
        loss_of(out[:2], w_lp, w_h).backward()
        return out, h.grad, w.grad

    def fused(h, w, y):
        s = stats_of(fl.fused_linear_token_logprobs, h, w, y, **kw)
        return s.logprobs, s.entropy, s.control_probs

    def ref(h, w, y):
        s = stats_of(reference.fused_linear_token_logprobs, h, w, y, **kw)
        return s.logprobs, s.entropy, s.control_probs

    def f64(h, w, y):
        logp, entropy, probs = naive_token_stats(h @ w.T, y, temperature)
        return logp, entropy, probs[:, control_ids]

    (logp, ent, ctrl), g_hidden, g_weight = run(fused, dtype)
    assert g_hidden.dtype == dtype and (g_weight is None) == (not train_weight)
    (rlp, rh, rctrl), r_hidden, r_weight = run(ref, dtype)
    (elp, eh, ectrl), e_hidden, e_weight = run(f64, torch.float64)

    if dtype == torch.float32:
        close(logp, elp, atol=2e-4)
        close(ent, eh, atol=2e-4)
        close(ctrl, ectrl, atol=1e-6)
        close(g_hidden, e_hidden, atol=1e-4, rtol=1e-4)
        close(g_weight, e_weight, atol=1e-4, rtol=1e-4)
    else:  # the logits are rounded to bf16, as in an unfused bf16 LM head
        close(logp, elp, atol=0.05, rtol=0.02)
        close(ent, eh, atol=0.05, rtol=0.02)
    close(logp, rlp, atol=2e-5)
    close(ent, rh, atol=2e-5)
    close(ctrl, rctrl, atol=1e-7)
    grad_tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=0.02, rtol=0.02)
    close(g_hidden, r_hidden, **grad_tol)
    if train_weight:
        close(g_weight, r_weight, **grad_tol)
    ignored = labels == IGNORE
    assert torch.all(logp[ignored] == 0) and torch.all(ent[ignored] == 0)
    assert torch.all(g_hidden[ignored] == 0)


def test_triton_fused_linear_default_chunk_rows():
    assert fl.default_chunk_rows(151_936, torch.bfloat16) % 128 == 0
    assert fl.default_chunk_rows(10**9, torch.float32) == 1


# --------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------


def test_dispatch_to_triton(monkeypatch):
    assert callable(getattr(fastrl.triton_kernels, "fused_linear_token_logprobs", None)), (
        "fastrl.triton_kernels must export fused_linear_token_logprobs (triton_kernels/__init__.py)"
    )
    monkeypatch.setenv("FASTRL_BACKEND", "triton")
    calls = []
    impl = fastrl.triton_kernels.fused_linear_token_logprobs

    def spy(*args, **kwargs):
        calls.append("fused_linear_token_logprobs")
        return impl(*args, **kwargs)

    monkeypatch.setattr(fastrl.triton_kernels, "fused_linear_token_logprobs", spy)
    ops._choose.cache_clear()
    try:
        assert ops.select_backend("fused_linear_token_logprobs", "cpu") == "triton"
        gen = torch.Generator().manual_seed(3)
        hidden, weight = torch.randn(3, 8, generator=gen), torch.randn(40, 8, generator=gen)
        labels = torch.tensor([1, IGNORE, 39])
        fused = ops.fused_linear_token_logprobs(
            hidden, weight, labels, control_ids=[1], chunk_size=2
        )
        expected = stats_of(reference.token_logprobs, hidden @ weight.T, labels, control_ids=[1])
        close(fused.logprobs, expected.logprobs, atol=1e-5)
        close(fused.entropy, expected.entropy, atol=1e-5)
        close(fused.control_probs, expected.control_probs, atol=1e-7)
    finally:
        ops._choose.cache_clear()
    assert calls == ["fused_linear_token_logprobs"]


# --------------------------------------------------------------------------------------------
# Compiled kernels on a GPU, in a fresh process (the kernels of this one are interpreted)
# --------------------------------------------------------------------------------------------

CUDA_CHECK = r"""
import sys

import torch

from fastrl.ops import reference
from fastrl.triton_kernels.fused_linear import fused_linear_token_logprobs

device, n, vocab, hdim = sys.argv[1], *map(int, sys.argv[2:5])
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
    hidden = torch.randn(n, hdim, device=device, generator=gen).to(dtype)
    weight = (torch.randn(vocab, hdim, device=device, generator=gen) / hdim**0.5).to(dtype)
    for chunk in (None, 100):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        hr, wr = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        kw = dict(temperature=0.7, control_ids=ids, chunk_size=chunk)
        lp, ent, _ = fused_linear_token_logprobs(h, w, labels, **kw)
        lp_r, ent_r, _ = reference.fused_linear_token_logprobs(hr, wr, labels, **kw)
        ((lp * w_lp).sum() + (ent * w_h).sum()).backward()
        ((lp_r * w_lp).sum() + (ent_r * w_h).sum()).backward()
        check("fused logprobs", lp, lp_r, 1e-4)
        check("fused entropy", ent, ent_r, 1e-4)
        check("fused grad hidden", h.grad, hr.grad, rel)
        check("fused grad weight", w.grad, wr.grad, rel)
print("ok")
"""


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_kernels_on_cuda():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", CUDA_CHECK, "cuda", "1024", "151936", "1024"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0 and "ok" in result.stdout, result.stdout + result.stderr
