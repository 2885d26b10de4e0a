"""Token logprob + entropy: the chunked torch reference of `fastrl.ops` against the naive
`log_softmax` over an fp32 copy of the logits, measured in the same run.

    python bench/bench_token_logprobs.py            # CPU sizes; prints one CSV row per case

Columns: N rows, V vocab, dtype, mode (forward | full = forward + backward), median ms of each
provider, and the speed ratio naive / fastrl. Bytes moved per forward pass: N * V * itemsize
(one read of the logits); the achieved GB/s is reported from that count. Peak memory is not
measured here (CPU); tests/test_ops.py checks that no fp32 (N, V) buffer is allocated.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fastrl.ops import token_logprobs


def naive(logits: torch.Tensor, labels: torch.Tensor):
    logp = torch.log_softmax(logits.float(), dim=-1)  # [N, V] fp32 copy
    token = logp.gather(-1, labels[:, None])[:, 0]
    entropy = -(logp.exp() * logp).sum(-1)
    return token, entropy


def fused(logits: torch.Tensor, labels: torch.Tensor):
    stats = token_logprobs(logits, labels)
    return stats.logprobs, stats.entropy


def median_ms(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def run(n: int, v: int, dtype: torch.dtype, mode: str, reps: int) -> dict:
    g = torch.Generator().manual_seed(0)
    base = (torch.randn(n, v, generator=g) * 3).to(dtype)
    labels = torch.randint(0, v, (n,), generator=g)

    def case(provider):
        def step():
            logits = base.detach().requires_grad_(mode == "full")
            token, entropy = provider(logits, labels)
            if mode == "full":
                (token.sum() + 0.1 * entropy.sum()).backward()

        return step

    ms = {name: median_ms(case(p), reps) for name, p in (("fastrl", fused), ("naive", naive))}
    gbs = n * v * base.element_size() / (ms["fastrl"] * 1e-3) / 1e9
    return {
        "N": n,
        "V": v,
        "dtype": str(dtype).removeprefix("torch."),
        "mode": mode,
        "fastrl_ms": round(ms["fastrl"], 2),
        "naive_ms": round(ms["naive"], 2),
        "naive_over_fastrl": round(ms["naive"] / ms["fastrl"], 2),
        "fastrl_fwd_read_GBps": round(gbs, 2) if mode == "forward" else "",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    rows = [
        run(n, v, dtype, mode, args.reps)
        for n, v in ((1024, 8192), (4096, 32000))
        for dtype in (torch.float32, torch.bfloat16)
        for mode in ("forward", "full")
    ]
    print(",".join(rows[0]))
    for row in rows:
        print(",".join(str(x) for x in row.values()))


if __name__ == "__main__":
    main()
