"""One prepared run on a GPU machine: build, GPU tests, ceilings, kernel and step benchmarks.

    bash bench/gpu_run.sh                                   # every part, within --budget-s
    bash bench/gpu_run.sh --parts kernels,step              # finish what a first call could not
    bash bench/gpu_run.sh --parts step --resume prev.json   # ... merged into an earlier report
    python bench/gpu_run.py --dry-run                       # CPU: the plan, checked, not timed

Written for a bare CUDA machine without network (python 3.12, torch 2.11 + CUDA 13.0, triton 3.6,
no vllm/deepspeed; fastrl is not installed there): it installs the checkout in editable mode
without dependencies, and the wheels found in `--wheels` (default `.whl/`, see bench/NOTES.md
for fetching liger-kernel and nvtx) into a private folder on PYTHONPATH. Parts, in order:

    build     `FASTRL_BUILD_EXT=1 python setup.py build_ext --inplace` (the CUDA extension, sm_80
              and sm_90), then a check that `fastrl._C` loads with its CUDA kernels
    tests     `pytest -m gpu` (kernels against float64 references on CUDA, the extension, the
              policy on CUDA for a few smoke steps with the HF engine)
    ceilings  device-to-device copy (GB/s) and bf16 matmul (TFLOP/s), the harness's ceilings
    kernels   bench_logprobs (N=32768, V=160000, with Liger's GRPO op), bench_fused_linear
              (M=16384, H=4096, V=131072, with Liger's fused linear GRPO loss), bench_policy_loss
              (B=512, T=4096), bench_packing
    step      bench_step: packed train step of a Qwen2.5-1.5B-shaped random model against the
              padded Hugging Face baseline

Every part runs as a subprocess under what is left of `--budget-s` (default 460 s, so that the
whole call fits 8 minutes); a part that does not fit is recorded as not run, and a later call
names it in `--parts`. The machine starts bare each call: a later call that runs `tests` names
`build` too (the GPU tests of the extension skip without it).

Results: `<out>/<device>.json` (the benchmarks' results under their names; this run's parts,
versions and ceilings under "gpu_run") and `<out>/gpu_run.log` (every command's full output);
`<out>` is `$OUT` when set.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
PARTS = ("build", "tests", "ceilings", "kernels", "step")

# Benchmark shapes (as in bench/RESULTS.md and bench/cuda_check.py).
LOGITS = {"n": 32768, "v": 160000}
FUSED = {"m": 16384, "h": 4096, "v": 131072}
LOSS = {"b": 512, "t": 4096}


@dataclass
class Command:
    """One subprocess of a part; `cap_s` bounds it even when more of the budget is left."""

    label: str
    argv: list[str]
    cap_s: int
    env: dict[str, str] = field(default_factory=dict)
    # Bytes the command needs on the GPU at its largest (0: small), checked by --dry-run.
    gpu_bytes: int = 0


def python() -> str:
    return sys.executable


def bench(script: str, args: str, out: Path) -> list[str]:
    """A benchmark script's command line: `args` split on spaces, results merged into `out`."""
    return [python(), str(BENCH / script), *args.split(), "--out", str(out)]


def gpu_test_files() -> list[str]:
    """The test files that hold GPU tests (collecting only these keeps the part short)."""
    tests = sorted((ROOT / "tests").glob("test_*.py"))
    return [str(p.relative_to(ROOT)) for p in tests if "@pytest.mark.gpu" in p.read_text()]


