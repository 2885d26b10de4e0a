"""One RL train step (forward + policy loss + backward) of a Qwen2.5-1.5B-shaped random model:
fastrl's packed path against the padded Hugging Face baseline, on the same trajectories.

    python bench/bench_step.py                       # CUDA: Qwen2.5-1.5B shape, 16 trajectories
    python bench/bench_step.py --dry-run             # plan only: shapes, micro-batches, memory
    python bench/bench_step.py --layers 2 --hidden 256 --vocab 4096 --seqs 8 --max-len 256

Providers, measured in the same run on the same trajectories (lengths drawn from
[min-len, max-len], a random prompt share, the rest trained on):
    hf-padded      micro-batches of rows x longest <= token budget (sorted by length), the model's
                   padded forward with its (B, T, V) logits, fp32 log_softmax + gather and entropy,
                   the torch reference policy loss, backward
    fastrl-packed  micro-batches bin-packed to the token budget, `token_stats(packed=True)` (one
                   padding-free sequence, varlen attention, the fused LM-head op on the trained
                   positions only) and `fastrl.ops.policy_loss`, backward
Both end with gradients in every parameter; the optimizer step is the same for both and is left
out. Reported: median ms per step, real tokens/s, model TFLOP/s (6 x parameters x real tokens,
attention left out) as a fraction of the matmul ceiling measured in the same run, and the peak
extra memory of a step.
"""

from __future__ import annotations

import argparse
import os
import random
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

# Qwen2.5-1.5B (config.json of the released model).
QWEN25_1_5B = dict(
    hidden=1536, intermediate=8960, layers=28, heads=12, kv_heads=2, vocab=151936, tied=True
)
LOSS_KWARGS = dict(clip_low=0.2, clip_high=0.28, kl_coef=0.0, loss_agg="token-mean")


