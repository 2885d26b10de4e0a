"""Colocated vLLM: weight-sync time and generation throughput against the baselines of the same run.

    python bench/bench_vllm.py               # tiny preset (vocab 2048), 64 prompts x 96 tokens
    python bench/bench_vllm.py --model DIR     # any local HF causal-LM directory

Part 1, weight sync: `VLLMEngine.sync_weights()` (every trainer tensor streamed into vLLM's fused
tensors in place, the CPU GEMM kernels repacked, the prefix cache reset) against a plain copy of
the same bytes (`copy_` of every parameter into a preallocated buffer). Reported: milliseconds and
the ratio sync / copy.

Part 2, generation: the same 64 tool-world prompts (their system prompts with tool schemas), sampled
at temperature 1 for exactly `--tokens` tokens (no stop token, so both engines produce the same
number of tokens), through vLLM and through fastrl's HF engine (KV-cached batched decoding on the
training model). Reported: generated tokens per second and the ratio vLLM / HF.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import add_out_argument, default_device, fmt_row, measure_ms, write_results  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny", help="preset name or local HF model directory")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--reps", type=int, default=5)
    add_out_argument(parser)
    args = parser.parse_args()

    from fastrl.config import cache_home
    from fastrl.envs import get_world
    from fastrl.models import load_model
    from fastrl.rollout.engines import HFEngine
    from fastrl.rollout.engines.vllm import VLLMEngine
    from fastrl.rollout.loop import _prompt_ids
    from fastrl.rollout.types import Sampling

    device = default_device()
    world = get_world("synthetic")
    cache = cache_home() / "models"
    model, tok, model_dir = load_model(
        args.model, corpus=lambda: world.tokenizer_corpus(), cache_dir=cache, vocab_size=2048
    )
    model = model.to(device).eval()
    n_params = sum(p.numel() for p in model.parameters())
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    engine = VLLMEngine(model, str(model_dir), seed=0, max_model_len=2048)
    print(f"model {args.model}: {n_params / 1e6:.2f}M parameters, {nbytes / 2**20:.1f} MiB")

    # -- part 1: weight sync vs a plain copy of the same bytes
    params = [p.detach() for p in model.parameters()]
    buffers = [torch.empty_like(p) for p in params]

    def plain_copy() -> None:
        for dst, src in zip(buffers, params):
            dst.copy_(src)

    copy_ms = measure_ms(plain_copy, device, args.reps)
    sync_ms = measure_ms(engine.sync_weights, device, args.reps)
    widths = [26, 10, 10]
    print(fmt_row(["weight sync", "ms", "vs copy"], widths))
    print(fmt_row(["plain copy of the bytes", f"{copy_ms:.2f}", "1.00"], widths))
    print(
        fmt_row(["VLLMEngine.sync_weights", f"{sync_ms:.2f}", f"{sync_ms / copy_ms:.2f}"], widths)
    )
    sync_row = {
        "bytes": nbytes, "copy_ms": round(copy_ms, 3), "sync_ms": round(sync_ms, 3),
        "sync_over_copy": round(sync_ms / copy_ms, 2),
    }  # fmt: skip

    # -- part 2: generation throughput, same prompts, same token count
    prompts = []
    for task in world.tasks("test", args.prompts):
        prompts.append(_prompt_ids(tok, world.make_env().reset(task)))
    sampling = Sampling(max_tokens=args.tokens, temperature=1.0, stop_token_id=None)
    hf = HFEngine(model, tok.pad_token_id, max_batch=args.prompts)
    gen_rows = []
    print(fmt_row(["generation", "s", "tokens/s", "vs HF"], [26, 8, 10, 8]))
    base = None
    for name, eng in (("hf", hf), ("vllm", engine)):
        eng.generate(prompts[:4], Sampling(8, 1.0), [f"w{i}" for i in range(4)])  # warm-up
        times = []
        for rep in range(max(1, args.reps // 2)):
            ids = [f"{rep}-{i}" for i in range(len(prompts))]
            t0 = time.perf_counter()
            outs = eng.generate(prompts, sampling, ids)
            times.append(time.perf_counter() - t0)
            assert all(len(o.token_ids) == args.tokens for o in outs)
        sec = sorted(times)[len(times) // 2]
        tps = len(prompts) * args.tokens / sec
        base = tps if base is None else base
        print(fmt_row([name, f"{sec:.2f}", f"{tps:.0f}", f"{tps / base:.2f}"], [26, 8, 10, 8]))
        gen_rows.append(
            {
                "engine": name, "prompts": len(prompts), "tokens_each": args.tokens,
                "prompt_tokens_mean": round(sum(map(len, prompts)) / len(prompts)),
                "seconds": round(sec, 3), "tokens_per_s": round(tps), "vs_hf": round(tps / base, 2),
            }
        )  # fmt: skip
    payload = {
        "model": args.model,
        "parameters": n_params,
        "sync": sync_row,
        "generation": gen_rows,
    }
    print("results:", write_results("vllm", device, payload, args.out))


if __name__ == "__main__":
    main()