def plan(out_json: Path) -> dict[str, list[Command]]:
    """The commands of every part, in order. The kernel benchmarks run the naive baseline,
    fastrl's Triton kernels and Liger (torch.compile and the torch references would not fit)."""
    n, v = LOGITS["n"], LOGITS["v"]
    m, h, vf = FUSED["m"], FUSED["h"], FUSED["v"]
    b, t = LOSS["b"], LOSS["t"]
    ceil = (
        "import json, sys, torch; sys.path.insert(0, 'bench'); from harness import ceilings; "
        "print('CEILINGS', json.dumps(ceilings(torch.device('cuda'))))"
    )
    ext = (
        "import torch; from fastrl.ops import _ext; ok = _ext.has_cuda_kernels(); "
        "print('fastrl._C CUDA kernels:', ok); raise SystemExit(0 if ok else 1)"
    )
    pytest = [python(), "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-rs"]
    build_env = {"FASTRL_BUILD_EXT": "1", "MAX_JOBS": "4"}
    logprobs = f"--n {n} --v {v} --modes fwd full grpo --providers naive fastrl-triton"
    fused = f"--m {m} --h {h} --v {vf} --providers naive fastrl-triton liger"
    return {
        "build": [
            Command("build_ext", [python(), "setup.py", "build_ext", "--inplace"], 240, build_env),
            Command("extension loads", [python(), "-c", ext], 60),
        ],
        "tests": [Command("pytest -m gpu", [*pytest, *gpu_test_files()], 200)],
        "ceilings": [Command("ceilings", [python(), "-c", ceil], 60, gpu_bytes=2 * 2**31)],
        "kernels": [
            # bf16 logits and the naive path's fp32 copies
            Command(
                "bench_logprobs",
                bench("bench_logprobs.py", logprobs, out_json),
                150,
                gpu_bytes=n * v * (2 + 4 + 4),
            ),
            # the naive path's logits; the weight and its fp32 gradient
            Command(
                "bench_fused_linear",
                bench("bench_fused_linear.py", fused, out_json),
                150,
                gpu_bytes=m * vf * (2 + 4) + vf * h * (2 + 4),
            ),
            Command(
                "bench_policy_loss",
                bench("bench_policy_loss.py", f"--b {b} --t {t}", out_json),
                60,
                gpu_bytes=12 * b * t * 4,
            ),
            Command("bench_packing", bench("bench_packing.py", "", out_json), 60),
        ],  # fmt: skip
        "step": [Command("bench_step", bench("bench_step.py", "", out_json), 180)],
    }


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


class Log:
    """Prints short lines and appends every command's full output to the log file."""

    def __init__(self, path: Path | None):
        self.path = path

    def line(self, text: str) -> None:
        print(text, flush=True)
        self.write(text + "\n")

    def write(self, text: str) -> None:
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(text)


