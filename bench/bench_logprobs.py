"""Token logprob + entropy + control-token probabilities over materialized logits.

    python bench/bench_logprobs.py                       # CUDA: N sweep at V=160000; CPU: small
    python bench/bench_logprobs.py --memory              # peak extra memory, N=4096, V=152064
    python bench/bench_logprobs.py --n 32768 --v 160000
    python bench/bench_logprobs.py --providers naive fastrl-triton --modes full grpo

Providers, measured in the same run:
    naive           log_softmax over an fp32 copy of the logits, gather, entropy (eager torch)
    compiled        `torch.compile` of `naive`
    fastrl-torch    the chunked torch reference of `fastrl.ops`
    fastrl-triton   the Triton kernels (CUDA only)
    liger           (mode grpo, CUDA only) Liger's Triton GRPO op `triton_grpo_loss`
Modes:
    fwd     logprob + entropy + K=3 control probabilities
    full    fwd + backward of a random weighted sum of logprob and entropy (d logits written)
    grpo    logprob + entropy → clipped GRPO loss → backward: fastrl's ops against Liger's op
Bytes per pass: fwd reads the logits once (N·V·itemsize); full also reads them again and writes
d(logits) (3·N·V·itemsize for the fused path). The achieved GB/s below uses those counts and is
reported as a fraction of the copy bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (  # noqa: E402
    add_out_argument,
    ceilings,
    default_device,
    fmt_row,
    measure_ms,
    peak_extra_bytes,
    write_results,
)

from fastrl.ops import reference  # noqa: E402

CONTROL_IDS = [11, 17, 23]


def naive(logits: torch.Tensor, labels: torch.Tensor, control: torch.Tensor):
    logp = torch.log_softmax(logits.float(), dim=-1)  # [N, V] fp32 copy
    token = logp.gather(-1, labels[:, None])[:, 0]
    entropy = -(logp.exp() * logp).sum(-1)
    ctrl = logp[:, control].exp()
    return token, entropy, ctrl


def providers(device: torch.device) -> dict:
    control = torch.tensor(CONTROL_IDS, device=device)
    out = {
        "naive": lambda x, y: naive(x, y, control)[:2],
        "compiled": None,
        "fastrl-torch": lambda x, y: _stats(reference.token_logprobs, x, y, control),
    }
    compiled = torch.compile(naive, dynamic=False)
    out["compiled"] = lambda x, y: compiled(x, y, control)[:2]
    if device.type == "cuda":
        try:
            from fastrl import triton_kernels

            if callable(getattr(triton_kernels, "token_logprobs", None)):
                out["fastrl-triton"] = lambda x, y: _stats(
                    triton_kernels.token_logprobs, x, y, control
                )
        except ImportError:
            pass
    return out


PROVIDERS = ("naive", "compiled", "fastrl-torch", "fastrl-triton")  # fwd and full modes


def select(table: dict, names: list[str] | None) -> dict:
    """The providers named (all when `names` is empty); one this device lacks (fastrl-triton off
    CUDA) is reported and skipped."""
    missing = sorted(set(names or ()) - set(table))
    if missing:
        print(f"not available here: {', '.join(missing)}")
    return {k: v for k, v in table.items() if not names or k in names}


def _stats(fn, logits, labels, control):
    """A backend function called as `fastrl.ops` calls it (ids as a tensor): logprobs, entropy."""
    logprobs, entropy, _ = fn(logits, labels, with_entropy=True, control_ids=control)
    return logprobs, entropy


def _full(fn, logits, w1, w2, labels):
    logits.grad = None
    lp, ent = fn(logits, labels)
    (lp * w1 + ent * w2).sum().backward()
    return logits.grad


def _grpo_fastrl(token_fn, loss_fn, logits, labels, old, adv, mask):
    logits.grad = None
    b, t = mask.shape
    s = token_fn(
        logits.view(b * t, -1), labels.view(-1), with_entropy=True, control_ids=CONTROL_IDS
    )
    loss, _ = loss_fn(
        s.logprobs.view(b, t),
        old,
        adv,
        mask,
        entropy=s.entropy.view(b, t),
        clip_low=0.2,
        clip_high=0.28,
        loss_agg="token-mean",
    )
    loss.backward()
    return logits.grad


def run(args) -> dict:
    device = default_device()
    dtype = getattr(torch, args.dtype)
    ceil = ceilings(device)
    print(f"device {device}: copy {ceil['copy_GBps']} GB/s, matmul {ceil['matmul_TFLOPs']} TFLOP/s")
    rows = []
    widths = [7, 7, 5, 14, 10, 8, 11, 10]
    print(fmt_row(["N", "V", "mode", "provider", "ms", "GB/s", "of copy", "vs naive"], widths))
    gen = torch.Generator(device=device).manual_seed(0)
    for n in args.n:
        v = args.v
        logits = (torch.randn(n, v, device=device, generator=gen) * 4).to(dtype)
        labels = torch.randint(0, v, (n,), device=device, generator=gen)
        w1, w2 = torch.randn(n, device=device), torch.randn(n, device=device)
        table = select(providers(device), args.providers)
        for mode in args.modes:
            base = None
            for name, fn in table.items():
                if mode == "grpo":
                    continue
                if mode == "fwd":
                    with torch.no_grad():
                        ms = measure_ms(
                            lambda fn=fn, x=logits, y=labels: fn(x, y), device, args.reps
                        )
                    nbytes = n * v * logits.element_size()
                else:
                    x = logits.detach().requires_grad_(True)
                    ms = measure_ms(
                        lambda fn=fn, x=x, a=w1, b=w2, y=labels: _full(fn, x, a, b, y),
                        device,
                        args.reps,
                    )
                    nbytes = 3 * n * v * logits.element_size()
                base = ms if name == "naive" else base
                gbs = nbytes / ms / 1e6
                row = {
                    "N": n,
                    "V": v,
                    "dtype": args.dtype,
                    "mode": mode,
                    "provider": name,
                    "ms": round(ms, 3),
                    "GBps": round(gbs, 1),
                    "frac_copy_bw": round(gbs / ceil["copy_GBps"], 3),
                    "speedup_vs_naive": round(base / ms, 2) if base else None,
                }
                rows.append(row)
                print(
                    fmt_row(
                        [
                            n,
                            v,
                            mode,
                            name,
                            f"{ms:.2f}",
                            f"{gbs:.1f}",
                            f"{row['frac_copy_bw']:.2f}",
                            row["speedup_vs_naive"],
                        ],
                        widths,
                    )
                )
            if mode == "grpo":
                rows += grpo_rows(device, logits, labels, args, widths)
        del logits
    return {"ceilings": ceil, "rows": rows}


def grpo_rows(device, logits, labels, args, widths) -> list[dict]:
    """fastrl's token_logprobs + policy_loss against Liger's fused GRPO op, fwd + bwd."""
    n, v = logits.shape
    t = min(1024, n)
    b = n // t
    gen = torch.Generator(device=device).manual_seed(1)
    old = torch.randn(b, t, device=device, generator=gen) * 0.1 - 2.0
    adv = torch.randn(b, device=device, generator=gen)
    mask = torch.ones(b, t, dtype=torch.bool, device=device)
    ids = labels[: b * t].view(b, t).contiguous()
    out = {}
    from fastrl import ops

    token_fn = ops.token_logprobs
    x = logits[: b * t].detach().clone().requires_grad_(True)
    out["fastrl"] = measure_ms(
        lambda: _grpo_fastrl(token_fn, ops.policy_loss, x, ids, old, adv, mask), device, args.reps
    )
    if device.type == "cuda":
        try:
            from liger_kernel.transformers.grpo_loss import triton_grpo_loss

            # Liger reads logits of shape (B, T + 1, V) (the last position is dropped).
            xl = torch.cat([x.detach().view(b, t, v), x.detach().view(b, t, v)[:, :1]], 1)
            xl = xl.contiguous().requires_grad_(True)

            def liger():
                xl.grad = None
                loss = triton_grpo_loss(
                    xl,
                    old,
                    None,
                    ids,
                    adv,
                    mask,
                    temperature=1.0,
                    beta=0.0,
                    eps_low=0.2,
                    eps_high=0.28,
                    inplace=True,
                    loss_type="grpo",
                    reduce=True,
                )[0]
                loss.backward()

            out["liger"] = measure_ms(liger, device, args.reps)
        except Exception as error:  # noqa: BLE001 - report why the baseline is missing
            print(f"liger unavailable: {error}")
    rows = []
    for name, ms in out.items():
        ratio = round(out["liger"] / ms, 2) if "liger" in out else None
        rows.append(
            {
                "N": b * t,
                "V": v,
                "dtype": args.dtype,
                "mode": "grpo",
                "provider": name,
                "ms": round(ms, 3),
                "speedup_vs_liger": ratio,
            }
        )
        print(fmt_row([b * t, v, "grpo", name, f"{ms:.2f}", "", "", ratio], widths))
    return rows


def memory(args) -> dict:
    """Peak extra memory of the forward at N=4096, V=152064 against an fp32 copy of the logits."""
    device = default_device()
    n, v = 4096, 152064
    dtype = getattr(torch, args.dtype)
    logits = torch.randn(n, v, device=device).to(dtype)
    labels = torch.randint(0, v, (n,), device=device)
    control = torch.tensor(CONTROL_IDS, device=device)
    fp32_copy = n * v * 4
    result = {"N": n, "V": v, "dtype": args.dtype, "fp32_copy_bytes": fp32_copy}
    with torch.no_grad():
        for name, fn in (
            (
                "fastrl-torch",
                lambda: reference.token_logprobs(logits, labels, control_ids=control),
            ),
            ("naive", lambda: naive(logits, labels, control)),
        ):
            peak = peak_extra_bytes(fn, device)
            result[f"{name}_peak_extra_bytes"] = peak
            if peak is not None:
                print(
                    f"{name}: peak extra {peak / 2**20:.0f} MiB = "
                    f"{peak / fp32_copy:.1%} of an fp32 copy of the logits "
                    f"({fp32_copy / 2**20:.0f} MiB)"
                )
    return {"memory": result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    gpu = torch.cuda.is_available()
    parser.add_argument(
        "--n", type=int, nargs="+", default=[4096, 8192, 16384, 32768] if gpu else [256, 1024]
    )
    parser.add_argument("--v", type=int, default=160000 if gpu else 32000)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--modes", nargs="+", default=["fwd", "full", "grpo"])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument(
        "--providers", nargs="+", choices=PROVIDERS, help="fwd/full providers (default: all)"
    )
    parser.add_argument("--memory", action="store_true", help="only the peak-memory case")
    add_out_argument(parser)
    args = parser.parse_args()
    payload = memory(args) if args.memory else run(args)
    key = "logprobs_memory" if args.memory else "logprobs"
    print("results:", write_results(key, default_device(), payload, args.out))


if __name__ == "__main__":
    main()