def build_model(args, device: torch.device, dtype: torch.dtype):
    """A randomly initialized Qwen2 causal LM of the requested shape, with the packed attention."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from fastrl.train import packing

    config = Qwen2Config(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(32768, args.max_len),
        tie_word_embeddings=args.tied,
        rope_theta=1e6,
    )
    config._attn_implementation = packing.register()
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(dtype)
    return model


def trajectories(args):
    """`args.seqs` trajectories of random tokens with lengths in [min_len, max_len]."""
    from fastrl.rollout.types import Trajectory

    rng = random.Random(0)
    trajs = []
    for i in range(args.seqs):
        n = rng.randint(args.min_len, args.max_len)
        prompt = rng.randint(1, max(1, n // 4))
        ids = [rng.randrange(1, args.vocab) for _ in range(n)]
        response = ids[prompt:]
        trajs.append(
            Trajectory(
                task_id=str(i),
                group_id=i // 4,
                prompt_ids=ids[:prompt],
                response_ids=response,
                loss_mask=[1] * len(response),
                engine_logprobs=[-rng.random() * 3 for _ in response],
            )
        )
    return trajs


def plan(args, trajs) -> dict:
    """Micro-batches of both paths and the sizes they imply (no device work)."""
    from fastrl.train.batch import micro_batches

    padded = micro_batches(trajs, args.token_budget, packed=False)
    packed = micro_batches(trajs, args.token_budget, packed=True)
    real = sum(t.num_tokens for t in trajs)
    padded_slots = sum(len(g) * max(t.num_tokens for t in g) for g in padded)
    params = args.vocab * args.hidden * (1 if args.tied else 2) + args.layers * (
        args.hidden * (args.hidden + 2 * args.hidden // args.heads * args.kv_heads)  # q, k, v
        + args.hidden * args.hidden  # o
        + 3 * args.hidden * args.intermediate  # gate, up, down
    )
    longest = max(max(t.num_tokens for t in g) * len(g) for g in padded)
    return {
        "sequences": len(trajs),
        "real_tokens": real,
        "padded_positions": padded_slots,
        "padding_fraction": round(1 - real / padded_slots, 4),
        "micro_batches": {"hf-padded": len(padded), "fastrl-packed": len(packed)},
        "parameters": params,
        "model_flops_per_step": 6 * params * real,
        # The padded path's largest logits tensor: (rows x longest, V) in the model dtype + fp32.
        "hf_logits_bytes": longest * args.vocab * (2 + 4),
        "token_budget": args.token_budget,
    }


def hf_padded_step(model, groups, pad_id: int, device) -> None:
    from fastrl.ops import reference
    from fastrl.train.batch import collate

    total = sum(len(g) for g in groups)
    for group in groups:
        batch = collate(group, pad_id, device)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        logp_all = logits.float().log_softmax(-1)  # [B, T, V]
        logp = logp_all.gather(-1, batch.labels[..., None])[..., 0]  # [B, T]
        entropy = -(logp_all.exp() * logp_all).sum(-1)  # [B, T]
        adv = torch.randn(batch.labels.shape[0], device=device)
        loss, _ = reference.policy_loss(
            logp, batch.engine_logprobs, adv, batch.target_mask, entropy=entropy, **LOSS_KWARGS
        )
        (loss * len(group) / total).backward()


def fastrl_packed_step(model, groups, pad_id: int, device) -> None:
    from fastrl import ops
    from fastrl.train.batch import collate, token_stats

    total = sum(len(g) for g in groups)
    for group in groups:
        batch = collate(group, pad_id, device)
        logp, entropy, _ = token_stats(model, batch, packed=True)  # [B, T] each
        adv = torch.randn(batch.labels.shape[0], device=device)
        loss, _ = ops.policy_loss(
            logp, batch.engine_logprobs, adv, batch.target_mask, entropy=entropy, **LOSS_KWARGS
        )
        (loss * len(group) / total).backward()


def run(args) -> dict:
    from fastrl.train.batch import micro_batches

    device = default_device()
    trajs = trajectories(args)
    info = plan(args, trajs)
    print(
        f"{info['sequences']} sequences, {info['real_tokens']} real tokens, "
        f"{info['padding_fraction']:.0%} of the padded positions are padding; "
        f"micro-batches {info['micro_batches']}; {info['parameters'] / 1e9:.2f} B parameters"
    )
    if args.dry_run:
        return {"plan": info, "dry_run": True}
    ceil = ceilings(device)
    print(f"device {device}: copy {ceil['copy_GBps']} GB/s, matmul {ceil['matmul_TFLOPs']} TFLOP/s")
    dtype = getattr(torch, args.dtype)
    model = build_model(args, device, dtype)
    model.train()
    steps = {
        "hf-padded": (hf_padded_step, micro_batches(trajs, args.token_budget, packed=False)),
        "fastrl-packed": (fastrl_packed_step, micro_batches(trajs, args.token_budget, packed=True)),
    }
    widths = [14, 10, 12, 9, 9, 12]
    print(fmt_row(["provider", "ms", "tokens/s", "TFLOP/s", "of mm", "peak GiB"], widths))
    rows = []
    for name, (step, groups) in steps.items():

        def once(step=step, groups=groups):
            model.zero_grad(set_to_none=True)
            step(model, groups, 0, device)

        try:
            ms = measure_ms(once, device, args.reps)
            peak = peak_extra_bytes(once, device)
        except torch.OutOfMemoryError as error:
            print(f"{name}: out of memory ({str(error).splitlines()[0]})")
            rows.append({"provider": name, "error": "out of memory"})
            torch.cuda.empty_cache()
            continue
        tflops = info["model_flops_per_step"] / ms / 1e9
        row = {
            "provider": name,
            "ms": round(ms, 2),
            "tokens_per_s": round(info["real_tokens"] / ms * 1e3),
            "TFLOPs": round(tflops, 1),
            "of_matmul": round(tflops / ceil["matmul_TFLOPs"], 3),
            "peak_bytes": peak,
        }
        rows.append(row)
        peak_gib = "-" if peak is None else f"{peak / 2**30:.1f}"
        print(
            fmt_row(
                [name, row["ms"], row["tokens_per_s"], row["TFLOPs"], row["of_matmul"], peak_gib],
                widths,
            )
        )
    return {"plan": info, "ceilings": ceil, "rows": rows, "dtype": args.dtype}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    gpu = torch.cuda.is_available()
    shape = QWEN25_1_5B
    parser.add_argument("--hidden", type=int, default=shape["hidden"])
    parser.add_argument("--intermediate", type=int, default=shape["intermediate"])
    parser.add_argument("--layers", type=int, default=shape["layers"])
    parser.add_argument("--heads", type=int, default=shape["heads"])
    parser.add_argument("--kv-heads", type=int, default=shape["kv_heads"])
    parser.add_argument("--vocab", type=int, default=shape["vocab"])
    parser.add_argument("--untied", dest="tied", action="store_false", help="separate LM head")
    parser.add_argument("--seqs", type=int, default=16)
    parser.add_argument("--min-len", type=int, default=128)
    parser.add_argument("--max-len", type=int, default=2048)
    parser.add_argument("--token-budget", type=int, default=8192)
    parser.add_argument("--dtype", default="bfloat16" if gpu else "float32")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dry-run", action="store_true", help="plan only, no model, no timing")
    add_out_argument(parser)
    args = parser.parse_args(argv)
    if args.hidden % args.heads or args.heads % args.kv_heads:
        parser.error("--hidden must be a multiple of --heads, and --heads of --kv-heads")
    if not 1 <= args.min_len <= args.max_len:
        parser.error("need 1 <= --min-len <= --max-len")
    payload = run(args)
    if not args.dry_run:
        print("results:", write_results("step", default_device(), payload, args.out))


if __name__ == "__main__":
    main()
