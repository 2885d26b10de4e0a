"""Fused LM head: token logprob + entropy from hidden states and the LM-head weight, into the
clipped GRPO loss, forward + backward (gradients for hidden and weight).

    python bench/bench_fused_linear.py                    # CUDA: M=16384 H=4096 V=131072
    python bench/bench_fused_linear.py --m 1024 --h 256 --v 32000
    python bench/bench_fused_linear.py --providers naive fastrl-triton liger

Providers, measured in the same run:
    naive           hidden @ weight.T → fp32 log_softmax → gather, entropy → loss (eager torch)
    compiled        `torch.compile` of `naive`
    fastrl-torch    `fastrl.ops.reference.fused_linear_token_logprobs` + the policy loss
    fastrl-triton   `fastrl.triton_kernels.fused_linear_token_logprobs` + the policy loss (CUDA)
    liger           `LigerFusedLinearGRPOLoss` (chunked torch; no entropy), compiled on CUDA
FLOPs per step: forward 2·M·H·V, backward (recompute 2·M·H·V + d(hidden) and d(weight)
4·M·H·V) = 8·M·H·V for the recomputing paths, 6·M·H·V for naive; TFLOP/s below uses 6·M·H·V
(the useful work) for every provider, and is also given as a fraction of the matmul ceiling
measured in the same run.
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
PROVIDERS = ("naive", "compiled", "fastrl-torch", "fastrl-triton", "liger")
# The Triton loss on CUDA; the torch reference elsewhere (called directly so that
# `torch.compile` of the naive step traces it without the dispatcher).
policy_loss = reference.policy_loss
if torch.cuda.is_available():
    try:
        from fastrl.triton_kernels import policy_loss  # noqa: F811
    except ImportError:
        pass


def loss_from(lp, ent, old, adv, mask):
    b, t = mask.shape
    loss, _ = policy_loss(
        lp.view(b, t),
        old,
        adv,
        mask,
        entropy=ent.view(b, t),
        clip_low=0.2,
        clip_high=0.28,
        entropy_coef=0.001,
    )
    return loss


def naive_step(hidden, weight, labels, old, adv, mask):
    logp = torch.log_softmax((hidden @ weight.T).float(), -1)
    lp = logp.gather(-1, labels[:, None])[:, 0]
    ent = -(logp.exp() * logp).sum(-1)
    return loss_from(lp, ent, old, adv, mask)


def fused_step(fn, control_ids: torch.Tensor):
    """A step through a backend function (called as `fastrl.ops` calls it: ids as a tensor)."""

    def step(hidden, weight, labels, old, adv, mask):
        logprobs, entropy, _ = fn(
            hidden, weight, labels, with_entropy=True, control_ids=control_ids
        )
        return loss_from(logprobs, entropy, old, adv, mask)

    return step


def providers(device: torch.device, b: int, t: int) -> dict:
    control_ids = torch.tensor(CONTROL_IDS, device=device)
    table = {
        "naive": naive_step,
        "compiled": torch.compile(naive_step, dynamic=False),
        "fastrl-torch": fused_step(reference.fused_linear_token_logprobs, control_ids),
    }
    if device.type == "cuda":
        try:
            from fastrl import triton_kernels

            fn = getattr(triton_kernels, "fused_linear_token_logprobs", None)
            if callable(fn):
                table["fastrl-triton"] = fused_step(fn, control_ids)
        except ImportError:
            pass
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        liger = LigerFusedLinearGRPOLoss(
            beta=0.0,
            use_ref_model=False,
            loss_type="grpo",
            epsilon_low=0.2,
            epsilon_high=0.28,
            compiled=device.type == "cuda",
            chunk_size=1,
        )

        def liger_step(hidden, weight, labels, old, adv, mask):
            out = liger(
                hidden.view(b, t, -1), weight, labels.view(b, t), mask, adv, old_per_token_logps=old
            )
            return out[0] if isinstance(out, tuple) else out

        table["liger"] = liger_step
    except ImportError as error:
        print(f"liger unavailable: {error}")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    gpu = torch.cuda.is_available()
    parser.add_argument("--m", type=int, default=16384 if gpu else 1024)
    parser.add_argument("--h", type=int, default=4096 if gpu else 256)
    parser.add_argument("--v", type=int, default=131072 if gpu else 32000)
    parser.add_argument("--t", type=int, default=1024, help="tokens per sequence")
    # bf16 matmuls are emulated (slow) on most CPUs: fp32 there.
    parser.add_argument("--dtype", default="bfloat16" if gpu else "float32")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument(
        "--providers", nargs="+", choices=PROVIDERS, help="providers to run (default: all)"
    )
    add_out_argument(parser)
    args = parser.parse_args()
    device = default_device()
    dtype = getattr(torch, args.dtype)
    m, h, v = args.m, args.h, args.v
    t = min(args.t, m)
    b = m // t
    m = b * t
    ceil = ceilings(device)
    print(f"device {device}: copy {ceil['copy_GBps']} GB/s, matmul {ceil['matmul_TFLOPs']} TFLOP/s")
    gen = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(m, h, device=device, generator=gen).to(dtype).requires_grad_(True)
    weight = (torch.randn(v, h, device=device, generator=gen) * h**-0.5).to(dtype)
    weight.requires_grad_(True)
    labels = torch.randint(0, v, (m,), device=device, generator=gen)
    old = torch.randn(b, t, device=device, generator=gen) * 0.1 - 8.0
    adv = torch.randn(b, device=device, generator=gen)
    mask = torch.ones(b, t, dtype=torch.bool, device=device)
    flops = 6 * m * h * v
    rows, base = [], None
    widths = [14, 10, 9, 10, 11, 10]
    print(fmt_row(["provider", "ms", "TFLOP/s", "of mm", "peak MiB", "vs naive"], widths))
    table = providers(device, b, t)
    missing = sorted(set(args.providers or ()) - set(table))
    if missing:  # fastrl-triton off CUDA, liger when not installed
        print(f"not available here: {', '.join(missing)}")
    for name, step in table.items():
        if args.providers and name not in args.providers:
            continue

        def run(step=step):
            hidden.grad = weight.grad = None
            step(hidden, weight, labels, old, adv, mask).backward()

        try:
            ms = measure_ms(run, device, args.reps)
            peak = peak_extra_bytes(run, device)
        except Exception as error:  # noqa: BLE001 - one failing provider must not hide the rest
            print(f"{name}: failed ({type(error).__name__}: {error})")
            continue
        base = ms if name == "naive" else base
        tflops = flops / ms / 1e9
        row = {
            "M": m,
            "H": h,
            "V": v,
            "dtype": args.dtype,
            "provider": name,
            "ms": round(ms, 3),
            "TFLOPs": round(tflops, 3),
            "frac_matmul": round(tflops / ceil["matmul_TFLOPs"], 3),
            "peak_extra_bytes": peak,
            "speedup_vs_naive": round(base / ms, 2) if base else None,
        }
        rows.append(row)
        print(
            fmt_row(
                [
                    name,
                    f"{ms:.1f}",
                    f"{tflops:.2f}",
                    f"{row['frac_matmul']:.2f}",
                    "-" if peak is None else f"{peak / 2**20:.0f}",
                    row["speedup_vs_naive"],
                ],
                widths,
            )
        )
    path = write_results("fused_linear", device, {"ceilings": ceil, "rows": rows}, args.out)
    print("results:", path)


if __name__ == "__main__":
    main()
