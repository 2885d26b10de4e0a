"""Command line: `fastrl train | eval | demo | pretrain | report | bench` (also
`python -m fastrl ...`, torchrun).

Options and dotted overrides (`key=value`) may come in any order. Commands that print a JSON
summary print only that line on stdout; logs, vLLM's included, go to stderr (and a training run's
also to RUN_DIR/train.log)."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TextIO

# The microbenchmarks live in the source checkout's bench/, next to the package.
BENCH_DIR = Path(__file__).resolve().parents[1] / "bench"
# Verbs whose leftover `key=value` arguments are dotted config overrides.
OVERRIDE_VERBS = ("train", "eval", "demo", "pretrain")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default where it has one (not for unset options and flags)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or action.help is None:
            return action.help
        return super()._get_help_string(action)


def _version() -> str:
    try:
        return version("fastrl")
    except PackageNotFoundError:  # a source tree on sys.path, not installed
        from fastrl import __version__

        return __version__


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastrl", description=__doc__, formatter_class=_HelpFormatter)
    p.add_argument("--version", action="version", version=f"fastrl {_version()}")
    sub = p.add_subparsers(dest="verb", required=True)
    overrides_help = "dotted config overrides, e.g. rl.lr=1e-5 run_dir=runs/x (any position)"

    t = sub.add_parser("train", help="SFT then RL as configured", formatter_class=_HelpFormatter)
    t.add_argument("--config", help="YAML config (default: the built-in demo)")
    t.add_argument(
        "--resume",
        action="store_true",
        help="continue run_dir's latest checkpoint (exit 2 when there is none)",
    )
    t.add_argument(
        "--resume-if-any",
        action="store_true",
        help="continue run_dir's latest checkpoint if there is one, else start fresh",
    )
    t.add_argument(
        "--overwrite",
        action="store_true",
        help="train into a run_dir that holds an earlier run: it is moved aside to "
        "RUN_DIR.old-<time> first (without this, a non-empty run_dir is refused)",
    )
    t.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=overrides_help)

    e = sub.add_parser(
        "eval", help="greedy evaluation of a policy on one split", formatter_class=_HelpFormatter
    )
    e.add_argument("--env", default=None, help="environment (default: the config's)")
    e.add_argument(
        "--split", default="test", help="split of the environment, e.g. train, test, format_ood"
    )
    e.add_argument(
        "--policy",
        default="model",
        help="model (the model at --model or --run) | oracle (each task's expert) | teacher (the "
        "SFT demonstrations) | replay:FILE.jsonl (recorded assistant messages)",
    )
    e.add_argument(
        "--model",
        default=None,
        help="local HF model directory or preset name (policy model: this or --run)",
    )
    e.add_argument(
        "--run",
        default=None,
        help="training run directory: its final/ model (else its latest checkpoint) and its "
        "config.yaml (--config replaces it; the differing keys are logged)",
    )
    e.add_argument("--config", default=None, help="YAML config for limits and the model")
    e.add_argument("--out", required=True, help="directory for summary.json and results.jsonl")
    e.add_argument(
        "--limit", type=int, default=None, help="number of tasks, > 0 (default: env.eval_tasks)"
    )
    e.add_argument(
        "--samples",
        type=int,
        default=0,
        help="also sample N episodes per task (policy model) and report sampled success and "
        "pass_at_k: the tasks a GRPO group can be rewarded on",
    )
    e.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="temperature of --samples (default: the config's rollout.temperature)",
    )
    e.add_argument(
        "--expert-probe",
        action="store_true",
        help="also score each task's expert trajectory under the policy (teacher forcing): "
        "its log-likelihood and the first token greedy decoding would not write",
    )
    e.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=overrides_help)

    d = sub.add_parser(
        "demo",
        help="the main job on the built-in default; prints a JSON summary (into runs/demo, or "
        "runs/demo-N when that holds an earlier run)",
        formatter_class=_HelpFormatter,
    )
    d.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=overrides_help)

    pt = sub.add_parser(
        "pretrain",
        help="tool-use pretraining of a preset on procedural tools and tasks (the <preset>-base "
        "models); prints a JSON summary with the base's held-out success per call syntax",
        formatter_class=_HelpFormatter,
    )
    pt.add_argument("--config", help="YAML config (its pretrain, model and env keys)")
    pt.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="dotted config overrides, e.g. pretrain.steps=300 model.name=small "
        "run_dir=runs/pretrain (the default run_dir; a run of the same recipe there resumes)",
    )

    r = sub.add_parser(
        "report",
        help="plots and an HTML page from a run directory's metrics",
        formatter_class=_HelpFormatter,
    )
    r.add_argument("run_dir", help="run directory holding metrics.jsonl")

    b = sub.add_parser(
        "bench",
        help="run a microbenchmark of bench/ (a source checkout); no name lists them",
        description="Runs bench/bench_NAME.py with the arguments that follow, e.g. "
        "`fastrl bench packing --reps 21`; results are merged into --out (default: "
        "bench/<device>.json under the cache directory, $FASTRL_CACHE or ~/.cache/fastrl).",
        formatter_class=_HelpFormatter,
    )
    b.add_argument("name", nargs="?", help="e.g. token_logprobs, policy_loss, packing")
    b.add_argument("args", nargs=argparse.REMAINDER, help="arguments of the benchmark script")
    p.verbs = sub.choices  # type: ignore[attr-defined]
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    """`argv` parsed, options and `key=value` overrides in any order.

    argparse gives a verb's positional overrides only their first run of arguments (and
    subparsers cannot intermix), so the overrides after an option come back unrecognised: they
    join `overrides` in command-line order. Anything else (an unknown `--flag`, a word without `=`)
    is the verb's usage error (exit 2).
    """
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    verb = parser.verbs[args.verb]  # type: ignore[attr-defined]
    if args.verb in OVERRIDE_VERBS:
        given = [*args.overrides, *extra]
        unknown = [a for a in given if a.startswith("-") or "=" not in a]
        args.overrides = [a for a in given if a not in unknown]
    else:
        unknown = extra
    if unknown:
        verb.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


def benchmarks() -> list[str]:
    """Names `fastrl bench` accepts: bench/bench_NAME.py of the source checkout."""
    return sorted(f.stem.removeprefix("bench_") for f in BENCH_DIR.glob("bench_*.py"))


def run_bench(name: str | None, args: list[str]) -> int:
    names = benchmarks()
    if not names:
        print(
            f"fastrl: error: no benchmarks at {BENCH_DIR}: `fastrl bench` runs the scripts of a "
            "source checkout (pip install -e .)",
            file=sys.stderr,
        )
        return 2
    if name is None:
        print("\n".join(names))
        return 0
    if name not in names:
        print(
            f"fastrl: error: unknown benchmark {name!r}; available: {', '.join(names)}",
            file=sys.stderr,
        )
        return 2
    return subprocess.call([sys.executable, str(BENCH_DIR / f"bench_{name}.py"), *args])


def resume_command(argv: list[str]) -> str:
    """The command line that continues an interrupted `fastrl train ARGV...`."""
    args = [a for a in argv if a not in ("--overwrite", "--resume-if-any")]
    if "--resume" not in args:
        args.append("--resume")
    return " ".join(["fastrl", *args])


def free_run_dir(base: str = "runs/demo") -> str:
    """`base` when it is empty or missing, else the first `base-N` (N = 2, 3, ...) that is."""
    n, path = 1, Path(base)
    while path.exists() and (not path.is_dir() or any(path.iterdir())):
        n += 1
        path = Path(f"{base}-{n}")
    return str(path)


def run_pretrain(config: str | None, overrides: list[str]) -> dict:
    """`fastrl pretrain`: the stage of `fastrl.pretrain` on the resolved config."""
    from fastrl import load_config
    from fastrl.pretrain import pretrain

    if not any(o.startswith("run_dir=") for o in overrides):
        overrides = ["run_dir=runs/pretrain", *overrides]
    return pretrain(load_config(config, overrides))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.verb == "bench":
        return run_bench(args.name, args.args)
    from fastrl.monitor.log import RunLogHandler, setup_logging

    setup_logging(os.environ.get("FASTRL_LOG", "INFO"))  # before anything imports vLLM
    run_log = RunLogHandler()  # RUN_DIR/train.log, opened once the run directory is claimed
    if args.verb in ("train", "demo") and int(os.environ.get("RANK", "0")) == 0:
        logging.getLogger().addHandler(run_log)
    # stdout carries the result line only: whatever a library prints there while the job runs
    # (DeepSpeed's accelerator notice, for one) goes to stderr with the logs.
    result = sys.stdout
    try:
        with contextlib.redirect_stdout(sys.stderr):
            return _run(args, argv, result)
    finally:
        logging.getLogger().removeHandler(run_log)
        run_log.close()


def _run(args: argparse.Namespace, argv: list[str], result: TextIO) -> int:
    from fastrl.api import ReplayError, evaluate, train
    from fastrl.config import ConfigError
    from fastrl.train.signals import Interrupted

    errors: tuple[type[Exception], ...] = (ConfigError, FileNotFoundError, ReplayError)
    if args.verb == "report":
        errors += (ValueError,)  # a metrics file without rows
    try:
        if args.verb == "report":
            from fastrl.monitor.report import write_report

            summary = write_report(args.run_dir)
        elif args.verb == "train":
            if args.resume and args.resume_if_any:
                raise ConfigError("--resume and --resume-if-any: pass one of them")
            resume = "auto" if args.resume_if_any else args.resume
            summary = train(args.config, args.overrides, resume=resume, overwrite=args.overwrite)
        elif args.verb == "pretrain":
            summary = run_pretrain(args.config, args.overrides)
        elif args.verb == "demo":
            overrides = args.overrides
            if not any(o.startswith("run_dir=") for o in overrides):
                overrides = [f"run_dir={free_run_dir()}", *overrides]
            summary = train(None, overrides)
        else:
            summary = evaluate(
                args.split,
                policy=args.policy,
                model=args.model,
                run=args.run,
                config=args.config,
                overrides=args.overrides,
                env=args.env,
                limit=args.limit,
                out=args.out,
                samples=args.samples,
                temperature=args.temperature,
                expert_probe=args.expert_probe,
            )
    except errors as e:
        print(f"fastrl: error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        again = f"; resume with: {resume_command(argv)}" if e.checkpoint is not None else ""
        print(f"fastrl: {e}{again}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:  # a second Ctrl-C: stopped at once, the last checkpoint intact
        print("fastrl: interrupted; the last checkpoint stays intact", file=sys.stderr)
        return 130
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun the summary is printed once
        print(json.dumps(summary), file=result, flush=True)
    return 0


if __name__ == "__main__":  # python -m fastrl.cli ... (also torchrun -m fastrl.cli)
    raise SystemExit(main())
