"""Triton token statistics and fused LM head against float64 and the torch reference.

Runs the kernels under the Triton interpreter on CPU tensors: `TRITON_INTERPRET=1` is set before
triton is imported (Triton decides interpreted vs compiled when a kernel is decorated), then
removed again if this module set it, so that other test modules see the environment they expect;
the tests here that go through the dispatcher set it back with monkeypatch.
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
def _interpreter_and_poisoned_outputs(monkeypatch):
    """Interpreter on; every buffer the ops allocate is filled with NaN (catches unwritten data)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")

    def poisoned(shape, dtype, device):
        return torch.full(shape, math.nan, dtype=dtype, device=device)

    monkeypatch.setattr(lp, "_empty", poisoned)
    monkeypatch.setattr(fl, "_empty", poisoned)


def make_labels(n: int, vocab: int, gen: torch.Generator, ignore: str) -> torch.Tensor:
    labels = torch.randint(0, vocab, (n,), generator=gen)  # [N]
    if ignore == "all":
        labels.fill_(IGNORE)
    elif ignore == "some":
        labels[1::3] = IGNORE
    return labels


def f64_stats(logits: torch.Tensor, labels: torch.Tensor, temperature: float, control_ids):
    """Float64 log_softmax reference: logprobs (N,), entropy (N,), control probs (N, K)."""
    logp = torch.log_softmax(logits.double() / temperature, dim=-1)  # [N, V]
    valid = labels != IGNORE  # [N]
    label_logp = logp.gather(1, labels.clamp(min=0)[:, None]).squeeze(1)  # [N]
    entropy = -(logp.exp() * logp).sum(dim=-1)  # [N]
    control = logp.exp()[:, control_ids] if control_ids is not None else None  # [N, K]
    return torch.where(valid, label_logp, 0.0), torch.where(valid, entropy, 0.0), control


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
# token_logprobs
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
def test_token_logprobs_forward_backward(case):
    n, vocab, dtype, temperature, scale, ignore = TOKEN_CASES[case]
    gen = torch.Generator().manual_seed(list(TOKEN_CASES).index(case))
    logits = (torch.randn(n, vocab, generator=gen) * scale).clamp(-scale, scale).to(dtype)
    labels = make_labels(n, vocab, gen, ignore)
    label0 = 7 if ignore == "all" else int(labels[0])
    control_ids = [0, label0, vocab - 1]
    w_lp, w_h = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    kw = dict(temperature=temperature, control_ids=control_ids)

    x = logits.clone().requires_grad_()
    out = lp.token_logprobs(x, labels, **kw)
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
    ref = reference.token_logprobs(xr, labels, **kw)
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
def test_token_logprobs_partial_gradients(which):
    gen = torch.Generator().manual_seed(1)
    n, vocab, temperature = 6, 997, 0.7
    logits = torch.randn(n, vocab, generator=gen) * 5  # [N, V]
    labels = make_labels(n, vocab, gen, "some")
    w = torch.randn(n, generator=gen)
    with_entropy = which != "no-entropy"
    w_lp = None if which == "entropy-only" else w
    w_h = w if which == "entropy-only" else None

    x = logits.clone().requires_grad_()
    out = lp.token_logprobs(x, labels, temperature=temperature, with_entropy=with_entropy)
    assert (out.entropy is None) == (not with_entropy) and out.control_probs is None
    loss_of((out.logprobs, out.entropy), w_lp, w_h).backward()

    x64 = logits.double().requires_grad_()
    exp_lp, exp_h, _ = f64_stats(x64, labels, temperature, None)
    loss_of((exp_lp, exp_h), w_lp, w_h).backward()
    close(out.logprobs, exp_lp, atol=1e-4)
    close(x.grad, x64.grad, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_logprobs_inplace_backward(dtype):
    gen = torch.Generator().manual_seed(2)
    n, vocab = 7, 997
    leaf = (torch.randn(n, vocab, generator=gen) * 8).to(dtype).requires_grad_()
    labels = make_labels(n, vocab, gen, "some")
    w_lp, w_h = torch.randn(n, generator=gen), torch.randn(n, generator=gen)

    expected = reference.token_logprobs(leaf, labels, temperature=0.7)
    loss_of((expected.logprobs, expected.entropy), w_lp, w_h).backward()
    expected_grad, leaf.grad = leaf.grad.clone(), None

    logits = leaf * 1  # an intermediate: its buffer receives the gradient
    out = lp.token_logprobs(logits, labels, temperature=0.7, inplace_backward=True)
    loss_of((out.logprobs, out.entropy), w_lp, w_h).backward()
    rtol = 1e-5 if dtype == torch.float32 else 1e-2
    close(leaf.grad, expected_grad, atol=1e-5, rtol=rtol)
    assert torch.equal(logits.detach(), leaf.grad)  # written in place

    # A later user of the overwritten logits fails loudly instead of reading the gradient.
    scaled = leaf.detach().clone().requires_grad_() * 1
    squared = (scaled * scaled).sum()  # saves `scaled` for its backward
    out = lp.token_logprobs(scaled, labels, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (out.logprobs.sum() + squared).backward()


def test_block_size_leaves_tails():
    cpu = torch.device("cpu")
    assert lp.block_size(997, cpu) < 997 and 997 % lp.block_size(997, cpu)
    assert lp.block_size(100, cpu) == 128
    assert lp.block_size(151_936, torch.device("cuda")) == lp.GPU_BLOCK_V


def test_token_logprobs_strided_logits():
    gen = torch.Generator().manual_seed(4)
    n, vocab = 5, 997
    wide = torch.randn(n, vocab + 50, generator=gen) * 4  # rows of a wider buffer
    labels = make_labels(n, vocab, gen, "some")
    column_major = wide[:, :vocab].T.contiguous().T  # non-unit column stride: copied by the op
    for layout in (wide[:, :vocab], column_major):
        out = lp.token_logprobs(layout, labels, control_ids=[5])
        exp_lp, exp_h, exp_ctrl = f64_stats(layout, labels, 1.0, [5])
        close(out.logprobs, exp_lp, atol=1e-4)
        close(out.entropy, exp_h, atol=1e-4)
        close(out.control_probs, exp_ctrl, atol=1e-6)
    x = wide.clone().requires_grad_()
    lp.token_logprobs(x[:, :vocab], labels).logprobs.sum().backward()
    x64 = wide.double().requires_grad_()
    f64_stats(x64[:, :vocab], labels, 1.0, None)[0].sum().backward()
    close(x.grad, x64.grad, atol=1e-5)


def test_token_logprobs_input_errors():
    logits, labels = torch.randn(3, 50), torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match="logits must have shape"):
        lp.token_logprobs(logits[0], labels)
    with pytest.raises(ValueError, match="labels must have shape"):
        lp.token_logprobs(logits, labels[:2])
    with pytest.raises(ValueError, match="temperature"):
        lp.token_logprobs(logits, labels, temperature=0.0)
    with pytest.raises(IndexError, match="control_ids"):
        lp.token_logprobs(logits, labels, control_ids=[0, 50])
    empty = lp.token_logprobs(torch.randn(0, 50), torch.zeros(0, dtype=torch.long))
    assert empty.logprobs.shape == empty.entropy.shape == (0,)


# --------------------------------------------------------------------------------------------
# fused_linear_token_logprobs
# --------------------------------------------------------------------------------------------

FUSED_CASES = {
    # name: (rows, hidden, vocab, dtype, temperature, ignore, chunk_size, train_weight)
    "fp32-chunked": (37, 32, 997, torch.float32, 0.7, "some", 16, True),
    "single-row": (1, 16, 997, torch.float32, 1.0, "none", None, True),
    "bf16-frozen-weight": (20, 16, 997, torch.bfloat16, 1.0, "some", 8, False),
    "all-ignored": (6, 16, 300, torch.float32, 1.0, "all", 4, True),
}


@pytest.mark.parametrize("case", list(FUSED_CASES))
def test_fused_linear_forward_backward(case):
    n, hdim, vocab, dtype, temperature, ignore, chunk, train_weight = FUSED_CASES[case]
    gen = torch.Generator().manual_seed(list(FUSED_CASES).index(case))
    hidden = torch.randn(n, hdim, generator=gen).to(dtype)
    weight = (torch.randn(vocab, hdim, generator=gen) * 0.5).to(dtype)
    labels = make_labels(n, vocab, gen, ignore)
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
        s = fl.fused_linear_token_logprobs(h, w, y, **kw)
        return s.logprobs, s.entropy, s.control_probs

    def ref(h, w, y):
        s = reference.fused_linear_token_logprobs(h, w, y, **kw)
        return s.logprobs, s.entropy, s.control_probs

    def f64(h, w, y):
        return f64_stats(h @ w.T, y, temperature, control_ids)

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


def test_fused_linear_default_chunk_rows():
    assert fl.default_chunk_rows(151_936, torch.bfloat16) % 128 == 0
    assert fl.default_chunk_rows(10**9, torch.float32) == 1
    with pytest.raises(ValueError, match="chunk_size"):
        fl.fused_linear_token_logprobs(
            torch.randn(2, 4), torch.randn(5, 4), torch.zeros(2, dtype=torch.long), chunk_size=0
        )


# --------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------


def test_dispatch_to_triton(monkeypatch):
    for op in ("token_logprobs", "fused_linear_token_logprobs"):
        assert callable(getattr(fastrl.triton_kernels, op, None)), (
            f"fastrl.triton_kernels must export {op} (triton_kernels/__init__.py)"
        )
    monkeypatch.setenv("FASTRL_BACKEND", "triton")
    calls = []

    def spy(name):
        impl = getattr(fastrl.triton_kernels, name)

        def wrapper(*args, **kwargs):
            calls.append(name)
            return impl(*args, **kwargs)

        monkeypatch.setattr(fastrl.triton_kernels, name, wrapper)

    spy("token_logprobs")
    spy("fused_linear_token_logprobs")
    ops._choose.cache_clear()
    try:
        assert ops.select_backend("token_logprobs", "cpu") == "triton"
        assert ops.select_backend("fused_linear_token_logprobs", "cpu") == "triton"
        gen = torch.Generator().manual_seed(3)
        hidden, weight = torch.randn(3, 8, generator=gen), torch.randn(40, 8, generator=gen)
        labels = torch.tensor([1, IGNORE, 39])
        stats = ops.token_logprobs(hidden @ weight.T, labels, control_ids=[1])
        fused = ops.fused_linear_token_logprobs(hidden, weight, labels, chunk_size=2)
        expected = reference.token_logprobs(hidden @ weight.T, labels, control_ids=[1])
        close(stats.logprobs, expected.logprobs, atol=1e-5)
        close(fused.entropy, expected.entropy, atol=1e-5)
        close(stats.control_probs, expected.control_probs, atol=1e-7)
    finally:
        ops._choose.cache_clear()
    assert calls == ["token_logprobs", "fused_linear_token_logprobs"]


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
from fastrl.triton_kernels.fused_linear import fused_linear_token_logprobs
from fastrl.triton_kernels.logprobs import token_logprobs

device, n, vocab, hdim = sys.argv[1], *map(int, sys.argv[2:5])
gen = torch.Generator(device).manual_seed(0)


def check(name, actual, expected, rel):
    err = (actual.double() - expected.double()).abs().max().item()
    bound = rel * max(expected.double().abs().max().item(), 1.0)
    assert err <= bound, f"{name}: max error {err:.3g} > {bound:.3g}"


labels = torch.randint(0, vocab, (n,), device=device, generator=gen)
labels[::5] = -100
ids = [0, 1, vocab - 1]
w_lp, w_h = torch.randn(2, n, device=device, generator=gen)
for dtype, rel in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
    logits = (torch.randn(n, vocab, device=device, generator=gen) * 4).to(dtype)
    for inplace in (False, True):
        x = logits.clone().requires_grad_()
        xr = logits.clone().requires_grad_()
        out = token_logprobs(x * 1, labels, temperature=0.7, control_ids=ids,
                             inplace_backward=inplace)
        ref = reference.token_logprobs(xr, labels, temperature=0.7, control_ids=ids)
        ((out.logprobs * w_lp).sum() + (out.entropy * w_h).sum()).backward()
        ((ref.logprobs * w_lp).sum() + (ref.entropy * w_h).sum()).backward()
        check("logprobs", out.logprobs, ref.logprobs, 1e-5)
        check("entropy", out.entropy, ref.entropy, 1e-5)
        check("control", out.control_probs, ref.control_probs, 1e-5)
        check(f"grad {dtype} inplace={inplace}", x.grad, xr.grad, rel)
    hidden = torch.randn(n, hdim, device=device, generator=gen).to(dtype)
    weight = (torch.randn(vocab, hdim, device=device, generator=gen) / hdim**0.5).to(dtype)
    for chunk in (None, 100):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        hr, wr = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        kw = dict(temperature=0.7, control_ids=ids, chunk_size=chunk)
        out = fused_linear_token_logprobs(h, w, labels, **kw)
        ref = reference.fused_linear_token_logprobs(hr, wr, labels, **kw)
        ((out.logprobs * w_lp).sum() + (out.entropy * w_h).sum()).backward()
        ((ref.logprobs * w_lp).sum() + (ref.entropy * w_h).sum()).backward()
        check("fused logprobs", out.logprobs, ref.logprobs, 1e-4)
        check("fused entropy", out.entropy, ref.entropy, 1e-4)
        check("fused grad hidden", h.grad, hr.grad, rel)
        check("fused grad weight", w.grad, wr.grad, rel)
print("ok")
"""


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_kernels_on_cuda():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    args = ["cuda", "1024", "151936", "1024"]
    result = subprocess.run(
        [sys.executable, "-c", CUDA_CHECK, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0 and "ok" in result.stdout, result.stdout + result.stderr