def run_command(cmd: Command, timeout: float, env: dict[str, str], log: Log) -> dict:
    """Run `cmd` in its own process group (killed whole at the timeout), its output streamed
    into the log file; returns its status, seconds and the last lines of its output."""
    log.line(f"$ {' '.join(cmd.argv)}  (limit {timeout:.0f} s)")
    offset = log.path.stat().st_size if log.path and log.path.exists() else 0
    start = time.perf_counter()
    with open(log.path or os.devnull, "a") as sink:
        proc = subprocess.Popen(
            cmd.argv,
            cwd=ROOT,
            env={**env, **cmd.env},
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            rc = proc.wait(timeout=timeout)
            status = "ok" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc, status = None, "timeout"
    seconds = time.perf_counter() - start
    output = ""
    if log.path is not None:
        with open(log.path, "rb") as f:
            f.seek(offset)
            output = f.read().decode(errors="replace")
    tail = [x for x in output.splitlines() if x.strip()][-12:]
    for text in tail:
        print(f"    {text}")
    log.line(f"  -> {status} in {seconds:.0f} s")
    return {"label": cmd.label, "status": status, "rc": rc, "seconds": round(seconds, 1),
            "tail": tail}  # fmt: skip


def device_slug() -> tuple[str, str]:
    """(GPU name, file name slug) from nvidia-smi, as the harness names its results."""
    name = (
        subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            check=True,
        )
        .stdout.splitlines()[0]
        .strip()
    )
    return name, re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def prepare(env: dict[str, str], wheels: Path, log: Log) -> dict:
    """Wheels into a private folder on PYTHONPATH; fastrl in editable mode (no dependencies)."""
    info: dict = {}
    found = sorted(wheels.glob("*.whl")) if wheels.is_dir() else []
    target = Path("/tmp/fastrl-wheels")
    for wheel in found:  # one at a time: a wheel for another Python must not block the rest
        cmd = [python(), "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
               "--upgrade", "--target", str(target), str(wheel)]  # fmt: skip
        result = subprocess.run(cmd, capture_output=True, text=True)
        log.write(result.stdout + result.stderr)
        info.setdefault("wheels", {})[wheel.name] = "ok" if result.returncode == 0 else "failed"
    if found:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(target), env.get("PYTHONPATH")]))
    probe = [python(), "-c", "import fastrl.triton_kernels"]
    if subprocess.run(probe, cwd=ROOT, env=env, capture_output=True).returncode != 0:
        cmd = [python(), "-m", "pip", "install", "-q", "--no-index", "--no-deps",
               "--no-build-isolation", "-e", str(ROOT)]  # fmt: skip
        result = subprocess.run(cmd, cwd=ROOT, env={**env, "FASTRL_SKIP_EXT": "1"},
                                capture_output=True, text=True)  # fmt: skip
        log.write(result.stdout + result.stderr)
        info["editable_install"] = "ok" if result.returncode == 0 else "failed"
    versions = (
        "import json, platform, torch, triton, transformers; print(json.dumps({'python': "
        "platform.python_version(), 'torch': torch.__version__, 'cuda': torch.version.cuda, "
        "'triton': triton.__version__, 'transformers': transformers.__version__}))"
    )
    result = subprocess.run([python(), "-c", versions], cwd=ROOT, env=env, capture_output=True,
                            text=True)  # fmt: skip
    info["versions"] = json.loads(result.stdout) if result.returncode == 0 else result.stderr[-500:]
    for pkg in ("liger_kernel", "nvtx"):
        probe = [python(), "-c", f"import {pkg}"]
        info[pkg] = subprocess.run(probe, env=env, capture_output=True).returncode == 0
    return info


def write_report(path: Path, report: dict) -> None:
    """Merge `report` under "gpu_run" into `path` (the benchmarks write their keys beside it)."""
    data = json.loads(path.read_text()) if path.exists() else {}
    data["gpu_run"] = report
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# Dry run
# --------------------------------------------------------------------------------------------


