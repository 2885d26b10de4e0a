"""Command line: `fastrl train | eval | demo | report` (also `python -m fastrl ...`, torchrun)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastrl", description=__doc__)
    sub = p.add_subparsers(dest="verb", required=True)

    t = sub.add_parser("train", help="SFT then RL as configured")
    t.add_argument("--config", help="YAML config (defaults: the built-in demo)")
    t.add_argument(
        "--resume", action="store_true", help="continue from run_dir's latest checkpoint"
    )
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. rl.lr=1e-5 run_dir=runs/x")

    e = sub.add_parser("eval", help="greedy evaluation of a policy on one split")
    e.add_argument("--env", default=None, help="environment (default: the config's)")
    e.add_argument("--split", default="test")
    e.add_argument("--policy", default="model", help="model | oracle | replay:FILE.jsonl")
    e.add_argument("--model", default=None, help="local HF model directory or preset name")
    e.add_argument("--config", default=None, help="YAML config for limits and the model")
    e.add_argument("--out", required=True, help="directory for summary.json and results.jsonl")
    e.add_argument(
        "--limit", type=int, default=None, help="number of tasks (default env.eval_tasks)"
    )
    e.add_argument(
        "--samples",
        type=int,
        default=0,
        help="also sample N episodes per task (policy model) and report sampled success and "
        "pass_at_k: the tasks a GRPO group can be rewarded on",
    )
    e.add_argument("--temperature", type=float, default=1.0, help="temperature of --samples")
    e.add_argument("overrides", nargs="*", help="dotted config overrides")

    d = sub.add_parser("demo", help="the main job on the built-in default; prints a JSON summary")
    d.add_argument("overrides", nargs="*", help="dotted config overrides")

    r = sub.add_parser("report", help="plots and an HTML page from a run directory's metrics")
    r.add_argument("run_dir", help="run directory holding metrics.jsonl")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("FASTRL_LOG", "INFO"),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    from fastrl.api import ReplayError, evaluate, train
    from fastrl.config import ConfigError

    errors: tuple[type[Exception], ...] = (ConfigError, FileNotFoundError, ReplayError)
    if args.verb == "report":
        errors += (ValueError,)  # a metrics file without rows
    try:
        if args.verb == "report":
            from fastrl.monitor.report import write_report

            summary = write_report(args.run_dir)
        elif args.verb == "train":
            summary = train(args.config, args.overrides, resume=args.resume)
        elif args.verb == "demo":
            summary = train(None, args.overrides)
        else:
            summary = evaluate(
                args.split,
                policy=args.policy,
                model=args.model,
                config=args.config,
                overrides=args.overrides,
                env=args.env,
                limit=args.limit,
                out=args.out,
                samples=args.samples,
                temperature=args.temperature,
            )
    except errors as e:
        print(f"fastrl: error: {e}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun the summary is printed once
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":  # python -m fastrl.cli ... (also torchrun -m fastrl.cli)
    raise SystemExit(main())
