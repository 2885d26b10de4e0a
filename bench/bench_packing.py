"""Packed sequences: pack/unpack bandwidth, and a training forward+backward padded vs packed.

    python bench/bench_packing.py                  # CUDA: B=64 rows up to T=4096; CPU: B=16, T=512
    python bench/bench_packing.py --skip-model     # only pack/unpack

Part 1, `pack` and `unpack` of a (B, T, H) bf16 (CUDA) / fp32 (CPU) tensor with a right-padded mask
whose row lengths are uniform in [1, T] (about 50% padding). Providers in the same run: `bool-index`
(torch boolean indexing, `x[mask]` / `out[mask] = packed`), `gather` (the flash-attn-style
nonzero + index_select of `fastrl.ops.reference`) and `ext` (the C++/CUDA extension). Bytes moved:
pack reads and writes the kept rows, unpack reads them and writes the whole padded output (zeros
included), plus the mask; reported against the copy bandwidth measured in the same run.
`zeros-only` (allocating and zeroing the padded output, nothing else) is the floor of any unpack
that returns a fresh tensor; on CPU, first-touch page faults of that fresh memory dominate.

Part 2, one forward+backward of a random-init Qwen2-shaped model (the `tiny` preset's shape on
CPU, a 0.5B-like shape on CUDA) over the same length spread, through `token_stats` + a token-mean
loss: `padded` (one right-padded batch, sdpa), `packed-mask` (one packed row, sdpa with the
block-diagonal mask transformers builds) and `packed-varlen` (one packed row, the fastrl_packed
attention). Reported: real tokens per second and the speed-up over padded (target: >= 1.6x at 50%
padding).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import add_out_argument, ceilings, default_device, fmt_row, measure_ms, write_results  # noqa: E402

from fastrl.ops import reference  # noqa: E402


def lengths_mask(b: int, t: int, device: torch.device, gen: torch.Generator) -> torch.Tensor:
    lengths = torch.randint(1, t + 1, (b,), generator=gen, device="cpu")  # ~50% padding
    lengths[0] = t  # the longest row sets the padded width
    return (torch.arange(t)[None] < lengths[:, None]).to(device)  # [B, T] bool


def bench_pack(args, device, ceil) -> list[dict]:
    from fastrl.ops import _ext

    gen = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    x = torch.randn(args.b, args.t, args.h, generator=gen).to(device, dtype)
    mask = lengths_mask(args.b, args.t, device, gen)
    kept = int(mask.sum())
    packed, cu = reference.pack(x, mask)
    row = args.h * x.element_size()
    # pack reads and writes the kept rows; unpack reads them and writes the whole padded output.
    op_bytes = {"pack": 2 * kept * row, "unpack": kept * row + x.numel() * x.element_size()}
    widths = [8, 11, 9, 8, 9, 11]
    print(f"pack/unpack: B={args.b} T={args.t} H={args.h} {dtype}, {kept} kept rows")
    print(fmt_row(["op", "impl", "ms", "GB/s", "of copy", "vs bool-ix"], widths))
    rows = []
    for op in ("pack", "unpack"):
        base = None
        nbytes = op_bytes[op] + mask.numel()
        impls = [("bool-index", None), ("gather", reference), ("ext", _ext)]
        if op == "unpack":  # the floor of any unpack that returns a fresh tensor
            impls.append(("zeros-only", "zeros"))
        for impl, mod in impls:
            if mod == "zeros":
                fn = lambda: torch.zeros_like(x)  # noqa: E731
            elif mod is None and op == "pack":
                fn = lambda: x[mask]  # noqa: E731
            elif mod is None:
                fn = lambda: x.new_zeros(x.shape).index_put_((mask,), packed)  # noqa: E731
            elif op == "pack":
                fn = lambda mod=mod: mod.pack(x, mask, total=kept)  # noqa: E731
            else:
                fn = lambda mod=mod: mod.unpack(packed, cu, mask)  # noqa: E731
            ms = measure_ms(fn, device, args.reps)
            base = ms if base is None else base
            gbs = nbytes / ms / 1e6
            frac = gbs / ceil["copy_GBps"]
            rows.append(
                {
                    "op": op, "impl": impl, "B": args.b, "T": args.t, "H": args.h,
                    "dtype": str(dtype).removeprefix("torch."), "ms": round(ms, 4),
                    "GBps": round(gbs, 1), "frac_copy_bw": round(frac, 3),
                    "speedup_vs_bool_index": round(base / ms, 2),
                }
            )  # fmt: skip
            cols = [op, impl, f"{ms:.3f}", f"{gbs:.1f}", f"{frac:.2f}", round(base / ms, 2)]
            print(fmt_row(cols, widths))
    return rows


def bench_model(args, device) -> list[dict]:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from fastrl.train import packing
    from fastrl.train.batch import Batch, token_stats

    packing.register()
    if device.type == "cuda":
        shape = dict(hidden_size=896, num_attention_heads=14, num_key_value_heads=2,
                     num_hidden_layers=24, intermediate_size=4864)  # fmt: skip
        dtype = torch.bfloat16
    else:
        shape = dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
                     num_hidden_layers=2, intermediate_size=768)  # fmt: skip
        dtype = torch.float32
    vocab = 32768 if device.type == "cuda" else 2048
    config = Qwen2Config(vocab_size=vocab, max_position_embeddings=args.t, **shape)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(device, dtype).train()
    gen = torch.Generator().manual_seed(1)
    mask = lengths_mask(args.b, args.t, torch.device("cpu"), gen)
    ids = torch.randint(10, vocab, (args.b, args.t), generator=gen) * mask
    target = mask.clone()
    target[:, :-1] &= mask[:, 1:]
    target[:, -1] = False
    tokens = int(mask.sum())
    batch = Batch(
        input_ids=ids.to(device), attention_mask=mask.long().to(device),
        target_mask=target.to(device), labels=(torch.roll(ids, -1, 1) * target).to(device),
        engine_logprobs=torch.zeros(args.b, args.t, device=device),
        sampled=torch.ones(args.b, dtype=torch.bool, device=device),
        n_real=tokens, longest=int(mask.sum(1).max()),
    )  # fmt: skip
    print(
        f"\nforward+backward: {config.num_hidden_layers} layers, H={config.hidden_size}, {dtype}, "
        f"B={args.b}, T<={args.t}, {tokens} real tokens ({tokens / mask.numel():.0%} of padded)"
    )
    widths = [14, 10, 10, 9]
    print(fmt_row(["path", "ms", "tokens/s", "vs padded"], widths))
    rows, base = [], None
    for name, attention, packed in (
        ("padded", "sdpa", False),
        ("packed-mask", "sdpa", True),
        ("packed-varlen", packing.ATTN_IMPLEMENTATION, True),
    ):
        model.config._attn_implementation = attention

        def step(packed=packed):
            model.zero_grad(set_to_none=True)
            logp, _, _ = token_stats(model, batch, packed=packed)
            (-(logp.sum()) / tokens).backward()

        try:
            ms = measure_ms(step, device, args.reps)
        except torch.OutOfMemoryError:
            print(fmt_row([name, "OOM", "", ""], widths))
            continue
        base = ms if base is None else base
        rows.append(
            {
                "path": name, "B": args.b, "T": args.t, "tokens": tokens, "ms": round(ms, 2),
                "tokens_per_s": round(tokens / ms * 1e3), "speedup_vs_padded": round(base / ms, 2),
            }
        )  # fmt: skip
        print(fmt_row([name, f"{ms:.1f}", f"{tokens / ms * 1e3:.0f}", round(base / ms, 2)], widths))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    gpu = torch.cuda.is_available()
    parser.add_argument("--b", type=int, default=64 if gpu else 16)
    parser.add_argument("--t", type=int, default=4096 if gpu else 512)
    parser.add_argument("--h", type=int, default=4096 if gpu else 1024, help="pack feature size")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--skip-model", action="store_true")
    add_out_argument(parser)
    args = parser.parse_args()
    device = default_device()
    ceil = ceilings(device)
    print(f"device {device}: copy {ceil['copy_GBps']} GB/s")
    payload = {"ceilings": ceil, "pack": bench_pack(args, device, ceil)}
    if not args.skip_model:
        payload["train_forward_backward"] = bench_model(args, device)
    print("results:", write_results("packing", device, payload, args.out))


if __name__ == "__main__":
    main()