def dry_run(parts: list[str], gpu_mem_gib: float, log: Log) -> int:
    """Plan every part, check what can be checked without a GPU; nothing is built or timed."""
    problems = []
    commands = plan(Path("OUT/device.json"))
    for part in parts:
        log.line(f"[{part}]")
        for cmd in commands[part]:
            log.line(f"  {cmd.label}: {' '.join(cmd.argv)}  (cap {cmd.cap_s} s)")
            script = next((Path(a) for a in cmd.argv if a.endswith(".py")), None)
            if script is not None and not (ROOT / script).exists():
                problems.append(f"{cmd.label}: {script} does not exist")
            if script is not None and script.parent == BENCH:
                # Every flag given must be one the script (or the harness) declares.
                source = script.read_text() + (BENCH / "harness.py").read_text()
                for flag in (a for a in cmd.argv if a.startswith("--")):
                    if f'"{flag}"' not in source:
                        problems.append(f"{cmd.label}: {script.name} has no {flag} option")
                if "--providers" in cmd.argv:
                    names = cmd.argv[cmd.argv.index("--providers") + 1 :]
                    for name in itertools.takewhile(lambda a: not a.startswith("--"), names):
                        if f'"{name}"' not in source:
                            problems.append(f"{cmd.label}: {script.name} has no provider {name}")
            if cmd.gpu_bytes > gpu_mem_gib * 2**30 * 0.9:
                problems.append(
                    f"{cmd.label}: needs about {cmd.gpu_bytes / 2**30:.0f} GiB of the "
                    f"{gpu_mem_gib:.0f} GiB GPU"
                )
            elif cmd.gpu_bytes:
                log.line(f"    largest buffers about {cmd.gpu_bytes / 2**30:.1f} GiB")
    if "tests" in parts:
        files = gpu_test_files()
        marked = sum((ROOT / f).read_text().count("@pytest.mark.gpu") for f in files)
        log.line(f"  {marked} tests marked gpu in {len(files)} files")
        if marked == 0:
            problems.append("tests: no test is marked gpu")
    if "step" in parts:
        result = subprocess.run(
            [python(), str(BENCH / "bench_step.py"), "--dry-run"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        log.line("  bench_step --dry-run: " + (result.stdout.strip().splitlines() or ["?"])[0])
        if result.returncode != 0:
            problems.append(f"bench_step --dry-run failed: {result.stderr.strip()[-500:]}")
    for text in problems:
        log.line(f"dry run: problem: {text}")
    log.line(f"dry run: {'ok' if not problems else f'{len(problems)} problems'}")
    return 0 if not problems else 1


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def parse_parts(text: str) -> list[str]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown parts {unknown}; parts: {', '.join(PARTS)}")
    return [p for p in PARTS if p in parts]  # always in dependency order


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", type=parse_parts, default=list(PARTS), help=",".join(PARTS))
    parser.add_argument("--out", default=os.environ.get("OUT") or str(BENCH / "results"))
    parser.add_argument("--budget-s", type=float, default=460.0)
    parser.add_argument("--resume", help="an earlier report of this script to merge into")
    parser.add_argument("--wheels", default=str(ROOT / ".whl"))
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--gpu-mem-gib", type=float, default=80.0, help="checked by --dry-run")
    args = parser.parse_args(argv)
    start = time.perf_counter()

    if args.dry_run:
        return dry_run(args.parts, args.gpu_mem_gib, Log(None))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = Log(out / "gpu_run.log")
    if shutil.which("nvidia-smi") is None:
        log.line("gpu_run: no nvidia-smi: not a GPU machine (use --dry-run here)")
        return 2
    name, slug = device_slug()
    out_json = out / f"{slug}.json"
    if args.resume:
        shutil.copyfile(args.resume, out_json)
    previous = json.loads(out_json.read_text()).get("gpu_run", {}) if out_json.exists() else {}
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONUNBUFFERED"] = "1"
    report = {
        "device": name,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(python()).name, *sys.argv]),
        "parts": previous.get("parts", {}),
    }
    log.line(f"gpu_run on {name}: parts {','.join(args.parts)}, budget {args.budget_s:.0f} s")
    report["setup"] = prepare(env, Path(args.wheels), log)
    log.line(f"setup: {json.dumps(report['setup'])}")
    write_report(out_json, report)

    commands = plan(out_json)
    for part in args.parts:
        results = []
        for cmd in commands[part]:
            left = args.budget_s - (time.perf_counter() - start)
            if left < 20:
                results.append({"label": cmd.label, "status": "not run: budget"})
                log.line(f"{cmd.label}: not run, {left:.0f} s of the budget left")
                continue
            results.append(run_command(cmd, min(cmd.cap_s, left), env, log))
            if part == "ceilings" and results[-1]["status"] == "ok":
                line = next(x for x in results[-1]["tail"] if x.startswith("CEILINGS"))
                report["ceilings"] = json.loads(line.removeprefix("CEILINGS"))
        statuses = {r["status"] for r in results}
        report["parts"][part] = {
            "status": "ok" if statuses == {"ok"} else ",".join(sorted(statuses)),
            "commands": results,
        }
        write_report(out_json, report)
    left = [p for p in PARTS if report["parts"].get(p, {}).get("status") != "ok"]
    report["seconds"] = round(time.perf_counter() - start, 1)
    write_report(out_json, report)
    summary = ", ".join(f"{p}: {report['parts'][p]['status']}" for p in report["parts"])
    log.line(f"gpu_run: {summary}; {report['seconds']:.0f} s; wrote {out_json}")
    if left:
        log.line(f"gpu_run: to finish: bash bench/gpu_run.sh --parts {','.join(left)}")
    return 0 if not left else 1


if __name__ == "__main__":
    sys.exit(main())
