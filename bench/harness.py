"""Shared benchmark harness: timings, peak memory, hardware ceilings and the results file.

Every script in `bench/` measures its providers and the hardware ceilings in the same run, so the
ratios it reports compare like with like:

    ms        median of repeated runs (`triton.testing.do_bench` on CUDA, wall clock on CPU)
    peak      extra memory at the peak over what was allocated before the call (CUDA: the caching
              allocator's counters; CPU: the process's peak resident set, reset through
              `/proc/self/clear_refs`, so it also counts allocator slack)
    ceilings  a large device-to-device copy (GB/s, read + write bytes) and a large matmul
              (TFLOP/s; bf16 on CUDA, fp32 on CPU)

Results are merged into `--out` (default: `bench/<device>.json` under fastrl's cache directory,
`$FASTRL_CACHE` or `~/.cache/fastrl`) under the script's name, with the device, versions, date and
the command line. The committed `bench/results/<device>.json` change only when named:
`--out bench/results/cpu.json`.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_ms(fn: Callable[[], object], device: torch.device, reps: int = 10) -> float:
    """Median milliseconds of `fn` (warm-up calls first).

    On CPU three warm-up calls let glibc's adaptive mmap threshold settle: until then, every large
    output is a fresh mapping whose first-touch page faults can cost more than the op itself.
    """
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _proc_status(key: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{key}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else None


def peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """Extra bytes at the peak of one call of `fn` over what was in use before it.

    None where it cannot be measured (CPU without `/proc/self/clear_refs`).
    """
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        out = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        del out
        return peak
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS to the current RSS
    except OSError:
        return None
    before = _proc_status("VmRSS")
    out = fn()
    peak = _proc_status("VmHWM")
    del out
    return None if before is None or peak is None else max(0, peak - before)


def ceilings(device: torch.device) -> dict[str, float]:
    """Measured copy bandwidth (GB/s) and matmul throughput (TFLOP/s) of `device`."""
    if device.type == "cuda":
        numel, n, dtype = 1 << 30, 8192, torch.bfloat16  # 2 GiB bf16 copy
    else:
        numel, n, dtype = 1 << 27, 2048, torch.float32  # 512 MiB fp32 copy
    src = torch.empty(
        numel, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32, device=device
    ).normal_()
    dst = torch.empty_like(src)
    copy_ms = measure_ms(lambda: dst.copy_(src), device)
    copy_gbs = 2 * src.numel() * src.element_size() / copy_ms / 1e6
    src = dst = None  # free before the matmul buffers
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    mm_ms = measure_ms(lambda: a @ b, device)
    return {
        "copy_GBps": round(copy_gbs, 1),
        "matmul_TFLOPs": round(2 * n**3 / mm_ms / 1e9, 2),
        "matmul_dtype": str(dtype).removeprefix("torch."),
    }


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = ""
    try:
        match = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        model = match.group(1).strip() if match else ""
    except OSError:
        pass
    return f"{model or platform.processor() or 'cpu'} ({torch.get_num_threads()} threads)"


def environment(device: torch.device) -> dict[str, str]:
    info = {
        "device": device_name(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        info["cuda"] = str(torch.version.cuda)
        try:
            import subprocess

            info["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                check=False,
            ).stdout.strip()
        except OSError:
            pass
    return info


def default_out(device: torch.device) -> Path:
    """`bench/<device>.json` under fastrl's cache directory."""
    from fastrl.config import cache_home

    name = device_name(device).lower()
    slug = "cpu" if device.type == "cpu" else re.sub(r"[^a-z0-9]+", "-", name)
    return cache_home() / "bench" / f"{slug.strip('-')}.json"


def add_out_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out",
        default=None,
        help="JSON file the results are merged into (default: bench/<device>.json under "
        "$FASTRL_CACHE or ~/.cache/fastrl; the committed ones: --out bench/results/cpu.json)",
    )


def write_results(
    script: str, device: torch.device, payload: dict, out: str | Path | None = None
) -> Path:
    """Merge `payload` under `script` into `out` (default: `default_out`), atomically."""
    path = Path(out) if out else default_out(device)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(path.read_text()) if path.exists() else {}
    data[script] = {"environment": environment(device), **payload}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def fmt_row(cols: list[object], widths: list[int]) -> str:
    return "  ".join(str(c).rjust(w) for c, w in zip(cols, widths, strict=False))
