"""Clipped GRPO/PPO loss with KL, entropy bonus and statistics, forward + backward.

    python bench/bench_policy_loss.py                 # CUDA: B=64, T=4096; CPU: B=16, T=1024

Providers, measured in the same run: `fastrl-torch` (the torch reference, eager), `compiled`
(`torch.compile` of it) and `fastrl-triton` (the fused kernel, CUDA only). The op is
memory-bound: it reads 5 (B, T) fp32 tensors (logprobs, old, ref, entropy, mask as fp32) and
writes 2 gradients, so bytes = 7·B·T·4; GB/s is reported as a fraction of the copy bandwidth
measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import add_out_argument, ceilings, default_device, fmt_row, measure_ms, write_results  # noqa: E402

from fastrl.ops import reference  # noqa: E402

KWARGS = dict(
    clip_low=0.2,
    clip_high=0.28,
    dual_clip=3.0,
    kl_coef=0.01,
    kl_estimator="k3",
    entropy_coef=0.001,
    loss_agg="seq-mean-token-mean",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    gpu = torch.cuda.is_available()
    parser.add_argument("--b", type=int, default=64 if gpu else 16)
    parser.add_argument("--t", type=int, default=4096 if gpu else 1024)
    parser.add_argument("--reps", type=int, default=10)
    add_out_argument(parser)
    args = parser.parse_args()
    device = default_device()
    b, t = args.b, args.t
    gen = torch.Generator(device=device).manual_seed(0)
    lp = (torch.randn(b, t, device=device, generator=gen) * 0.3 - 2).requires_grad_(True)
    ent = torch.rand(b, t, device=device, generator=gen).requires_grad_(True)
    old = lp.detach() + torch.randn(b, t, device=device, generator=gen) * 0.2
    ref = lp.detach() + torch.randn(b, t, device=device, generator=gen) * 0.2
    adv = torch.randn(b, device=device, generator=gen)
    mask = torch.rand(b, t, device=device, generator=gen) < 0.9
    table = {
        "fastrl-torch": reference.policy_loss,
        "compiled": torch.compile(reference.policy_loss, dynamic=False),
    }
    if device.type == "cuda":
        try:
            from fastrl.triton_kernels import policy_loss

            table["fastrl-triton"] = policy_loss
        except ImportError:
            pass
    ceil = ceilings(device)
    print(f"device {device}: copy {ceil['copy_GBps']} GB/s")
    nbytes = 7 * b * t * 4
    rows, base = [], None
    widths = [14, 9, 8, 9, 10]
    print(fmt_row(["provider", "ms", "GB/s", "of copy", "vs torch"], widths))
    for name, fn in table.items():

        def run(fn=fn):
            lp.grad = ent.grad = None
            loss, _ = fn(lp, old, adv, mask, ref_logprobs=ref, entropy=ent, **KWARGS)
            loss.backward()

        ms = measure_ms(run, device, args.reps)
        base = ms if base is None else base
        gbs = nbytes / ms / 1e6
        rows.append(
            {
                "B": b,
                "T": t,
                "provider": name,
                "ms": round(ms, 4),
                "GBps": round(gbs, 1),
                "frac_copy_bw": round(gbs / ceil["copy_GBps"], 3),
                "speedup_vs_torch": round(base / ms, 2),
            }
        )
        print(
            fmt_row(
                [
                    name,
                    f"{ms:.3f}",
                    f"{gbs:.1f}",
                    f"{gbs / ceil['copy_GBps']:.2f}",
                    round(base / ms, 2),
                ],
                widths,
            )
        )
    print(
        "results:", write_results("policy_loss", device, {"ceilings": ceil, "rows": rows}, args.out)
    )


if __name__ == "__main__":
    main()
